//! Delivery: one thread per sink reads the outbox from that sink's own cursor (committed in
//! the store), hands runs of alerts to its sink, and moves the cursor past what the sink
//! accepted; an outbox entry is deleted once every sink's cursor is past it. A slow or
//! failing sink so never holds back another (at-least-once at every sink: a crash between a
//! sink's acceptance and its cursor's commit re-delivers those alerts to it, with the same
//! ids).
//!
//! Each sink has its own backoff: exponential with full jitter from 100 ms, capped at 5 s (or
//! the receiver's `Retry-After`), reset by any success, waited out on the sink's own thread
//! while it keeps its periodic work going. A failure that retrying cannot help (a 4xx other
//! than 408 and 429) is narrowed down by splitting the run until the refused alerts are
//! found; each is set aside as an **alert dead letter** (sink, alert id, status, the
//! receiver's message, the alert) and delivery goes on.
//!
//! The cursor commits, dead letters and outbox deletions are the one write outside the
//! pipeline's writer thread: they touch only keys that the pipeline wrote in committed
//! batches and never writes again (and the sinks' own keys), so the writers cannot conflict.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rand::Rng;

use super::sinks::{Failed, Sink, SinkError};
use crate::compliance::wire::{AlertEnqueued, AlertId};
use crate::store::{Batch, OutboxEntry, Store, StoreError};
use crate::telemetry::DeliveryMetrics;

/// Alerts read from the outbox at a time, per sink.
const RUN: usize = 4096;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between attempts (unless the receiver asks for longer with
/// `Retry-After`): short enough that a sink that is back is found again within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an idle sink looks at the outbox (new alerts also wake it at once).
const POLL: Duration = Duration::from_millis(200);
/// Bytes of a receiver's message kept in an alert dead letter.
const MESSAGE_LIMIT: usize = 512;

/// What delivery did, reported when it stops.
#[derive(Clone, Debug, Default)]
pub struct DeliveryReport {
    /// Outbox entries every sink accepted (or set aside) in this run, deleted.
    pub delivered: u64,
    /// Attempts that failed and were retried, summed over the sinks.
    pub retries: u64,
    /// Alerts set aside as dead letters, summed over the sinks.
    pub dead_lettered: u64,
    /// Alerts still in the outbox at the stop (delivered by a later run).
    pub left_in_outbox: u64,
}

/// What one sink's thread did.
#[derive(Clone, Copy, Debug, Default)]
struct SinkReport {
    retries: u64,
    dead_lettered: u64,
}

/// A deadline set once, read by the delivery threads.
#[derive(Default)]
struct Deadline(Mutex<Option<Instant>>);

impl Deadline {
    fn set(&self, at: Instant) {
        if let Ok(mut d) = self.0.lock() {
            *d = Some(at);
        }
    }

    fn get(&self) -> Option<Instant> {
        self.0.lock().ok().and_then(|d| *d)
    }

    fn passed(&self) -> bool {
        self.0
            .lock()
            .map(|d| d.is_some_and(|at| Instant::now() >= at))
            .unwrap_or(true)
    }
}

/// What the sinks' threads share.
struct Shared {
    store: Arc<Store>,
    metrics: Option<DeliveryMetrics>,
    draining: AtomicBool,
    deadline: Deadline,
    /// Bumped by [`Reopener::reopen`]; each thread reopens its sink when it sees a new value.
    reopen_generation: AtomicU64,
    /// Each sink's cursor: the next outbox sequence number it has not accepted.
    cursors: Vec<AtomicU64>,
    /// For each sink, when the oldest alert it has not accepted was committed (Unix ms; 0:
    /// it has accepted everything it has seen).
    waiting_since: Vec<AtomicU64>,
    /// Outbox entries below this are deleted; the lock also makes deletions one at a time.
    deleted_below: Mutex<u64>,
    /// Entries deleted by this process.
    delivered: AtomicU64,
    /// Why delivery stopped working (a sink's thread failed or panicked), once it did.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, why: String) {
        tracing::error!(error = %why, "alert delivery stopped");
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(why);
        }
    }

    /// Deletes the entries every sink is past; observes their latency. `accepted` are the
    /// entries the calling sink has just accepted (the only ones that can newly be past
    /// every sink, when that sink was the last).
    fn collect(&self, accepted: &[OutboxEntry]) -> Result<(), StoreError> {
        let min = self
            .cursors
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .min()
            .unwrap_or(0);
        let Ok(mut below) = self.deleted_below.lock() else {
            return Ok(());
        };
        if min <= *below {
            return Ok(());
        }
        let mut batch = Batch::default();
        self.store.delete_outbox_range(&mut batch, *below, min)?;
        self.store.write(&mut batch)?;
        let done = accepted.iter().filter(|e| e.seq >= *below && e.seq < min);
        let mut n = 0u64;
        if let Some(metrics) = &self.metrics {
            let now = crate::time::Ticks::now().0;
            for entry in done {
                n += 1;
                observe_latency(&metrics.enqueue_to_alert_seconds, now, &entry.alert);
            }
        } else {
            n = done.count() as u64;
        }
        self.delivered.fetch_add(n, Ordering::Relaxed);
        *below = min;
        Ok(())
    }

    /// Updates the backlog gauges: pending alerts (from the slowest sink's cursor to the
    /// high-water mark) and when the oldest of them was committed.
    fn backlog(&self) -> Result<(), StoreError> {
        let Some(metrics) = &self.metrics else {
            return Ok(());
        };
        let min = self
            .cursors
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .min()
            .unwrap_or(0);
        let floor = self.deleted_below.lock().map_or(min, |b| *b).max(min);
        let next = self.store.next_outbox_seq()?;
        metrics
            .outbox_pending
            .set(i64::try_from(next.saturating_sub(floor)).unwrap_or(i64::MAX));
        let oldest = self
            .waiting_since
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .filter(|&w| w != 0)
            .min()
            .unwrap_or(0);
        metrics
            .head_waiting_since_ms
            .store(oldest, Ordering::Relaxed);
        Ok(())
    }
}

/// The running delivery threads, one per sink.
pub struct Delivery {
    shared: Arc<Shared>,
    wakes: Vec<Sender<()>>,
    /// Each thread's result, sent when it stops (a panic sends an error too).
    done: Receiver<Result<SinkReport, StoreError>>,
    handles: Vec<JoinHandle<()>>,
}

/// Time past the drain deadline allowed for a sink call already under way.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Wakes the delivery threads from another thread (new alerts were committed).
#[derive(Clone)]
pub struct DeliveryWaker(Vec<Sender<()>>);

impl DeliveryWaker {
    pub fn wake(&self) {
        for wake in &self.0 {
            let _ = wake.try_send(());
        }
    }
}

/// Makes every sink reopen what it writes to (the alert file after log rotation): for the
/// service's SIGHUP handler.
#[derive(Clone)]
pub struct Reopener {
    shared: Arc<Shared>,
    wakes: Vec<Sender<()>>,
}

impl Reopener {
    /// Asks every sink to reopen; each does before its next delivery, within a poll.
    pub fn reopen(&self) {
        self.shared.reopen_generation.fetch_add(1, Ordering::SeqCst);
        for wake in &self.wakes {
            let _ = wake.try_send(());
        }
    }
}

/// Whether delivery still works: for `/readyz` and the service's exit status.
#[derive(Clone)]
pub struct DeliveryHealth(Arc<Shared>);

impl DeliveryHealth {
    /// Why delivery stopped working (a sink's thread failed or panicked); `None` while it
    /// works.
    pub fn failure(&self) -> Option<String> {
        self.0.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl Delivery {
    /// New alerts were committed: look now rather than at the next poll.
    pub fn wake(&self) {
        self.waker().wake();
    }

    pub fn waker(&self) -> DeliveryWaker {
        DeliveryWaker(self.wakes.clone())
    }

    pub fn reopener(&self) -> Reopener {
        Reopener {
            shared: self.shared.clone(),
            wakes: self.wakes.clone(),
        }
    }

    pub fn health(&self) -> DeliveryHealth {
        DeliveryHealth(self.shared.clone())
    }

    /// Delivers what is left, giving up after `deadline` (what is left stays in the outbox),
    /// and stops. Returns by the deadline (and a short grace) even when a sink call hangs:
    /// that thread is then left behind, and what its sink had not accepted is delivered again
    /// by the next start. An error when a thread failed, hung or panicked.
    pub fn drain_and_stop(self, deadline: Duration) -> Result<DeliveryReport, StoreError> {
        let shared = &self.shared;
        shared.deadline.set(Instant::now() + deadline);
        shared.draining.store(true, Ordering::SeqCst);
        for wake in &self.wakes {
            let _ = wake.try_send(());
        }
        let until = Instant::now() + deadline + DRAIN_GRACE;
        let mut report = DeliveryReport::default();
        let mut first_error = None;
        for _ in 0..self.handles.len() {
            let left = until.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok(Ok(sink)) => {
                    report.retries += sink.retries;
                    report.dead_lettered += sink.dead_lettered;
                }
                Ok(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                Err(_) => {
                    return Err(StoreError::Corrupt {
                        what: "delivery",
                        detail: format!("a sink did not answer within the {deadline:?} deadline; undelivered alerts stay in the outbox"),
                    });
                }
            }
        }
        // Every thread has stopped: they have only their locals left to drop, the store
        // among them: wait for that, so that RocksDB is never closed while the process exits.
        for handle in self.handles {
            let _ = handle.join();
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        report.delivered = shared.delivered.load(Ordering::Relaxed);
        let floor = shared
            .cursors
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .min()
            .unwrap_or(0);
        report.left_in_outbox = count_left(&shared.store, floor)?;
        Ok(report)
    }
}

/// Starts delivering the outbox of `store` to `sinks`, a thread each. `metrics`, when given,
/// counts deliveries, retries, failures and dead letters per sink, tracks the outbox's
/// backlog, and observes for every alert past every sink the time since its causing event was
/// enqueued (its `enqueuedtime`).
pub fn spawn_delivery(
    store: Arc<Store>,
    sinks: Vec<Box<dyn Sink>>,
    metrics: Option<DeliveryMetrics>,
) -> std::io::Result<Delivery> {
    let io = |e: StoreError| std::io::Error::other(e.to_string());
    let first = store
        .outbox_entries(0, 1)
        .map_err(io)?
        .first()
        .map_or(0, |e| e.seq);
    let mut cursors = Vec::with_capacity(sinks.len());
    for sink in &sinks {
        // A sink with no cursor (new, or never accepted anything) starts at the oldest entry.
        let cursor = store.sink_cursor(sink.name()).map_err(io)?.unwrap_or(0);
        cursors.push(AtomicU64::new(cursor.max(first)));
    }
    if let Some(metrics) = &metrics {
        // Every sink's counters show from the start, at 0.
        for sink in &sinks {
            for counter in [
                &metrics.deliveries,
                &metrics.retries,
                &metrics.failures,
                &metrics.dead_letters,
            ] {
                counter.with_label_values(&[sink.name()]);
            }
        }
    }
    let shared = Arc::new(Shared {
        store,
        metrics,
        draining: AtomicBool::new(false),
        deadline: Deadline::default(),
        reopen_generation: AtomicU64::new(0),
        waiting_since: sinks.iter().map(|_| AtomicU64::new(0)).collect(),
        cursors,
        deleted_below: Mutex::new(first),
        delivered: AtomicU64::new(0),
        failure: Mutex::new(None),
    });
    let (finished, done) = crossbeam_channel::bounded(sinks.len().max(1));
    let mut wakes = Vec::with_capacity(sinks.len());
    let mut handles = Vec::with_capacity(sinks.len());
    for (index, sink) in sinks.into_iter().enumerate() {
        let (wake, woken) = crossbeam_channel::bounded(1);
        wakes.push(wake);
        let shared = shared.clone();
        let finished = finished.clone();
        let handle = std::thread::Builder::new()
            .name(format!("twinwatch-deliver-{}", sink.name()))
            .spawn(move || {
                let name = sink.name();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    SinkThread::new(&shared, index, sink, &woken).run()
                }))
                .unwrap_or_else(|_| {
                    Err(StoreError::Corrupt {
                        what: "delivery",
                        detail: format!("the delivery thread of the {name} sink panicked"),
                    })
                });
                if let Err(error) = &result {
                    shared.fail(format!("{name}: {error}"));
                }
                let _ = finished.send(result);
            })?;
        handles.push(handle);
    }
    Ok(Delivery {
        shared,
        wakes,
        done,
        handles,
    })
}

/// One sink's delivery: its window of the outbox, its cursor, its backoff.
struct SinkThread<'a> {
    shared: &'a Shared,
    index: usize,
    sink: Box<dyn Sink>,
    name: &'static str,
    woken: &'a Receiver<()>,
    /// Outbox entries from the cursor on, as last read.
    window: VecDeque<OutboxEntry>,
    /// When entries of the old format (no commit time) were first seen, by sequence number
    /// of the first of them: they count as committed then.
    first_seen: Option<(u64, u64)>,
    /// The most alerts the next attempt may carry, while a refused run is narrowed down.
    limit: usize,
    /// The end (exclusive sequence number) of the refused run being narrowed down.
    suspect_end: u64,
    backoff: Duration,
    retry_at: Option<Instant>,
    rng: rand_chacha::ChaCha8Rng,
    told_to_stop: bool,
    reopened: u64,
    report: SinkReport,
}

impl<'a> SinkThread<'a> {
    fn new(
        shared: &'a Shared,
        index: usize,
        sink: Box<dyn Sink>,
        woken: &'a Receiver<()>,
    ) -> SinkThread<'a> {
        // Jitter needs no secure randomness: a generator seeded from the clock will do.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ index as u64;
        SinkThread {
            shared,
            index,
            name: sink.name(),
            sink,
            woken,
            window: VecDeque::new(),
            first_seen: None,
            limit: usize::MAX,
            suspect_end: 0,
            backoff: FIRST_BACKOFF,
            retry_at: None,
            rng: <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed),
            told_to_stop: false,
            reopened: 0,
            report: SinkReport::default(),
        }
    }

    fn cursor(&self) -> u64 {
        self.shared.cursors[self.index].load(Ordering::SeqCst)
    }

    fn run(mut self) -> Result<SinkReport, StoreError> {
        loop {
            self.tell_stop();
            self.maybe_reopen();
            self.housekeep();
            let draining = self.shared.draining.load(Ordering::SeqCst);
            if draining && self.shared.deadline.passed() {
                return Ok(self.report);
            }
            if let Some(at) = self.retry_at {
                let now = Instant::now();
                if now < at {
                    if !self.sink.busy() {
                        self.wait((at - now).min(POLL));
                    }
                    continue;
                }
                self.retry_at = None;
            }
            if self.window.is_empty() {
                self.read()?;
            }
            self.note_waiting();
            self.shared.backlog()?;
            if self.window.is_empty() {
                if draining {
                    return Ok(self.report);
                }
                if !self.sink.busy() {
                    self.wait(POLL);
                }
                continue;
            }
            self.attempt()?;
        }
    }

    /// Waits for a wake-up (new alerts, a reopen, the stop) or `at_most`.
    fn wait(&self, at_most: Duration) {
        match self.woken.recv_timeout(at_most) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            // Nobody can wake this thread any more: the poll interval will do.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(at_most),
        }
    }

    fn read(&mut self) -> Result<(), StoreError> {
        let entries = self.shared.store.outbox_entries(self.cursor(), RUN)?;
        self.window.extend(entries);
        Ok(())
    }

    /// Records when the oldest alert this sink has not accepted was committed.
    fn note_waiting(&mut self) {
        let since = match self.window.front() {
            None => 0,
            Some(entry) => match entry.committed_ms {
                Some(ms) => ms.max(1),
                None => match self.first_seen {
                    Some((seq, ms)) if seq <= entry.seq => ms,
                    _ => {
                        let now = unix_ms();
                        self.first_seen = Some((entry.seq, now));
                        now
                    }
                },
            },
        };
        self.shared.waiting_since[self.index].store(since, Ordering::Relaxed);
    }

    /// One delivery attempt of the front of the window.
    fn attempt(&mut self) -> Result<(), StoreError> {
        let mut n = self.window.len().min(self.limit);
        if self.suspect_end > self.cursor() {
            let suspect = self
                .window
                .iter()
                .take_while(|e| e.seq < self.suspect_end)
                .count();
            n = n.min(suspect.max(1));
        }
        let alerts: Vec<&[u8]> = self
            .window
            .iter()
            .take(n)
            .map(|e| e.alert.as_slice())
            .collect();
        let outcome = self.sink.deliver(&alerts);
        drop(alerts);
        let (accepted, error) = match outcome {
            Ok(()) => (n, None),
            Err(Failed { accepted, error }) => (accepted.min(n), Some(error)),
        };
        if accepted > 0 {
            crate::failpoint::hit(crate::failpoint::DELIVERY_AFTER_ACK);
            self.advance(accepted, None)?;
            self.backoff = FIRST_BACKOFF;
            if let Some(metrics) = &self.shared.metrics {
                metrics
                    .deliveries
                    .with_label_values(&[self.name])
                    .inc_by(accepted as u64);
            }
        }
        let Some(error) = error else {
            if self.cursor() >= self.suspect_end {
                self.limit = usize::MAX;
            }
            return Ok(());
        };
        if let Some(metrics) = &self.shared.metrics {
            metrics.failures.with_label_values(&[self.name]).inc();
        }
        let refused = n - accepted;
        if error.is_permanent() {
            if refused <= 1 {
                // The one refused alert: set aside, and on with the rest.
                tracing::warn!(sink = self.name, error = %error, kind = error.kind(), "alert refused for good; kept as an alert dead letter");
                self.advance(1, Some(&error))?;
                // The rest of the refused run is tried whole again (bisected anew if it
                // holds more refused alerts): a few attempts per refused alert, not one per
                // alert of the run.
                self.limit = usize::MAX;
            } else {
                // Somewhere in the rest of the run: try each half in turn.
                tracing::debug!(sink = self.name, error = %error, refused, "run refused; splitting it to find the refused alerts");
                let last = self
                    .window
                    .get(refused - 1)
                    .map_or(self.cursor(), |e| e.seq);
                self.suspect_end = self.suspect_end.max(last + 1);
                self.limit = refused.div_ceil(2);
            }
            return Ok(());
        }
        tracing::warn!(sink = self.name, error = %error, kind = error.kind(), "alert delivery failed; retrying");
        self.report.retries += 1;
        if let Some(metrics) = &self.shared.metrics {
            metrics.retries.with_label_values(&[self.name]).inc();
        }
        // Exponential backoff with full jitter, so that many instances do not retry a
        // recovering receiver in step; a receiver's `Retry-After` is honoured.
        let pause = self.backoff.mul_f64(self.rng.gen_range(0.5..1.0));
        let pause = error.retry_after().map_or(pause, |asked| asked.max(pause));
        self.retry_at = Some(Instant::now() + pause);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }

    /// Moves the cursor past the first `n` entries of the window (accepted, or with
    /// `dead_letter`, the one refused) and commits it, then deletes what every sink is past.
    fn advance(&mut self, n: usize, dead_letter: Option<&SinkError>) -> Result<(), StoreError> {
        let done: Vec<OutboxEntry> = self.window.drain(..n.min(self.window.len())).collect();
        let Some(last) = done.last() else {
            return Ok(());
        };
        let next = last.seq + 1;
        let store = &self.shared.store;
        let mut batch = Batch::default();
        if let Some(error) = dead_letter {
            for entry in &done {
                let record = dead_letter_record(self.name, entry, error);
                store.put_alert_dead_letter(&mut batch, entry.seq, self.name, &record)?;
            }
            self.report.dead_lettered += done.len() as u64;
            if let Some(metrics) = &self.shared.metrics {
                metrics
                    .dead_letters
                    .with_label_values(&[self.name])
                    .inc_by(done.len() as u64);
            }
        }
        store.put_sink_cursor(&mut batch, self.name, next)?;
        store.write(&mut batch)?;
        self.shared.cursors[self.index].store(next, Ordering::SeqCst);
        self.shared.collect(&done)
    }

    /// The sink's periodic work (the Alertmanager sink's re-post of open alerts). A failure
    /// is logged and counted in the sink's failures, so that an outage with no new alerts to
    /// deliver still shows in `twinwatch_sink_failures_total`.
    fn housekeep(&mut self) {
        if let Err(error) = self.sink.tick() {
            tracing::warn!(sink = self.name, error = %error, kind = error.kind(), "sink housekeeping failed");
            if let Some(metrics) = &self.shared.metrics {
                metrics.failures.with_label_values(&[self.name]).inc();
            }
        }
    }

    /// Once the service is stopping, tells the sink the deadline its calls must keep (once).
    fn tell_stop(&mut self) {
        if self.told_to_stop || !self.shared.draining.load(Ordering::SeqCst) {
            return;
        }
        if let Some(at) = self.shared.deadline.get() {
            self.sink.stop_by(at);
            self.told_to_stop = true;
        }
    }

    fn maybe_reopen(&mut self) {
        let generation = self.shared.reopen_generation.load(Ordering::SeqCst);
        if generation != self.reopened {
            self.reopened = generation;
            if let Err(error) = self.sink.reopen() {
                tracing::error!(sink = self.name, error = %error, "reopening failed; still writing where it was");
            }
        }
    }
}

/// An alert dead letter's record: one JSON object, as `twinwatch deadletters --alerts`
/// prints it.
fn dead_letter_record(sink: &str, entry: &OutboxEntry, error: &SinkError) -> Vec<u8> {
    let alert_id = serde_json::from_slice::<AlertId>(&entry.alert)
        .ok()
        .map(|a| a.id);
    let message = match error {
        SinkError::Http { detail, .. } => detail.clone(),
        other => other.to_string(),
    };
    let message: String = message.chars().take(MESSAGE_LIMIT).collect();
    let alert = serde_json::from_slice::<serde_json::Value>(&entry.alert).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&entry.alert).into_owned())
    });
    let record = serde_json::json!({
        "sink": sink,
        "seq": entry.seq,
        "alertId": alert_id,
        "status": error.status(),
        "kind": error.kind(),
        "message": message,
        "deadLetteredAtMs": unix_ms(),
        "alert": alert,
    });
    serde_json::to_vec(&record).unwrap_or_default()
}

fn unix_ms() -> u64 {
    u64::try_from(crate::time::Ticks::now().unix_millis()).unwrap_or(0)
}

/// Observes `now` (ticks) minus the alert's `enqueuedtime` (alerts without one are skipped).
fn observe_latency(latency: &prometheus::Histogram, now: i64, alert: &[u8]) {
    let enqueued = serde_json::from_slice::<AlertEnqueued>(alert)
        .ok()
        .and_then(|a| a.enqueuedtime)
        .and_then(|t| crate::time::Ticks::parse_lenient(&t));
    if let Some(enqueued) = enqueued {
        latency.observe((now - enqueued.0).max(0) as f64 / 1e7);
    }
}

fn count_left(store: &Store, from: u64) -> Result<u64, StoreError> {
    let mut n = 0u64;
    let mut next = from;
    loop {
        let entries = store.outbox_entries(next, RUN)?;
        let Some(last) = entries.last() else {
            return Ok(n);
        };
        n += entries.len() as u64;
        next = last.seq + 1;
    }
}

#[cfg(test)]
mod tests;
