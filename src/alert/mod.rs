//! Alert delivery: the outbox that the pipeline fills in the same batch as the state change,
//! the delivery threads that empty it (one per sink, each with its own committed cursor), and
//! the sinks they deliver to (file, stdout, a CloudEvents webhook, Prometheus Alertmanager).
//!
//! - `outbox`: the per-sink delivery threads, backoff, alert dead letters, health.
//! - `sinks`: the `Sink` trait, `SinkError` (retryable or permanent), the local sinks.
//! - `poster`: what the HTTP sinks share (agent, TLS, the POST, URL checks and redaction).
//! - `webhook`, `alertmanager`: the HTTP sinks.
//!
//! The alert's wire type (the CloudEvent every sink reads) is `compliance::wire`, beside the
//! renderer that writes it.

pub mod alertmanager;
pub mod outbox;
pub mod poster;
pub mod sinks;
#[cfg(test)]
mod testserver;
pub mod webhook;

pub use alertmanager::AlertmanagerSink;
pub use outbox::{
    spawn_delivery, Delivery, DeliveryHealth, DeliveryReport, DeliveryWaker, Reopener,
};
pub use poster::HttpOptions;
pub use sinks::{ConsoleSink, Failed, FileSink, Sink, SinkError, StdoutSink};
pub use webhook::{WebhookMode, WebhookOptions, WebhookSink};
