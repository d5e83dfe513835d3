//! The delivery thread: reads the outbox in order, hands each run of alerts to every sink,
//! and deletes a run only once every sink has accepted it (at-least-once: a crash between
//! the two re-delivers the run, with the same ids).
//!
//! The outbox deletions are the one write outside the pipeline's writer thread: they touch
//! only keys that the pipeline wrote in committed batches and never writes again, so the two
//! writers cannot conflict.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rand::Rng;

use super::sinks::Sink;
use crate::store::{Batch, Store, StoreError};
use crate::telemetry::DeliveryMetrics;

/// Alerts read from the outbox at a time.
const RUN: usize = 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What delivery did, reported when it stops.
#[derive(Clone, Debug, Default)]
pub struct DeliveryReport {
    pub delivered: u64,
    pub retries: u64,
    /// Alerts still in the outbox at the stop (delivered by a later run).
    pub left_in_outbox: u64,
}

/// The running delivery thread.
pub struct Delivery {
    wake: Sender<()>,
    draining: Arc<AtomicBool>,
    deadline: Arc<parking_deadline::Deadline>,
    /// The thread's result, sent when it stops (a panic drops the sender).
    done: Receiver<Result<DeliveryReport, StoreError>>,
    handle: JoinHandle<()>,
}

/// Time past the drain deadline allowed for a sink call already under way.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

mod parking_deadline {
    use std::sync::Mutex;
    use std::time::Instant;

    /// A deadline set once, read by the delivery thread.
    #[derive(Default)]
    pub struct Deadline(Mutex<Option<Instant>>);

    impl Deadline {
        pub fn set(&self, at: Instant) {
            if let Ok(mut d) = self.0.lock() {
                *d = Some(at);
            }
        }

        pub fn get(&self) -> Option<Instant> {
            self.0.lock().ok().and_then(|d| *d)
        }

        pub fn passed(&self) -> bool {
            self.0
                .lock()
                .map(|d| d.is_some_and(|at| Instant::now() >= at))
                .unwrap_or(true)
        }
    }
}

/// Wakes the delivery thread from another thread (new alerts were committed).
#[derive(Clone)]
pub struct DeliveryWaker(Sender<()>);

impl DeliveryWaker {
    pub fn wake(&self) {
        let _ = self.0.try_send(());
    }
}

impl Delivery {
    /// New alerts were committed: look now rather than at the next poll.
    pub fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    pub fn waker(&self) -> DeliveryWaker {
        DeliveryWaker(self.wake.clone())
    }

    /// Delivers what is left, giving up after `deadline` (what is left stays in the outbox),
    /// and stops. Returns by the deadline (and a short grace) even when a sink call hangs:
    /// the thread is then left behind, and what it had not deleted is delivered again by the
    /// next start.
    pub fn drain_and_stop(self, deadline: Duration) -> Result<DeliveryReport, StoreError> {
        self.deadline.set(Instant::now() + deadline);
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.wake.try_send(());
        match self.done.recv_timeout(deadline + DRAIN_GRACE) {
            Ok(result) => {
                // It has only its locals left to drop, the store among them: wait for that,
                // so that RocksDB is never closed while the process exits.
                let _ = self.handle.join();
                result
            }
            Err(RecvTimeoutError::Timeout) => Err(StoreError::Corrupt {
                what: "delivery",
                detail: format!("a sink did not answer within the {deadline:?} deadline; undelivered alerts stay in the outbox"),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(StoreError::Corrupt {
                what: "delivery",
                detail: "the delivery thread panicked".into(),
            }),
        }
    }
}

/// Starts delivering the outbox of `store` to `sinks`. `metrics`, when given, counts
/// deliveries, retries and failures per sink, tracks the outbox's backlog, and observes for
/// every delivered alert the time since its causing event was enqueued (its `enqueuedtime`).
pub fn spawn_delivery(
    store: Arc<Store>,
    sinks: Vec<Box<dyn Sink>>,
    metrics: Option<DeliveryMetrics>,
) -> std::io::Result<Delivery> {
    let (wake, woken) = crossbeam_channel::bounded(1);
    let (finished, done) = crossbeam_channel::bounded(1);
    let draining = Arc::new(AtomicBool::new(false));
    let deadline = Arc::new(parking_deadline::Deadline::default());
    let handle = std::thread::Builder::new()
        .name("twinwatch-deliver".into())
        .spawn({
            let draining = draining.clone();
            let deadline = deadline.clone();
            move || {
                let result = run(
                    &store,
                    sinks,
                    &woken,
                    &draining,
                    &deadline,
                    metrics.as_ref(),
                );
                let _ = finished.send(result);
            }
        })?;
    Ok(Delivery {
        wake,
        draining,
        deadline,
        done,
        handle,
    })
}

fn run(
    store: &Store,
    mut sinks: Vec<Box<dyn Sink>>,
    woken: &Receiver<()>,
    draining: &AtomicBool,
    deadline: &parking_deadline::Deadline,
    metrics: Option<&DeliveryMetrics>,
) -> Result<DeliveryReport, StoreError> {
    let mut report = DeliveryReport::default();
    // The position after the last run delivered. Sequence numbers are never reused (the
    // store keeps a high-water mark), so nothing new can appear before it; reading from it
    // also spares RocksDB a walk over the deleted entries.
    let mut next = 0u64;
    // Jitter needs no secure randomness: a generator seeded from the clock will do.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    if let Some(metrics) = metrics {
        // Every sink's counters show from the start, at 0.
        for sink in &sinks {
            for counter in [&metrics.deliveries, &metrics.retries, &metrics.failures] {
                counter.with_label_values(&[sink.name()]);
            }
        }
    }
    // The oldest alert in the outbox, as last seen (for the backlog metrics).
    let mut head = None;
    let mut told_to_stop = false;
    loop {
        tell_stop(&mut sinks, draining, deadline, &mut told_to_stop);
        for sink in &mut sinks {
            housekeep(sink.as_mut(), metrics);
        }
        let entries = store.outbox_from(next, RUN)?;
        let first = entries.first().map(|(seq, _)| *seq);
        if let Some(metrics) = metrics {
            backlog(store, metrics, first, &mut head)?;
        }
        if entries.is_empty() {
            if draining.load(Ordering::SeqCst) {
                return Ok(report);
            }
            match woken.recv_timeout(Duration::from_millis(200)) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(report),
            }
        }
        let alerts: Vec<&[u8]> = entries.iter().map(|(_, a)| a.as_slice()).collect();
        // Sinks that have not yet accepted this run.
        let mut waiting: Vec<usize> = (0..sinks.len()).collect();
        let mut backoff = FIRST_BACKOFF;
        while !waiting.is_empty() {
            tell_stop(&mut sinks, draining, deadline, &mut told_to_stop);
            waiting.retain(|&i| match sinks[i].deliver(&alerts) {
                Ok(()) => {
                    if let Some(metrics) = metrics {
                        metrics
                            .deliveries
                            .with_label_values(&[sinks[i].name()])
                            .inc_by(alerts.len() as u64);
                    }
                    false
                }
                Err(error) => {
                    tracing::warn!(sink = sinks[i].name(), error = %error, kind = error.kind(), "alert delivery failed; retrying");
                    if let Some(metrics) = metrics {
                        metrics
                            .failures
                            .with_label_values(&[sinks[i].name()])
                            .inc();
                    }
                    true
                }
            });
            if waiting.is_empty() {
                break;
            }
            if let Some(metrics) = metrics {
                backlog(store, metrics, first, &mut head)?;
                for &i in &waiting {
                    metrics.retries.with_label_values(&[sinks[i].name()]).inc();
                }
            }
            if draining.load(Ordering::SeqCst) && deadline.passed() {
                report.left_in_outbox = count_left(store, next)?;
                return Ok(report);
            }
            report.retries += 1;
            // Exponential backoff with full jitter, so that many instances do not retry a
            // recovering receiver in step. Meanwhile the healthy sinks keep their periodic
            // work (Alertmanager must keep hearing of open alerts while a webhook is down).
            let pause = backoff.mul_f64(rng.gen_range(0.5..1.0));
            let resume_at = Instant::now() + pause;
            while Instant::now() < resume_at {
                let step = resume_at
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200));
                if let Ok(()) | Err(RecvTimeoutError::Timeout) = woken.recv_timeout(step) {}
                for (i, sink) in sinks.iter_mut().enumerate() {
                    if !waiting.contains(&i) {
                        housekeep(sink.as_mut(), metrics);
                    }
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if let Some(metrics) = metrics {
            observe_latency(&metrics.enqueue_to_alert_seconds, &alerts);
        }
        crate::failpoint::hit(crate::failpoint::DELIVERY_AFTER_ACK);
        let mut batch = Batch::default();
        for (seq, _) in &entries {
            store.delete_outbox(&mut batch, *seq)?;
        }
        store.write(&mut batch)?;
        report.delivered += entries.len() as u64;
        next = entries.last().map_or(next, |(seq, _)| seq + 1);
    }
}

/// A sink's periodic work (the Alertmanager sink's re-post of open alerts). A failure is logged
/// and counted in the sink's failures, so that an outage with no new alerts to deliver still
/// shows in `twinwatch_sink_failures_total`; the next tick tries again.
fn housekeep(sink: &mut dyn Sink, metrics: Option<&DeliveryMetrics>) {
    if let Err(error) = sink.tick() {
        tracing::warn!(sink = sink.name(), error = %error, kind = error.kind(), "sink housekeeping failed");
        if let Some(metrics) = metrics {
            metrics.failures.with_label_values(&[sink.name()]).inc();
        }
    }
}

/// Once the service is stopping, tells every sink the deadline its calls must keep (once).
fn tell_stop(
    sinks: &mut [Box<dyn Sink>],
    draining: &AtomicBool,
    deadline: &parking_deadline::Deadline,
    told: &mut bool,
) {
    if *told || !draining.load(Ordering::SeqCst) {
        return;
    }
    if let Some(at) = deadline.get() {
        for sink in sinks {
            sink.stop_by(at);
        }
        *told = true;
    }
}

/// Updates the backlog metrics, `head` being the oldest alert in the outbox: the alerts from
/// it to the committed high-water mark are pending (sequence numbers are consecutive), and it
/// has waited since it first became the head in this process.
fn backlog(
    store: &Store,
    metrics: &DeliveryMetrics,
    head: Option<u64>,
    tracked: &mut Option<u64>,
) -> Result<(), StoreError> {
    let pending = match head {
        Some(head) => store.next_outbox_seq()?.saturating_sub(head),
        None => 0,
    };
    metrics.outbox_pending.set(pending as i64);
    let since = &metrics.head_waiting_since_ms;
    match head {
        None => since.store(0, Ordering::Relaxed),
        Some(head) => {
            if *tracked != Some(head) || since.load(Ordering::Relaxed) == 0 {
                *tracked = Some(head);
                since.store(unix_ms(), Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Observes now minus each alert's `enqueuedtime` (alerts without one are skipped).
fn observe_latency(latency: &prometheus::Histogram, alerts: &[&[u8]]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| (d.as_nanos() / 100) as i64);
    for alert in alerts {
        let enqueued = serde_json::from_slice::<serde_json::Value>(alert)
            .ok()
            .and_then(|v| {
                v["enqueuedtime"]
                    .as_str()
                    .and_then(crate::time::Ticks::parse_lenient)
            });
        if let Some(enqueued) = enqueued {
            latency.observe((now - enqueued.0).max(0) as f64 / 1e7);
        }
    }
}

fn count_left(store: &Store, from: u64) -> Result<u64, StoreError> {
    let mut n = 0u64;
    let mut next = from;
    loop {
        let entries = store.outbox_from(next, RUN)?;
        let Some((last, _)) = entries.last() else {
            return Ok(n);
        };
        n += entries.len() as u64;
        next = last + 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::alert::SinkError;
    use crate::store::StoreOptions;

    /// A sink that keeps what it was given.
    struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Sink for Collect {
        fn name(&self) -> &'static str {
            "collect"
        }

        fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError> {
            let mut seen = self.0.lock().expect("lock");
            seen.extend(alerts.iter().map(|a| a.to_vec()));
            Ok(())
        }
    }

    /// A sink whose periodic work always fails, as the Alertmanager sink's re-post does while
    /// Alertmanager is down.
    struct FailingTicks;

    impl Sink for FailingTicks {
        fn name(&self) -> &'static str {
            "failing-ticks"
        }

        fn deliver(&mut self, _alerts: &[&[u8]]) -> Result<(), SinkError> {
            Ok(())
        }

        fn tick(&mut self) -> Result<(), SinkError> {
            Err(SinkError::Http {
                sink: "failing-ticks".into(),
                status: 0,
                detail: "connection refused".into(),
            })
        }
    }

    /// Regression: a failed re-post was only logged, so an Alertmanager outage with no new
    /// alerts left `twinwatch_sink_failures_total` at 0.
    #[test]
    fn failed_housekeeping_counts_as_a_sink_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("store"));
        let metrics = crate::telemetry::Metrics::new().expect("metrics");
        let failures = metrics
            .delivery
            .failures
            .with_label_values(&["failing-ticks"]);
        let delivery = spawn_delivery(
            store,
            vec![Box::new(FailingTicks)],
            Some(metrics.delivery.clone()),
        )
        .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        while failures.get() < 2 {
            assert!(Instant::now() < deadline, "failed ticks are not counted");
            std::thread::sleep(Duration::from_millis(20));
        }
        delivery
            .drain_and_stop(Duration::from_secs(10))
            .expect("stop");
    }

    fn put(store: &Store, seq: u64, text: &str) {
        let mut batch = Batch::default();
        store
            .put_outbox(&mut batch, seq, text.as_bytes())
            .expect("put");
        store.write(&mut batch).expect("write");
    }

    /// Regression: after delivery drained what an interrupted run left (sequence numbers
    /// 500..503), the engine, finding the outbox empty, numbered new alerts from 0 again while
    /// delivery read on from 503: they were stranded. Numbers are now never reused: the store
    /// keeps a high-water mark, and delivery reads on from its position.
    #[test]
    fn delivery_finds_alerts_renumbered_from_zero_after_draining_a_restart_backlog() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("store"));
        for seq in 500..503 {
            put(&store, seq, &format!("old-{seq}"));
        }
        let mut batch = Batch::default();
        store.put_outbox_next(&mut batch, 503).expect("mark");
        store.write(&mut batch).expect("write");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let delivery = spawn_delivery(store.clone(), vec![Box::new(Collect(seen.clone()))], None)
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.outbox_from(0, 10).expect("read").is_empty() {
            assert!(Instant::now() < deadline, "the backlog was not drained");
            std::thread::sleep(Duration::from_millis(10));
        }
        // What the engine numbers next with the outbox empty: after the high-water mark.
        let first = store.next_outbox_seq().expect("seq");
        assert_eq!(first, 503, "sequence numbers must not be reused");
        for (i, seq) in (first..first + 3).enumerate() {
            put(&store, seq, &format!("new-{i}"));
        }
        delivery.wake();
        let report = delivery
            .drain_and_stop(Duration::from_secs(10))
            .expect("stop");
        let seen: Vec<String> = seen
            .lock()
            .expect("lock")
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            seen,
            ["old-500", "old-501", "old-502", "new-0", "new-1", "new-2"]
        );
        assert_eq!((report.delivered, report.left_in_outbox), (6, 0));
    }
}
