//! The violation side of the apply thread: evaluating a changed twin, turning the change of
//! its failing set into transitions and stored violations (open and pending, with the
//! deadline index and the counts by rule), firing pending violations whose deadline has come
//! (`docs/semantics.md` §9), and numbering and queueing alerts (their ids derive from their
//! [`Origin`]).

use std::collections::BTreeMap;

use super::snapshot::Directory;
use super::{Deadlines, FailingCounts, PipelineError, SourceHandle, State, ViolationSets};
use crate::compliance::{self, Transition, Violation};
use crate::model::TwinKey;
use crate::policy::{Policy, TwinView};
use crate::store::keys::{decode_twin_key, encode_twin_key, twin_key};
use crate::store::{Store, StoreError, StoredViolation};
use crate::time::Ticks;

impl State {
    /// Evaluates the policy on a live twin into `self.transitions`, updating its stored
    /// violations; nothing when the twin does not exist.
    pub(super) fn evaluate(
        &mut self,
        key: TwinKey<'_>,
        time: Ticks,
        origin: &Origin<'_>,
    ) -> Result<(), PipelineError> {
        self.transitions.clear();
        if self.options.policy.candidates(key.module_id).is_empty() {
            self.key_buf.clear();
            encode_twin_key(key, &mut self.key_buf);
            if !self.violations.contains_key(&self.key_buf[..]) {
                return Ok(());
            }
        }
        let policy = self.options.policy.clone();
        let modules = device_modules(&self.snapshot.directory, key);
        let Some((version, doc)) = self.snapshot.live_doc(key)? else {
            return Ok(());
        };
        self.failing.clear();
        failing_rules(&policy, &modules, key, version, &doc, &mut self.failing);
        drop(doc);
        self.update_violations(key, version, time, origin)
    }

    /// A twin evaluated elsewhere (a pass's evaluator thread, `scan.rs`): its failing rules
    /// become its violations and alerts at `time`, as [`State::evaluate`]'s would.
    pub(super) fn take_evaluation(
        &mut self,
        key: TwinKey<'_>,
        version: i64,
        failing: Vec<usize>,
        time: Ticks,
        origin: &Origin<'_>,
    ) -> Result<(), PipelineError> {
        self.transitions.clear();
        // The evaluator's failing set, kept as this twin's (its buffer replaces ours).
        self.failing = failing;
        self.update_violations(key, version, time, origin)?;
        self.emit(origin, key, time, 0)?;
        Ok(())
    }

    /// Turns `self.failing` (the rules failing now on the twin at `version`) into transitions
    /// (`self.transitions`) and the stored violations' changes; `origin` names the pending
    /// violations it starts.
    pub(super) fn update_violations(
        &mut self,
        key: TwinKey<'_>,
        version: i64,
        time: Ticks,
        origin: &Origin<'_>,
    ) -> Result<(), PipelineError> {
        let policy = self.options.policy.clone();
        let encoded = twin_key(key);
        let stored = self.violations.get_mut(&encoded[..]);
        match &stored {
            None if self.failing.is_empty() => return Ok(()),
            Some(stored) if compliance::unchanged(&policy, stored, &self.failing) => {
                self.twin_version = version;
                return Ok(());
            }
            _ => {}
        }
        let mut current = stored.map(std::mem::take).unwrap_or_default();
        let before = current.clone();
        let sources = &self.sources;
        let pending_id = |rule_id: &str| -> Box<str> {
            match origin {
                Origin::Event { source, index } => {
                    // Built piece by piece: this runs for every violation that becomes pending.
                    let name = &sources[source.0].alert_name;
                    let mut id = String::with_capacity(name.len() + 22 + rule_id.len());
                    id.push_str(name);
                    id.push('#');
                    id.push_str(itoa::Buffer::new().format(*index));
                    id.push('/');
                    id.push_str(rule_id);
                    id.into()
                }
                Origin::Reaudit { prefix } => {
                    format!("{prefix}/{}#{rule_id}.pending", escaped_key(key)).into()
                }
                Origin::Seed { prefix } => {
                    format!("{prefix}/{}/v{version}#{rule_id}.pending", escaped_key(key)).into()
                }
                // A violation opening evaluates nothing; named after its own alert all the same.
                Origin::Fixed { id } => format!("{id}/{rule_id}").into(),
            }
        };
        self.counters.pending_dropped += compliance::transitions(
            &policy,
            &mut current,
            &self.failing,
            time,
            version,
            &pending_id,
            &mut self.transitions,
        );
        for old in &before {
            let now = current.iter().find(|v| v.rule_id == old.rule_id);
            if now.is_some_and(|now| now.pending.is_some() == old.pending.is_some()) {
                continue;
            }
            // Gone, or moved between pending and open: off the old state's books.
            self.forget_violation(&encoded, old)?;
        }
        for violation in &current {
            let old = before.iter().find(|v| v.rule_id == violation.rule_id);
            match old {
                Some(old) if old == violation => {}
                Some(old) if old.pending.is_some() == violation.pending.is_some() => {
                    // The same state with another severity, title or deadline (a re-audit).
                    if let (Some(was), Some(is)) = (&old.pending, &violation.pending) {
                        let place = policy.rule_index(&violation.rule_id).unwrap_or(usize::MAX);
                        self.deadlines.remove(&(
                            was.deadline,
                            encoded.clone().into_boxed_slice(),
                            place,
                        ));
                        self.deadlines.insert((
                            is.deadline,
                            encoded.clone().into_boxed_slice(),
                            place,
                        ));
                    }
                    self.store_violation(&encoded, violation)?;
                }
                _ => self.record_violation(&encoded, violation)?,
            }
        }
        if current.is_empty() {
            self.violations.remove(&encoded[..]);
        } else {
            self.violations.insert(encoded.into_boxed_slice(), current);
        }
        self.twin_version = version;
        Ok(())
    }

    /// Writes a violation into the batch, in the column family of its state.
    pub(super) fn store_violation(
        &mut self,
        encoded: &[u8],
        violation: &Violation,
    ) -> Result<(), PipelineError> {
        self.store
            .put_violation(&mut self.batch, encoded, violation)?;
        Ok(())
    }

    /// A rule's place in the policy, the deadline index's tie-break (a rule the policy no
    /// longer has sorts last).
    fn rule_place(&self, rule_id: &str) -> usize {
        self.options
            .policy
            .rule_index(rule_id)
            .unwrap_or(usize::MAX)
    }

    /// A violation that was not in this state before: stored, counted, indexed.
    pub(super) fn record_violation(
        &mut self,
        encoded: &[u8],
        violation: &Violation,
    ) -> Result<(), PipelineError> {
        match &violation.pending {
            Some(pending) => {
                let place = self.rule_place(&violation.rule_id);
                self.deadlines
                    .insert((pending.deadline, encoded.into(), place));
                *self
                    .pending_counts
                    .entry(violation.rule_id.clone())
                    .or_insert(0) += 1;
            }
            None => {
                self.failing_counts
                    .entry(violation.rule_id.clone())
                    .or_insert((violation.severity, 0))
                    .1 += 1;
            }
        }
        self.store_violation(encoded, violation)
    }

    /// Takes a violation in its stored state off the books: the store, the counts, the index.
    pub(super) fn forget_violation(
        &mut self,
        encoded: &[u8],
        violation: &Violation,
    ) -> Result<(), PipelineError> {
        match &violation.pending {
            Some(pending) => {
                let place = self.rule_place(&violation.rule_id);
                self.deadlines
                    .remove(&(pending.deadline, encoded.into(), place));
                if let Some(n) = self.pending_counts.get_mut(&violation.rule_id) {
                    *n = n.saturating_sub(1);
                }
                self.store
                    .delete_pending(&mut self.batch, encoded, &violation.rule_id)?;
            }
            None => {
                if let Some((_, n)) = self.failing_counts.get_mut(&violation.rule_id) {
                    *n = n.saturating_sub(1);
                }
                self.store
                    .delete_violation(&mut self.batch, encoded, &violation.rule_id)?;
            }
        }
        Ok(())
    }

    /// Opens, in order, every pending violation whose deadline is not after `until`
    /// (`docs/semantics.md` §9): an `opened` alert timed at its deadline, with the id and twin
    /// version fixed when it became pending.
    pub(super) fn fire_until(&mut self, until: Ticks) -> Result<(), PipelineError> {
        while let Some(first) = self.deadlines.first() {
            if first.0 > until {
                break;
            }
            let Some((deadline, encoded, place)) = self.deadlines.pop_first() else {
                break;
            };
            let Some(set) = self.violations.get_mut(&encoded) else {
                continue;
            };
            // The entry names its rule by place in the policy: two rules may share a deadline.
            let policy = &self.options.policy;
            let Some(violation) = set.iter_mut().find(|v| {
                v.pending.as_ref().is_some_and(|p| p.deadline == deadline)
                    && policy.rule_index(&v.rule_id).unwrap_or(usize::MAX) == place
            }) else {
                continue;
            };
            let was_pending = violation.clone();
            let Some(pending) = violation.pending.take() else {
                continue;
            };
            let opened = violation.clone();
            // Off the pending books (the index entry is already taken), onto the open ones.
            self.forget_violation(&encoded, &was_pending)?;
            self.record_violation(&encoded, &opened)?;
            self.counters.pending_opened += 1;
            let owned = decode_twin_key(&encoded).ok_or_else(|| StoreError::bad_key(&encoded))?;
            self.transitions.clear();
            self.transitions.push(Transition {
                kind: compliance::AlertKind::Opened,
                rule_id: opened.rule_id.clone(),
                severity: opened.severity,
                title: opened.title.clone(),
                reason: None,
                twin_version: Some(opened.twin_version),
            });
            let origin = Origin::Fixed {
                id: &pending.alert_id,
            };
            self.emit_with_version(&origin, owned.as_key(), deadline, opened.twin_version, 0)?;
            crate::failpoint::hit(crate::failpoint::TIMER_AFTER_FIRE);
        }
        Ok(())
    }

    /// A removed twin's violations resolve (reason `deleted`) into `self.transitions`; its
    /// pending ones are dropped.
    pub(super) fn remove_violations(&mut self, key: TwinKey<'_>) -> Result<(), PipelineError> {
        self.transitions.clear();
        let encoded = twin_key(key);
        if let Some(stored) = self.violations.remove(&encoded[..]) {
            for violation in &stored {
                self.forget_violation(&encoded, violation)?;
            }
            self.counters.pending_dropped += compliance::deleted(stored, &mut self.transitions);
        }
        Ok(())
    }

    pub(super) fn emit(
        &mut self,
        origin: &Origin<'_>,
        key: TwinKey<'_>,
        time: Ticks,
        n_before: usize,
    ) -> Result<usize, PipelineError> {
        let version = self.twin_version;
        self.emit_with_version(origin, key, time, version, n_before)
    }

    /// Counts `self.transitions` as alerts of `origin`, numbered from `n_before`, and queues
    /// them when a sink will deliver them. Returns the origin's alert count so far.
    pub(super) fn emit_with_version(
        &mut self,
        origin: &Origin<'_>,
        key: TwinKey<'_>,
        time: Ticks,
        version: i64,
        n_before: usize,
    ) -> Result<usize, PipelineError> {
        // A re-audit's and a seed pass's alerts were caused by no event: they carry no
        // enqueued time, whatever event the engine applied last.
        let enqueued = match origin {
            Origin::Event { .. } | Origin::Fixed { .. } => self.enqueued_time,
            Origin::Reaudit { .. } | Origin::Seed { .. } => None,
        };
        let mut n = n_before;
        for mut transition in std::mem::take(&mut self.transitions) {
            match transition.kind {
                compliance::AlertKind::Opened => self.counters.alerts_opened += 1,
                _ => self.counters.alerts_resolved += 1,
            }
            if let Origin::Reaudit { .. } = origin {
                transition.reason = Some(compliance::REASON_POLICY);
            }
            if self.options.queue_alerts {
                let id = match origin {
                    Origin::Event { source, index } => {
                        format!("{}#{}.{}", self.sources[source.0].alert_name, index, n)
                    }
                    Origin::Reaudit { prefix } => {
                        format!("{prefix}/{}#{n}", escaped_key(key))
                    }
                    Origin::Fixed { id } => (*id).to_owned(),
                    Origin::Seed { prefix } => {
                        let what = match transition.kind {
                            compliance::AlertKind::Opened => "opened",
                            compliance::AlertKind::Resolved => "resolved",
                            compliance::AlertKind::Deleted => "removed",
                        };
                        format!(
                            "{prefix}/{}/v{version}#{}.{what}",
                            escaped_key(key),
                            transition.rule_id
                        )
                    }
                };
                let alert = compliance::cloud_event(
                    &id,
                    key,
                    &transition,
                    time,
                    transition.twin_version.unwrap_or(version),
                    enqueued,
                );
                self.store
                    .put_outbox(&mut self.batch, self.next_outbox_seq, &alert)?;
                self.next_outbox_seq += 1;
                self.outbox_grew = true;
            }
            n += 1;
        }
        Ok(n)
    }
}

/// What caused an alert: its id derives from this (`docs/semantics.md` §4, §7, §8).
pub(super) enum Origin<'a> {
    /// An event: the source and its position.
    Event { source: SourceHandle, index: u64 },
    /// A re-audit: `policy:<re-audits before it>:<fingerprint prefix>`.
    Reaudit { prefix: &'a str },
    /// A seed pass's evaluation or removal: `seed:<hub>@<as-of>`.
    Seed { prefix: &'a str },
    /// A pending violation opening: the id it was given when it became pending.
    Fixed { id: &'a str },
}

/// A part of an alert id with `%`, `/` and `#` percent-escaped, so that distinct parts never
/// give the same text.
pub(super) fn escape_id_part(part: &str) -> String {
    part.replace('%', "%25")
        .replace('/', "%2F")
        .replace('#', "%23")
}

/// A twin key in an alert id: `hub/device[/module]`, each part escaped.
pub(super) fn escaped_key(key: TwinKey<'_>) -> String {
    let mut out = format!(
        "{}/{}",
        escape_id_part(key.hub),
        escape_id_part(key.device_id)
    );
    if !key.is_device_twin() {
        out.push('/');
        out.push_str(&escape_id_part(key.module_id));
    }
    out
}

/// A device twin's live modules (its `/$modules`); nothing for a module twin.
pub(super) fn device_modules(directory: &Directory, key: TwinKey<'_>) -> Vec<Box<str>> {
    if key.is_device_twin() {
        directory.live_modules(key.hub, key.device_id)
    } else {
        Vec::new()
    }
}

/// Appends to `failing` the rules failing on the twin `key` at `version` with document `doc`;
/// `modules` are a device twin's live modules (`/$modules`).
pub(super) fn failing_rules(
    policy: &Policy,
    modules: &[Box<str>],
    key: TwinKey<'_>,
    version: i64,
    doc: &crate::value::Map,
    failing: &mut Vec<usize>,
) {
    let modules: Vec<&str> = modules.iter().map(|m| &**m).collect();
    let view = TwinView {
        hub_name: key.hub,
        device_id: key.device_id,
        module_id: key.module_id,
        version,
        doc,
        modules: &modules,
    };
    policy.evaluate(&view, failing);
}

/// Counts the twins failing each rule; every rule of `policy` is listed, at 0 when none fails.
pub(super) fn failing_counts(violations: &ViolationSets, policy: &Policy) -> FailingCounts {
    let mut out: FailingCounts = policy
        .rules()
        .iter()
        .map(|rule| (rule.id.as_str().into(), (rule.severity, 0)))
        .collect();
    for violation in violations
        .values()
        .flatten()
        .filter(|v| v.pending.is_none())
    {
        out.entry(violation.rule_id.clone())
            .or_insert((violation.severity, 0))
            .1 += 1;
    }
    out
}

/// Counts the pending violations by rule id.
pub(super) fn pending_counts(violations: &ViolationSets) -> BTreeMap<Box<str>, u64> {
    let mut out = BTreeMap::new();
    for violation in violations.values().flatten() {
        if violation.pending.is_some() {
            *out.entry(violation.rule_id.clone()).or_insert(0) += 1;
        }
    }
    out
}

/// Indexes every pending violation by deadline (see [`State::deadlines`]).
pub(super) fn deadline_index(violations: &ViolationSets, policy: &Policy) -> Deadlines {
    let mut out = Deadlines::new();
    for (key, set) in violations {
        for violation in set {
            if let Some(pending) = &violation.pending {
                let place = policy.rule_index(&violation.rule_id).unwrap_or(usize::MAX);
                out.insert((pending.deadline, key.clone(), place));
            }
        }
    }
    out
}

/// Loads every twin's violations, open and pending, each twin's in the order of `policy` (rules no longer in it
/// last, by id).
pub(super) fn load_violations(
    store: &Store,
    policy: &Policy,
) -> Result<ViolationSets, PipelineError> {
    let mut out = ViolationSets::default();
    for item in store.violations()?.chain(store.pending_violations()?) {
        let StoredViolation { key, violation } = item?;
        let mut encoded = Vec::new();
        encode_twin_key(key.as_key(), &mut encoded);
        out.entry(encoded.into_boxed_slice())
            .or_default()
            .push(violation);
    }
    let rules = policy.rules();
    let place = |v: &Violation| {
        rules
            .iter()
            .position(|r| *r.id == *v.rule_id)
            .unwrap_or(usize::MAX)
    };
    for violations in out.values_mut() {
        violations.sort_by(|a, b| (place(a), &a.rule_id).cmp(&(place(b), &b.rule_id)));
    }
    Ok(out)
}
