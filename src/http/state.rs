//! The state the HTTP handlers read: the registry, the store, the receivers' health, the
//! alert delivery's health, the seed passes; readiness (`/readyz`, `twinwatch_ready`) and the
//! gauges read at each scrape.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::source::eventhub::SourceHealth;
use crate::source::hub::SeedStatus;
use crate::store::Store;
use crate::telemetry::Metrics;

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
    pub seed: Option<Arc<SeedStatus>>,
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
        let now = u64::try_from(crate::time::Ticks::now().unix_millis()).unwrap_or(0);
        Duration::from_millis(now.saturating_sub(since))
    }

    /// The live counts `/v1/stats` adds to what it reads from the store.
    pub fn live_stats(&self) -> serde_json::Value {
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
