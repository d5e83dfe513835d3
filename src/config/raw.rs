//! The configuration file as written: every table and key, documented, unknown keys refused.
//! `Debug` redacts the secrets.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::redact::{redacted, redacted_url_opt};

/// The configuration file as written. Its `Debug` redacts the secrets (see [`redact_url`]).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The snapshot's data directory (env `TWINWATCH_DATA_DIR`).
    pub data_dir: Option<PathBuf>,
    /// Address of the HTTP listener: /metrics, /healthz, /readyz (default 127.0.0.1:9464).
    pub listen: Option<String>,
    /// Policy files, concatenated in order; the built-in baseline when empty.
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    #[serde(default)]
    pub eventhub: RawEventHub,
    #[serde(default)]
    pub alerts: RawAlerts,
    #[serde(default)]
    pub batching: RawBatching,
    /// Seeding and reconciling from the hub's twin query (`docs/semantics.md` §7).
    #[serde(default)]
    pub seed: RawSeed,
    /// How long a stop (SIGTERM, Ctrl-C) may take, seconds (default 30).
    pub shutdown_deadline_secs: Option<u64>,
    /// Bearer token required by the query API (`/v1/*`); better from the environment
    /// (`TWINWATCH_API_TOKEN`) or a file. Without one, the API is open on a loopback `listen`
    /// address and not served on any other.
    pub api_token: Option<String>,
    /// A file holding the API's bearer token (a mounted Kubernetes Secret, say).
    pub api_token_file: Option<PathBuf>,
    /// Consuming pauses while the data directory's disk has less than this free, MiB
    /// (default 256): a batch is never written into a full disk.
    pub min_free_disk_mib: Option<u64>,
    /// How late an event may arrive, seconds (default 60): when every owned partition is
    /// caught up, the clock of rules with `for` follows the wall clock minus this, so that a
    /// pending violation opens even when the hub is quiet.
    pub allowed_event_delay_secs: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEventHub {
    /// The Event Hub-compatible connection string
    /// (`Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...`); better
    /// from the environment: `TWINWATCH_EVENTHUB_CONNECTION_STRING`.
    pub connection_string: Option<String>,
    /// The consumer group (default `$Default`).
    pub consumer_group: Option<String>,
    /// The partitions this instance owns: `"all"` (default), a list of partition ids, or
    /// `"ordinal"`: replica k of `replicas` owns the partitions at positions i of the hub's
    /// list with i % replicas == k.
    pub partitions: Option<toml::Value>,
    /// With `partitions = "ordinal"`: how many replicas share the hub.
    pub replicas: Option<u32>,
    /// With `partitions = "ordinal"`: this replica's ordinal; from `TWINWATCH_REPLICA_ORDINAL`,
    /// else from the trailing `-N` of the host name (a StatefulSet pod's name).
    pub ordinal: Option<u32>,
    /// Where a partition without a checkpoint starts: `earliest` (default) or `latest`.
    pub start_position: Option<String>,
    /// An endpoint to connect to instead of the namespace's (`amqp://host:port` for an emulator
    /// or a private endpoint). `UseDevelopmentEmulator=true` in the connection string implies
    /// `amqp://HOST:PORT` of its `Endpoint`.
    pub custom_endpoint: Option<String>,
    /// The receivers' owner level (epoch); a receiver with a higher one takes the partition.
    pub owner_level: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Append alerts (CloudEvents JSON lines) to this file.
    pub file: Option<PathBuf>,
    /// Print alerts on standard output.
    #[serde(default)]
    pub stdout: bool,
    /// POST each alert to this URL (CloudEvents HTTP binding, structured mode).
    pub webhook_url: Option<String>,
    /// Bearer token for the webhook (env `TWINWATCH_WEBHOOK_TOKEN`).
    pub webhook_token: Option<String>,
    /// Prometheus Alertmanager base URL.
    pub alertmanager_url: Option<String>,
    /// Re-send open alerts to Alertmanager this often, seconds (default 60).
    pub alertmanager_repost_secs: Option<u64>,
    /// Timeout of one HTTP request to a sink, seconds (default 10).
    pub sink_timeout_secs: Option<u64>,
    /// `batched` (default: a JSON array of alerts a request,
    /// `application/cloudevents-batch+json`) or `structured` (one alert a request).
    pub webhook_mode: Option<String>,
    /// Alerts per webhook request at most, batched mode (default 500).
    pub webhook_batch_max_alerts: Option<u64>,
    /// Bytes per webhook request body at most, batched mode (default 1048576).
    pub webhook_batch_max_bytes: Option<u64>,
    /// Webhook requests in flight at once (default 4).
    pub webhook_in_flight: Option<u64>,
    /// A PEM file of CA certificates trusted for https sinks besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Alertmanager's `resolve_timeout`, seconds (default 300, Alertmanager's own default):
    /// the re-post interval must be at most half of it.
    pub alertmanager_resolve_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatching {
    /// Commit after this many messages (default 8192).
    pub max_messages: Option<u64>,
    /// ...or when the open batch is this old, milliseconds (default 50 for the service).
    pub max_delay_ms: Option<u64>,
    /// Memory for the cache of recently used twins, MiB (default 256).
    pub cache_mib: Option<u64>,
    /// Bodies larger than this are dead letters (default 262144).
    pub max_body_bytes: Option<u64>,
}

/// The `[seed]` table: seed passes of the service from IoT Hub's twin query.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSeed {
    /// The IoT Hub connection string of a shared access policy with registry read
    /// (`HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`); better from the
    /// environment: `TWINWATCH_IOTHUB_CONNECTION_STRING`. Without one, the service never seeds.
    pub connection_string: Option<String>,
    /// Seed when the snapshot holds no twin of the hub (default true with a connection
    /// string).
    pub on_empty: Option<bool>,
    /// Reconcile every this many hours (default 24; 0 turns it off; fractions allowed).
    pub reconcile_every_hours: Option<f64>,
    /// Twins that changed within this many seconds before a pass began are never removed by
    /// it (default 3600: the twin query's results may lag).
    pub grace_secs: Option<u64>,
    /// Twins asked for per page (`x-ms-max-item-count`, default 1000, at most 10000).
    pub page_size: Option<u32>,
    /// Replaces `https://<HostName>`: a private endpoint or an emulator (`http://` to loopback
    /// only).
    pub endpoint: Option<String>,
    /// A PEM file of CA certificates trusted for the hub besides the system's.
    pub ca_file: Option<PathBuf>,
    /// For demos and tests of a synthetic fleet whose clock is not the wall clock: the as-of
    /// time of the pass run at start (RFC 3339); later passes use the moment they begin.
    pub as_of: Option<String>,
}

impl fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("policies", &self.policies)
            .field("eventhub", &self.eventhub)
            .field("alerts", &self.alerts)
            .field("batching", &self.batching)
            .field("shutdown_deadline_secs", &self.shutdown_deadline_secs)
            .field("api_token", &format_args!("{}", redacted(&self.api_token)))
            .field("api_token_file", &self.api_token_file)
            .field("min_free_disk_mib", &self.min_free_disk_mib)
            .field("seed", &self.seed)
            .finish()
    }
}

impl fmt::Debug for RawEventHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawEventHub")
            .field(
                "connection_string",
                &format_args!("{}", redacted(&self.connection_string)),
            )
            .field("consumer_group", &self.consumer_group)
            .field("partitions", &self.partitions)
            .field("replicas", &self.replicas)
            .field("ordinal", &self.ordinal)
            .field("start_position", &self.start_position)
            .field("custom_endpoint", &redacted_url_opt(&self.custom_endpoint))
            .field("owner_level", &self.owner_level)
            .finish()
    }
}

impl fmt::Debug for RawAlerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawAlerts")
            .field("file", &self.file)
            .field("stdout", &self.stdout)
            .field("webhook_url", &redacted_url_opt(&self.webhook_url))
            .field(
                "webhook_token",
                &format_args!("{}", redacted(&self.webhook_token)),
            )
            .field(
                "alertmanager_url",
                &redacted_url_opt(&self.alertmanager_url),
            )
            .field("alertmanager_repost_secs", &self.alertmanager_repost_secs)
            .field("sink_timeout_secs", &self.sink_timeout_secs)
            .finish()
    }
}

impl fmt::Debug for RawSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSeed")
            .field(
                "connection_string",
                &format_args!("{}", redacted(&self.connection_string)),
            )
            .field("on_empty", &self.on_empty)
            .field("reconcile_every_hours", &self.reconcile_every_hours)
            .field("grace_secs", &self.grace_secs)
            .field("page_size", &self.page_size)
            .field("endpoint", &redacted_url_opt(&self.endpoint))
            .field("ca_file", &self.ca_file)
            .field("as_of", &self.as_of)
            .finish()
    }
}
