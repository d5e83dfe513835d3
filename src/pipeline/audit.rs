//! Re-auditing the snapshot under a changed policy (`docs/semantics.md` §8).
//!
//! The store records the fingerprint of the policy its violations were computed with. When the
//! engine's policy has another (or none is recorded), every twin is evaluated again, in key
//! order, before anything else is applied. Progress (the last twin covered) is committed with
//! the violations and alerts it produced, and the new fingerprint only once every twin is
//! covered, so a re-audit interrupted at any point resumes where its last batch ended.

use serde::{Deserialize, Serialize};

use super::scan::{evaluate_in_order, Audited, Scope};
use super::{
    deadline_index, failing_counts, pending_counts, store_ticks, Origin, PipelineError, State,
};
use crate::store::keys::{
    META_HIGH_WATER, META_POLICY_FINGERPRINT, META_REAUDITS_DONE, META_REAUDIT_PROGRESS,
};
use crate::store::StoreError;

/// What a re-audit did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReauditReport {
    /// Twins evaluated by this run (a resumed re-audit counts only what it covered).
    pub twins: u64,
    pub alerts_opened: u64,
    pub alerts_resolved: u64,
    /// It went on from an interrupted re-audit under the same policy.
    pub resumed: bool,
}

/// The progress of an unfinished re-audit, as committed.
#[derive(Serialize, Deserialize)]
struct Progress {
    fingerprint: String,
    /// The encoded key of the last twin covered, in hex.
    after: String,
}

impl State {
    /// Re-audits every twin when the snapshot's recorded fingerprint is not the policy's.
    pub(super) fn reaudit_if_needed(
        &mut self,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<ReauditReport>, PipelineError> {
        let policy = self.options.policy.clone();
        let fingerprint = policy.fingerprint().to_owned();
        if self.store.meta(META_POLICY_FINGERPRINT)?.as_deref() == Some(fingerprint.as_bytes()) {
            return Ok(None);
        }
        // Everything applied so far is in the store, which the re-audit reads in key order.
        self.flush()?;
        let resume_after = match self.store.meta(META_REAUDIT_PROGRESS)? {
            Some(raw) => serde_json::from_slice::<Progress>(&raw)
                .ok()
                .filter(|p| p.fingerprint == fingerprint)
                .and_then(|p| hex_decode(&p.after)),
            None => None,
        };
        let n_done = match self.store.meta(META_REAUDITS_DONE)? {
            Some(raw) => {
                u64::from_be_bytes(raw.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    what: "re-audit count",
                    detail: format!("{} bytes", raw.len()),
                })?)
            }
            None => 0,
        };
        let prefix = format!("policy:{n_done}:{}", &fingerprint[..12]);
        let origin = Origin::Reaudit { prefix: &prefix };
        let time = self.high_water;
        let mut report = ReauditReport {
            resumed: resume_after.is_some(),
            ..ReauditReport::default()
        };
        let (opened_before, resolved_before) =
            (self.counters.alerts_opened, self.counters.alerts_resolved);
        let started = std::time::Instant::now();
        // A new, empty snapshot just records its policy.
        let quiet = self.snapshot.directory.n_live() == 0;
        if !quiet {
            tracing::info!(
                fingerprint = %fingerprint,
                resumed = report.resumed,
                "the policy differs from the one the snapshot was computed with: re-auditing every twin"
            );
        }
        let store = self.store.clone();
        let from = resume_after.clone().unwrap_or_default();
        let mut n_in_batch = 0usize;
        // Other threads read, decode and evaluate the twins in key order while this one turns
        // their failing sets into violations and alerts. (Nothing is in flight: the store is
        // the snapshot.)
        evaluate_in_order(&store, Scope::From(&from), &policy, |audited| {
            let Audited {
                encoded,
                key: owned,
                version,
                failing,
            } = audited;
            if resume_after.as_deref() == Some(&encoded[..]) {
                return Ok(());
            }
            self.take_evaluation(owned.as_key(), version, failing, time, &origin)?;
            report.twins += 1;
            n_in_batch += 1;
            if n_in_batch >= self.options.batch_messages {
                self.put_progress(&fingerprint, Some(&encoded))?;
                crate::failpoint::hit(crate::failpoint::REAUDIT_BEFORE_COMMIT);
                self.commit()?;
                n_in_batch = 0;
                progress(report.twins);
            }
            Ok(())
        })?;
        self.store.put_meta(
            &mut self.batch,
            META_POLICY_FINGERPRINT,
            fingerprint.as_bytes(),
        )?;
        self.store
            .delete_meta(&mut self.batch, META_REAUDIT_PROGRESS)?;
        self.store.put_meta(
            &mut self.batch,
            META_REAUDITS_DONE,
            &(n_done + 1).to_be_bytes(),
        )?;
        // Rules no longer in the policy are gone from every twin now, and the others may have
        // moved: the counts and the deadline index start again from the violations.
        self.failing_counts = failing_counts(&self.violations, &policy);
        self.pending_counts = pending_counts(&self.violations);
        self.deadlines = deadline_index(&self.violations, &policy);
        // A changed `for` may have moved deadlines to or before the clock.
        self.enqueued_time = None;
        self.fire_until(self.high_water)?;
        crate::failpoint::hit(crate::failpoint::REAUDIT_BEFORE_COMMIT);
        self.flush()?;
        progress(report.twins);
        report.alerts_opened = self.counters.alerts_opened - opened_before;
        report.alerts_resolved = self.counters.alerts_resolved - resolved_before;
        let seconds = started.elapsed().as_secs_f64();
        if quiet {
            return Ok(Some(report));
        }
        tracing::info!(
            twins = report.twins,
            opened = report.alerts_opened,
            resolved = report.alerts_resolved,
            seconds,
            twins_per_second = (report.twins as f64 / seconds.max(1e-9)) as u64,
            "re-audit done"
        );
        Ok(Some(report))
    }

    fn put_progress(
        &mut self,
        fingerprint: &str,
        last: Option<&[u8]>,
    ) -> Result<(), PipelineError> {
        let Some(last) = last else {
            return Ok(());
        };
        let progress = Progress {
            fingerprint: fingerprint.to_owned(),
            after: last.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let value = serde_json::to_vec(&progress).map_err(|e| StoreError::Corrupt {
            what: "re-audit progress",
            detail: e.to_string(),
        })?;
        self.store
            .put_meta(&mut self.batch, META_REAUDIT_PROGRESS, &value)?;
        Ok(())
    }
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One rule's line in a dry run (`twinwatch audit`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RulePlan {
    pub rule_id: String,
    /// The rule is in the new policy (else the snapshot's violations name a rule it dropped).
    pub in_policy: bool,
    /// The rule's severity under the new policy (for a removed rule, as stored).
    pub severity: String,
    pub failing_now: u64,
    pub failing_after: u64,
    pub to_open: u64,
    pub to_resolve: u64,
}

/// What a re-audit under another policy would do (`twinwatch audit`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditPlan {
    /// The fingerprint the snapshot was computed with (`None`: none recorded).
    pub current_fingerprint: Option<String>,
    pub new_fingerprint: String,
    pub twins: u64,
    /// The new policy's rules in order, then the rules only the snapshot knows, by id.
    pub rules: Vec<RulePlan>,
}

/// Evaluates every twin of a (read-only) store under `policy` and compares with the stored
/// violations, changing nothing.
pub fn plan(
    store: &crate::store::Store,
    policy: &crate::policy::Policy,
) -> Result<AuditPlan, PipelineError> {
    use std::collections::{BTreeMap, HashMap};
    // Every twin's failing rules now, by encoded key.
    let mut now: HashMap<Vec<u8>, Vec<(String, String)>> = HashMap::new();
    for item in store.violations()? {
        let crate::store::StoredViolation { key, violation } = item?;
        let severity = violation.severity.as_str().to_owned();
        now.entry(crate::store::keys::twin_key(key.as_key()))
            .or_default()
            .push((violation.rule_id.into(), severity));
    }
    // Pending violations (`docs/semantics.md` §9) by encoded key: (rule, since). A re-audit opens
    // a failure of a rule with `for` only when it has lasted `for` by the clock; the others
    // are (or stay) pending, no alert.
    let mut pending: HashMap<Vec<u8>, Vec<(String, crate::time::Ticks)>> = HashMap::new();
    for item in store.pending_violations()? {
        let crate::store::StoredViolation { key, violation } = item?;
        pending
            .entry(crate::store::keys::twin_key(key.as_key()))
            .or_default()
            .push((violation.rule_id.into(), violation.since));
    }
    let clock = store_ticks(store, META_HIGH_WATER)?.unwrap_or_default();
    let rules = policy.rules();
    let mut by_rule: BTreeMap<String, RulePlan> = BTreeMap::new();
    for rule in rules {
        by_rule.insert(
            rule.id.clone(),
            RulePlan {
                rule_id: rule.id.clone(),
                in_policy: true,
                severity: rule.severity.as_str().to_owned(),
                ..RulePlan::default()
            },
        );
    }
    let mut twins = 0u64;
    // As in a re-audit, other threads read and evaluate the twins while this one compares.
    evaluate_in_order(store, Scope::From(&[]), policy, |audited| {
        let Audited {
            encoded, failing, ..
        } = audited;
        twins += 1;
        let failing_now = now.remove(&encoded).unwrap_or_default();
        let pending_now = pending.remove(&encoded).unwrap_or_default();
        for &i in &failing {
            let rule = &rules[i];
            let plan = by_rule.get_mut(&rule.id).expect("every rule has a plan");
            plan.failing_after += 1;
            if failing_now.iter().any(|(id, _)| *id == rule.id) {
                continue;
            }
            let opens = match rule.grace {
                None => true,
                // Pending since then (a new failure: since the clock), due by the clock.
                Some(grace) => {
                    let since = pending_now
                        .iter()
                        .find(|(id, _)| *id == rule.id)
                        .map_or(clock, |&(_, since)| since);
                    since.0.saturating_add(grace.0) <= clock.0
                }
            };
            if opens {
                plan.to_open += 1;
            }
        }
        for (rule_id, severity) in failing_now {
            let plan = by_rule.entry(rule_id.clone()).or_insert_with(|| RulePlan {
                rule_id: rule_id.clone(),
                in_policy: false,
                severity,
                ..RulePlan::default()
            });
            plan.failing_now += 1;
            let still = failing.iter().any(|&i| rules[i].id == rule_id);
            if !still {
                plan.to_resolve += 1;
            }
        }
        Ok(())
    })?;
    let current_fingerprint = store
        .meta(META_POLICY_FINGERPRINT)?
        .map(|raw| String::from_utf8_lossy(&raw).into_owned());
    let mut out: Vec<RulePlan> = rules
        .iter()
        .filter_map(|rule| by_rule.remove(&rule.id))
        .collect();
    out.extend(by_rule.into_values());
    Ok(AuditPlan {
        current_fingerprint,
        new_fingerprint: policy.fingerprint().to_owned(),
        twins,
        rules: out,
    })
}
