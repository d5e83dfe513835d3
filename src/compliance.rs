//! Violations and alerts (`SEMANTICS.md` §4, §6): from a twin's failing rules before and after
//! an event to `opened` / `resolved` transitions, and from a transition to its CloudEvent.
//!
//! Pure: the pipeline keeps the failing set of every twin and calls [`transitions`] after each
//! evaluation; alerts are rendered here so that every sink sends the same bytes.

use serde_json::json;

use crate::model::TwinKey;
use crate::policy::{Policy, Severity};
use crate::time::Ticks;

/// A rule failing on a twin, as kept in memory and stored: what its `opened` alert said.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    pub rule_id: Box<str>,
    pub severity: Severity,
    pub title: Box<str>,
    /// The opTime of the event that opened it.
    pub since: Ticks,
    /// The twin's version after that event.
    pub twin_version: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    Opened,
    Resolved,
    /// Resolved because the twin was removed (`reason: "deleted"`).
    Deleted,
}

/// One transition of one (twin, rule).
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub kind: AlertKind,
    pub rule_id: Box<str>,
    pub severity: Severity,
    pub title: Box<str>,
}

/// Compares a twin's stored failing set with the rules failing now (`failing`: indices into
/// `policy.rules()`, in policy order), updates the set, and appends the transitions, opened
/// and resolved alike, in policy order; rules no longer in the policy resolve after them.
/// `time` and `version` are those of the event.
pub fn transitions(
    policy: &Policy,
    stored: &mut Vec<Violation>,
    failing: &[usize],
    time: Ticks,
    version: i64,
    out: &mut Vec<Transition>,
) {
    if stored.is_empty() && failing.is_empty() {
        return;
    }
    let rules = policy.rules();
    // Each change with its rule's place in the policy (rules no longer in it go last).
    let mut changes: Vec<(usize, Transition)> = Vec::new();
    let mut next: Vec<Violation> = Vec::with_capacity(failing.len());
    for &i in failing {
        let rule = &rules[i];
        match stored.iter().position(|v| *v.rule_id == *rule.id) {
            Some(p) => next.push(stored.swap_remove(p)),
            None => {
                changes.push((
                    i,
                    Transition {
                        kind: AlertKind::Opened,
                        rule_id: rule.id.as_str().into(),
                        severity: rule.severity,
                        title: rule.title.as_str().into(),
                    },
                ));
                next.push(Violation {
                    rule_id: rule.id.as_str().into(),
                    severity: rule.severity,
                    title: rule.title.as_str().into(),
                    since: time,
                    twin_version: version,
                });
            }
        }
    }
    for old in stored.drain(..) {
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
            },
        ));
    }
    changes.sort_by(|a, b| (a.0, &a.1.rule_id).cmp(&(b.0, &b.1.rule_id)));
    out.extend(changes.into_iter().map(|(_, t)| t));
    *stored = next;
}

/// The transitions of a removed twin: every failing rule resolves with reason `deleted`, in
/// the stored (policy) order.
pub fn deleted(stored: Vec<Violation>, out: &mut Vec<Transition>) {
    for old in stored {
        out.push(Transition {
            kind: AlertKind::Deleted,
            rule_id: old.rule_id,
            severity: old.severity,
            title: old.title,
        });
    }
}

/// Renders one alert as a CloudEvents 1.0 structured JSON object (`SEMANTICS.md` §6), one line;
/// `enqueued`, the causing event's Event Hubs enqueued time, becomes the extension attribute
/// `enqueuedtime`.
pub fn cloud_event(
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
    if transition.kind == AlertKind::Deleted {
        data["reason"] = json!("deleted");
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
        // An extension attribute: when the causing event reached the Event Hub, so that the
        // time from enqueue to alert can be measured wherever the alert arrives.
        event["enqueuedtime"] = json!(enqueued.to_string());
    }
    serde_json::to_vec(&event).expect("a JSON value always serializes")
}

/// Stored form of a [`Violation`] (the `violations` column family's values).
pub fn encode_violation(v: &Violation) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "severity": v.severity.as_str(),
        "title": &*v.title,
        "since": v.since.0,
        "twinVersion": v.twin_version,
    }))
    .expect("a JSON value always serializes")
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

pub fn decode_violation(rule_id: &str, bytes: &[u8]) -> Option<Violation> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(Violation {
        rule_id: rule_id.into(),
        severity: Severity::parse(v["severity"].as_str()?)?,
        title: v["title"].as_str()?.into(),
        since: Ticks(v["since"].as_i64()?),
        twin_version: v["twinVersion"].as_i64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let text = r#"
rules:
  - {id: a, severity: low, check: {path: /tags/a, op: absent}}
  - {id: b, severity: high, title: B rule, check: {path: /tags/b, op: absent}}
"#;
        Policy::from_sources(&[("p.yaml".into(), text.into())]).expect("valid")
    }

    #[test]
    fn only_changes_are_transitions() {
        let policy = policy();
        let mut stored = Vec::new();
        let mut out = Vec::new();
        transitions(&policy, &mut stored, &[0, 1], Ticks(1), 1, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![(AlertKind::Opened, "a"), (AlertKind::Opened, "b")]
        );
        out.clear();
        transitions(&policy, &mut stored, &[0, 1], Ticks(2), 2, &mut out);
        assert!(out.is_empty(), "failing to failing is no alert");
        transitions(&policy, &mut stored, &[1], Ticks(3), 3, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![(AlertKind::Resolved, "a")]
        );
        assert_eq!(stored.len(), 1);
        out.clear();
        transitions(&policy, &mut stored, &[0], Ticks(4), 4, &mut out);
        assert_eq!(
            out.iter()
                .map(|t| (t.kind, &*t.rule_id))
                .collect::<Vec<_>>(),
            vec![(AlertKind::Opened, "a"), (AlertKind::Resolved, "b")],
            "opened and resolved interleave in policy order"
        );
        out.clear();
        transitions(&policy, &mut stored, &[0, 1], Ticks(5), 5, &mut out);
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
        }];
        let mut out = Vec::new();
        transitions(&policy, &mut stored, &[1], Ticks(5), 2, &mut out);
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
