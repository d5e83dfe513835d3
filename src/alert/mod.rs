//! Alert delivery: the outbox that the pipeline fills in the same batch as the state change,
//! the delivery thread that empties it, and the sinks it delivers to (file, stdout, an HTTP
//! webhook, Prometheus Alertmanager).

pub mod http;
pub mod outbox;
pub mod sinks;

pub use http::{AlertmanagerSink, WebhookSink};
pub use outbox::{spawn_delivery, Delivery, DeliveryReport, DeliveryWaker};
pub use sinks::{ConsoleSink, FileSink, Sink, SinkError, StdoutSink};
