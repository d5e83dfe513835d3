//! Violations and alerts (`docs/semantics.md` §4, §6): from a twin's failing rules before and after
//! an event to `opened` / `resolved` transitions, and from a transition to its CloudEvent.
//!
//! Pure: the pipeline keeps the failing set of every twin and calls [`transitions`] after each
//! evaluation; alerts are rendered here so that every sink sends the same bytes, and read back
//! through the same type ([`wire`]).

pub mod wire;

use crate::model::TwinKey;
/// The failing (twin, rule) and its pending state live in `model`: the store, below this
/// module, encodes them.
pub use crate::model::{Pending, Violation};
use crate::policy::{Policy, Severity};
use crate::time::Ticks;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    Opened,
    Resolved,
    /// Resolved because the twin was removed (`reason: "deleted"`).
    Deleted,
}

/// The `reason` of an alert raised by a re-audit (`docs/semantics.md` §8).
pub const REASON_POLICY: &str = "policy";

/// The `reason` of an alert that resolves a removed twin's violation.
pub const REASON_DELETED: &str = "deleted";

/// One transition of one (twin, rule).
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub kind: AlertKind,
    pub rule_id: Box<str>,
    pub severity: Severity,
    pub title: Box<str>,
    /// The alert's `reason`: `deleted` for a removal, `policy` for a re-audit, else none.
    pub reason: Option<&'static str>,
    /// The twin version the alert carries when it is not the twin's current one (a pending
    /// violation opening: the version at which it began failing).
    pub twin_version: Option<i64>,
}

/// Whether [`transitions`] would change nothing: the stored violations are exactly the
/// failing rules (both in policy order), each with its rule's severity, title and deadline.
/// The common case, checked without copying the set.
pub fn unchanged(policy: &Policy, stored: &[Violation], failing: &[usize]) -> bool {
    let rules = policy.rules();
    stored.len() == failing.len()
        && stored.iter().zip(failing).all(|(violation, &i)| {
            let rule = &rules[i];
            *violation.rule_id == *rule.id
                && violation.severity == rule.severity
                && *violation.title == *rule.title
                && match (&violation.pending, rule.grace) {
                    (None, None) => true,
                    (Some(pending), Some(grace)) => {
                        pending.deadline == Ticks(violation.since.0.saturating_add(grace.0))
                    }
                    _ => false,
                }
        })
}

/// Compares a twin's stored failing set with the rules failing now (`failing`: indices into
/// `policy.rules()`, in policy order), updates the set, and appends the transitions, opened
/// and resolved alike, in policy order; rules no longer in the policy resolve after them.
/// `time` and `version` are those of the event. A rule with `for` starts failing as a
/// pending violation (no transition) whose alert id `pending_id` makes; a pending violation
/// that stops failing is dropped silently. Returns how many were dropped.
pub fn transitions(
    policy: &Policy,
    stored: &mut Vec<Violation>,
    failing: &[usize],
    time: Ticks,
    version: i64,
    pending_id: &dyn Fn(&str) -> Box<str>,
    out: &mut Vec<Transition>,
) -> u64 {
    if stored.is_empty() && failing.is_empty() {
        return 0;
    }
    let rules = policy.rules();
    // Each change with its rule's place in the policy (rules no longer in it go last).
    let mut changes: Vec<(usize, Transition)> = Vec::new();
    let mut next: Vec<Violation> = Vec::with_capacity(failing.len());
    for &i in failing {
        let rule = &rules[i];
        match stored.iter().position(|v| *v.rule_id == *rule.id) {
            Some(p) => {
                // Still failing: it keeps its `since` and version, and takes the rule's
                // severity and title (which differ only after a policy change).
                let mut kept = stored.swap_remove(p);
                if kept.severity != rule.severity || *kept.title != *rule.title {
                    kept.severity = rule.severity;
                    kept.title = rule.title.as_str().into();
                }
                if let Some(pending) = &mut kept.pending {
                    match rule.grace {
                        // A changed `for` moves the deadline (after a policy change).
                        Some(grace) => {
                            pending.deadline = Ticks(kept.since.0.saturating_add(grace.0))
                        }
                        // The rule lost its `for`: the violation opens at once.
                        None => {
                            kept.pending = None;
                            changes.push((i, opened(rule, Some(kept.twin_version))));
                        }
                    }
                }
                next.push(kept);
            }
            None => {
                let pending = rule.grace.map(|grace| Pending {
                    deadline: Ticks(time.0.saturating_add(grace.0)),
                    alert_id: pending_id(&rule.id),
                });
                if pending.is_none() {
                    changes.push((i, opened(rule, None)));
                }
                next.push(Violation {
                    rule_id: rule.id.as_str().into(),
                    severity: rule.severity,
                    title: rule.title.as_str().into(),
                    since: time,
                    twin_version: version,
                    pending,
                });
            }
        }
    }
    let mut dropped = 0;
    for old in stored.drain(..) {
        if old.pending.is_some() {
            dropped += 1;
            continue;
        }
        let place = rules
            .iter()
            .position(|r| *r.id == *old.rule_id)
            .unwrap_or(usize::MAX);
        changes.push((
            place,
            Transition {
                kind: AlertKind::Resolved,
                rule_id: old.rule_id,
                severity: old.severity,
                title: old.title,
                reason: None,
                twin_version: None,
            },
        ));
    }
    changes.sort_by(|a, b| (a.0, &a.1.rule_id).cmp(&(b.0, &b.1.rule_id)));
    out.extend(changes.into_iter().map(|(_, t)| t));
    *stored = next;
    dropped
}

/// The transitions of a removed twin: every failing rule resolves with reason `deleted`, in
/// the stored (policy) order; a pending violation is dropped silently. Returns how many were
/// dropped.
pub fn deleted(stored: Vec<Violation>, out: &mut Vec<Transition>) -> u64 {
    let mut dropped = 0;
    for old in stored {
        if old.pending.is_some() {
            dropped += 1;
            continue;
        }
        out.push(Transition {
            kind: AlertKind::Deleted,
            rule_id: old.rule_id,
            severity: old.severity,
            title: old.title,
            reason: Some(REASON_DELETED),
            twin_version: None,
        });
    }
    dropped
}

/// The `opened` transition of `rule`; `twin_version` is the one fixed when the violation
/// became pending (`None`: the twin's version now).
fn opened(rule: &crate::policy::Rule, twin_version: Option<i64>) -> Transition {
    Transition {
        kind: AlertKind::Opened,
        rule_id: rule.id.as_str().into(),
        severity: rule.severity,
        title: rule.title.as_str().into(),
        reason: None,
        twin_version,
    }
}

/// Renders one alert as a CloudEvents 1.0 structured JSON object (`docs/semantics.md` §6), one line
/// (`data.reason` from the transition: `deleted`, `policy`);
/// `enqueued`, the causing event's Event Hubs enqueued time, becomes the extension attribute
/// `enqueuedtime`. Written from [`wire::CloudEvent`], whose fields are in the byte order the
/// JSON object this used to build wrote them in: the bytes are those alerts always had.
pub fn cloud_event(
    id: &str,
    key: TwinKey<'_>,
    transition: &Transition,
    time: Ticks,
    twin_version: i64,
    enqueued: Option<Ticks>,
) -> Vec<u8> {
    let kind = match transition.kind {
        AlertKind::Opened => wire::OPENED_TYPE,
        AlertKind::Resolved | AlertKind::Deleted => wire::RESOLVED_TYPE,
    };
    let subject = if key.is_device_twin() {
        key.device_id.to_owned()
    } else {
        format!("{}/modules/{}", key.device_id, key.module_id)
    };
    let event = wire::CloudEvent {
        data: wire::ViolationData {
            device_id: key.device_id.to_owned(),
            hub_name: key.hub.to_owned(),
            module_id: (!key.is_device_twin()).then(|| key.module_id.to_owned()),
            reason: transition.reason.map(str::to_owned),
            rule_id: transition.rule_id.to_string(),
            severity: transition.severity.as_str().to_owned(),
            title: transition.title.to_string(),
            twin_version,
        },
        datacontenttype: Some("application/json".to_owned()),
        // An extension attribute: when the causing event reached the Event Hub, so that the
        // time from enqueue to alert can be measured wherever the alert arrives.
        enqueuedtime: enqueued.map(|enqueued| enqueued.to_string()),
        id: id.to_owned(),
        source: format!("/iothub/{}", key.hub),
        specversion: "1.0".to_owned(),
        subject,
        time: time.to_string(),
        kind: kind.to_owned(),
    };
    serde_json::to_vec(&event).expect("strings and integers always serialize")
}

/// A violation as `twinwatch violations` prints it and the query API answers it:
/// `hubName`, `deviceId`, `moduleId` (module twins only), `ruleId`, `severity`, `since`,
/// `twinVersion`.
pub fn violation_line(key: TwinKey<'_>, rule_id: &str, v: &Violation) -> serde_json::Value {
    let mut line = json!({"hubName": key.hub, "deviceId": key.device_id});
    if !key.module_id.is_empty() {
        line["moduleId"] = json!(key.module_id);
    }
    line["ruleId"] = json!(rule_id);
    line["severity"] = json!(v.severity.as_str());
    line["since"] = json!(v.since.to_string());
    line["twinVersion"] = json!(v.twin_version);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The renderer as it was, building a `serde_json::Value` (whose object keys come out
    /// sorted): the bytes every alert has had, which the wire type must keep.
    fn cloud_event_as_before(
        id: &str,
        key: TwinKey<'_>,
        transition: &Transition,
        time: Ticks,
        twin_version: i64,
        enqueued: Option<Ticks>,
    ) -> Vec<u8> {
        let kind = match transition.kind {
            AlertKind::Opened => "io.twinwatch.violation.opened",
            AlertKind::Resolved | AlertKind::Deleted => "io.twinwatch.violation.resolved",
        };
        let subject = if key.is_device_twin() {
            key.device_id.to_owned()
        } else {
            format!("{}/modules/{}", key.device_id, key.module_id)
        };
        let mut data = json!({
            "hubName": key.hub,
            "deviceId": key.device_id,
            "ruleId": &*transition.rule_id,
            "title": &*transition.title,
            "severity": transition.severity.as_str(),
            "twinVersion": twin_version,
        });
        if !key.is_device_twin() {
            data["moduleId"] = json!(key.module_id);
        }
        if let Some(reason) = transition.reason {
            data["reason"] = json!(reason);
        }
        let mut event = json!({
            "specversion": "1.0",
            "id": id,
            "type": kind,
            "source": format!("/iothub/{}", key.hub),
            "subject": subject,
            "time": time.to_string(),
            "datacontenttype": "application/json",
            "data": data,
        });
        if let Some(enqueued) = enqueued {
            event["enqueuedtime"] = json!(enqueued.to_string());
        }
        serde_json::to_vec(&event).expect("serializes")
    }

    /// Every shape of alert (device and module twins; opened, resolved, deleted and a
    /// re-audit's; with and without an enqueued time; text that needs escaping) is written
    /// byte for byte as the JSON value wrote it.
    #[test]
    fn cloud_events_keep_their_bytes() {
        let keys = [
            TwinKey {
                hub: "hub-1",
                device_id: "dev-1",
                module_id: "",
            },
            TwinKey {
                hub: "h\u{e9}b",
                device_id: "d \"quoted\"/x",
                module_id: "azureiotsecurity",
            },
        ];
        let kinds = [
            (AlertKind::Opened, None),
            (AlertKind::Opened, Some(REASON_POLICY)),
            (AlertKind::Resolved, None),
            (AlertKind::Resolved, Some(REASON_POLICY)),
            (AlertKind::Deleted, Some(REASON_DELETED)),
        ];
        let mut compared = 0;
        for key in keys {
            for (kind, reason) in kinds {
                for enqueued in [None, Some(Ticks(638_000_000_000_000_001))] {
                    for (version, time) in [(7, Ticks(638_000_000_000_000_000)), (-1, Ticks(0))] {
                        let transition = Transition {
                            kind,
                            rule_id: "tls-required/\u{1F512}".into(),
                            severity: Severity::Critical,
                            title: "TLS \"must\" be required\n\t<&>".into(),
                            reason,
                            twin_version: None,
                        };
                        let id = "data/a.json#12.3";
                        let new = cloud_event(id, key, &transition, time, version, enqueued);
                        let old =
                            cloud_event_as_before(id, key, &transition, time, version, enqueued);
                        assert_eq!(String::from_utf8_lossy(&new), String::from_utf8_lossy(&old));
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 2 * 5 * 2 * 2);
    }

    fn policy() -> Policy {
        let text = r#"
rules:
  - {id: a, severity: low, check: {path: /tags/a, op: absent}}
  - {id: b, severity: high, title: B rule, check: {path: /tags/b, op: absent}}
"#;
        Policy::from_sources(&[("p.yaml".into(), text.into())]).expect("valid")
    }

    fn no_id(rule: &str) -> Box<str> {
        panic!("no rule of this policy has `for`, yet {rule} was made pending")
    }

    #[test]
    fn only_changes_are_transitions() {
        let policy = policy();
        let mut stored = Vec::new();
        let mut out = Vec::new();
        transitions(&policy, &mut stored, &[0, 1], Ticks(1), 1, &no_id, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![(AlertKind::Opened, "a"), (AlertKind::Opened, "b")]
        );
        out.clear();
        transitions(&policy, &mut stored, &[0, 1], Ticks(2), 2, &no_id, &mut out);
        assert!(out.is_empty(), "failing to failing is no alert");
        transitions(&policy, &mut stored, &[1], Ticks(3), 3, &no_id, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![(AlertKind::Resolved, "a")]
        );
        assert_eq!(stored.len(), 1);
        out.clear();
        transitions(&policy, &mut stored, &[0], Ticks(4), 4, &no_id, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![(AlertKind::Opened, "a"), (AlertKind::Resolved, "b")],
            "opened and resolved interleave in policy order"
        );
        out.clear();
        transitions(&policy, &mut stored, &[0, 1], Ticks(5), 5, &no_id, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![(AlertKind::Opened, "b")]
        );
        stored.retain(|v| &*v.rule_id == "b");
        assert_eq!((stored[0].since, stored[0].twin_version), (Ticks(5), 5));
        out.clear();
        deleted(std::mem::take(&mut stored), &mut out);
        assert_eq!(out[0].kind, AlertKind::Deleted);
        assert_eq!(&*out[0].title, "B rule");
    }

    #[test]
    fn a_rule_gone_from_the_policy_resolves_last() {
        let policy = policy();
        let mut stored = vec![Violation {
            rule_id: "zz-removed".into(),
            severity: Severity::Low,
            title: "gone".into(),
            since: Ticks(0),
            twin_version: 1,
            pending: None,
        }];
        let mut out = Vec::new();
        transitions(&policy, &mut stored, &[1], Ticks(5), 2, &no_id, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![
                (AlertKind::Opened, "b"),
                (AlertKind::Resolved, "zz-removed")
            ]
        );
    }
}
