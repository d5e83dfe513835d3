//! Logs: tracing to standard error, human-readable on a terminal and JSON otherwise.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How logs are written: `text` for people, `json` for collectors (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The HTTP client's protocol layer logs raw requests at trace level, Authorization
    // header included: never let a token reach the logs.
    let filter = match "ureq_proto=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Buckets for durations from a millisecond to a minute.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// What the pipeline observes itself, per batch (cheap clones of the registered metrics).
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    /// `twinwatch_batch_size_messages`.
    pub batch_size: prometheus::Histogram,
    /// `twinwatch_apply_duration_seconds`: the apply thread's time on one batch.
    pub apply_seconds: prometheus::Histogram,
    /// `twinwatch_commit_duration_seconds`: RocksDB's write of one batch.
    pub commit_seconds: prometheus::Histogram,
}

/// What the delivery thread observes (cheap clones of the registered metrics).
#[derive(Clone, Debug)]
pub struct DeliveryMetrics {
    pub enqueue_to_alert_seconds: prometheus::Histogram,
    pub deliveries: prometheus::IntCounterVec,
    pub retries: prometheus::IntCounterVec,
    pub failures: prometheus::IntCounterVec,
    /// `twinwatch_sink_dead_letters_total{sink}`: alerts a sink refused for good, set aside.
    pub dead_letters: prometheus::IntCounterVec,
    pub outbox_pending: prometheus::IntGauge,
    /// When the alert at the head of the outbox started waiting (Unix ms; 0: none waits):
    /// `twinwatch_outbox_oldest_age_seconds` is computed from it at each scrape.
    pub head_waiting_since_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Policy changes and grace periods (`docs/semantics.md` §8, §9), set by the apply thread.
#[derive(Clone)]
pub struct PolicyMetrics {
    /// SIGHUP reloads by outcome: `applied`, `unchanged`, `rejected`.
    pub reloads: prometheus::IntCounterVec,
    /// Twins re-audited by this process.
    pub reaudited_twins: prometheus::IntCounter,
    /// Twins covered so far by the re-audit under way (0 when none is).
    pub reaudit_progress: prometheus::IntGauge,
    /// Always 1, labelled with the fingerprint of the policy in force.
    pub info: prometheus::IntGaugeVec,
    /// Pending violations (rules with `for`) by rule.
    pub pending: prometheus::IntGaugeVec,
    /// Pending violations that opened, and that were dropped before their deadline.
    pub pending_outcomes: prometheus::IntCounterVec,
}

/// Seed passes of the service (`docs/semantics.md` §7), set by the seed and apply threads.
#[derive(Clone)]
pub struct SeedMetrics {
    /// `twinwatch_seed_passes_total{outcome}`: complete, incomplete, failed.
    pub passes: prometheus::IntCounterVec,
    /// `twinwatch_seed_documents_total{outcome}`: applied, stale, dead_lettered.
    pub documents: prometheus::IntCounterVec,
    /// `twinwatch_seed_twins_removed_total`: twins reconciling removed.
    pub removed: prometheus::IntCounter,
    /// `twinwatch_seed_last_complete_timestamp_seconds`: the as-of time of the last complete
    /// pass (Unix seconds; 0 before the first).
    pub last_complete: prometheus::Gauge,
    /// `twinwatch_seed_running`: 1 while a pass is under way.
    pub running: prometheus::IntGauge,
    /// `twinwatch_seed_throttled_total`: 429 answers waited out.
    pub throttled: prometheus::IntCounter,
    /// `twinwatch_seed_throttled_seconds_total`: the time those waits took.
    pub throttled_seconds: prometheus::Counter,
    /// `twinwatch_seed_step_duration_seconds`: the apply thread's time on one step of a pass
    /// (a page's documents, or a batch of its evaluation): the longest the feed waits for it.
    pub step_seconds: prometheus::Histogram,
}

/// The service's Prometheus metrics, declared once; registered on their own registry so that
/// /metrics shows exactly these and the process collector. Each is documented in the README.
pub struct Metrics {
    pub registry: prometheus::Registry,
    /// `twinwatch_messages_total{outcome}`: applied, stale, ignored, dead_lettered.
    pub messages: prometheus::IntCounterVec,
    /// `twinwatch_dead_letters_total{reason}`.
    pub dead_letters: prometheus::IntCounterVec,
    /// `twinwatch_alerts_total{kind}`: opened, resolved.
    pub alerts: prometheus::IntCounterVec,
    /// `twinwatch_batches_total`.
    pub batches: prometheus::IntCounter,
    pub pipeline: PipelineMetrics,
    pub delivery: DeliveryMetrics,
    /// `twinwatch_outbox_oldest_age_seconds`.
    pub outbox_oldest_age_seconds: prometheus::Gauge,
    /// `twinwatch_checkpoint_sequence_number{partition}`: the last committed sequence number.
    pub checkpoint_sequence_number: prometheus::IntGaugeVec,
    /// `twinwatch_partition_lag_events{partition}`: the hub's last enqueued sequence number
    /// minus the checkpoint.
    pub partition_lag_events: prometheus::IntGaugeVec,
    /// `twinwatch_partition_connected{partition}`: 1 while a receiver is attached.
    pub partition_connected: prometheus::IntGaugeVec,
    /// `twinwatch_receiver_reconnects_total{partition}`.
    pub receiver_reconnects: prometheus::IntCounterVec,
    /// `twinwatch_receiver_displaced_total{partition}`: taken over by a higher owner level.
    pub receiver_displaced: prometheus::IntCounterVec,
    /// `twinwatch_events_expired_total{partition}`: events the hub dropped (retention) before
    /// they were read: the gaps in a partition's sequence numbers.
    pub events_expired: prometheus::IntCounterVec,
    /// `twinwatch_twins`: twins in the snapshot.
    pub twins: prometheus::IntGauge,
    /// `twinwatch_tombstones`.
    pub tombstones: prometheus::IntGauge,
    /// `twinwatch_failing_twins{rule,severity}`.
    pub failing_twins: prometheus::IntGaugeVec,
    /// `twinwatch_event_age_seconds`: now minus the enqueued time of the last applied event.
    pub event_age_seconds: prometheus::Gauge,
    /// `twinwatch_rocksdb_*`: read from RocksDB at each scrape.
    pub rocksdb_memtable_bytes: prometheus::IntGauge,
    pub rocksdb_pending_compaction_bytes: prometheus::IntGauge,
    pub rocksdb_block_cache_usage_bytes: prometheus::IntGauge,
    pub rocksdb_live_sst_bytes: prometheus::IntGauge,
    /// `twinwatch_disk_free_bytes`: free space on the data directory's filesystem.
    pub disk_free_bytes: prometheus::IntGauge,
    /// `twinwatch_ready`: 1 when /readyz answers 200.
    pub ready: prometheus::IntGauge,
    pub policy: PolicyMetrics,
    pub seed: SeedMetrics,
}

/// Registers `metric` and hands it back.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &prometheus::Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        use prometheus::{
            opts, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
        };
        let r = prometheus::Registry::new();
        let counter_vec = |name: &str, help: &str, label: &str| {
            registered(&r, IntCounterVec::new(opts!(name, help), &[label])?)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(&r, IntGaugeVec::new(opts!(name, help), labels)?)
        };
        let gauge = |name: &str, help: &str| registered(&r, IntGauge::new(name, help)?);
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            registered(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
            )
        };
        let messages = counter_vec(
            "twinwatch_messages_total",
            "Messages consumed by this process, by outcome",
            "outcome",
        )?;
        let dead_letters = counter_vec(
            "twinwatch_dead_letters_total",
            "Messages dead-lettered by this process, by reason",
            "reason",
        )?;
        let alerts = counter_vec(
            "twinwatch_alerts_total",
            "Alerts raised by this process, by kind (opened, resolved)",
            "kind",
        )?;
        let batches = registered(
            &r,
            IntCounter::new("twinwatch_batches_total", "Batches committed to the store")?,
        )?;
        let pipeline = PipelineMetrics {
            batch_size: histogram(
                "twinwatch_batch_size_messages",
                "Messages per committed batch",
                vec![
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0,
                ],
            )?,
            apply_seconds: histogram(
                "twinwatch_apply_duration_seconds",
                "The apply thread's time on one batch: decoding, applying, evaluating, encoding",
                SECONDS_BUCKETS.to_vec(),
            )?,
            commit_seconds: histogram(
                "twinwatch_commit_duration_seconds",
                "RocksDB's write of one batch (twins, checkpoints, violations, alerts) to the WAL and memtable",
                SECONDS_BUCKETS.to_vec(),
            )?,
        };
        let delivery = DeliveryMetrics {
            enqueue_to_alert_seconds: histogram(
                "twinwatch_enqueue_to_alert_seconds",
                "From an event's Event Hubs enqueue to its alerts' acceptance by every sink",
                vec![
                    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4,
                    0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
                ],
            )?,
            deliveries: counter_vec(
                "twinwatch_sink_deliveries_total",
                "Alerts accepted by each sink",
                "sink",
            )?,
            retries: counter_vec(
                "twinwatch_sink_retries_total",
                "Runs of alerts sent to a sink again after it failed",
                "sink",
            )?,
            failures: counter_vec(
                "twinwatch_sink_failures_total",
                "Failed deliveries to each sink: of a run of alerts, or of its periodic re-post (Alertmanager)",
                "sink",
            )?,
            dead_letters: counter_vec(
                "twinwatch_sink_dead_letters_total",
                "Alerts a sink refused for good (a 4xx other than 408 and 429), set aside as alert dead letters",
                "sink",
            )?,
            outbox_pending: gauge(
                "twinwatch_outbox_pending_alerts",
                "Alerts committed but not yet accepted (or set aside) by every sink",
            )?,
            head_waiting_since_ms: Default::default(),
        };
        let outbox_oldest_age_seconds = registered(
            &r,
            Gauge::new(
                "twinwatch_outbox_oldest_age_seconds",
                "How long the oldest alert in the outbox has waited for delivery (0 when none waits)",
            )?,
        )?;
        let checkpoint_sequence_number = gauge_vec(
            "twinwatch_checkpoint_sequence_number",
            "The last committed sequence number of each owned partition",
            &["partition"],
        )?;
        let partition_lag_events = gauge_vec(
            "twinwatch_partition_lag_events",
            "The hub's last enqueued sequence number minus the committed one, per owned partition",
            &["partition"],
        )?;
        let partition_connected = gauge_vec(
            "twinwatch_partition_connected",
            "1 while the partition's receiver is attached",
            &["partition"],
        )?;
        let receiver_reconnects = counter_vec(
            "twinwatch_receiver_reconnects_total",
            "Receiver reconnections, by partition",
            "partition",
        )?;
        let receiver_displaced = counter_vec(
            "twinwatch_receiver_displaced_total",
            "Times another consumer with a higher owner level took the partition",
            "partition",
        )?;
        let events_expired = counter_vec(
            "twinwatch_events_expired_total",
            "Events the hub dropped (retention) before they were read: gaps in the partition's sequence numbers; a reconcile pass (twinwatch seed) restores the twins they changed",
            "partition",
        )?;
        let twins = gauge("twinwatch_twins", "Twins in the snapshot")?;
        let tombstones = gauge(
            "twinwatch_tombstones",
            "Tombstones of deleted twins in the snapshot",
        )?;
        let failing_twins = gauge_vec(
            "twinwatch_failing_twins",
            "Twins failing each policy rule, by rule and severity",
            &["rule", "severity"],
        )?;
        let event_age_seconds = registered(
            &r,
            Gauge::new(
                "twinwatch_event_age_seconds",
                "Now minus the Event Hubs enqueued time of the last applied event",
            )?,
        )?;
        let rocksdb_memtable_bytes = gauge(
            "twinwatch_rocksdb_memtable_bytes",
            "RocksDB: bytes in all memtables (rocksdb.cur-size-all-mem-tables)",
        )?;
        let rocksdb_pending_compaction_bytes = gauge(
            "twinwatch_rocksdb_pending_compaction_bytes",
            "RocksDB: estimated bytes compaction has to rewrite (rocksdb.estimate-pending-compaction-bytes)",
        )?;
        let rocksdb_block_cache_usage_bytes = gauge(
            "twinwatch_rocksdb_block_cache_usage_bytes",
            "RocksDB: bytes in the block cache (rocksdb.block-cache-usage)",
        )?;
        let rocksdb_live_sst_bytes = gauge(
            "twinwatch_rocksdb_live_sst_bytes",
            "RocksDB: bytes of the live SST files (rocksdb.live-sst-files-size)",
        )?;
        let disk_free_bytes = gauge(
            "twinwatch_disk_free_bytes",
            "Free bytes on the data directory's filesystem (consuming pauses below min_free_disk_mib)",
        )?;
        let ready = gauge("twinwatch_ready", "1 when /readyz answers 200")?;
        let policy = PolicyMetrics {
            reloads: counter_vec(
                "twinwatch_policy_reloads_total",
                "Policy reloads on SIGHUP, by outcome (applied, unchanged, rejected)",
                "outcome",
            )?,
            reaudited_twins: registered(
                &r,
                IntCounter::new(
                    "twinwatch_reaudit_twins_total",
                    "Twins re-audited after a policy change by this process",
                )?,
            )?,
            reaudit_progress: gauge(
                "twinwatch_reaudit_progress_twins",
                "Twins covered so far by the re-audit under way (0 when none is)",
            )?,
            info: gauge_vec(
                "twinwatch_policy_info",
                "Always 1; the fingerprint of the policy in force in a label",
                &["fingerprint"],
            )?,
            pending: gauge_vec(
                "twinwatch_pending_violations",
                "Violations of rules with `for` that have not lasted long enough to alert, by rule",
                &["rule"],
            )?,
            pending_outcomes: counter_vec(
                "twinwatch_pending_violations_total",
                "Pending violations that opened (deadline reached) or were dropped (passed or removed first)",
                "outcome",
            )?,
        };
        for outcome in ["applied", "unchanged", "rejected"] {
            policy.reloads.with_label_values(&[outcome]);
        }
        let seed = SeedMetrics {
            passes: counter_vec(
                "twinwatch_seed_passes_total",
                "Seed passes from the hub's twin query, by outcome (complete, incomplete: interrupted or a page failed, nothing removed; failed: the hub refused or could not be used)",
                "outcome",
            )?,
            documents: counter_vec(
                "twinwatch_seed_documents_total",
                "Twin documents read by seed passes, by outcome (applied, stale, dead_lettered)",
                "outcome",
            )?,
            removed: registered(
                &r,
                IntCounter::new(
                    "twinwatch_seed_twins_removed_total",
                    "Twins removed by reconciling: absent from a complete pass and unchanged for longer than the grace",
                )?,
            )?,
            last_complete: registered(
                &r,
                Gauge::new(
                    "twinwatch_seed_last_complete_timestamp_seconds",
                    "The as-of time of the last complete seed pass, Unix seconds (0: none yet)",
                )?,
            )?,
            running: gauge(
                "twinwatch_seed_running",
                "1 while a seed pass is under way",
            )?,
            throttled: registered(
                &r,
                IntCounter::new(
                    "twinwatch_seed_throttled_total",
                    "Answers 429 (throttled) from the hub's twin query, waited out",
                )?,
            )?,
            throttled_seconds: registered(
                &r,
                prometheus::Counter::new(
                    "twinwatch_seed_throttled_seconds_total",
                    "Seconds spent waiting out the hub's throttling (its Retry-After)",
                )?,
            )?,
            step_seconds: histogram(
                "twinwatch_seed_step_duration_seconds",
                "The apply thread's time on one step of a seed pass (a page's documents, or a batch of its evaluation), between two chunks of events",
                SECONDS_BUCKETS.to_vec(),
            )?,
        };
        for outcome in ["complete", "incomplete", "failed"] {
            seed.passes.with_label_values(&[outcome]);
        }
        for outcome in ["applied", "stale", "dead_lettered"] {
            seed.documents.with_label_values(&[outcome]);
        }
        for outcome in ["opened", "dropped"] {
            policy.pending_outcomes.with_label_values(&[outcome]);
        }
        let build_info = gauge_vec(
            "twinwatch_build_info",
            "Always 1; the version in a label",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // Every outcome shows from the start, at 0.
        for outcome in ["applied", "stale", "ignored", "dead_lettered"] {
            messages.with_label_values(&[outcome]);
        }
        for kind in ["opened", "resolved"] {
            alerts.with_label_values(&[kind]);
        }
        for reason in crate::model::DeadLetterReason::ALL {
            dead_letters.with_label_values(&[reason.as_str()]);
        }
        Ok(Metrics {
            registry: r,
            messages,
            dead_letters,
            alerts,
            batches,
            pipeline,
            delivery,
            outbox_oldest_age_seconds,
            checkpoint_sequence_number,
            partition_lag_events,
            partition_connected,
            receiver_reconnects,
            receiver_displaced,
            events_expired,
            twins,
            tombstones,
            failing_twins,
            event_age_seconds,
            rocksdb_memtable_bytes,
            rocksdb_pending_compaction_bytes,
            rocksdb_block_cache_usage_bytes,
            rocksdb_live_sst_bytes,
            disk_free_bytes,
            ready,
            policy,
            seed,
        })
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a String cannot fail but for a metric family that is malformed,
        // which the registry refuses at registration.
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}
