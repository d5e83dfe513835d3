//! The apply thread: decode → apply → batch → store, for any source.
//!
//! An [`Engine`] is driven by one thread that hands it records in source order. It decodes
//! each (parsing a JSON body once, into a reused tape), applies the event to the
//! [`Snapshot`], and cuts batches by size and time. A batch (every changed twin and
//! tombstone, the dead letters and each source's checkpoint) is handed to the writer thread
//! as one `WriteBatch`, so the apply thread goes on while RocksDB writes; the bounded channel
//! between them is the backpressure.

pub mod snapshot;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use simd_json::Node;

use crate::compliance::{self, decode_violation, Transition, Violation};
use crate::decode::{decode_body, decode_header, Body, BodyParser, Decoded, Message};
use crate::model::{DeadLetterReason, SourceId, TwinKey};
use crate::policy::{Policy, Severity, TwinView};
use crate::source::storage_json::StorageJsonMessage;
use crate::store::keys::{encode_twin_key, twin_key};
use crate::store::{Batch, Checkpoint, Store, StoreError};
use crate::telemetry::PipelineMetrics;
use crate::twin::{apply, Outcome};
pub use snapshot::{Directory, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store writer stopped")]
    WriterGone,
}

impl PipelineError {
    pub fn kind(&self) -> &'static str {
        match self {
            PipelineError::Store(e) => e.kind(),
            PipelineError::WriterGone => "writer_gone",
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

type WriteResult = Result<u64, StoreError>;

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
    to_writer: Option<Sender<(u64, Batch)>>,
    from_writer: Receiver<WriteResult>,
    writer: Option<JoinHandle<()>>,
    body_parser: BodyParser,
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
}

/// The apply engine; see the module docs.
pub struct Engine {
    line_buf: Vec<u8>,
    buffers: simd_json::Buffers,
    spare_tape: Option<simd_json::Tape<'static>>,
    state: State,
}

impl Engine {
    /// Loads the directory of slots from the store and starts the writer thread.
    pub fn new(store: Arc<Store>, options: EngineOptions) -> Result<Engine, PipelineError> {
        let directory = Directory::load(&store)?;
        let violations = load_violations(&store, &options.policy)?;
        let failing_counts = failing_counts(&violations, &options.policy);
        let next_outbox_seq = store.next_outbox_seq()?;
        let snapshot = Snapshot::new(store.clone(), directory, options.cache_bytes);
        // Two batches may wait for the writer: the apply thread builds the next one while
        // RocksDB writes the last, and is slowed down only when it gets further ahead.
        let (to_writer, writer_input) = crossbeam_channel::bounded::<(u64, Batch)>(1);
        let (writer_output, from_writer) = crossbeam_channel::bounded::<WriteResult>(4);
        let writer_store = store.clone();
        let commit_seconds = options.metrics.as_ref().map(|m| m.commit_seconds.clone());
        let min_free = options.min_free_bytes;
        let writer = std::thread::Builder::new()
            .name("twinwatch-writer".into())
            .spawn(move || {
                for (batch_no, mut batch) in writer_input {
                    if let Some(min_free) = min_free {
                        if let Err(e) = writer_store.wait_for_space(min_free) {
                            let _ = writer_output.send(Err(e));
                            return;
                        }
                    }
                    crate::failpoint::hit(crate::failpoint::WRITER_BEFORE_WRITE);
                    let started = Instant::now();
                    let result = writer_store.write(&mut batch).map(|()| batch_no);
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
            .map_err(|_| PipelineError::WriterGone)?;
        Ok(Engine {
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
                body_parser: BodyParser::default(),
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
            },
        })
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
        self.line_buf.clear();
        self.line_buf.extend_from_slice(line);
        self.line_buf
            .resize(line.len() + simd_json::INPUT_PADDING, 0);
        let mut tape = self
            .spare_tape
            .take()
            .unwrap_or_else(simd_json::Tape::null)
            .reset();
        let parsed = simd_json::fill_tape_padded(
            &mut self.line_buf,
            line.len(),
            &mut self.buffers,
            &mut tape,
        );
        let nodes = parsed.ok().map(|()| &tape.0[..]);
        let result = self
            .state
            .ingest_line(source, index, next_byte_offset, nodes, line);
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
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        self.state
            .ingest_line(source, index, next_byte_offset, nodes, raw)
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
        raw: &[u8],
    ) -> Result<(), PipelineError> {
        match nodes.and_then(|nodes| StorageJsonMessage::new(nodes, raw.len())) {
            Some(message) => self.handle(source, index, &message, &|| Cow::Borrowed(raw))?,
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
        let mut parsed = None;
        let body: &[Node<'_>] = match header.body {
            Body::Tape(nodes) => nodes,
            Body::Absent => &[],
            other => {
                parsed = self.body_parser.parse(other, self.spare_tape.take());
                parsed.as_ref().map_or(&[][..], |tape| &tape.0[..])
            }
        };
        let event = match decode_body(&header, body) {
            Ok(event) => event,
            Err(reason) => return self.dead_letter(source, index, reason, &raw()),
        };
        let event_version = event.version;
        let outcome = apply(&event, &mut self.snapshot)?;
        // The body's tape allocation serves the next message.
        if let Some(tape) = parsed {
            self.spare_tape = Some(tape.reset());
        }
        // The key from the header, which borrows only the message, not the body's parser.
        let key = header.key;
        let time = header.op_time;
        self.transitions.clear();
        let mut n_alerts = 0usize;
        match outcome {
            Outcome::Stale => {
                self.counters.stale += 1;
                return Ok(());
            }
            Outcome::Upserted { appeared } => {
                self.counters.applied += 1;
                self.evaluate(key, time)?;
                n_alerts = self.emit(source, index, key, time, n_alerts)?;
                if appeared && !key.is_device_twin() {
                    self.evaluate(key.device_twin(), time)?;
                    self.emit(source, index, key.device_twin(), time, n_alerts)?;
                }
            }
            Outcome::Removed { cascaded } => {
                self.counters.applied += 1;
                let version = match self.snapshot.directory.slot(key) {
                    Some(crate::twin::Slot::Dead { version, .. }) => version,
                    _ => event_version,
                };
                self.remove_violations(key);
                n_alerts = self.emit_with_version(source, index, key, time, version, n_alerts)?;
                for module_id in &cascaded {
                    let module_key = TwinKey { module_id, ..key };
                    let version = match self.snapshot.directory.slot(module_key) {
                        Some(crate::twin::Slot::Dead { version, .. }) => version,
                        _ => 0,
                    };
                    self.remove_violations(module_key);
                    n_alerts =
                        self.emit_with_version(source, index, module_key, time, version, n_alerts)?;
                }
                if !key.is_device_twin() {
                    self.evaluate(key.device_twin(), time)?;
                    self.emit(source, index, key.device_twin(), time, n_alerts)?;
                }
            }
        }
        Ok(())
    }

    /// Evaluates the policy on a live twin into `self.transitions`, updating its stored
    /// violations; nothing when the twin does not exist.
    fn evaluate(
        &mut self,
        key: TwinKey<'_>,
        time: crate::time::Ticks,
    ) -> Result<(), PipelineError> {
        self.transitions.clear();
        if self.options.policy.candidates(key.module_id).is_empty() {
            self.key_buf.clear();
            encode_twin_key(key, &mut self.key_buf);
            if !self.violations.contains_key(&self.key_buf[..]) {
                return Ok(());
            }
        }
        let modules_owned = if key.is_device_twin() {
            self.snapshot.directory.live_modules(key.hub, key.device_id)
        } else {
            Vec::new()
        };
        let modules: Vec<&str> = modules_owned.iter().map(|m| &**m).collect();
        let policy = self.options.policy.clone();
        let Some((version, doc)) = self.snapshot.live_doc(key)? else {
            return Ok(());
        };
        let view = TwinView {
            hub_name: key.hub,
            device_id: key.device_id,
            module_id: key.module_id,
            version,
            doc: &doc,
            modules: &modules,
        };
        self.failing.clear();
        policy.evaluate(&view, &mut self.failing);
        drop(doc);
        let encoded = twin_key(key);
        let stored = self.violations.get_mut(&encoded[..]);
        if stored.is_none() && self.failing.is_empty() {
            return Ok(());
        }
        let mut current = stored.map(std::mem::take).unwrap_or_default();
        let before: Vec<Box<str>> = current.iter().map(|v| v.rule_id.clone()).collect();
        compliance::transitions(
            &policy,
            &mut current,
            &self.failing,
            time,
            version,
            &mut self.transitions,
        );
        for rule_id in &before {
            if !current.iter().any(|v| v.rule_id == *rule_id) {
                self.store
                    .delete_violation(&mut self.batch, &encoded, rule_id)?;
                if let Some((_, n)) = self.failing_counts.get_mut(rule_id) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        for violation in &current {
            if !before.contains(&violation.rule_id) {
                self.failing_counts
                    .entry(violation.rule_id.clone())
                    .or_insert((violation.severity, 0))
                    .1 += 1;
                self.store.put_violation(
                    &mut self.batch,
                    &encoded,
                    &violation.rule_id,
                    &compliance::encode_violation(violation),
                )?;
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

    /// A removed twin's violations resolve (reason `deleted`) into `self.transitions`.
    fn remove_violations(&mut self, key: TwinKey<'_>) {
        self.transitions.clear();
        let encoded = twin_key(key);
        if let Some(stored) = self.violations.remove(&encoded[..]) {
            for violation in &stored {
                // A store error here would surface at the next write of this batch; deleting
                // into a batch cannot fail but for a missing column family, checked at open.
                let _ = self
                    .store
                    .delete_violation(&mut self.batch, &encoded, &violation.rule_id);
                if let Some((_, n)) = self.failing_counts.get_mut(&violation.rule_id) {
                    *n = n.saturating_sub(1);
                }
            }
            compliance::deleted(stored, &mut self.transitions);
        }
    }

    fn emit(
        &mut self,
        source: SourceHandle,
        index: u64,
        key: TwinKey<'_>,
        time: crate::time::Ticks,
        n_before: usize,
    ) -> Result<usize, PipelineError> {
        let version = self.twin_version;
        self.emit_with_version(source, index, key, time, version, n_before)
    }

    /// Counts `self.transitions` as alerts of the event at (`source`, `index`), numbered from
    /// `n_before`, and queues them when a sink will deliver them. Returns the event's alert
    /// count so far.
    fn emit_with_version(
        &mut self,
        source: SourceHandle,
        index: u64,
        key: TwinKey<'_>,
        time: crate::time::Ticks,
        version: i64,
        n_before: usize,
    ) -> Result<usize, PipelineError> {
        let mut n = n_before;
        for transition in std::mem::take(&mut self.transitions) {
            match transition.kind {
                compliance::AlertKind::Opened => self.counters.alerts_opened += 1,
                _ => self.counters.alerts_resolved += 1,
            }
            if self.options.queue_alerts {
                let id = format!("{}#{}.{}", self.sources[source.0].alert_name, index, n);
                let alert = compliance::cloud_event(
                    &id,
                    key,
                    &transition,
                    time,
                    version,
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
        self.snapshot.drain_into(&mut batch, self.batch_no)?;
        if self.outbox_grew {
            self.store
                .put_outbox_next(&mut batch, self.next_outbox_seq)?;
            self.outbox_grew = false;
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
            .send((self.batch_no, batch))
            .map_err(|_| PipelineError::WriterGone)?;
        self.counters.batches += 1;
        self.n_in_batch = 0;
        self.batch_started = None;
        self.drain_acks(false)
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
            let batch_no = result?;
            self.snapshot.committed(batch_no);
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
}

/// Counts the twins failing each rule; every rule of `policy` is listed, at 0 when none fails.
fn failing_counts(violations: &ViolationSets, policy: &Policy) -> FailingCounts {
    let mut out: FailingCounts = policy
        .rules()
        .iter()
        .map(|rule| (rule.id.as_str().into(), (rule.severity, 0)))
        .collect();
    for violation in violations.values().flatten() {
        out.entry(violation.rule_id.clone())
            .or_insert((violation.severity, 0))
            .1 += 1;
    }
    out
}

/// Loads every twin's violations, each twin's in the order of `policy` (rules no longer in it
/// last, by id).
fn load_violations(store: &Store, policy: &Policy) -> Result<ViolationSets, PipelineError> {
    let mut out = ViolationSets::default();
    for item in store.violations()? {
        let (key, rule_id, value) = item?;
        let violation = decode_violation(&rule_id, &value).ok_or_else(|| StoreError::Corrupt {
            what: "violation",
            detail: format!("{} {rule_id}", key.as_key()),
        })?;
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
