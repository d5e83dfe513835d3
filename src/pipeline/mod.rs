//! The apply thread: decode → apply → batch → store, for any source.
//!
//! An [`Engine`] is driven by one thread that hands it records in source order. It decodes
//! each (parsing a JSON body once, into a reused tape), applies the event to the
//! [`Snapshot`], and cuts batches by size and time. A batch (every changed twin and
//! tombstone, the dead letters and each source's checkpoint) is handed to the writer thread,
//! which encodes its twins into one `WriteBatch` and writes it, so the apply thread goes on
//! while the batch is encoded and written; the bounded channel between them is the
//! backpressure.

mod audit;
mod seed;
pub mod snapshot;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use simd_json::Node;

use crate::compliance::{self, Transition, Violation};
use crate::decode::{decode_body, decode_header, Body, BodyParser, Decoded, Message};
use crate::model::{DeadLetterReason, Slot, SourceId, TwinKey};
use crate::policy::{Policy, Severity, TwinView};
use crate::source::parsed::LineVerdict;
use crate::source::storage_json::StorageJsonMessage;
use crate::store::keys::{
    decode_twin_key, encode_twin_key, twin_key, META_HIGH_WATER, META_SEEDED_PREFIX,
};
use crate::store::{Batch, Checkpoint, Store, StoreError, StoredViolation};
use crate::telemetry::PipelineMetrics;
use crate::time::Ticks;
use crate::twin::{apply, is_stale, Outcome};
pub use audit::{plan as plan_audit, AuditPlan, ReauditReport, RulePlan};
pub use seed::{PassEnd, SeedCounters, SeedPass};
pub use snapshot::{Directory, Snapshot};
use snapshot::{TwinWrites, Written};

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

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            batch_messages: 8192,
            batch_interval: Duration::from_millis(200),
            max_body_bytes: crate::decode::DEFAULT_MAX_BODY_BYTES,
            cache_bytes: 256 << 20,
            policy: Arc::new(Policy::baseline()),
            queue_alerts: false,
            metrics: None,
            min_free_bytes: None,
            continue_seed: None,
        }
    }
}

/// Counts of what happened to messages (`SEMANTICS.md` §5: every message is one of these).
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
    /// deadline (`SEMANTICS.md` §9).
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

/// A batch for the writer thread: its number, the batch so far, and the twins it encodes
/// into it.
type ToWrite = (u64, Batch, TwinWrites);

/// A written batch: its number and its encoded twins, for the document cache.
type WriteResult = Result<(u64, Written), StoreError>;

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
    /// (`SEMANTICS.md` §8), the time of a re-audit's alerts.
    high_water: Ticks,
    /// The open batch moved the high-water mark: it records the new one.
    high_water_moved: bool,
    /// Every pending violation by deadline, then twin key, then the rule's place in the
    /// policy: the order in which they open (`SEMANTICS.md` §9).
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
    /// re-audits the snapshot if it was computed with another policy (`SEMANTICS.md` §7, §8).
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
        // Two batches may wait for the writer: the apply thread builds the next one while
        // RocksDB writes the last, and is slowed down only when it gets further ahead.
        let (to_writer, writer_input) = crossbeam_channel::bounded::<ToWrite>(1);
        let (writer_output, from_writer) = crossbeam_channel::bounded::<WriteResult>(4);
        let writer_store = store.clone();
        let commit_seconds = options.metrics.as_ref().map(|m| m.commit_seconds.clone());
        let min_free = options.min_free_bytes;
        let writer = std::thread::Builder::new()
            .name("twinwatch-writer".into())
            .spawn(move || {
                for (batch_no, mut batch, twins) in writer_input {
                    if let Some(min_free) = min_free {
                        if let Err(e) = writer_store.wait_for_space(min_free) {
                            let _ = writer_output.send(Err(e));
                            return;
                        }
                    }
                    crate::failpoint::hit(crate::failpoint::WRITER_BEFORE_WRITE);
                    let started = Instant::now();
                    let result = twins
                        .encode_into(&writer_store, &mut batch)
                        .and_then(|written| {
                            writer_store.write(&mut batch)?;
                            Ok((batch_no, written))
                        });
                    crate::failpoint::hit(crate::failpoint::WRITER_AFTER_WRITE);
                    if let Some(histogram) = &commit_seconds {
                        histogram.observe(started.elapsed().as_secs_f64());
                    }
                    let failed = result.is_err();
                    if writer_output.send(result).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(PipelineError::Thread)?;
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
    /// its fingerprint differs from the one the snapshot was computed with (`SEMANTICS.md` §8);
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
    /// violation due by then: the service's quiet feed (`SEMANTICS.md` §9), when every owned
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
        // Timers due by this event's time fire before it is applied (`SEMANTICS.md` §9).
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

    /// Evaluates the policy on a live twin into `self.transitions`, updating its stored
    /// violations; nothing when the twin does not exist.
    fn evaluate(
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

    /// Turns `self.failing` (the rules failing now on the twin at `version`) into transitions
    /// (`self.transitions`) and the stored violations' changes; `origin` names the pending
    /// violations it starts.
    fn update_violations(
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
    fn store_violation(
        &mut self,
        encoded: &[u8],
        violation: &Violation,
    ) -> Result<(), PipelineError> {
        self.store
            .put_violation(&mut self.batch, encoded, violation)?;
        Ok(())
    }

    /// A violation that was not in this state before: stored, counted, indexed.
    fn record_violation(
        &mut self,
        encoded: &[u8],
        violation: &Violation,
    ) -> Result<(), PipelineError> {
        match &violation.pending {
            Some(pending) => {
                let place = self
                    .options
                    .policy
                    .rule_index(&violation.rule_id)
                    .unwrap_or(usize::MAX);
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
    fn forget_violation(
        &mut self,
        encoded: &[u8],
        violation: &Violation,
    ) -> Result<(), PipelineError> {
        match &violation.pending {
            Some(pending) => {
                let place = self
                    .options
                    .policy
                    .rule_index(&violation.rule_id)
                    .unwrap_or(usize::MAX);
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
    /// (`SEMANTICS.md` §9): an `opened` alert timed at its deadline, with the id and twin
    /// version fixed when it became pending.
    fn fire_until(&mut self, until: Ticks) -> Result<(), PipelineError> {
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
            let owned = decode_twin_key(&encoded).ok_or_else(|| StoreError::Corrupt {
                what: "key",
                detail: format!("{encoded:?}"),
            })?;
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
    fn remove_violations(&mut self, key: TwinKey<'_>) -> Result<(), PipelineError> {
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

    fn emit(
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
    fn emit_with_version(
        &mut self,
        origin: &Origin<'_>,
        key: TwinKey<'_>,
        time: Ticks,
        version: i64,
        n_before: usize,
    ) -> Result<usize, PipelineError> {
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
                    self.enqueued_time,
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

    fn after_message(&mut self) -> Result<(), PipelineError> {
        self.n_in_batch += 1;
        let started = *self.batch_started.get_or_insert_with(Instant::now);
        if self.n_in_batch >= self.options.batch_messages
            || started.elapsed() >= self.options.batch_interval
        {
            self.commit()?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), PipelineError> {
        let any_source_moved = self.sources.iter().any(|s| s.dirty);
        if self.n_in_batch == 0 && !any_source_moved && self.batch.is_empty() {
            self.batch_started = None;
            return Ok(());
        }
        self.batch_no += 1;
        let started = self.options.metrics.is_some().then(Instant::now);
        let mut batch = std::mem::take(&mut self.batch);
        let twins = self.snapshot.take_writes(self.batch_no);
        if self.outbox_grew {
            self.store
                .put_outbox_next(&mut batch, self.next_outbox_seq)?;
            self.outbox_grew = false;
        }
        if self.high_water_moved {
            self.store.put_meta(
                &mut batch,
                META_HIGH_WATER,
                &self.high_water.0.to_be_bytes(),
            )?;
            self.high_water_moved = false;
        }
        let mut positions = Vec::new();
        for (i, source) in self.sources.iter_mut().enumerate().filter(|(_, s)| s.dirty) {
            self.store
                .put_checkpoint(&mut batch, &source.id, &source.checkpoint)?;
            source.dirty = false;
            positions.push((i, source.checkpoint.next_index));
        }
        self.uncommitted.push_back((self.batch_no, positions));
        if let (Some(metrics), Some(started)) = (&self.options.metrics, started) {
            let busy = std::mem::take(&mut self.busy) + started.elapsed();
            metrics.apply_seconds.observe(busy.as_secs_f64());
            metrics.batch_size.observe(self.n_in_batch as f64);
        }
        let to_writer = self.to_writer.as_ref().ok_or(PipelineError::WriterGone)?;
        crate::failpoint::hit(crate::failpoint::APPLY_BEFORE_HANDOFF);
        // A full channel blocks here: the backpressure that keeps the apply thread at most
        // two batches ahead of RocksDB.
        to_writer
            .send((self.batch_no, batch, twins))
            .map_err(|_| PipelineError::WriterGone)?;
        self.counters.batches += 1;
        self.n_in_batch = 0;
        self.batch_started = None;
        self.drain_acks(false)
    }

    /// Commits what is open and waits until the writer has written every batch, so that the
    /// store holds all that was applied (the writer thread goes on).
    fn flush(&mut self) -> Result<(), PipelineError> {
        self.commit()?;
        while !self.uncommitted.is_empty() {
            let result = self
                .from_writer
                .recv()
                .map_err(|_| PipelineError::WriterGone)?;
            self.acknowledged(result?);
        }
        Ok(())
    }

    fn drain_acks(&mut self, until_closed: bool) -> Result<(), PipelineError> {
        loop {
            let result = if until_closed {
                match self.from_writer.recv() {
                    Ok(result) => result,
                    Err(_) => return Ok(()),
                }
            } else {
                match self.from_writer.try_recv() {
                    Ok(result) => result,
                    Err(crossbeam_channel::TryRecvError::Empty) => return Ok(()),
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        return Err(PipelineError::WriterGone)
                    }
                }
            };
            self.acknowledged(result?);
        }
    }

    /// The writer wrote every batch up to `batch_no`, the last one's twins as `written`.
    fn acknowledged(&mut self, (batch_no, written): (u64, Written)) {
        self.snapshot.committed(batch_no, written);
        while self
            .uncommitted
            .front()
            .is_some_and(|(n, _)| *n <= batch_no)
        {
            if let Some((_, positions)) = self.uncommitted.pop_front() {
                for (source, next_index) in positions {
                    if self.committed.len() <= source {
                        self.committed.resize(source + 1, None);
                    }
                    self.committed[source] = Some(next_index);
                }
            }
        }
    }
}

/// What caused an alert: its id derives from this (`SEMANTICS.md` §4, §7, §8).
enum Origin<'a> {
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
fn escape_id_part(part: &str) -> String {
    part.replace('%', "%25")
        .replace('/', "%2F")
        .replace('#', "%23")
}

/// A twin key in an alert id: `hub/device[/module]`, each part escaped.
fn escaped_key(key: TwinKey<'_>) -> String {
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
fn device_modules(directory: &Directory, key: TwinKey<'_>) -> Vec<Box<str>> {
    if key.is_device_twin() {
        directory.live_modules(key.hub, key.device_id)
    } else {
        Vec::new()
    }
}

/// Appends to `failing` the rules failing on the twin `key` at `version` with document `doc`;
/// `modules` are a device twin's live modules (`/$modules`).
fn failing_rules(
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

/// Counts the twins failing each rule; every rule of `policy` is listed, at 0 when none fails.
fn failing_counts(violations: &ViolationSets, policy: &Policy) -> FailingCounts {
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
fn pending_counts(violations: &ViolationSets) -> BTreeMap<Box<str>, u64> {
    let mut out = BTreeMap::new();
    for violation in violations.values().flatten() {
        if violation.pending.is_some() {
            *out.entry(violation.rule_id.clone()).or_insert(0) += 1;
        }
    }
    out
}

/// Indexes every pending violation by deadline (see [`State::deadlines`]).
fn deadline_index(violations: &ViolationSets, policy: &Policy) -> Deadlines {
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
fn load_violations(store: &Store, policy: &Policy) -> Result<ViolationSets, PipelineError> {
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
