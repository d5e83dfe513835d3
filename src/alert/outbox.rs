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

impl Delivery {
    /// New alerts were committed: look now rather than at the next poll.
    pub fn wake(&self) {
        let _ = self.wake.try_send(());
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
pub fn spawn_delivery(store: Arc<Store>, sinks: Vec<Box<dyn Sink>>) -> std::io::Result<Delivery> {
    let (wake, woken) = crossbeam_channel::bounded(1);
    let draining = Arc::new(AtomicBool::new(false));
    let deadline = Arc::new(parking_deadline::Deadline::default());
    let handle = std::thread::Builder::new()
        .name("twinwatch-deliver".into())
        .spawn({
            let draining = draining.clone();
            let deadline = deadline.clone();
            move || run(&store, sinks, &woken, &draining, &deadline)
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
) -> Result<DeliveryReport, StoreError> {
    let mut report = DeliveryReport::default();
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
            // recovering receiver in step.
            let pause = backoff.mul_f64(rng.gen_range(0.5..1.0));
            if let Ok(()) | Err(RecvTimeoutError::Timeout) = woken.recv_timeout(pause) {}
            backoff = (backoff * 2).min(MAX_BACKOFF);
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
