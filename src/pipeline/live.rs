//! The live feed's way into the engine (`twinwatch run`): the apply thread takes the Event
//! Hub receivers' chunks of events and the seed thread's pages in turn, applies each
//! partition's events once and in order (a receiver that reconnected may send some again), records
//! events that expired from the hub's retention, reloads the policy on SIGHUP, moves the quiet
//! clock of `for` rules, and exports the engine's counts to the metric registry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::live_seed::ServiceSeed;
use super::{Counters, Engine, EngineOptions, SourceHandle};
use crate::model::{DeadLetterReason, SourceId};
use crate::policy::Policy;
use crate::source::avro::RecordMessage;
use crate::source::eventhub::{LiveEvent, PartitionStart, SourceHealth};
use crate::source::hub::{SeedInput, SeedPlan};
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::time::Ticks;

/// What the apply thread needs besides the engine and its feed.
pub struct LiveSettings {
    /// Set by SIGHUP: the policy files are loaded again before the next batch.
    pub reload: Arc<AtomicBool>,
    /// Loads the policy files (an error names the file and the rule).
    pub load_policy: Box<dyn Fn() -> anyhow::Result<Policy> + Send>,
    /// The quiet clock's allowed delay (`docs/semantics.md` §9).
    pub allowed_event_delay: Duration,
    /// Wakes alert delivery after a committed batch (it may carry alerts).
    pub wake: Option<Box<dyn Fn() + Send>>,
}

/// What the apply thread reads: the Event Hub's partitions, as the receivers hand them over.
pub struct LiveFeed {
    /// The Event Hub's name: sources are named `<entity>/<partition>`.
    pub entity: String,
    pub partition_ids: Vec<String>,
    /// Where the apply thread answers with each partition's start (after its checkpoint).
    pub starts: oneshot::Sender<Vec<PartitionStart>>,
    pub events: mpsc::Receiver<Vec<LiveEvent>>,
    /// The receivers' health: connection, the hub's end of each partition.
    pub health: Arc<SourceHealth>,
    /// The runtime the receivers run on: the apply thread waits for them on it.
    pub handle: tokio::runtime::Handle,
    pub cancel: CancellationToken,
}

/// What the apply thread shows the HTTP handlers besides the registry.
pub struct LiveView<'a> {
    pub metrics: &'a Metrics,
    /// Set once the failing twins by rule are exported (`/v1/stats` reads them from then on).
    pub violations_counted: &'a AtomicBool,
}

/// Reloads the policy files (SIGHUP): a policy that does not load is refused and the current
/// one stays; a different one re-audits the snapshot (`docs/semantics.md` §8) before the next
/// batch.
fn reload_policy(
    engine: &mut Engine,
    settings: &LiveSettings,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let m = &metrics.policy;
    let policy = match (settings.load_policy)() {
        Ok(policy) => policy,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "the reloaded policy is refused; the current one stays in force");
            m.reloads.with_label_values(&["rejected"]).inc();
            return Ok(());
        }
    };
    if policy.fingerprint() == engine.policy().fingerprint() {
        tracing::info!("the reloaded policy is the one in force: nothing to re-audit");
        m.reloads.with_label_values(&["unchanged"]).inc();
        return Ok(());
    }
    let previous = engine.policy().fingerprint().to_owned();
    let fingerprint = policy.fingerprint().to_owned();
    let progress_gauge = m.reaudit_progress.clone();
    let report = engine.set_policy(Arc::new(policy), &mut |n| {
        progress_gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
    })?;
    m.reaudit_progress.set(0);
    if let Some(report) = report {
        m.reaudited_twins.inc_by(report.twins);
    }
    let _ = m.info.remove_label_values(&[&previous]);
    m.info.with_label_values(&[&fingerprint]).set(1);
    m.reloads.with_label_values(&["applied"]).inc();
    tracing::info!(fingerprint = %fingerprint, "the reloaded policy is in force");
    Ok(())
}

/// Every owned partition has been read to the hub's end (its last enqueued event applied).
fn caught_up(health: &SourceHealth, expected: &[u64]) -> bool {
    health
        .partitions
        .iter()
        .enumerate()
        .all(|(i, (_, partition))| {
            let hub_next = partition.hub_next_sequence.load(Ordering::Relaxed);
            hub_next >= 0 && i64::try_from(expected[i]).unwrap_or(i64::MAX) >= hub_next
        })
}

/// The apply thread's part of the service's seed passes.
pub struct ApplySeed {
    pub seed: ServiceSeed,
    /// Where the apply thread tells the seed thread what to run first.
    pub plan: std::sync::mpsc::Sender<SeedPlan>,
    pub inputs: mpsc::Receiver<SeedInput>,
}

/// What the apply thread takes next.
enum Next {
    Events(Vec<LiveEvent>),
    Seed(SeedInput),
    /// Nothing came within the batch interval (or the service is stopping).
    Idle,
    /// Every receiver is gone and everything they sent is applied.
    Closed,
}

/// The apply thread's inputs, in turn: a chunk of events, then a page of a seed pass (when
/// one is waiting), so that neither waits for more than one of the other. Waits up to `tick`
/// when both are empty.
fn next_input(
    rx: &mut mpsc::Receiver<Vec<LiveEvent>>,
    seed: &mut Option<mpsc::Receiver<SeedInput>>,
    seed_turn: &mut bool,
    handle: &tokio::runtime::Handle,
    tick: Duration,
    cancel: &CancellationToken,
    closed: bool,
) -> Next {
    *seed_turn = !*seed_turn;
    for seed_now in [*seed_turn, !*seed_turn] {
        if seed_now {
            if let Some(inputs) = seed {
                match inputs.try_recv() {
                    Ok(input) => return Next::Seed(input),
                    Err(mpsc::error::TryRecvError::Disconnected) => *seed = None,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
        } else {
            match rx.try_recv() {
                Ok(chunk) => return Next::Events(chunk),
                Err(mpsc::error::TryRecvError::Disconnected) => return Next::Closed,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
        }
    }
    // The timer must be made inside the runtime: build it in the async block. A stop ends
    // the wait at once (the batch interval may be up to a minute).
    let (next, seed_gone) = handle.block_on(async {
        let seed_input = async {
            match seed.as_mut() {
                Some(inputs) => inputs.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = tokio::time::timeout(tick, rx.recv()) => match received {
                Ok(Some(chunk)) => (Next::Events(chunk), false),
                Ok(None) => (Next::Closed, false),
                Err(_) => (Next::Idle, false),
            },
            input = seed_input => match input {
                Some(input) => (Next::Seed(input), false),
                None => (Next::Idle, true),
            },
            _ = cancel.cancelled(), if !closed => (Next::Idle, false),
        }
    });
    if seed_gone {
        *seed = None;
    }
    next
}

/// The apply thread of `twinwatch run`: opens the engine, answers each partition's start,
/// then applies the receivers' events (each partition's sequence numbers once, in order; a gap
/// recorded as expired) and the seed thread's pages in turn, reloads the policy on SIGHUP,
/// moves the quiet clock, and exports the metrics about every 100 ms, until the feed ends.
pub fn apply_loop(
    store: Arc<Store>,
    options: EngineOptions,
    feed: LiveFeed,
    live: &LiveSettings,
    view: LiveView<'_>,
    seed: Option<ApplySeed>,
) -> anyhow::Result<Counters> {
    let LiveFeed {
        entity,
        partition_ids,
        starts: starts_tx,
        events: mut rx,
        health,
        handle,
        cancel,
    } = feed;
    let metrics = view.metrics;
    let tick = options.batch_interval;
    let mut options = options;
    // A seed pass left open by the last run goes on (`EngineOptions::continue_seed`).
    let continuing = match &seed {
        Some(seed) => seed.seed.continuing(&store)?,
        None => None,
    };
    options.continue_seed = continuing.clone();
    let mut engine = Engine::new(store, options)?;
    let (mut seed, mut seed_inputs) = match seed {
        Some(ApplySeed {
            seed, plan, inputs, ..
        }) => {
            let _ = plan.send(seed.plan(&engine, continuing.map(|(_, as_of)| as_of)));
            (Some(seed), Some(inputs))
        }
        None => (None, None),
    };
    let mut seed_turn = false;
    metrics
        .policy
        .info
        .with_label_values(&[engine.policy().fingerprint()])
        .set(1);
    let mut handles: Vec<SourceHandle> = Vec::new();
    let mut expected: Vec<u64> = Vec::new();
    let mut starts = Vec::new();
    for (index, id) in partition_ids.iter().enumerate() {
        let (source, checkpoint) =
            engine.add_source(SourceId::Partition(id.clone()), format!("{entity}/{id}"))?;
        handles.push(source);
        expected.push(checkpoint.next_index);
        // At 0 from the start, so that an alert on its increase sees the first gap.
        metrics.events_expired.with_label_values(&[id]);
        let next = (checkpoint.next_index > 0 || checkpoint.offset.is_some())
            .then_some(checkpoint.next_index as i64);
        starts.push(PartitionStart {
            index,
            id: id.clone(),
            next_sequence_number: next,
        });
        if let Some(next) = next {
            metrics
                .checkpoint_sequence_number
                .with_label_values(&[id])
                .set(next - 1);
        }
    }
    let _ = starts_tx.send(starts);
    // Each partition's checkpoint at the start: its position until this process commits.
    let resumed_at = expected.clone();
    let mut exported = Counters::default();
    let mut last_export = Instant::now();
    let mut last_committed_batches = 0;
    let mut closed = false;
    loop {
        // Once the service stops, no more chunks are taken in: what is buffered is applied
        // and the loop ends, even while a receiver that hangs (a detach the hub never
        // answers) still holds its sender. The check runs at least every `tick`.
        if !closed && cancel.is_cancelled() {
            rx.close();
            closed = true;
        }
        if closed {
            // A pass under way stays open; its pages are read again at the next start.
            seed_inputs = None;
        }
        // An ending pass evaluates a batch of its twins at each turn: no wait for input then.
        let seed_busy = seed.as_ref().is_some_and(|s| s.busy()) && !closed;
        match next_input(
            &mut rx,
            &mut seed_inputs,
            &mut seed_turn,
            &handle,
            if seed_busy { Duration::ZERO } else { tick },
            &cancel,
            closed,
        ) {
            Next::Closed => break,
            Next::Seed(input) => {
                if let Some(seed) = &mut seed {
                    let started = Instant::now();
                    seed.handle(&mut engine, input)?;
                    metrics
                        .seed
                        .step_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
            }
            Next::Events(chunk) => {
                let mut newest = None;
                for event in &chunk {
                    let p = event.partition;
                    let seq = event.sequence_number.max(0) as u64;
                    // A receiver that reconnected may be sent events again; what the snapshot
                    // has applied is never applied twice.
                    if seq < expected[p] {
                        continue;
                    }
                    if seq > expected[p] && expected[p] > 0 {
                        // Expired from retention before they were read: their changes are
                        // lost until a reconcile pass (`twinwatch seed`) reads the twins.
                        let expired = seq - expected[p];
                        tracing::warn!(partition = %partition_ids[p], expected = expected[p], got = seq, expired, "events expired from the hub's retention before they were read: run a reconcile pass (twinwatch seed)");
                        metrics
                            .events_expired
                            .with_label_values(&[&partition_ids[p]])
                            .inc_by(expired);
                        engine.record_expired(handles[p], expected[p], seq - 1)?;
                    }
                    expected[p] = seq + 1;
                    let message = RecordMessage {
                        record: &event.record,
                        body_bytes: &event.body,
                        body_nodes: None,
                        body_verdict: None,
                    };
                    engine.ingest_event(
                        handles[p],
                        seq,
                        event.offset.as_deref(),
                        &message,
                        &|| message.raw(),
                    )?;
                    if let Some(crate::source::avro::OwnedProp::Time(t)) =
                        &event.record.enqueued_time
                    {
                        newest = Some(*t);
                    }
                }
                if let Some(t) = newest {
                    let now = Ticks::now();
                    metrics.event_age_seconds.set((now.0 - t.0) as f64 / 1e7);
                }
            }
            Next::Idle => {
                engine.tick()?;
                // A quiet feed must not freeze the clock of `for` rules (`docs/semantics.md` §9).
                if engine.has_pending() && caught_up(&health, &expected) {
                    let delay = i64::try_from(live.allowed_event_delay.as_nanos() / 100)
                        .unwrap_or(i64::MAX);
                    engine
                        .advance_clock(crate::time::Ticks(Ticks::now().0.saturating_sub(delay)))?;
                }
            }
        }
        if seed_busy {
            if let Some(seed) = &mut seed {
                let started = Instant::now();
                seed.step(&mut engine)?;
                metrics
                    .seed
                    .step_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        if live.reload.swap(false, Ordering::SeqCst) {
            reload_policy(&mut engine, live, metrics)?;
        }
        // A committed batch may carry alerts: delivery looks at once rather than at its poll.
        let batches = engine.counters().batches;
        if batches != last_committed_batches {
            last_committed_batches = batches;
            if let Some(wake) = &live.wake {
                wake();
            }
        }
        if last_export.elapsed() >= Duration::from_millis(100) {
            export_metrics(
                &engine,
                &mut exported,
                &view,
                &health,
                &partition_ids,
                &handles,
                &resumed_at,
            );
            last_export = Instant::now();
        }
    }
    if let Some(seed) = &mut seed {
        seed.interrupted();
    }
    let counters = engine.finish()?;
    export_metrics_final(&counters, &mut exported, metrics);
    if let Some(wake) = &live.wake {
        wake();
    }
    Ok(counters)
}

fn add(counter: &prometheus::IntCounter, now: u64, before: u64) {
    if now > before {
        counter.inc_by(now - before);
    }
}

fn export_metrics_final(counters: &Counters, exported: &mut Counters, m: &Metrics) {
    add(
        &m.messages.with_label_values(&["applied"]),
        counters.applied,
        exported.applied,
    );
    add(
        &m.messages.with_label_values(&["stale"]),
        counters.stale,
        exported.stale,
    );
    add(
        &m.messages.with_label_values(&["ignored"]),
        counters.ignored,
        exported.ignored,
    );
    add(
        &m.messages.with_label_values(&["dead_lettered"]),
        counters.n_dead_lettered(),
        exported.n_dead_lettered(),
    );
    for reason in DeadLetterReason::ALL {
        let now = counters.dead_lettered.get(&reason).copied().unwrap_or(0);
        let before = exported.dead_lettered.get(&reason).copied().unwrap_or(0);
        add(
            &m.dead_letters.with_label_values(&[reason.as_str()]),
            now,
            before,
        );
    }
    add(
        &m.alerts.with_label_values(&["opened"]),
        counters.alerts_opened,
        exported.alerts_opened,
    );
    add(
        &m.alerts.with_label_values(&["resolved"]),
        counters.alerts_resolved,
        exported.alerts_resolved,
    );
    add(&m.batches, counters.batches, exported.batches);
    add(
        &m.policy.pending_outcomes.with_label_values(&["opened"]),
        counters.pending_opened,
        exported.pending_opened,
    );
    add(
        &m.policy.pending_outcomes.with_label_values(&["dropped"]),
        counters.pending_dropped,
        exported.pending_dropped,
    );
    *exported = counters.clone();
}

fn export_metrics(
    engine: &Engine,
    exported: &mut Counters,
    view: &LiveView<'_>,
    health: &SourceHealth,
    partition_ids: &[String],
    handles: &[SourceHandle],
    resumed_at: &[u64],
) {
    let m = view.metrics;
    export_metrics_final(engine.counters(), exported, m);
    for (i, id) in partition_ids.iter().enumerate() {
        if let Some(next) = engine.committed_next_index(handles[i]) {
            m.checkpoint_sequence_number
                .with_label_values(&[id])
                .set(next as i64 - 1);
        }
        let health = &health.partitions[i].1;
        m.partition_connected
            .with_label_values(&[id])
            .set(i64::from(health.connected.load(Ordering::Relaxed)));
        // The lag shows once the hub's end has been read.
        let hub_next = health.hub_next_sequence.load(Ordering::Relaxed);
        if hub_next >= 0 {
            let committed_next = engine
                .committed_next_index(handles[i])
                .unwrap_or(resumed_at[i])
                .try_into()
                .unwrap_or(i64::MAX);
            m.partition_lag_events
                .with_label_values(&[id])
                .set((hub_next - committed_next).max(0));
        }
        let reconnects = m.receiver_reconnects.with_label_values(&[id]);
        add(
            &reconnects,
            health.reconnects.load(Ordering::Relaxed),
            reconnects.get(),
        );
        let displaced = m.receiver_displaced.with_label_values(&[id]);
        add(
            &displaced,
            health.displaced.load(Ordering::Relaxed),
            displaced.get(),
        );
    }
    for (rule, severity, n) in engine.failing_twins() {
        m.failing_twins
            .with_label_values(&[rule, severity.as_str()])
            .set(n as i64);
    }
    for (rule, n) in engine.pending_by_rule() {
        m.policy.pending.with_label_values(&[rule]).set(n as i64);
    }
    m.twins.set(engine.snapshot().directory.n_live() as i64);
    m.tombstones
        .set(engine.snapshot().directory.n_dead() as i64);
    view.violations_counted.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::SeedInput;
    use super::*;

    fn kind(next: &Next) -> &'static str {
        match next {
            Next::Events(_) => "events",
            Next::Seed(_) => "seed",
            Next::Idle => "idle",
            Next::Closed => "closed",
        }
    }

    /// The apply thread takes a chunk of events and a seed input in turn while both wait, so
    /// that a pass never holds the feed up for more than one page; it waits for whichever
    /// comes first when both are empty; a seed thread that is gone leaves the events alone.
    #[test]
    fn the_apply_thread_takes_events_and_seed_inputs_in_turn() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, mut rx) = mpsc::channel::<Vec<LiveEvent>>(8);
        let (seed_tx, seed_rx) = mpsc::channel::<SeedInput>(8);
        for _ in 0..3 {
            tx.try_send(Vec::new()).expect("a chunk");
            seed_tx
                .try_send(SeedInput::Page(Vec::new()))
                .expect("a page");
        }
        tx.try_send(Vec::new()).expect("a chunk");
        let mut seed = Some(seed_rx);
        let mut turn = false;
        let cancel = CancellationToken::new();
        let handle = runtime.handle().clone();
        let mut next = |seed: &mut Option<mpsc::Receiver<SeedInput>>, tick: Duration| {
            kind(&next_input(
                &mut rx, seed, &mut turn, &handle, tick, &cancel, false,
            ))
        };
        let taken: Vec<&str> = (0..8)
            .map(|_| next(&mut seed, Duration::from_millis(10)))
            .collect();
        assert_eq!(
            taken,
            ["seed", "events", "seed", "events", "seed", "events", "events", "idle"]
        );

        // Both empty: a page sent meanwhile ends the wait at once.
        let sender = seed_tx.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sender.blocking_send(SeedInput::Page(Vec::new()))
        });
        let started = Instant::now();
        assert_eq!(next(&mut seed, Duration::from_secs(20)), "seed");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(late.join().expect("sender").is_ok());

        // The seed thread gone: its input is dropped, the events go on.
        drop(seed_tx);
        assert_eq!(next(&mut seed, Duration::from_millis(10)), "idle");
        assert!(seed.is_none());
        drop(tx);
        assert_eq!(next(&mut seed, Duration::from_millis(10)), "closed");
    }
}
