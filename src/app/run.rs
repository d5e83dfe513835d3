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
use crate::alert::Sink;
use crate::cli::RunArgs;
use crate::config::{Config, RawConfig};
use crate::http::ServiceState;
use crate::pipeline::live::{apply_loop, ApplySeed, LiveFeed, LiveSettings, LiveView};
use crate::pipeline::live_seed::ServiceSeed;
use crate::pipeline::{Counters, EngineOptions};
use crate::source::eventhub::{self, LiveEvent, PartitionHealth, SourceHealth};
use crate::source::hub::{SeedStatus, SeedThread, SEED_PAGES};
use crate::store::Store;
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
    let store = super::sinks::open_store(&config.data_dir)?;
    let mut sinks = super::sinks::build_sinks(&config.alerts, &store)?;
    sinks.extend(extra_sinks);
    let metrics = Metrics::new().map_err(Failure::runtime)?;
    let delivery = super::sinks::start_delivery(&store, sinks, Some(metrics.delivery.clone()))?;
    let queue_alerts = delivery.is_some();
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
        let status = Arc::new(SeedStatus::new(seed_config.hub()));
        let (plan_tx, plan_rx) = std::sync::mpsc::channel();
        let (to_apply, from_seed) = mpsc::channel(SEED_PAGES);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (stop, cancel) = (stop.clone(), cancel.clone());
            tracker.spawn(async move {
                cancel.cancelled().await;
                stop.store(true, Ordering::SeqCst);
            });
        }
        let thread = SeedThread {
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
        let apply = ApplySeed {
            seed: ServiceSeed::new(seed_config, status.clone(), metrics.seed.clone()),
            plan: plan_tx,
            inputs: from_seed,
        };
        (apply, status)
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
        seed: seed.as_ref().map(|(_, status)| status.clone()),
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
        let stats: crate::http::api::StatsFn = {
            let state = state.clone();
            Arc::new(move || state.live_stats())
        };
        let mut app = crate::http::router(state.clone());
        if serves_api {
            app = app.merge(crate::http::api::router(
                state.store.clone(),
                config.api_token.clone(),
                stats,
            ));
        } else {
            app = app.merge(crate::http::api::disabled_router());
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
    let apply = {
        let state = state.clone();
        let feed = LiveFeed {
            entity: config.eventhub.entity.clone(),
            partition_ids: partition_ids.clone(),
            starts: starts_tx,
            events: rx,
            health: health.clone(),
            handle: tokio::runtime::Handle::current(),
            cancel: cancel.clone(),
        };
        let policies = config.policies.clone();
        let wake = delivery.map(|d| d.waker());
        let live = LiveSettings {
            reload: reload.clone(),
            load_policy: Box::new(move || super::load_policy(&policies).map_err(|f| f.error)),
            allowed_event_delay: config.allowed_event_delay,
            wake: wake.map(|w| Box::new(move || w.wake()) as Box<dyn Fn() + Send>),
        };
        let cancel = cancel.clone();
        let seed = seed.map(|(apply, _)| apply);
        std::thread::Builder::new()
            .name("twinwatch-apply".into())
            .stack_size(64 << 20)
            .spawn(move || -> Result<Counters, anyhow::Error> {
                // A panic is a bug, but it must still stop the service rather than leave the
                // receivers blocked on a channel nobody reads.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let view = LiveView {
                        metrics: &state.metrics,
                        violations_counted: &state.violations_counted,
                    };
                    apply_loop(store, options, feed, &live, view, seed)
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
