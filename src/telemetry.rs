//! Logs: tracing to standard error, human-readable on a terminal and JSON otherwise.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

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

/// The service's Prometheus metrics, declared once; registered on their own registry so that
/// /metrics shows exactly these and the process collector.
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
    /// `twinwatch_checkpoint_sequence_number{partition}`: the last committed sequence number.
    pub checkpoint_sequence_number: prometheus::IntGaugeVec,
    /// `twinwatch_partition_connected{partition}`: 1 while a receiver is attached.
    pub partition_connected: prometheus::IntGaugeVec,
    /// `twinwatch_receiver_reconnects_total{partition}`.
    pub receiver_reconnects: prometheus::IntCounterVec,
    /// `twinwatch_receiver_displaced_total{partition}`: taken over by a higher owner level.
    pub receiver_displaced: prometheus::IntCounterVec,
    /// `twinwatch_twins`: twins in the snapshot.
    pub twins: prometheus::IntGauge,
    /// `twinwatch_tombstones`.
    pub tombstones: prometheus::IntGauge,
    /// `twinwatch_event_age_seconds`: now minus the enqueued time of the last applied event.
    pub event_age_seconds: prometheus::Gauge,
    /// `twinwatch_enqueue_to_alert_seconds`: from an event's enqueue to its alerts' acceptance
    /// by every sink.
    pub enqueue_to_alert_seconds: prometheus::Histogram,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        use prometheus::{opts, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
        let registry = prometheus::Registry::new();
        let messages = IntCounterVec::new(
            opts!(
                "twinwatch_messages_total",
                "Messages consumed by this process, by outcome"
            ),
            &["outcome"],
        )?;
        let dead_letters = IntCounterVec::new(
            opts!(
                "twinwatch_dead_letters_total",
                "Messages dead-lettered by this process, by reason"
            ),
            &["reason"],
        )?;
        let alerts = IntCounterVec::new(
            opts!(
                "twinwatch_alerts_total",
                "Alerts raised by this process, by kind (opened, resolved)"
            ),
            &["kind"],
        )?;
        let batches = IntCounter::new("twinwatch_batches_total", "Batches committed to the store")?;
        let checkpoint_sequence_number = IntGaugeVec::new(
            opts!(
                "twinwatch_checkpoint_sequence_number",
                "The last committed sequence number of each owned partition"
            ),
            &["partition"],
        )?;
        let partition_connected = IntGaugeVec::new(
            opts!(
                "twinwatch_partition_connected",
                "1 while the partition's receiver is attached"
            ),
            &["partition"],
        )?;
        let receiver_reconnects = IntCounterVec::new(
            opts!(
                "twinwatch_receiver_reconnects_total",
                "Receiver reconnections, by partition"
            ),
            &["partition"],
        )?;
        let receiver_displaced = IntCounterVec::new(
            opts!(
                "twinwatch_receiver_displaced_total",
                "Times another consumer with a higher owner level took the partition"
            ),
            &["partition"],
        )?;
        let twins = IntGauge::new("twinwatch_twins", "Twins in the snapshot")?;
        let tombstones = IntGauge::new(
            "twinwatch_tombstones",
            "Tombstones of deleted twins in the snapshot",
        )?;
        let event_age_seconds = Gauge::new(
            "twinwatch_event_age_seconds",
            "Now minus the Event Hubs enqueued time of the last applied event",
        )?;
        let enqueue_to_alert_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "twinwatch_enqueue_to_alert_seconds",
                "From an event's Event Hubs enqueue to its alerts' acceptance by every sink",
            )
            .buckets(vec![
                0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
            ]),
        )?;
        registry.register(Box::new(enqueue_to_alert_seconds.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(alerts.clone()))?;
        registry.register(Box::new(batches.clone()))?;
        registry.register(Box::new(checkpoint_sequence_number.clone()))?;
        registry.register(Box::new(partition_connected.clone()))?;
        registry.register(Box::new(receiver_reconnects.clone()))?;
        registry.register(Box::new(receiver_displaced.clone()))?;
        registry.register(Box::new(twins.clone()))?;
        registry.register(Box::new(tombstones.clone()))?;
        registry.register(Box::new(event_age_seconds.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // Every outcome shows from the start, at 0.
        for outcome in ["applied", "stale", "ignored", "dead_lettered"] {
            messages.with_label_values(&[outcome]);
        }
        for kind in ["opened", "resolved"] {
            alerts.with_label_values(&[kind]);
        }
        Ok(Metrics {
            registry,
            messages,
            dead_letters,
            alerts,
            batches,
            checkpoint_sequence_number,
            partition_connected,
            receiver_reconnects,
            receiver_displaced,
            twins,
            tombstones,
            event_age_seconds,
            enqueue_to_alert_seconds,
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
