//! `twinwatch run`: the service. Event Hub receivers on a tokio runtime feed the apply thread
//! (the same engine as replay); a delivery thread sends alerts to the sinks; an HTTP listener
//! serves /metrics, /healthz and /readyz. SIGTERM or Ctrl-C stops the receivers; the apply
//! thread commits its last batch; the outbox gets a bounded time to drain; exit 0.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Failure;
use crate::alert::{spawn_delivery, Sink};
use crate::cli::RunArgs;
use crate::config::{AlertsConfig, Config, RawConfig};
use crate::model::{DeadLetterReason, SourceId};
use crate::pipeline::{Counters, Engine, EngineOptions, SourceHandle};
use crate::source::avro::RecordMessage;
use crate::source::eventhub::{self, LiveEvent, PartitionHealth, PartitionStart, SourceHealth};
use crate::store::{Store, StoreOptions};
use crate::telemetry::Metrics;

/// Chunks of events (up to [`eventhub::CHUNK_EVENTS`] each) buffered between the receivers
/// and the apply thread.
const CHANNEL_CHUNKS: usize = 32;

/// The configuration from the file (if any), the environment and the flags.
pub fn load_config(args: &RunArgs) -> Result<Config, Failure> {
    let mut raw = match &args.config {
        Some(path) => RawConfig::from_file(path).map_err(Failure::usage)?,
        None => RawConfig::default(),
    };
    if let Some(dir) = &args.data_dir {
        raw.data_dir = Some(dir.clone());
    }
    if !args.policies.is_empty() {
        raw.policies = args.policies.clone();
    }
    if let Some(file) = &args.alerts_file {
        raw.alerts.file = Some(file.clone());
    }
    if args.alerts_stdout {
        raw.alerts.stdout = true;
    }
    if let Some(listen) = &args.listen {
        raw.listen = Some(listen.clone());
    }
    raw.with_environment(|name| std::env::var(name).ok())
        .validate()
        .map_err(|e| Failure::usage(anyhow::anyhow!("invalid configuration:\n{e}")))
}

fn sinks(alerts: &AlertsConfig, store: &Arc<Store>) -> Result<Vec<Box<dyn Sink>>, Failure> {
    super::sinks::from_config(alerts, store)
}

/// An outbox whose oldest alert has waited this long makes the service not ready.
const OUTBOX_STUCK_AFTER: Duration = Duration::from_secs(300);

/// State the HTTP handlers read.
pub struct ServiceState {
    pub metrics: Metrics,
    pub store: Arc<Store>,
    /// The receivers' health, once the service has connected to the Event Hub.
    pub health: std::sync::OnceLock<Arc<SourceHealth>>,
    /// Why the service could not connect (yet), for /readyz.
    pub connect_error: std::sync::Mutex<Option<String>>,
    /// Set when the apply thread failed: the service cannot go on.
    pub failed: std::sync::Mutex<Option<String>>,
    /// Whether alert delivery still works (`None`: no sinks).
    pub delivery: Option<crate::alert::DeliveryHealth>,
    /// Set once the apply thread has exported the failing twins by rule
    /// (`twinwatch_failing_twins`, counted by the engine from the stored violations on): from
    /// then on `/v1/stats` reads its violation counts there instead of scanning the store.
    pub violations_counted: AtomicBool,
    /// The seed passes' progress and last outcome (`None`: no `[seed]`), for /readyz.
    pub seed: Option<Arc<super::seed::SeedStatus>>,
}

impl ServiceState {
    /// Why the service is not ready (empty when it is): the pipeline failed, not connected,
    /// a partition the hub refuses, a partition without its receiver, or alerts stuck in the
    /// outbox. (The store is open: it was opened before the listener started.)
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(error) = self.failed.lock().ok().and_then(|f| f.clone()) {
            problems.push(format!("the pipeline failed: {error}"));
        }
        match self.health.get() {
            None => {
                let reason = self
                    .connect_error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .unwrap_or_else(|| "connecting".to_owned());
                problems.push(format!("not connected to the Event Hub: {reason}"));
            }
            Some(health) => {
                for (id, partition) in &health.partitions {
                    if let Some(error) = partition.refused_error() {
                        problems.push(format!(
                            "partition {id}: the hub refuses its receiver (retrying): {error}"
                        ));
                    } else if !partition.connected.load(Ordering::Relaxed) {
                        problems.push(format!("partition {id} is not connected"));
                    }
                }
            }
        }
        if let Some(problem) = self.store.space_problem() {
            problems.push(problem);
        }
        if let Some(error) = self.delivery.as_ref().and_then(|d| d.failure()) {
            problems.push(format!("alert delivery stopped: {error}"));
        }
        let waited = self.outbox_oldest_age();
        if waited >= OUTBOX_STUCK_AFTER {
            problems.push(format!(
                "the outbox is stuck: its oldest alert has waited {} s for a sink",
                waited.as_secs()
            ));
        }
        problems
    }

    /// How long the oldest alert in the outbox has waited for delivery (zero when none waits).
    fn outbox_oldest_age(&self) -> Duration {
        let since = self
            .metrics
            .delivery
            .head_waiting_since_ms
            .load(Ordering::Relaxed);
        if since == 0 {
            return Duration::ZERO;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Duration::from_millis(now.saturating_sub(since))
    }

    /// The live counts `/v1/stats` adds to what it reads from the store.
    fn live_stats(&self) -> serde_json::Value {
        let m = &self.metrics;
        let messages: serde_json::Map<String, serde_json::Value> =
            ["applied", "stale", "ignored", "dead_lettered"]
                .into_iter()
                .map(|outcome| {
                    let n = m.messages.with_label_values(&[outcome]).get();
                    (outcome.to_owned(), serde_json::json!(n))
                })
                .collect();
        let mut stats = serde_json::json!({
            "twins": m.twins.get(),
            "tombstones": m.tombstones.get(),
            "messages": messages,
            "alerts": {
                "opened": m.alerts.with_label_values(&["opened"]).get(),
                "resolved": m.alerts.with_label_values(&["resolved"]).get(),
            },
            "outboxPending": m.delivery.outbox_pending.get(),
            "ready": self.problems().is_empty(),
        });
        if let (Some(counts), Some(out)) = (self.violation_counts(), stats.as_object_mut()) {
            out.insert("violations".to_owned(), counts);
        }
        stats
    }

    /// `/v1/stats`'s violation counts from the failing twins by rule the apply thread exports
    /// (a twin fails a rule exactly when it has that violation), `None` until it has.
    fn violation_counts(&self) -> Option<serde_json::Value> {
        use prometheus::core::Collector as _;
        if !self.violations_counted.load(Ordering::Acquire) {
            return None;
        }
        let mut total = 0u64;
        let mut by_severity = serde_json::Map::new();
        let mut by_rule = serde_json::Map::new();
        for family in self.metrics.failing_twins.collect() {
            for metric in family.get_metric() {
                let n = metric.get_gauge().get_value().max(0.0) as u64;
                if n == 0 {
                    continue;
                }
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                };
                let (Some(rule), Some(severity)) = (label("rule"), label("severity")) else {
                    continue;
                };
                total += n;
                let before = by_severity
                    .get(&severity)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                by_severity.insert(severity, serde_json::json!(before + n));
                by_rule.insert(rule, serde_json::json!(n));
            }
        }
        Some(serde_json::json!({"total": total, "bySeverity": by_severity, "byRule": by_rule}))
    }

    /// Sets the gauges read at scrape time: RocksDB's figures, the outbox's oldest alert's
    /// age, readiness.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let stats = self.store.stats();
        let gauge = |g: &prometheus::IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        gauge(&m.rocksdb_memtable_bytes, stats.memtable_bytes);
        gauge(
            &m.rocksdb_pending_compaction_bytes,
            stats.pending_compaction_bytes,
        );
        gauge(&m.rocksdb_block_cache_usage_bytes, stats.block_cache_bytes);
        gauge(&m.rocksdb_live_sst_bytes, stats.live_sst_bytes);
        if let Ok(free) = self.store.free_bytes() {
            gauge(&m.disk_free_bytes, free);
        }
        m.outbox_oldest_age_seconds
            .set(self.outbox_oldest_age().as_secs_f64());
        m.ready.set(i64::from(self.problems().is_empty()));
    }
}

pub fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    let config = load_config(&args)?;
    run_with(config, Vec::new())
}

/// Runs the service with a validated configuration; `extra_sinks` are added to the
/// configured ones (the demo's console).
pub fn run_with(config: Config, extra_sinks: Vec<Box<dyn Sink>>) -> Result<ExitCode, Failure> {
    let policy = Arc::new(super::load_policy(&config.policies)?);
    tracing::info!(
        data_dir = %config.data_dir.display(),
        listen = %config.listen,
        hub = %config.eventhub.entity,
        host = %config.eventhub.host,
        consumer_group = %config.eventhub.consumer_group,
        partitions = ?config.eventhub.partitions,
        start_position = ?config.eventhub.start_position,
        custom_endpoint = ?config.eventhub.custom_endpoint.as_deref().map(crate::config::redact_url),
        rules = policy.rules().len(),
        alerts = ?config.alerts,
        seed = ?config.seed,
        "starting"
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))
        .map_err(Failure::runtime)?;
    let store = Arc::new(
        Store::open(&config.data_dir, &StoreOptions::default())
            .with_context(|| format!("opening {}", config.data_dir.display()))
            .map_err(Failure::runtime)?,
    );
    let mut sinks = sinks(&config.alerts, &store)?;
    sinks.extend(extra_sinks);
    let queue_alerts = !sinks.is_empty();
    let metrics = Metrics::new().map_err(Failure::runtime)?;
    let delivery = if queue_alerts {
        let observed = Some(metrics.delivery.clone());
        Some(spawn_delivery(store.clone(), sinks, observed).map_err(Failure::runtime)?)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("twinwatch-io")
        .enable_all()
        .build()
        .map_err(Failure::runtime)?;
    let options = EngineOptions {
        batch_messages: config.batch_messages,
        batch_interval: config.batch_interval,
        max_body_bytes: config.max_body_bytes,
        cache_bytes: config.cache_bytes,
        policy,
        queue_alerts,
        metrics: Some(metrics.pipeline.clone()),
        min_free_bytes: Some(config.min_free_bytes),
        continue_seed: None,
    };
    let result = runtime.block_on(serve(
        config.clone(),
        store,
        options,
        delivery.as_ref(),
        metrics,
    ));
    // Whatever task is still running (a receiver whose detach the hub never answered) is
    // dropped, not waited for: the stop keeps to its deadline.
    runtime.shutdown_timeout(Duration::from_millis(200));
    let (counters, stopping_since) = result?;
    // A delivery thread that died (not one that is slow to stop) fails the run.
    let delivery_health = delivery.as_ref().map(|d| d.health());
    if let Some(delivery) = delivery {
        // The whole stop fits in the deadline: delivery gets what the pipeline left of it.
        let left = config
            .shutdown_deadline
            .saturating_sub(stopping_since.elapsed())
            .max(Duration::from_millis(100));
        match delivery.drain_and_stop(left) {
            Ok(report) if report.left_in_outbox > 0 => tracing::warn!(
                left = report.left_in_outbox,
                "alerts not yet accepted by every sink stay queued for the next start"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "alert delivery failed"),
        }
    }
    tracing::info!(
        messages = counters.messages,
        applied = counters.applied,
        stale = counters.stale,
        ignored = counters.ignored,
        dead_lettered = counters.n_dead_lettered(),
        "stopped"
    );
    if let Some(error) = delivery_health.and_then(|h| h.failure()) {
        tracing::error!(error = %error, "exiting with an error: alert delivery had stopped");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs the service until a stop signal; returns this process's counts and when the stop
/// began.
async fn serve(
    config: Config,
    store: Arc<Store>,
    options: EngineOptions,
    delivery: Option<&crate::alert::Delivery>,
    metrics: Metrics,
) -> Result<(Counters, Instant), Failure> {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    {
        let cancel = cancel.clone();
        tracker.spawn(async move {
            shutdown_signal().await;
            tracing::info!("stopping: no more events are read; the last batch is being committed");
            cancel.cancel();
        });
    }
    // SIGHUP: reload the policy files (the apply thread re-audits between two batches) and
    // reopen the alert file (log rotation by rename).
    let reload = Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[cfg(unix)]
    {
        let reload = reload.clone();
        let cancel = cancel.clone();
        let reopener = delivery.map(|d| d.reopener());
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hangup) => {
                tracker.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            received = hangup.recv() => {
                                if received.is_none() {
                                    break;
                                }
                                tracing::info!("SIGHUP: reloading the policy files and reopening the alert file");
                                reload.store(true, Ordering::SeqCst);
                                if let Some(reopener) = &reopener {
                                    reopener.reopen();
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: policy reloads need a restart")
            }
        }
    }
    // The seed thread: it waits for the apply thread's plan, then runs the passes and
    // hands their pages over (`docs/semantics.md` §7).
    let seed = config.seed.clone().map(|seed_config| {
        let status = Arc::new(super::seed::SeedStatus::new(seed_config.hub()));
        let (plan_tx, plan_rx) = std::sync::mpsc::channel();
        let (to_apply, from_seed) = mpsc::channel(super::seed::SEED_PAGES);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (stop, cancel) = (stop.clone(), cancel.clone());
            tracker.spawn(async move {
                cancel.cancelled().await;
                stop.store(true, Ordering::SeqCst);
            });
        }
        let thread = super::seed::SeedThread {
            config: seed_config.clone(),
            plan: plan_rx,
            to_apply,
            status: status.clone(),
            metrics: metrics.seed.clone(),
            stop,
        };
        // Not joined: a request under way may take its timeout; the process does not wait.
        if let Err(e) = std::thread::Builder::new()
            .name("twinwatch-seed".into())
            .spawn(move || thread.run())
        {
            tracing::error!(error = %e, "cannot start the seed thread: no seed passes");
        }
        ApplySeed {
            seed: super::seed::ServiceSeed::new(seed_config, status.clone(), metrics.seed.clone()),
            plan: plan_tx,
            inputs: from_seed,
            status,
        }
    });
    // HTTP first: /healthz and /readyz answer while the service connects, and say why it
    // cannot (bad credentials, the hub unreachable).
    let state = Arc::new(ServiceState {
        metrics,
        store: store.clone(),
        health: std::sync::OnceLock::new(),
        connect_error: std::sync::Mutex::new(None),
        failed: std::sync::Mutex::new(None),
        delivery: delivery.map(|d| d.health()),
        violations_counted: AtomicBool::new(false),
        seed: seed.as_ref().map(|s| s.status.clone()),
    });
    if let Some(health) = delivery.map(|d| d.health()) {
        // Alerts can no longer leave the outbox: stop, and exit 1, rather than run on
        // without them.
        let cancel = cancel.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if let Some(error) = health.failure() {
                    tracing::error!(error = %error, "alert delivery stopped; stopping the service");
                    cancel.cancel();
                    return;
                }
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))
        .map_err(Failure::runtime)?;
    let serves_api = config.serves_api();
    if serves_api {
        tracing::info!(
            address = %config.listen,
            api_token = config.api_token.is_some(),
            "serving /metrics, /healthz, /readyz, /v1/*"
        );
    } else {
        tracing::warn!(
            address = %config.listen,
            "serving /metrics, /healthz, /readyz only: the query API (/v1/*) needs an API token \
             (TWINWATCH_API_TOKEN or api_token_file) on an address other than loopback"
        );
    }
    {
        let stats: crate::api::StatsFn = {
            let state = state.clone();
            Arc::new(move || state.live_stats())
        };
        let mut app = crate::http::router(state.clone());
        if serves_api {
            app = app.merge(crate::api::router(
                state.store.clone(),
                config.api_token.clone(),
                stats,
            ));
        } else {
            app = app.merge(crate::api::disabled_router());
        }
        let cancel = cancel.clone();
        tracker.spawn(crate::http::serve(
            listener,
            app,
            crate::http::Limits::SERVICE,
            cancel,
        ));
    }
    // Connect, retrying until it works or the service is stopped (the hub may not be up yet).
    let mut backoff = Duration::from_millis(500);
    let partition_ids = loop {
        match eventhub::connect(&config.eventhub).await {
            Ok(connected) => break connected,
            Err(e) => {
                tracing::error!(error = %e, "cannot connect to the Event Hub; retrying");
                if let Ok(mut error) = state.connect_error.lock() {
                    *error = Some(e.to_string());
                }
                tokio::select! {
                    _ = cancel.cancelled() => {
                        tracker.close();
                        return Ok((Counters::default(), Instant::now()));
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    if let Ok(mut error) = state.connect_error.lock() {
        *error = None;
    }
    let health = Arc::new(SourceHealth {
        partitions: partition_ids
            .iter()
            .map(|id| (id.clone(), Arc::new(PartitionHealth::default())))
            .collect(),
    });
    let _ = state.health.set(health.clone());

    // The apply thread owns the engine; it reports each partition's checkpoint first.
    let (tx, rx) = mpsc::channel::<Vec<LiveEvent>>(CHANNEL_CHUNKS);
    let (starts_tx, starts_rx) = oneshot::channel();
    let handle = tokio::runtime::Handle::current();
    let apply = {
        let state = state.clone();
        let entity = config.eventhub.entity.clone();
        let partition_ids = partition_ids.clone();
        let wake = delivery.map(|d| d.waker());
        let cancel = cancel.clone();
        let live = LiveSettings {
            policies: config.policies.clone(),
            reload: reload.clone(),
            allowed_event_delay: config.allowed_event_delay,
        };
        std::thread::Builder::new()
            .name("twinwatch-apply".into())
            .stack_size(64 << 20)
            .spawn(move || -> Result<Counters, anyhow::Error> {
                // A panic is a bug, but it must still stop the service rather than leave the
                // receivers blocked on a channel nobody reads.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    apply_loop(
                        store,
                        options,
                        &entity,
                        &partition_ids,
                        starts_tx,
                        rx,
                        &handle,
                        &state,
                        wake,
                        &live,
                        &cancel,
                        seed,
                    )
                }))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the apply thread panicked")));
                if let Err(e) = &result {
                    if let Ok(mut failed) = state.failed.lock() {
                        *failed = Some(format!("{e:#}"));
                    }
                    // Nothing can be applied any more: stop reading.
                    cancel.cancel();
                }
                result
            })
            .map_err(Failure::runtime)?
    };
    let starts = starts_rx.await.unwrap_or_default();
    eventhub::spawn_receivers(
        &config.eventhub,
        starts,
        health,
        tx,
        cancel.clone(),
        &tracker,
    );
    tracker.close();
    cancel.cancelled().await;
    let stopping_since = Instant::now();
    // A batch waiting for disk space is not written: its events are read again next start.
    state.store.stop_waiting();
    // The receivers stop at once; the HTTP listener finishes the requests under way.
    let deadline = config.shutdown_deadline / 2;
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(?deadline, "some tasks did not stop in time");
    }
    let counters = tokio::task::spawn_blocking(move || apply.join())
        .await
        .map_err(Failure::runtime)?
        .map_err(|_| Failure::runtime(anyhow::anyhow!("the apply thread panicked")))?
        .map_err(Failure::runtime)?;
    Ok((counters, stopping_since))
}

/// What the apply thread needs besides the engine: where to reload the policy from, the
/// SIGHUP flag, and the quiet clock's allowed delay.
struct LiveSettings {
    policies: Vec<std::path::PathBuf>,
    reload: Arc<std::sync::atomic::AtomicBool>,
    allowed_event_delay: Duration,
}

/// Reloads the policy files (SIGHUP): a policy that does not load is refused and the current
/// one stays; a different one re-audits the snapshot (`docs/semantics.md` §8) before the next
/// batch.
fn reload_policy(
    engine: &mut Engine,
    settings: &LiveSettings,
    state: &ServiceState,
) -> anyhow::Result<()> {
    let m = &state.metrics.policy;
    let policy = match super::load_policy(&settings.policies) {
        Ok(policy) => policy,
        Err(failure) => {
            tracing::error!(error = %format!("{:#}", failure.error), "the reloaded policy is refused; the current one stays in force");
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

/// The wall clock as an instant.
fn now_ticks() -> crate::time::Ticks {
    crate::time::Ticks(
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() / 100)) as i64,
    )
}

/// Every owned partition has been read to the hub's end (its last enqueued event applied).
fn caught_up(state: &ServiceState, expected: &[u64]) -> bool {
    let Some(health) = state.health.get() else {
        return false;
    };
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
struct ApplySeed {
    seed: super::seed::ServiceSeed,
    /// Where the apply thread tells the seed thread what to run first.
    plan: std::sync::mpsc::Sender<super::seed::SeedPlan>,
    inputs: mpsc::Receiver<super::seed::SeedInput>,
    status: Arc<super::seed::SeedStatus>,
}

/// What the apply thread takes next.
enum Next {
    Events(Vec<LiveEvent>),
    Seed(super::seed::SeedInput),
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
    seed: &mut Option<mpsc::Receiver<super::seed::SeedInput>>,
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

#[allow(clippy::too_many_arguments)]
fn apply_loop(
    store: Arc<Store>,
    options: EngineOptions,
    entity: &str,
    partition_ids: &[String],
    starts_tx: oneshot::Sender<Vec<PartitionStart>>,
    mut rx: mpsc::Receiver<Vec<LiveEvent>>,
    handle: &tokio::runtime::Handle,
    state: &ServiceState,
    wake: Option<crate::alert::DeliveryWaker>,
    live: &LiveSettings,
    cancel: &CancellationToken,
    seed: Option<ApplySeed>,
) -> anyhow::Result<Counters> {
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
    state
        .metrics
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
        state.metrics.events_expired.with_label_values(&[id]);
        let next = (checkpoint.next_index > 0 || checkpoint.offset.is_some())
            .then_some(checkpoint.next_index as i64);
        starts.push(PartitionStart {
            index,
            id: id.clone(),
            next_sequence_number: next,
        });
        if let Some(next) = next {
            state
                .metrics
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
            handle,
            if seed_busy { Duration::ZERO } else { tick },
            cancel,
            closed,
        ) {
            Next::Closed => break,
            Next::Seed(input) => {
                if let Some(seed) = &mut seed {
                    let started = Instant::now();
                    seed.handle(&mut engine, input)?;
                    state
                        .metrics
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
                        state
                            .metrics
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
                    let now = now_ticks();
                    state
                        .metrics
                        .event_age_seconds
                        .set((now.0 - t.0) as f64 / 1e7);
                }
            }
            Next::Idle => {
                engine.tick()?;
                // A quiet feed must not freeze the clock of `for` rules (`docs/semantics.md` §9).
                if engine.has_pending() && caught_up(state, &expected) {
                    let delay = i64::try_from(live.allowed_event_delay.as_nanos() / 100)
                        .unwrap_or(i64::MAX);
                    engine
                        .advance_clock(crate::time::Ticks(now_ticks().0.saturating_sub(delay)))?;
                }
            }
        }
        if seed_busy {
            if let Some(seed) = &mut seed {
                let started = Instant::now();
                seed.step(&mut engine)?;
                state
                    .metrics
                    .seed
                    .step_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        if live.reload.swap(false, Ordering::SeqCst) {
            reload_policy(&mut engine, live, state)?;
        }
        // A committed batch may carry alerts: delivery looks at once rather than at its poll.
        let batches = engine.counters().batches;
        if batches != last_committed_batches {
            last_committed_batches = batches;
            if let Some(wake) = &wake {
                wake.wake();
            }
        }
        if last_export.elapsed() >= Duration::from_millis(100) {
            export_metrics(
                &engine,
                &mut exported,
                state,
                partition_ids,
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
    export_metrics_final(&counters, &mut exported, state);
    if let Some(wake) = &wake {
        wake.wake();
    }
    Ok(counters)
}

fn add(counter: &prometheus::IntCounter, now: u64, before: u64) {
    if now > before {
        counter.inc_by(now - before);
    }
}

fn export_metrics_final(counters: &Counters, exported: &mut Counters, state: &ServiceState) {
    let m = &state.metrics;
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
    state: &ServiceState,
    partition_ids: &[String],
    handles: &[SourceHandle],
    resumed_at: &[u64],
) {
    export_metrics_final(engine.counters(), exported, state);
    let m = &state.metrics;
    for (i, id) in partition_ids.iter().enumerate() {
        if let Some(next) = engine.committed_next_index(handles[i]) {
            m.checkpoint_sequence_number
                .with_label_values(&[id])
                .set(next as i64 - 1);
        }
        let Some(health) = state.health.get() else {
            return;
        };
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
    state.violations_counted.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::super::seed::SeedInput;
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
