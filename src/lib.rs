//! twinwatch: a live snapshot of an Azure IoT Hub fleet's twins, with compliance alerts.
//!
//! Without the `service` feature (on by default) only the pure core and the file readers are
//! built: no RocksDB, no Event Hubs, no HTTP. The fuzz targets (fuzz/) build it so.
//!
//! Codemap, top to bottom (every arrow points down: ARCHITECTURE.md's layers, checked by
//! `tests/it/layers.rs`; what the code computes is docs/semantics.md):
//! - [`app`]: wiring: each command from parsed arguments to an exit code.
//! - [`http`]: the service's HTTP wing: the listener (/metrics, /healthz, /readyz), the query
//!   API (`http::api`, `/v1/*`: twins, violations, stats) and the state they read
//!   (`http::ServiceState`).
//! - [`pipeline`]: the apply thread: decode → apply → evaluate → batch → store; the writer.
//!   One way in per source kind: `pipeline::replay` (files), `pipeline::live` (the Event Hub
//!   and the service's seed pages, `pipeline::live_seed`); seed passes (`pipeline::seed`) and
//!   re-audits (`pipeline::audit`) go through it too.
//! - [`alert`]: the outbox's delivery threads (one per sink) and the sinks: file, stdout and
//!   console (`alert::sinks`), the webhook (`alert::webhook`) and Alertmanager
//!   (`alert::alertmanager`) on a shared HTTP poster (`alert::poster`).
//! - [`source`]: where messages come from: captured files and their encodings (JSON lines;
//!   Avro through `source::avro_fast`, or apache-avro for other schemas), Event Hubs
//!   (`source::eventhub`), the twin documents of seed passes (`source::documents`) and the
//!   hub's twin query with the service's seed thread (`source::hub`).
//! - [`store`]: RocksDB, the only module that touches it; key layout in `store::keys`.
//! - [`decode`]: one message into a twin event, an ignore or a dead letter (pure).
//! - [`twin`]: applying an event to the snapshot (pure).
//! - [`compliance`]: failing rules to `opened`/`resolved` transitions and CloudEvents (pure);
//!   `compliance::wire`, the CloudEvent type every reader of alerts uses.
//! - [`policy`]: the policy language: loading, compiling, evaluating rules (pure).
//! - [`generate`]: a deterministic synthetic fleet for demos, tests and benchmarks.
//! - [`emulator`]: a local Event Hubs endpoint (AMQP 1.0) for development, tests and the demo;
//!   it stands apart and reuses only the generator (its message type and twin documents),
//!   `iothub` (connection string, signatures) and `time`; `emulator::query` serves IoT Hub's
//!   twin query (HTTPS and HTTP) from twin documents.
//! - [`iothub`]: IoT Hub's service API for a seed pass: connection string, shared access
//!   signatures, the blocking twin query client.
//! - [`value`]: the JSON value twins are made of; merge patch; the on-disk codec.
//! - [`model`], [`time`]: shared vocabulary: keys, events, reasons, positions, violations,
//!   instants.
//! - [`config`], [`cli`], [`telemetry`]: the service's configuration; argument types; logs
//!   and metrics.
//! - [`failpoint`]: named crash and delay spots for the reliability suite (a cargo feature).

#[cfg(feature = "service")]
pub mod alert;
#[cfg(feature = "service")]
pub mod app;
pub mod cli;
pub mod compliance;
pub mod config;
pub mod decode;
#[cfg(feature = "service")]
pub mod emulator;
pub mod failpoint;
pub mod generate;
#[cfg(feature = "service")]
pub mod http;
pub mod iothub;
pub mod model;
#[cfg(feature = "service")]
pub mod pipeline;
pub mod policy;
pub mod source;
#[cfg(feature = "service")]
pub mod store;
pub mod telemetry;
pub mod time;
pub mod twin;
pub mod value;
