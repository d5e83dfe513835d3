//! The apply thread: decode → apply → batch → store, for any source.
//!
//! An [`Engine`] is driven by one thread that hands it records in source order. It decodes
//! each (parsing a JSON body once, into a reused tape), applies the event to the
//! [`Snapshot`], and cuts batches by size and time. A batch (every changed twin and
//! tombstone, the dead letters and each source's checkpoint) is handed to the writer thread,
//! which encodes its twins into one `WriteBatch` and writes it, so the apply thread goes on
//! while the batch is encoded and written; the bounded channel between them is the
//! backpressure.
//!
//! Here: the engine, its options and the handling of one message. `violations` evaluates and
//! keeps the violation sets (transitions, pending violations and their deadlines, alert ids);
//! `batch` cuts batches and runs the writer thread; `audit`, `seed` and `snapshot` as their
//! own docs say.

mod audit;
mod batch;
pub mod live;
pub mod live_seed;
pub mod replay;
mod scan;
mod seed;
pub mod snapshot;
mod violations;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use simd_json::Node;

use crate::compliance::{Transition, Violation};
use crate::decode::{decode_body, decode_header, Body, BodyParser, Decoded, Message};
use crate::model::{DeadLetterReason, Slot, SourceId, TwinKey};
use crate::policy::{Policy, Severity};
use crate::source::parsed::LineVerdict;
use crate::source::storage_json::StorageJsonMessage;
use crate::store::keys::{META_HIGH_WATER, META_SEEDED_PREFIX};
use crate::store::{Batch, Checkpoint, Store, StoreError};
use crate::telemetry::PipelineMetrics;
use crate::time::Ticks;
use crate::twin::{apply, is_stale, Outcome};
pub use audit::{plan as plan_audit, AuditPlan, ReauditReport, RulePlan};
use batch::{ToWrite, WriteResult};
pub use seed::{PassEnd, SeedCounters, SeedPass};
pub use snapshot::{Directory, Snapshot};
use violations::{deadline_index, failing_counts, load_violations, pending_counts, Origin};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store writer stopped")]
    WriterGone,
    #[error("could not start a thread: {0}")]
    Thread(std::io::Error),
}

impl PipelineError {
    pub fn kind(&self) -> &'static str {
        match self {
            PipelineError::Store(e) => e.kind(),
            PipelineError::WriterGone => "writer_gone",
            PipelineError::Thread(_) => "thread",
        }
    }
}

/// How batches are cut and how much is kept in memory.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Commit after this many messages...
    pub batch_messages: usize,
    /// ...or when the open batch is this old.
    pub batch_interval: Duration,
    /// Bodies larger than this are dead letters (`body_too_large`).
    pub max_body_bytes: usize,
    /// The encoded-twin cache, bytes.
    pub cache_bytes: usize,
    /// The compliance policy evaluated on every changed twin.
    pub policy: Arc<Policy>,
    /// Whether alerts go to the outbox (some sink will deliver them); without, they are only
    /// counted, and the violation set is kept all the same.
    pub queue_alerts: bool,
    /// Per-batch histograms (the service's /metrics); `None` spares replay the clock reads.
    pub metrics: Option<PipelineMetrics>,
    /// Before each write, wait until the disk has this many bytes free (the service); `None`
    /// writes at once, and a full disk fails the write (replay).
    pub min_free_bytes: Option<u64>,
    /// The seed pass (hub, as-of time) this engine is opened to run: an interrupted pass that
    /// is the same one is continued rather than evaluated at open (`seed` run again).
    pub continue_seed: Option<(String, Ticks)>,
}

/// The defaults of `replay` and `seed`'s flags (`crate::config`'s constants, which the flags'
/// `--help` shows). The service's batch interval is shorter
/// (`crate::config::SERVICE_BATCH_INTERVAL_MS`): it sets its options from its configuration.
impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            batch_messages: crate::config::DEFAULT_BATCH_MESSAGES as usize,
            batch_interval: Duration::from_millis(crate::config::DEFAULT_BATCH_INTERVAL_MS),
            max_body_bytes: crate::decode::DEFAULT_MAX_BODY_BYTES,
            cache_bytes: (crate::config::DEFAULT_CACHE_MIB as usize) << 20,
            policy: Arc::new(Policy::baseline()),
            queue_alerts: false,
            metrics: None,
            min_free_bytes: None,
            continue_seed: None,
        }
    }
}

/// Counts of what happened to messages (`docs/semantics.md` §5: every message is one of these).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages: u64,
    pub applied: u64,
    pub stale: u64,
    pub ignored: u64,
    pub dead_lettered: BTreeMap<DeadLetterReason, u64>,
    pub batches: u64,
    pub alerts_opened: u64,
    /// Resolved alerts, those of deleted twins included.
    pub alerts_resolved: u64,
    /// Pending violations (rules with `for`) that opened, and that were dropped before their
    /// deadline (`docs/semantics.md` §9).
    pub pending_opened: u64,
    pub pending_dropped: u64,
}

impl Counters {
    pub fn n_dead_lettered(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

/// A source known to the engine, with the position to commit for it.
struct SourceState {
    id: SourceId,
    text: String,
    /// The source's name in alert ids: stable across replays of the same files.
    alert_name: String,
    checkpoint: Checkpoint,
    dirty: bool,
}

/// Handle of a source registered with [`Engine::add_source`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceHandle(usize);

/// Each failing twin's violations: encoded twin key → its failing rules, in policy order.
type ViolationSets = HashMap<Box<[u8]>, Vec<Violation>, foldhash::fast::RandomState>;

/// How many twins fail each rule: rule id → (severity, count).
type FailingCounts = BTreeMap<Box<str>, (Severity, u64)>;

/// Everything but the parsing buffers, so that a parsed tape and the state can be borrowed
/// at once.
struct State {
    store: Arc<Store>,
    snapshot: Snapshot,
    options: EngineOptions,
    counters: Counters,
    sources: Vec<SourceState>,
    batch: Batch,
    /// The size of the last batch written, in bytes: the next one starts with room for as
    /// much, rather than growing (and being copied) from nothing every time.
    batch_bytes: usize,
    n_in_batch: usize,
    batch_started: Option<Instant>,
    batch_no: u64,
    to_writer: Option<Sender<ToWrite>>,
    from_writer: Receiver<WriteResult>,
    writer: Option<JoinHandle<()>>,
    body_parser: Option<BodyParser>,
    violations: ViolationSets,
    failing_counts: FailingCounts,
    /// The apply thread's time on the open batch (measured only with `options.metrics`).
    busy: Duration,
    next_outbox_seq: u64,
    failing: Vec<usize>,
    transitions: Vec<Transition>,
    /// The version of the twin last evaluated (what its alerts carry).
    twin_version: i64,
    key_buf: Vec<u8>,
    /// Per in-flight batch, the positions it commits.
    uncommitted: std::collections::VecDeque<(u64, Vec<(usize, u64)>)>,
    /// Per source, the committed next index.
    committed: Vec<Option<u64>>,
    /// The Event Hubs enqueued time of the message being handled (what its alerts carry).
    enqueued_time: Option<crate::time::Ticks>,
    /// The open batch queued alerts: it records the outbox's new high-water mark.
    outbox_grew: bool,
    /// A tape allocation for bodies that arrive as bytes, reused message after message.
    spare_tape: Option<simd_json::Tape<'static>>,
    /// The snapshot's high-water mark: the greatest opTime of any event or document applied
    /// (`docs/semantics.md` §8), the time of a re-audit's alerts.
    high_water: Ticks,
    /// The open batch moved the high-water mark: it records the new one.
    high_water_moved: bool,
    /// Every pending violation by deadline, then twin key, then the rule's place in the
    /// policy: the order in which they open (`docs/semantics.md` §9).
    deadlines: Deadlines,
    /// Pending violations by rule id.
    pending_counts: BTreeMap<Box<str>, u64>,
}

/// See [`State::deadlines`].
type Deadlines = std::collections::BTreeSet<(Ticks, Box<[u8]>, usize)>;

/// The apply engine; see the module docs.
pub struct Engine {
    line_buf: Vec<u8>,
    buffers: simd_json::Buffers,
    spare_tape: Option<simd_json::Tape<'static>>,
    state: State,
}

impl Engine {
    /// Loads the directory of slots from the store and starts the writer thread; then, before
    /// anything else is applied, evaluates what an interrupted seed pass left unevaluated and
    /// re-audits the snapshot if it was computed with another policy (`docs/semantics.md` §7, §8).
    pub fn new(store: Arc<Store>, options: EngineOptions) -> Result<Engine, PipelineError> {
        let directory = Directory::load(&store)?;
        let violations = load_violations(&store, &options.policy)?;
        let failing_counts = failing_counts(&violations, &options.policy);
        let deadlines = deadline_index(&violations, &options.policy);
        let pending_counts = pending_counts(&violations);
        let next_outbox_seq = store.next_outbox_seq()?;
        let high_water = store_ticks(&store, META_HIGH_WATER)?.unwrap_or_default();
        let mut snapshot = Snapshot::new(store.clone(), directory, options.cache_bytes);
        for (hub, as_of) in store.meta_with_prefix(META_SEEDED_PREFIX)? {
            let hub = String::from_utf8(hub).map_err(|_| StoreError::Corrupt {
                what: "seeded hub",
                detail: "not UTF-8".into(),
            })?;
            snapshot
                .seeded
                .insert(hub.into(), decode_ticks(&as_of, "seeded hub")?);
        }
        let (to_writer, from_writer, writer) = batch::spawn_writer(&store, &options)?;
        let mut engine = Engine {
            line_buf: Vec::new(),
            buffers: simd_json::Buffers::with_max_depth(4096, usize::MAX >> 8),
            spare_tape: Some(simd_json::Tape::null()),
            state: State {
                store,
                snapshot,
                options,
                counters: Counters::default(),
                sources: Vec::new(),
                batch: Batch::default(),
                batch_bytes: 0,
                n_in_batch: 0,
                batch_started: None,
                batch_no: 0,
                to_writer: Some(to_writer),
                from_writer,
                writer: Some(writer),
                body_parser: Some(BodyParser::default()),
                violations,
                failing_counts,
                busy: Duration::ZERO,
                next_outbox_seq,
                failing: Vec::new(),
                transitions: Vec::new(),
                twin_version: 0,
                key_buf: Vec::new(),
                uncommitted: std::collections::VecDeque::new(),
                committed: Vec::new(),
                enqueued_time: None,
                outbox_grew: false,
                spare_tape: None,
                high_water,
                high_water_moved: false,
                pending_counts,
                deadlines,
            },
        };
        engine.state.finish_interrupted_seed()?;
        engine.state.reaudit_if_needed(&mut |_| {})?;
        Ok(engine)
    }

    /// Registers a source; returns its handle and its committed checkpoint. `alert_name`
    /// names the source in alert ids (a file's path relative to what was replayed, a
    /// partition's id), so ids do not depend on where the files happen to lie.
    pub fn add_source(
        &mut self,
        id: SourceId,
        alert_name: String,
    ) -> Result<(SourceHandle, Checkpoint), PipelineError> {
        let checkpoint = self.state.store.checkpoint(&id)?.unwrap_or_default();
        self.state.sources.push(SourceState {
            alert_name,
            text: id.to_text(),
            id,
            checkpoint: checkpoint.clone(),
            dirty: false,
        });
        Ok((SourceHandle(self.state.sources.len() - 1), checkpoint))
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.state.snapshot
    }

    /// How many twins fail each rule of the policy (and each rule no longer in it that some
    /// twin still fails): `(rule id, severity, count)` by rule id.
    pub fn failing_twins(&self) -> impl Iterator<Item = (&str, Severity, u64)> + '_ {
        self.state
            .failing_counts
            .iter()
            .map(|(rule, &(severity, n))| (&**rule, severity, n))
    }

    /// One line of a storage-route JSON file: record `index` of `source`, ending at
    /// `next_byte_offset`. Parses the line; see [`Engine::ingest_parsed_line`] for lines
    /// parsed elsewhere.
    pub fn ingest_json_line(
        &mut self,
        source: SourceHandle,
        index: u64,
        next_byte_offset: u64,
        line: &[u8],
    ) -> Result<(), PipelineError> {
        self.with_parsed(line, |state, nodes| {
            state.ingest_line(
                source,
                index,
                next_byte_offset,
                nodes,
                LineVerdict::default(),
                line,
            )
        })
    }

    /// Parses `raw` into the reused tape and hands its nodes (`None` when it is not JSON) and
    /// the state to `f`.
    fn with_parsed<R>(
        &mut self,
        raw: &[u8],
        f: impl FnOnce(&mut State, Option<&[Node<'_>]>) -> R,
    ) -> R {
        self.line_buf.clear();
        self.line_buf.extend_from_slice(raw);
        self.line_buf
            .resize(raw.len() + simd_json::INPUT_PADDING, 0);
        let mut tape = self
            .spare_tape
            .take()
            .unwrap_or_else(simd_json::Tape::null)
            .reset();
        let parsed = simd_json::fill_tape_padded(
            &mut self.line_buf,
            raw.len(),
            &mut self.buffers,
            &mut tape,
        );
        let nodes = parsed.ok().map(|()| &tape.0[..]);
        let result = f(&mut self.state, nodes);
        self.spare_tape = Some(tape.reset());
        result
    }

    /// One line of a storage-route JSON file, already parsed (`nodes` is `None` when it is
    /// not JSON); `raw` is the line as read, kept for a dead letter.
    pub fn ingest_parsed_line(
        &mut self,
        source: SourceHandle,
        index: u64,
        next_byte_offset: u64,
        nodes: Option<&[Node<'_>]>,
        verdict: LineVerdict,
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        self.state
            .ingest_line(source, index, next_byte_offset, nodes, verdict, raw)
    }

    /// One message of any other container (an Avro record): record `index` of `source`;
    /// `raw` renders it for a dead letter. The source resumes by record index.
    pub fn ingest_message<'a>(
        &mut self,
        source: SourceHandle,
        index: u64,
        message: &impl Message<'a>,
        raw: &dyn Fn() -> Cow<'a, [u8]>,
    ) -> Result<(), PipelineError> {
        self.state.handle(source, index, message, raw)?;
        self.state.advance(source, index, None)
    }

    /// One event of an Event Hub partition: sequence number `sequence_number`, with the opaque
    /// `offset` kept beside it in the checkpoint.
    pub fn ingest_event<'a>(
        &mut self,
        source: SourceHandle,
        sequence_number: u64,
        offset: Option<&str>,
        message: &impl Message<'a>,
        raw: &dyn Fn() -> Cow<'a, [u8]>,
    ) -> Result<(), PipelineError> {
        self.state.handle(source, sequence_number, message, raw)?;
        let state = &mut self.state.sources[source.0];
        state.checkpoint.offset = offset.map(str::to_owned);
        self.state.advance(source, sequence_number, None)
    }

    /// The next record index (for a partition: the last sequence number plus one) that the
    /// store has committed for `source`; `None` before its first commit in this process.
    pub fn committed_next_index(&self, source: SourceHandle) -> Option<u64> {
        self.state.committed.get(source.0).copied().flatten()
    }

    /// Marks a source's position without a message (a file's end, past blank lines).
    pub fn set_position(&mut self, source: SourceHandle, checkpoint: Checkpoint) {
        let state = &mut self.state.sources[source.0];
        if state.checkpoint != checkpoint {
            state.checkpoint = checkpoint;
            state.dirty = true;
        }
    }

    /// The policy being evaluated.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.state.options.policy
    }

    /// Evaluates with `policy` from now on: commits what is open, then re-audits every twin if
    /// its fingerprint differs from the one the snapshot was computed with (`docs/semantics.md` §8);
    /// `progress` is called with the number of twins re-audited so far.
    pub fn set_policy(
        &mut self,
        policy: Arc<Policy>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<ReauditReport>, PipelineError> {
        self.state.flush()?;
        self.state.options.policy = policy;
        self.state.reaudit_if_needed(progress)
    }

    /// The snapshot's high-water mark: the greatest opTime applied so far.
    pub fn high_water(&self) -> Ticks {
        self.state.high_water
    }

    /// Moves the clock of `for` rules to `to` if that is later, opening every pending
    /// violation due by then: the service's quiet feed (`docs/semantics.md` §9), when every owned
    /// partition is caught up.
    pub fn advance_clock(&mut self, to: Ticks) -> Result<(), PipelineError> {
        let state = &mut self.state;
        if to <= state.high_water {
            return Ok(());
        }
        state.enqueued_time = None;
        state.fire_until(to)?;
        state.move_high_water(to);
        // What fired is in the open batch: start its interval, so that `tick` commits it
        // (and delivery sees its alerts) even if no message follows.
        if !state.batch.is_empty() {
            state.batch_started.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Records that the events `first..=last` of a partition expired from the hub's retention
    /// before they were read: a dead letter of reason `expired` at `first`, in the open batch,
    /// so that it is committed with the checkpoint that moves past the gap (a crash before the
    /// commit finds the same gap again, under the same key).
    pub fn record_expired(
        &mut self,
        source: SourceHandle,
        first: u64,
        last: u64,
    ) -> Result<(), PipelineError> {
        let state = &mut self.state;
        let text = &state.sources[source.0].text;
        state
            .store
            .put_expired(&mut state.batch, text, first, last)?;
        Ok(())
    }

    /// Whether any violation is pending (a rule with `for` whose deadline is still to come).
    pub fn has_pending(&self) -> bool {
        !self.state.deadlines.is_empty()
    }

    /// How many violations are pending (rules with `for`), by rule id.
    pub fn pending_by_rule(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.state
            .pending_counts
            .iter()
            .map(|(rule, &n)| (&**rule, n))
    }

    /// Commits the open batch if its time is up (call it when input is idle).
    pub fn tick(&mut self) -> Result<(), PipelineError> {
        let state = &mut self.state;
        if state
            .batch_started
            .is_some_and(|t| t.elapsed() >= state.options.batch_interval)
        {
            state.commit()?;
        }
        state.drain_acks(false)
    }

    /// Commits what is open and waits until the writer has written everything.
    pub fn finish(mut self) -> Result<Counters, PipelineError> {
        self.state.commit()?;
        self.state.to_writer = None;
        if let Some(writer) = self.state.writer.take() {
            writer.join().map_err(|_| PipelineError::WriterGone)?;
        }
        self.state.drain_acks(true)?;
        Ok(self.state.counters.clone())
    }
}

impl State {
    fn ingest_line(
        &mut self,
        source: SourceHandle,
        index: u64,
        next_byte_offset: u64,
        nodes: Option<&[Node<'_>]>,
        verdict: LineVerdict,
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        let message = nodes
            .and_then(|nodes| StorageJsonMessage::checked(nodes, raw.len(), verdict.unambiguous));
        match message {
            Some(message) => {
                let message = message.with_body_verdict(verdict.body);
                self.handle(source, index, &message, &|| Cow::Borrowed(raw))?
            }
            None => {
                self.counters.messages += 1;
                self.dead_letter(source, index, DeadLetterReason::BadRecord, raw)?;
            }
        }
        self.advance(source, index, Some(next_byte_offset))
    }

    /// Record `index` of `source` is done: the source resumes after it.
    fn advance(
        &mut self,
        source: SourceHandle,
        index: u64,
        byte_offset: Option<u64>,
    ) -> Result<(), PipelineError> {
        let checkpoint = &mut self.sources[source.0];
        checkpoint.checkpoint.next_index = index + 1;
        checkpoint.checkpoint.byte_offset = byte_offset;
        checkpoint.dirty = true;
        self.after_message()
    }

    /// Decodes, applies and evaluates one message; `raw` renders the record for a dead letter
    /// (only called for one).
    fn handle<'a>(
        &mut self,
        source: SourceHandle,
        index: u64,
        message: &impl Message<'a>,
        raw: &dyn Fn() -> Cow<'a, [u8]>,
    ) -> Result<(), PipelineError> {
        if self.options.metrics.is_none() {
            return self.handle_timeless(source, index, message, raw);
        }
        let started = Instant::now();
        let result = self.handle_timeless(source, index, message, raw);
        self.busy += started.elapsed();
        result
    }

    fn handle_timeless<'a>(
        &mut self,
        source: SourceHandle,
        index: u64,
        message: &impl Message<'a>,
        raw: &dyn Fn() -> Cow<'a, [u8]>,
    ) -> Result<(), PipelineError> {
        self.counters.messages += 1;
        if self.options.queue_alerts {
            self.enqueued_time = message.eventhubs_enqueued_time().and_then(|p| p.time());
        }
        let header = match decode_header(message, self.options.max_body_bytes) {
            Ok(header) => header,
            Err(Decoded::DeadLetter(reason)) => {
                return self.dead_letter(source, index, reason, &raw())
            }
            Err(_) => {
                self.counters.ignored += 1;
                return Ok(());
            }
        };
        // The parser is taken out of the state while its tape is in use, so that firing
        // timers (which needs the whole state) can happen before the event is applied.
        let mut body_parser = None;
        let mut parsed = None;
        let body: &[Node<'_>] = match header.body {
            Body::Tape(nodes) => nodes,
            Body::Absent => &[],
            other => {
                let parser = body_parser.insert(self.body_parser.take().unwrap_or_default());
                parsed = parser.parse(other, self.spare_tape.take());
                parsed.as_ref().map_or(&[][..], |tape| &tape.0[..])
            }
        };
        let event = match decode_body(&header, body) {
            Ok(event) => event,
            Err(reason) => {
                drop(parsed);
                self.body_parser = body_parser;
                return self.dead_letter(source, index, reason, &raw());
            }
        };
        let event_version = event.version;
        // Timers due by this event's time fire before it is applied (`docs/semantics.md` §9).
        if event.op_time > self.high_water
            && self.deadlines.first().is_some_and(|d| d.0 <= event.op_time)
            && !is_stale(&event, &self.snapshot)
        {
            self.enqueued_time = None;
            self.fire_until(event.op_time)?;
            if self.options.queue_alerts {
                self.enqueued_time = message.eventhubs_enqueued_time().and_then(|p| p.time());
            }
        }
        let outcome = apply(&event, &mut self.snapshot)?;
        // The body's tape allocation serves the next message.
        if let Some(tape) = parsed {
            self.spare_tape = Some(tape.reset());
        }
        if body_parser.is_some() {
            self.body_parser = body_parser;
        }
        // The key from the header, which borrows only the message, not the body's parser.
        let key = header.key;
        let time = header.op_time;
        self.transitions.clear();
        let origin = Origin::Event { source, index };
        let mut n_alerts = 0usize;
        match outcome {
            Outcome::Stale => {
                self.counters.stale += 1;
                return Ok(());
            }
            Outcome::Upserted { appeared } => {
                self.counters.applied += 1;
                self.move_high_water(time);
                self.evaluate(key, time, &origin)?;
                n_alerts = self.emit(&origin, key, time, n_alerts)?;
                if appeared && !key.is_device_twin() {
                    self.evaluate(key.device_twin(), time, &origin)?;
                    self.emit(&origin, key.device_twin(), time, n_alerts)?;
                }
            }
            Outcome::Removed { cascaded } => {
                self.counters.applied += 1;
                self.move_high_water(time);
                let version = match self.snapshot.directory.slot(key) {
                    Some(Slot::Dead { version, .. }) => version,
                    _ => event_version,
                };
                self.remove_violations(key)?;
                n_alerts = self.emit_with_version(&origin, key, time, version, n_alerts)?;
                for module_id in &cascaded {
                    let module_key = TwinKey { module_id, ..key };
                    let version = match self.snapshot.directory.slot(module_key) {
                        Some(Slot::Dead { version, .. }) => version,
                        _ => 0,
                    };
                    self.remove_violations(module_key)?;
                    n_alerts =
                        self.emit_with_version(&origin, module_key, time, version, n_alerts)?;
                }
                if !key.is_device_twin() {
                    self.evaluate(key.device_twin(), time, &origin)?;
                    self.emit(&origin, key.device_twin(), time, n_alerts)?;
                }
            }
        }
        Ok(())
    }

    /// Moves the high-water mark to `time` if it is later.
    fn move_high_water(&mut self, time: Ticks) {
        if time > self.high_water {
            self.high_water = time;
            self.high_water_moved = true;
        }
    }

    fn dead_letter(
        &mut self,
        source: SourceHandle,
        index: u64,
        reason: DeadLetterReason,
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        *self.counters.dead_lettered.entry(reason).or_default() += 1;
        let text = &self.sources[source.0].text;
        self.store
            .put_dead_letter(&mut self.batch, text, index, reason, raw)?;
        Ok(())
    }
}

/// An instant stored under a `meta` key (big-endian ticks), if any.
fn store_ticks(store: &Store, key: &[u8]) -> Result<Option<Ticks>, StoreError> {
    store
        .meta(key)?
        .map(|raw| decode_ticks(&raw, "instant"))
        .transpose()
}

fn decode_ticks(raw: &[u8], what: &'static str) -> Result<Ticks, StoreError> {
    let bytes: [u8; 8] = raw.try_into().map_err(|_| StoreError::Corrupt {
        what,
        detail: format!("{} bytes, not 8", raw.len()),
    })?;
    Ok(Ticks(i64::from_be_bytes(bytes)))
}
