//! Seed passes (`docs/semantics.md` §7): twin documents as IoT Hub's twin query returns them,
//! applied through the same snapshot and batches as events; then, for a complete pass, the
//! twins of the hub that the pass did not see are reconciled away; then every twin the pass
//! touched is evaluated once, in key order, at the pass's as-of time.
//!
//! The touched keys are durable (`seed_touched`, written in the batch that applied the
//! document), and so is the pass itself (`seed_pass`): a pass interrupted by a crash goes on
//! when the same pass (hub and as-of time) is run again, and what it applied before is
//! evaluated with the rest at its end; opened for anything else, the data directory first
//! evaluates what the interrupted pass applied, as an incomplete pass does.

use std::collections::BTreeMap;
use std::hash::BuildHasher as _;

use foldhash::fast::RandomState;
use serde::{Deserialize, Serialize};
use simd_json::Node;

use super::scan::{evaluate_in_order, Scope};
use super::{Engine, Origin, PipelineError, State};
use crate::decode::decode_document_checked;
use crate::model::{DeadLetterReason, Slot, TwinKey};
use crate::store::keys::{decode_twin_key, twin_key, META_SEEDED_PREFIX, META_SEED_PASS};
use crate::store::StoreError;
use crate::time::Ticks;
use crate::twin::{apply_document, document_is_stale, Outcome, Twins as _};

/// What a seed pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedCounters {
    pub documents: u64,
    pub applied: u64,
    pub stale: u64,
    pub dead_lettered: BTreeMap<DeadLetterReason, u64>,
    /// Twins removed by reconciling.
    pub removed: u64,
    /// Twins evaluated at the end of the pass.
    pub evaluated: u64,
    pub alerts_opened: u64,
    pub alerts_resolved: u64,
}

impl SeedCounters {
    pub fn n_dead_lettered(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

/// A seed pass under way; see [`Engine::begin_seed`].
pub struct SeedPass {
    hub: Box<str>,
    as_of: Ticks,
    /// The pass as a source: dead letters are stored under it, by document number.
    source_text: String,
    /// The (device id, module id) of every document read, stale ones included.
    seen: SeenKeys,
    next_index: u64,
    counters: SeedCounters,
    /// Once the pass is ending ([`Engine::begin_end_seed`]): the touched twins' encoded keys
    /// not yet evaluated, in key order.
    touched: Option<std::vec::IntoIter<Vec<u8>>>,
}

impl SeedPass {
    pub fn hub(&self) -> &str {
        &self.hub
    }

    pub fn as_of(&self) -> Ticks {
        self.as_of
    }

    pub fn counters(&self) -> &SeedCounters {
        &self.counters
    }

    /// Whether the pass is ending: its documents are all in ([`Engine::begin_end_seed`]),
    /// and this many touched twins are left to evaluate.
    pub fn ending(&self) -> Option<usize> {
        self.touched.as_ref().map(ExactSizeIterator::len)
    }

    /// The pass (hub, as-of time) a data directory holds open: one that was interrupted
    /// before its end (a crash, or a service stopped mid-pass). Read before [`Engine::new`]
    /// so that the caller can continue it (`EngineOptions::continue_seed`) rather than have
    /// it evaluated as an incomplete pass.
    pub fn stored(store: &crate::store::Store) -> Result<Option<(String, Ticks)>, PipelineError> {
        let Some(raw) = store.meta(META_SEED_PASS)? else {
            return Ok(None);
        };
        let pass: StoredPass = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt {
            what: "seed pass",
            detail: e.to_string(),
        })?;
        Ok(Some((pass.hub, Ticks(pass.as_of))))
    }
}

/// The (device id, module id) pairs a pass read, for reconciling: a set that keeps the ids'
/// bytes back to back in one buffer, so that remembering a document allocates nothing (a set
/// of `(Box<str>, Box<str>)` cost two allocations per document, and a large pass holds
/// hundreds of thousands). Membership compares the ids themselves, never only a hash.
#[derive(Default)]
struct SeenKeys {
    /// Every pair's device id then module id.
    bytes: Vec<u8>,
    /// Per pair: where it starts in `bytes`, its device id's length and its module id's.
    table: hashbrown::HashTable<(usize, usize, usize)>,
    hasher: RandomState,
}

impl SeenKeys {
    fn hash(hasher: &RandomState, device_id: &[u8], module_id: &[u8]) -> u64 {
        hasher.hash_one((device_id, module_id))
    }

    /// The ids of an entry of `table`.
    fn ids<'b>(
        bytes: &'b [u8],
        &(at, device, module): &(usize, usize, usize),
    ) -> (&'b [u8], &'b [u8]) {
        let device_end = at + device;
        (
            &bytes[at..device_end],
            &bytes[device_end..device_end + module],
        )
    }

    fn insert(&mut self, device_id: &str, module_id: &str) {
        let (device_id, module_id) = (device_id.as_bytes(), module_id.as_bytes());
        let hash = Self::hash(&self.hasher, device_id, module_id);
        let (bytes, hasher) = (&self.bytes, &self.hasher);
        let entry = self.table.entry(
            hash,
            |entry| Self::ids(bytes, entry) == (device_id, module_id),
            |entry| {
                let (device_id, module_id) = Self::ids(bytes, entry);
                Self::hash(hasher, device_id, module_id)
            },
        );
        if let hashbrown::hash_table::Entry::Vacant(vacant) = entry {
            vacant.insert((self.bytes.len(), device_id.len(), module_id.len()));
            self.bytes.extend_from_slice(device_id);
            self.bytes.extend_from_slice(module_id);
        }
    }

    fn contains(&self, device_id: &str, module_id: &str) -> bool {
        let (device_id, module_id) = (device_id.as_bytes(), module_id.as_bytes());
        let hash = Self::hash(&self.hasher, device_id, module_id);
        self.table
            .find(hash, |entry| {
                Self::ids(&self.bytes, entry) == (device_id, module_id)
            })
            .is_some()
    }
}

/// How a pass ended.
#[derive(Clone, Copy, Debug)]
pub struct PassEnd {
    /// Every page of both queries, or every file to its end, was read.
    pub complete: bool,
    /// Reconcile a complete pass with this grace (in ticks); `None`: do not reconcile.
    pub reconcile_grace: Option<Ticks>,
}

/// The pass whose touched twins await evaluation, as stored.
#[derive(Serialize, Deserialize)]
struct StoredPass {
    hub: String,
    as_of: i64,
}

/// The alert ids of a pass derive from its hub and as-of time.
fn alert_prefix(hub: &str, as_of: Ticks) -> String {
    format!(
        "seed:{}@{as_of}",
        hub.replace('%', "%25").replace('/', "%2F")
    )
}

impl Engine {
    /// Starts a seed pass of `hub` as of `as_of` (the moment the pass began).
    pub fn begin_seed(&mut self, hub: &str, as_of: Ticks) -> Result<SeedPass, PipelineError> {
        let state = &mut self.state;
        let stored = StoredPass {
            hub: hub.to_owned(),
            as_of: as_of.0,
        };
        let value = serde_json::to_vec(&stored).map_err(|e| StoreError::Corrupt {
            what: "seed pass",
            detail: e.to_string(),
        })?;
        state
            .store
            .put_meta(&mut state.batch, META_SEED_PASS, &value)?;
        Ok(SeedPass {
            hub: hub.into(),
            as_of,
            source_text: alert_prefix(hub, as_of),
            seen: SeenKeys::default(),
            next_index: 0,
            counters: SeedCounters::default(),
            touched: None,
        })
    }

    /// One twin document of the pass, as raw JSON; numbered in the order given.
    pub fn ingest_document(
        &mut self,
        pass: &mut SeedPass,
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        self.with_parsed(raw, |state, nodes| {
            state.handle_document(pass, nodes, None, raw)
        })
    }

    /// One twin document of the pass, already parsed (`nodes` is `None` when it is not JSON;
    /// `well_formed` is [`crate::decode::body_is_well_formed`] of it when the parser checked
    /// it), as the reader thread of a seed from files hands them over
    /// ([`crate::source::documents::spawn_document_reader`]); `raw` is the document as read,
    /// kept for a dead letter. The same as [`Engine::ingest_document`] of `raw`.
    pub fn ingest_parsed_document(
        &mut self,
        pass: &mut SeedPass,
        nodes: Option<&[Node<'_>]>,
        well_formed: Option<bool>,
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        self.state.handle_document(pass, nodes, well_formed, raw)
    }

    /// Ends a pass: reconciles it if it is complete and reconciling is asked for, records the
    /// hub as seeded, and evaluates every twin the pass touched.
    pub fn end_seed(
        &mut self,
        mut pass: SeedPass,
        end: PassEnd,
    ) -> Result<SeedCounters, PipelineError> {
        self.begin_end_seed(&mut pass, end)?;
        // Nothing else is applied until the pass ends: its twins are evaluated all at once, on
        // every core.
        let keys: Vec<Vec<u8>> = pass.touched.take().into_iter().flatten().collect();
        let (hub, as_of) = (&pass.hub, pass.as_of);
        pass.counters.evaluated += self.state.counting_alerts(&mut pass.counters, |state| {
            let n = state.evaluate_touched_keys(hub, as_of, &keys)?;
            state.forget_seed_pass()?;
            Ok(n)
        })?;
        Ok(pass.counters)
    }

    /// The first half of [`Engine::end_seed`]: reconciles and records the hub as seeded, and
    /// lists the touched twins. Their evaluation then goes a batch at a time
    /// ([`Engine::evaluate_seed_step`]), so that the service applies events in between and
    /// ingestion never waits for more than one batch of a large pass. An event applied
    /// between two steps is evaluated as any event is; the twin is evaluated again at the
    /// pass's time when its turn comes, which changes nothing unless the event did not (its
    /// failing set is already stored); a twin an event removed is not evaluated (there is
    /// nothing to evaluate).
    pub fn begin_end_seed(
        &mut self,
        pass: &mut SeedPass,
        end: PassEnd,
    ) -> Result<(), PipelineError> {
        let state = &mut self.state;
        if pass.touched.is_some() {
            return Ok(());
        }
        let (opened_before, resolved_before) =
            (state.counters.alerts_opened, state.counters.alerts_resolved);
        if end.complete {
            if let Some(grace) = end.reconcile_grace {
                state.reconcile(pass, grace)?;
            }
            let hub = pass.hub.clone();
            if state
                .snapshot
                .seeded
                .get(&hub)
                .is_none_or(|t| *t < pass.as_of)
            {
                let mut key = META_SEEDED_PREFIX.to_vec();
                key.extend_from_slice(hub.as_bytes());
                state
                    .store
                    .put_meta(&mut state.batch, &key, &pass.as_of.0.to_be_bytes())?;
                state.snapshot.seeded.insert(hub, pass.as_of);
            }
        }
        state.flush()?;
        crate::failpoint::hit(crate::failpoint::SEED_BEFORE_EVALUATION);
        pass.counters.alerts_opened += state.counters.alerts_opened - opened_before;
        pass.counters.alerts_resolved += state.counters.alerts_resolved - resolved_before;
        // Read after the flush: every touched key is in the store.
        pass.touched = Some(state.store.seed_touched()?.into_iter());
        Ok(())
    }

    /// Evaluates the next batch of the pass's touched twins, in key order, and commits it;
    /// after the last, forgets the pass and returns its counters.
    /// A pass not yet ended ([`Engine::begin_end_seed`]) has nothing to evaluate: `None`.
    pub fn evaluate_seed_step(
        &mut self,
        pass: &mut SeedPass,
    ) -> Result<Option<SeedCounters>, PipelineError> {
        let Some(touched) = &mut pass.touched else {
            return Ok(None);
        };
        let (hub, as_of) = (&pass.hub, pass.as_of);
        let (evaluated, done) = self.state.counting_alerts(&mut pass.counters, |state| {
            let evaluated = if touched.len() > 0 {
                state.evaluate_touched_step(hub, as_of, touched)?
            } else {
                0
            };
            let done = touched.len() == 0;
            if done {
                state.forget_seed_pass()?;
            }
            Ok((evaluated, done))
        })?;
        pass.counters.evaluated += evaluated;
        Ok(done.then(|| pass.counters.clone()))
    }
}

impl State {
    fn handle_document(
        &mut self,
        pass: &mut SeedPass,
        nodes: Option<&[Node<'_>]>,
        well_formed: Option<bool>,
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        let index = pass.next_index;
        pass.next_index += 1;
        pass.counters.documents += 1;
        let document = match decode_document_checked(&pass.hub, nodes, well_formed) {
            Ok(document) => document,
            Err(reason) => {
                *pass.counters.dead_lettered.entry(reason).or_default() += 1;
                self.store.put_dead_letter(
                    &mut self.batch,
                    &pass.source_text,
                    index,
                    reason,
                    raw,
                )?;
                return self.after_message();
            }
        };
        let key = document.key;
        pass.seen.insert(key.device_id, key.module_id);
        // Timers due by the pass's time fire before its first document is applied.
        if pass.as_of > self.high_water
            && self.deadlines.first().is_some_and(|d| d.0 <= pass.as_of)
            && !document_is_stale(&document, pass.as_of, &self.snapshot)
        {
            self.enqueued_time = None;
            self.fire_until(pass.as_of)?;
        }
        match apply_document(&document, pass.as_of, &mut self.snapshot)? {
            Outcome::Stale => pass.counters.stale += 1,
            Outcome::Upserted { appeared } => {
                pass.counters.applied += 1;
                self.move_high_water(pass.as_of);
                self.store
                    .put_seed_touched(&mut self.batch, &twin_key(key))?;
                if appeared && !key.is_device_twin() {
                    // The device's `/$modules` changed.
                    self.store
                        .put_seed_touched(&mut self.batch, &twin_key(key.device_twin()))?;
                }
            }
            Outcome::Removed { .. } => {}
        }
        self.after_message()
    }

    /// Removes, in key order, every live twin of the pass's hub that the pass did not see and
    /// that did not change within `grace` before its as-of time.
    fn reconcile(&mut self, pass: &mut SeedPass, grace: Ticks) -> Result<(), PipelineError> {
        let cutoff = Ticks(pass.as_of.0.saturating_sub(grace.0));
        let mut doomed: Vec<(Box<str>, Box<str>, i64)> = self
            .snapshot
            .directory
            .live_of_hub(&pass.hub)
            .filter_map(|(device_id, module_id, slot)| match slot {
                Slot::Live {
                    version,
                    last_change,
                    ..
                } if last_change < cutoff && !pass.seen.contains(device_id, module_id) => {
                    Some((device_id.into(), module_id.into(), version))
                }
                _ => None,
            })
            .collect();
        doomed.sort_unstable_by(|a, b| {
            (a.0.as_bytes(), a.1.as_bytes()).cmp(&(b.0.as_bytes(), b.1.as_bytes()))
        });
        let prefix = alert_prefix(&pass.hub, pass.as_of);
        let origin = Origin::Seed { prefix: &prefix };
        for (device_id, module_id, version) in &doomed {
            let key = TwinKey {
                hub: &pass.hub,
                device_id,
                module_id,
            };
            self.snapshot.put_dead(key, *version, pass.as_of);
            self.remove_violations(key)?;
            self.emit_with_version(&origin, key, pass.as_of, *version, 0)?;
            if !key.is_device_twin() {
                self.store
                    .put_seed_touched(&mut self.batch, &twin_key(key.device_twin()))?;
            }
            pass.counters.removed += 1;
            self.after_message()?;
        }
        if !doomed.is_empty() {
            tracing::info!(hub = %pass.hub, removed = doomed.len(), "reconciled: twins the hub no longer has were removed");
        }
        Ok(())
    }

    /// Evaluates, in key order, every twin a pass touched, at the pass's time, and forgets the
    /// pass. Returns how many twins were evaluated.
    fn evaluate_touched(&mut self, hub: &str, as_of: Ticks) -> Result<u64, PipelineError> {
        let keys = self.store.seed_touched()?;
        let n = self.evaluate_touched_keys(hub, as_of, &keys)?;
        self.forget_seed_pass()?;
        Ok(n)
    }

    /// Evaluates the twins of `keys` (encoded, in key order) at the pass's time, on every core
    /// ([`evaluate_in_order`]), deleting their `seed_touched` entries in the batches that
    /// commit their evaluation. Nothing else may be applied meanwhile: the twins are read
    /// from the store, which must hold everything applied (the pass was flushed). Returns how
    /// many twins were evaluated (a key whose twin is gone has nothing to evaluate).
    fn evaluate_touched_keys(
        &mut self,
        hub: &str,
        as_of: Ticks,
        keys: &[Vec<u8>],
    ) -> Result<u64, PipelineError> {
        let prefix = alert_prefix(hub, as_of);
        let origin = Origin::Seed { prefix: &prefix };
        let store = self.store.clone();
        let policy = self.options.policy.clone();
        // `keys[deleted..done]` are evaluated (or have no twin) but still stored: a batch
        // deletes them as one range with its evaluations (the keys between two of them are
        // all of the pass: nothing else is written while this runs).
        let (mut deleted, mut done) = (0usize, 0usize);
        let (mut n, mut n_in_batch) = (0u64, 0usize);
        evaluate_in_order(&store, Scope::Keys(keys), &policy, |audited| {
            // The keys before this twin's have no twin.
            done += keys[done..]
                .iter()
                .position(|k| *k == audited.encoded)
                .map_or(keys.len() - done, |i| i + 1);
            let (key, version) = (audited.key.as_key(), audited.version);
            self.take_evaluation(key, version, audited.failing, as_of, &origin)?;
            n += 1;
            n_in_batch += 1;
            if n_in_batch >= self.options.batch_messages.max(1) {
                self.store
                    .delete_seed_touched_range(&mut self.batch, &keys[deleted..done])?;
                deleted = done;
                self.commit()?;
                n_in_batch = 0;
            }
            Ok(())
        })?;
        self.store
            .delete_seed_touched_range(&mut self.batch, &keys[deleted..])?;
        self.commit()?;
        Ok(n)
    }

    /// Evaluates the next `batch_messages` twins of `keys` at the pass's time, deletes their
    /// `seed_touched` entries and commits them together.
    fn evaluate_touched_step(
        &mut self,
        hub: &str,
        as_of: Ticks,
        keys: &mut std::vec::IntoIter<Vec<u8>>,
    ) -> Result<u64, PipelineError> {
        let prefix = alert_prefix(hub, as_of);
        let origin = Origin::Seed { prefix: &prefix };
        let mut n = 0u64;
        for encoded in keys.by_ref().take(self.options.batch_messages.max(1)) {
            let owned = decode_twin_key(&encoded).ok_or_else(|| StoreError::bad_key(&encoded))?;
            let key = owned.as_key();
            self.evaluate(key, as_of, &origin)?;
            self.emit(&origin, key, as_of, 0)?;
            self.store.delete_seed_touched(&mut self.batch, &encoded)?;
            n += 1;
        }
        self.commit()?;
        Ok(n)
    }

    /// Runs `f`, adding the alerts it opened and resolved to a pass's `counters`.
    fn counting_alerts<T>(
        &mut self,
        counters: &mut SeedCounters,
        f: impl FnOnce(&mut State) -> Result<T, PipelineError>,
    ) -> Result<T, PipelineError> {
        let (opened, resolved) = (self.counters.alerts_opened, self.counters.alerts_resolved);
        let out = f(self)?;
        counters.alerts_opened += self.counters.alerts_opened - opened;
        counters.alerts_resolved += self.counters.alerts_resolved - resolved;
        Ok(out)
    }

    /// The pass is over: nothing awaits evaluation any more.
    fn forget_seed_pass(&mut self) -> Result<(), PipelineError> {
        self.store.delete_meta(&mut self.batch, META_SEED_PASS)?;
        self.flush()
    }

    /// Evaluates what a pass interrupted by a crash left unevaluated (`docs/semantics.md` §7: an
    /// incomplete pass evaluates the documents it read).
    pub(super) fn finish_interrupted_seed(&mut self) -> Result<(), PipelineError> {
        let Some(raw) = self.store.meta(META_SEED_PASS)? else {
            return Ok(());
        };
        let pass: StoredPass = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt {
            what: "seed pass",
            detail: e.to_string(),
        })?;
        if let Some((hub, as_of)) = &self.options.continue_seed {
            if *hub == pass.hub && as_of.0 == pass.as_of {
                // The same pass read again: it goes on, and what it applied before is
                // evaluated with the rest at its end.
                tracing::info!(hub = %pass.hub, "continuing an interrupted seed pass");
                return Ok(());
            }
        }
        tracing::warn!(hub = %pass.hub, "a seed pass was interrupted: evaluating the twins it applied");
        self.evaluate_touched(&pass.hub, Ticks(pass.as_of))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SeenKeys;

    #[test]
    fn seen_keys_compare_the_ids_not_their_concatenation() {
        let mut seen = SeenKeys::default();
        seen.insert("ab", "c");
        seen.insert("", "");
        assert!(seen.contains("ab", "c"));
        assert!(
            !seen.contains("a", "bc"),
            "same bytes back to back, other ids"
        );
        assert!(!seen.contains("abc", ""));
        assert!(seen.contains("", ""));
        // Many pairs (the table grows and rehashes from the buffer), each kept once.
        for i in 0..50_000 {
            seen.insert(
                &format!("device-{i}"),
                if i % 3 == 0 { "" } else { "module" },
            );
            seen.insert(
                &format!("device-{i}"),
                if i % 3 == 0 { "" } else { "module" },
            );
        }
        assert_eq!(seen.table.len(), 50_002);
        for i in 0..50_000 {
            let module = if i % 3 == 0 { "" } else { "module" };
            let other = if i % 3 == 0 { "module" } else { "" };
            assert!(seen.contains(&format!("device-{i}"), module));
            assert!(!seen.contains(&format!("device-{i}"), other));
        }
        assert!(!seen.contains("device-50000", ""));
    }
}
