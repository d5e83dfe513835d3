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
    handle: JoinHandle<Result<DeliveryReport, StoreError>>,
}

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
    /// and stops.
    pub fn drain_and_stop(self, deadline: Duration) -> Result<DeliveryReport, StoreError> {
        self.deadline.set(Instant::now() + deadline);
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.wake.try_send(());
        self.handle.join().unwrap_or_else(|_| {
            Err(StoreError::Corrupt {
                what: "delivery",
                detail: "the delivery thread panicked".into(),
            })
        })
    }
}

/// Starts delivering the outbox of `store` to `sinks`.
/// `latency`, when given, observes for every delivered alert the time since its causing event
/// was enqueued (the alert's `enqueuedtime`).
pub fn spawn_delivery(
    store: Arc<Store>,
    sinks: Vec<Box<dyn Sink>>,
    latency: Option<prometheus::Histogram>,
) -> std::io::Result<Delivery> {
    let (wake, woken) = crossbeam_channel::bounded(1);
    let draining = Arc::new(AtomicBool::new(false));
    let deadline = Arc::new(parking_deadline::Deadline::default());
    let handle = std::thread::Builder::new()
        .name("twinwatch-deliver".into())
        .spawn({
            let draining = draining.clone();
            let deadline = deadline.clone();
            move || {
                run(
                    &store,
                    sinks,
                    &woken,
                    &draining,
                    &deadline,
                    latency.as_ref(),
                )
            }
        })?;
    Ok(Delivery {
        wake,
        draining,
        deadline,
        handle,
    })
}

fn run(
    store: &Store,
    mut sinks: Vec<Box<dyn Sink>>,
    woken: &Receiver<()>,
    draining: &AtomicBool,
    deadline: &parking_deadline::Deadline,
    latency: Option<&prometheus::Histogram>,
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
    loop {
        for sink in &mut sinks {
            if let Err(error) = sink.tick() {
                tracing::warn!(sink = sink.name(), error = %error, kind = error.kind(), "sink housekeeping failed");
            }
        }
        let entries = store.outbox_from(next, RUN)?;
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
            waiting.retain(|&i| match sinks[i].deliver(&alerts) {
                Ok(()) => false,
                Err(error) => {
                    tracing::warn!(sink = sinks[i].name(), error = %error, kind = error.kind(), "alert delivery failed; retrying");
                    true
                }
            });
            if waiting.is_empty() {
                break;
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
                        if let Err(error) = sink.tick() {
                            tracing::warn!(sink = sink.name(), error = %error, "sink housekeeping failed");
                        }
                    }
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if let Some(latency) = latency {
            observe_latency(latency, &alerts);
        }
        let mut batch = Batch::default();
        for (seq, _) in &entries {
            store.delete_outbox(&mut batch, *seq)?;
        }
        store.write(&mut batch)?;
        report.delivered += entries.len() as u64;
        next = entries.last().map_or(next, |(seq, _)| seq + 1);
    }
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
