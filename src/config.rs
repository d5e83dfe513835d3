//! The service's configuration: one TOML file (`twinwatch run --config FILE`), environment
//! overrides for secrets and deployment settings, and command-line flags for what people change
//! per run. [`RawConfig`] is the file as written (every field documented, unknown fields
//! refused); [`RawConfig::validate`] turns it into the [`Config`] the rest of the program uses.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A secret: never printed, logged or exported in full.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: String, error: String },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Read { .. } => "read",
            ConfigError::Parse { .. } => "parse",
            ConfigError::Invalid(_) => "invalid",
        }
    }
}

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

/// Which partitions an instance owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partitions {
    All,
    List(Vec<String>),
    /// Replica `ordinal` of `replicas` owns the partitions at positions i of the hub's list
    /// with `i % replicas == ordinal`.
    Ordinal {
        replicas: u32,
        ordinal: u32,
    },
}

impl Partitions {
    /// The partitions owned, among the hub's `ids` (in the hub's order); a listed id the hub
    /// does not have is an error.
    pub fn select(&self, ids: &[String]) -> Result<Vec<String>, String> {
        match self {
            Partitions::All => Ok(ids.to_vec()),
            Partitions::List(wanted) => match wanted.iter().find(|id| !ids.contains(id)) {
                Some(missing) => Err(missing.clone()),
                None => Ok(wanted.clone()),
            },
            Partitions::Ordinal { replicas, ordinal } => Ok(ids
                .iter()
                .enumerate()
                .filter(|(i, _)| *i as u64 % u64::from(*replicas) == u64::from(*ordinal))
                .map(|(_, id)| id.clone())
                .collect()),
        }
    }
}

/// The ordinal at the end of a StatefulSet pod's host name (`twinwatch-2` → 2).
fn ordinal_of_host(host: &str) -> Option<u32> {
    host.trim().rsplit_once('-')?.1.parse().ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPosition {
    Earliest,
    Latest,
}

/// The validated Event Hub settings. `Debug` redacts the connection string and the custom
/// endpoint's user-info and query.
#[derive(Clone)]
pub struct EventHubConfig {
    pub connection_string: Secret,
    /// `EntityPath` of the connection string.
    pub entity: String,
    /// The namespace host (for logs: no secret in it).
    pub host: String,
    pub consumer_group: String,
    pub partitions: Partitions,
    pub start_position: StartPosition,
    pub custom_endpoint: Option<String>,
    pub owner_level: Option<i64>,
}

/// The validated alert sinks. `Debug` (what the startup log prints) shows the URLs without
/// user-info or query ([`redact_url`]) and never the token.
#[derive(Clone, Default)]
pub struct AlertsConfig {
    pub file: Option<PathBuf>,
    pub stdout: bool,
    pub webhook_url: Option<String>,
    pub webhook_token: Option<Secret>,
    pub alertmanager_url: Option<String>,
    pub alertmanager_repost: Duration,
    pub sink_timeout: Duration,
    /// One alert a webhook request (CloudEvents structured mode) instead of batches.
    pub webhook_structured: bool,
    pub webhook_batch_max_alerts: usize,
    pub webhook_batch_max_bytes: usize,
    pub webhook_in_flight: usize,
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("file", &self.file)
            .field("stdout", &self.stdout)
            .field(
                "webhook_url",
                &self.webhook_url.as_deref().map(redacted_url),
            )
            .field("webhook_token", &self.webhook_token)
            .field(
                "alertmanager_url",
                &self.alertmanager_url.as_deref().map(redacted_url),
            )
            .field("alertmanager_repost", &self.alertmanager_repost)
            .field("sink_timeout", &self.sink_timeout)
            .field("webhook_structured", &self.webhook_structured)
            .field("webhook_batch_max_alerts", &self.webhook_batch_max_alerts)
            .field("webhook_batch_max_bytes", &self.webhook_batch_max_bytes)
            .field("webhook_in_flight", &self.webhook_in_flight)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `url` without user-info (`user:password@`), query or fragment, which may hold secrets:
/// the form that names a sink in errors and logs.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

/// `url` with any user-info (`user:password@`) and query or fragment (`?token=...`) replaced
/// by `<redacted>`: the form of a URL in logs, errors and `Debug` output. Scheme, host, port
/// and path stay, so the operator can still tell which endpoint is meant.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (rest, had_query) = match rest.find(['?', '#']) {
        Some(i) => (&rest[..i], true),
        None => (rest, false),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}"),
        None => authority.to_owned(),
    };
    let query = if had_query { "?<redacted>" } else { "" };
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}{query}"),
        None => format!("{host}{path}{query}"),
    }
}

/// How an optional secret shows in `Debug`: whether it is set, never its value.
fn redacted(value: &Option<String>) -> &'static str {
    if value.is_some() {
        "Some(<redacted>)"
    } else {
        "None"
    }
}

/// How an optional URL shows in `Debug`: [`redact_url`].
fn redacted_url_opt(value: &Option<String>) -> Option<String> {
    value.as_deref().map(redact_url)
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

impl fmt::Debug for EventHubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventHubConfig")
            .field("connection_string", &self.connection_string)
            .field("entity", &self.entity)
            .field("host", &self.host)
            .field("consumer_group", &self.consumer_group)
            .field("partitions", &self.partitions)
            .field("start_position", &self.start_position)
            .field("custom_endpoint", &redacted_url_opt(&self.custom_endpoint))
            .field("owner_level", &self.owner_level)
            .finish()
    }
}

/// The validated `[seed]` settings. `Debug` never shows the key (see
/// [`crate::iothub::ConnectionString`]) nor the endpoint's user-info or query.
#[derive(Clone)]
pub struct SeedConfig {
    pub connection: crate::iothub::ConnectionString,
    pub on_empty: bool,
    /// `None`: reconciling is off.
    pub reconcile_every: Option<Duration>,
    pub grace: Duration,
    pub page_size: u32,
    pub endpoint: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// See [`RawSeed::as_of`].
    pub as_of: Option<crate::time::Ticks>,
}

impl SeedConfig {
    /// The hub's name: the first label of the connection string's `HostName`.
    pub fn hub(&self) -> &str {
        self.connection.hub_name()
    }
}

impl fmt::Debug for SeedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedConfig")
            .field("hub", &self.connection.host_name())
            .field("on_empty", &self.on_empty)
            .field("reconcile_every", &self.reconcile_every)
            .field("grace", &self.grace)
            .field("page_size", &self.page_size)
            .field("endpoint", &redacted_url_opt(&self.endpoint))
            .field("ca_file", &self.ca_file)
            .field("as_of", &self.as_of.map(|t| t.to_string()))
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

/// The `[seed]` table validated: `None` without an IoT Hub connection string (then no other
/// seed setting may be given).
fn validate_seed(raw: RawSeed, problems: &mut Vec<String>) -> Option<SeedConfig> {
    let Some(text) = raw.connection_string.filter(|s| !s.trim().is_empty()) else {
        let given = [
            ("on_empty", raw.on_empty.is_some()),
            ("reconcile_every_hours", raw.reconcile_every_hours.is_some()),
            ("grace_secs", raw.grace_secs.is_some()),
            ("page_size", raw.page_size.is_some()),
            ("endpoint", raw.endpoint.is_some()),
            ("ca_file", raw.ca_file.is_some()),
            ("as_of", raw.as_of.is_some()),
        ];
        let given: Vec<&str> = given.iter().filter(|g| g.1).map(|g| g.0).collect();
        if !given.is_empty() {
            problems.push(format!(
                "seed.{}: seeding needs seed.connection_string (or TWINWATCH_IOTHUB_CONNECTION_STRING)",
                given.join(", seed.")
            ));
        }
        return None;
    };
    // The parser's errors never quote the string.
    let connection = match crate::iothub::ConnectionString::parse(&text) {
        Ok(connection) => connection,
        Err(e) => {
            problems.push(format!("seed.connection_string: {e}"));
            return None;
        }
    };
    let hours = raw.reconcile_every_hours.unwrap_or(24.0);
    let reconcile_every = if !(0.0..=8760.0).contains(&hours) || hours.is_nan() {
        problems.push(format!(
            "seed.reconcile_every_hours must be between 0 (off) and 8760, not {hours}"
        ));
        None
    } else if hours == 0.0 {
        None
    } else {
        // At least a second: a shorter interval is a typo, not a schedule.
        Some(Duration::from_secs_f64(hours * 3600.0).max(Duration::from_secs(1)))
    };
    let grace_secs = raw.grace_secs.unwrap_or(3600);
    if grace_secs > 30 * 86_400 {
        problems.push(format!(
            "seed.grace_secs must be at most 2592000 (30 days), not {grace_secs}"
        ));
    }
    let page_size = raw.page_size.unwrap_or(1000);
    if !(1..=10_000).contains(&page_size) {
        problems.push(format!(
            "seed.page_size must be between 1 and 10000, not {page_size}"
        ));
    }
    if let Some(endpoint) = &raw.endpoint {
        let shown = redact_url(endpoint);
        match endpoint.split_once("://") {
            Some(("https", _)) => {}
            Some(("http", rest)) if is_loopback_authority(rest) => {}
            Some(("http", _)) => problems.push(format!(
                "seed.endpoint {shown}: plain http only to a loopback address (the signature would cross the network in the clear)"
            )),
            _ => problems.push(format!(
                "seed.endpoint {shown}: an https:// (or loopback http://) URL"
            )),
        }
    }
    if let Some(path) = &raw.ca_file {
        if !path.is_file() {
            problems.push(format!("seed.ca_file: {} is not a file", path.display()));
        }
    }
    let as_of = match raw.as_of.as_deref() {
        None => None,
        Some(text) => {
            let parsed = crate::time::Ticks::parse_strict(text);
            if parsed.is_none() {
                problems.push(format!(
                    "seed.as_of: {text:?} is not a time like 2026-12-01T00:00:00Z"
                ));
            }
            parsed
        }
    };
    Some(SeedConfig {
        connection,
        on_empty: raw.on_empty.unwrap_or(true),
        reconcile_every,
        grace: Duration::from_secs(grace_secs),
        page_size,
        endpoint: raw.endpoint,
        ca_file: raw.ca_file,
        as_of,
    })
}

/// The configuration the service runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub policies: Vec<PathBuf>,
    pub eventhub: EventHubConfig,
    pub alerts: AlertsConfig,
    pub batch_messages: usize,
    pub batch_interval: Duration,
    pub cache_bytes: usize,
    pub max_body_bytes: usize,
    pub shutdown_deadline: Duration,
    pub api_token: Option<Secret>,
    pub min_free_bytes: u64,
    /// See [`RawConfig::allowed_event_delay_secs`].
    pub allowed_event_delay: Duration,
    /// Seed passes from the hub's twin query; `None` without an IoT Hub connection string.
    pub seed: Option<SeedConfig>,
}

impl Config {
    /// Whether the query API (`/v1/*`) is served: with a token, or on a loopback address
    /// only. Without a token on any other address, the fleet's security state would be
    /// readable by anyone who reaches the port, so only /metrics, /healthz and /readyz are.
    pub fn serves_api(&self) -> bool {
        self.api_token.is_some() || self.listen.ip().is_loopback()
    }
}

impl RawConfig {
    /// Reads a configuration file.
    pub fn from_file(path: &std::path::Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            error: e.to_string(),
        })
    }

    /// Fills what the file leaves out from the environment (`TWINWATCH_DATA_DIR`,
    /// `TWINWATCH_EVENTHUB_CONNECTION_STRING`, `TWINWATCH_IOTHUB_CONNECTION_STRING`,
    /// `TWINWATCH_WEBHOOK_TOKEN`,
    /// `TWINWATCH_API_TOKEN`, and for `partitions = "ordinal"` `TWINWATCH_REPLICA_ORDINAL` or
    /// the ordinal in `HOSTNAME`).
    pub fn with_environment(mut self, env: impl Fn(&str) -> Option<String>) -> RawConfig {
        if self.data_dir.is_none() {
            self.data_dir = env("TWINWATCH_DATA_DIR").map(PathBuf::from);
        }
        if self.eventhub.connection_string.is_none() {
            self.eventhub.connection_string = env("TWINWATCH_EVENTHUB_CONNECTION_STRING");
        }
        if self.alerts.webhook_token.is_none() {
            self.alerts.webhook_token = env("TWINWATCH_WEBHOOK_TOKEN");
        }
        if self.seed.connection_string.is_none() {
            self.seed.connection_string = env("TWINWATCH_IOTHUB_CONNECTION_STRING");
        }
        if self.api_token.is_none() && self.api_token_file.is_none() {
            self.api_token = env("TWINWATCH_API_TOKEN");
        }
        if self.eventhub.ordinal.is_none() {
            self.eventhub.ordinal = env("TWINWATCH_REPLICA_ORDINAL")
                .and_then(|v| v.trim().parse().ok())
                .or_else(|| env("HOSTNAME").as_deref().and_then(ordinal_of_host));
        }
        self
    }

    /// Checks every field; every problem is reported at once.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let data_dir = self.data_dir.unwrap_or_else(|| {
            problems.push("data_dir is required (--data-dir or TWINWATCH_DATA_DIR)".to_owned());
            PathBuf::new()
        });
        let listen = self.listen.as_deref().unwrap_or("127.0.0.1:9464");
        let listen: SocketAddr = listen.parse().unwrap_or_else(|_| {
            problems.push(format!(
                "listen: {listen:?} is not an address such as 127.0.0.1:9464"
            ));
            SocketAddr::from(([127, 0, 0, 1], 9464))
        });
        let eventhub = validate_eventhub(self.eventhub, &mut problems);
        let alerts = validate_alerts(self.alerts, &mut problems);
        let seed = validate_seed(self.seed, &mut problems);
        let positive =
            |name: &str, value: Option<u64>, default: u64, max: u64, problems: &mut Vec<String>| {
                let v = value.unwrap_or(default);
                if v == 0 || v > max {
                    problems.push(format!("{name} must be between 1 and {max}, not {v}"));
                    default
                } else {
                    v
                }
            };
        let batch_messages = positive(
            "batching.max_messages",
            self.batching.max_messages,
            8192,
            1_000_000,
            &mut problems,
        );
        let batch_delay = positive(
            "batching.max_delay_ms",
            self.batching.max_delay_ms,
            50,
            60_000,
            &mut problems,
        );
        let cache_mib = self.batching.cache_mib.unwrap_or(256);
        let max_body = positive(
            "batching.max_body_bytes",
            self.batching.max_body_bytes,
            262_144,
            1 << 30,
            &mut problems,
        );
        let deadline = positive(
            "shutdown_deadline_secs",
            self.shutdown_deadline_secs,
            30,
            3600,
            &mut problems,
        );
        let api_token = match (self.api_token, &self.api_token_file) {
            (Some(_), Some(_)) => {
                problems.push("api_token and api_token_file: give one, not both".into());
                None
            }
            (Some(token), None) => Some(token),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) => Some(text.trim().to_owned()),
                Err(e) => {
                    problems.push(format!("api_token_file: {}: {e}", path.display()));
                    None
                }
            },
            (None, None) => None,
        };
        if api_token.as_ref().is_some_and(|t| t.trim().is_empty()) {
            problems.push("the API token is empty".into());
        }
        let allowed_event_delay = self.allowed_event_delay_secs.unwrap_or(60);
        if allowed_event_delay > 86_400 {
            problems.push(format!(
                "allowed_event_delay_secs must be at most 86400, not {allowed_event_delay}"
            ));
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems.join("\n")));
        }
        Ok(Config {
            data_dir,
            listen,
            policies: self.policies,
            eventhub: eventhub.expect("problems were reported above"),
            alerts,
            batch_messages: batch_messages as usize,
            batch_interval: Duration::from_millis(batch_delay),
            cache_bytes: (cache_mib as usize) << 20,
            max_body_bytes: max_body as usize,
            shutdown_deadline: Duration::from_secs(deadline),
            api_token: api_token.map(Secret::new),
            min_free_bytes: self.min_free_disk_mib.unwrap_or(256) << 20,
            allowed_event_delay: Duration::from_secs(allowed_event_delay),
            seed,
        })
    }
}

/// The parts of an Event Hubs connection string the service needs.
#[derive(Debug, PartialEq, Eq)]
struct ConnectionParts {
    host: String,
    port: Option<u16>,
    entity: Option<String>,
    development_emulator: bool,
    has_key: bool,
}

/// Parses `Key=Value;...` (keys case-insensitive); the error never quotes the string.
fn parse_connection_string(text: &str) -> Result<ConnectionParts, String> {
    let mut endpoint = None;
    let mut entity = None;
    let mut emulator = false;
    let mut has_key = false;
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err("a part of the connection string is not Key=Value".into());
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(value.trim().to_owned()),
            "entitypath" => entity = Some(value.trim().to_owned()),
            "usedevelopmentemulator" => emulator = value.trim().eq_ignore_ascii_case("true"),
            "sharedaccesskey" | "sharedaccesssignature" => has_key = !value.trim().is_empty(),
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or("the connection string has no Endpoint")?;
    let rest = endpoint
        .strip_prefix("sb://")
        .ok_or("the connection string's Endpoint must start with sb://")?;
    let authority = rest.trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            Some(
                p.parse::<u16>()
                    .map_err(|_| "the Endpoint's port is not a number")?,
            ),
        ),
        None => (authority.to_owned(), None),
    };
    if host.is_empty() {
        return Err("the connection string's Endpoint has no host".into());
    }
    Ok(ConnectionParts {
        host,
        port,
        entity: entity.filter(|e| !e.is_empty()),
        development_emulator: emulator,
        has_key,
    })
}

fn validate_eventhub(raw: RawEventHub, problems: &mut Vec<String>) -> Option<EventHubConfig> {
    let Some(connection_string) = raw.connection_string.filter(|s| !s.trim().is_empty()) else {
        problems.push(
            "eventhub.connection_string is required (or TWINWATCH_EVENTHUB_CONNECTION_STRING)"
                .into(),
        );
        return None;
    };
    let parts = match parse_connection_string(&connection_string) {
        Ok(parts) => parts,
        Err(e) => {
            problems.push(format!("eventhub.connection_string: {e}"));
            return None;
        }
    };
    if !parts.has_key {
        problems
            .push("eventhub.connection_string: no SharedAccessKey or SharedAccessSignature".into());
    }
    let Some(entity) = parts.entity.clone() else {
        problems.push(
            "eventhub.connection_string: no EntityPath (the Event Hub-compatible name)".into(),
        );
        return None;
    };
    let partitions = match raw.partitions {
        None => Partitions::All,
        Some(toml::Value::String(s)) if s == "all" => Partitions::All,
        Some(toml::Value::String(s)) if s == "ordinal" => match (raw.replicas, raw.ordinal) {
            (Some(replicas), Some(ordinal)) if ordinal < replicas => {
                Partitions::Ordinal { replicas, ordinal }
            }
            (Some(replicas @ 1..), Some(ordinal)) => {
                problems.push(format!(
                    "eventhub.partitions = \"ordinal\": ordinal {ordinal} is not below replicas = {replicas}"
                ));
                Partitions::All
            }
            (None | Some(0), _) => {
                problems.push(
                    "eventhub.partitions = \"ordinal\" needs eventhub.replicas (at least 1)".into(),
                );
                Partitions::All
            }
            (Some(_), None) => {
                problems.push(
                    "eventhub.partitions = \"ordinal\": no ordinal (eventhub.ordinal, TWINWATCH_REPLICA_ORDINAL, or a host name ending in -N)"
                        .into(),
                );
                Partitions::All
            }
        },
        Some(toml::Value::Array(items)) => {
            let ids: Vec<String> = items
                .iter()
                .filter_map(|v| match v {
                    toml::Value::String(s) => Some(s.clone()),
                    toml::Value::Integer(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect();
            if ids.len() != items.len() || ids.is_empty() {
                problems.push(
                    "eventhub.partitions: a non-empty list of partition ids, or \"all\"".into(),
                );
            }
            // Two receivers on one partition would race for its checkpoint (and, with an
            // owner level, displace each other for ever).
            let mut seen = std::collections::BTreeSet::new();
            let duplicates: std::collections::BTreeSet<&String> =
                ids.iter().filter(|id| !seen.insert(*id)).collect();
            if !duplicates.is_empty() {
                problems.push(format!(
                    "eventhub.partitions: {} listed more than once",
                    duplicates
                        .iter()
                        .map(|id| format!("{id:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Partitions::List(ids)
        }
        Some(_) => {
            problems.push(
                "eventhub.partitions: a list of partition ids, \"all\" or \"ordinal\"".into(),
            );
            Partitions::All
        }
    };
    let start_position = match raw.start_position.as_deref() {
        None | Some("earliest") => StartPosition::Earliest,
        Some("latest") => StartPosition::Latest,
        Some(other) => {
            problems.push(format!(
                "eventhub.start_position: earliest or latest, not {other:?}"
            ));
            StartPosition::Earliest
        }
    };
    let custom_endpoint = match raw.custom_endpoint {
        Some(url) => {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                problems.push("eventhub.custom_endpoint: an amqp:// or amqps:// URL".into());
            }
            Some(url)
        }
        // The official clients ignore UseDevelopmentEmulator and drop the port: the
        // application has to say where to connect (DESIGN.md, known traps).
        None if parts.development_emulator => Some(format!(
            "amqp://{}:{}",
            parts.host,
            parts.port.unwrap_or(5672)
        )),
        None => None,
    };
    Some(EventHubConfig {
        connection_string: Secret::new(connection_string),
        entity,
        host: parts.host,
        consumer_group: raw.consumer_group.unwrap_or_else(|| "$Default".into()),
        partitions,
        start_position,
        custom_endpoint,
        owner_level: raw.owner_level,
    })
}

/// The validated sinks of `raw` (the `[alerts]` table, or a command's sink flags), or what
/// is wrong with them, one problem a line.
pub fn alerts_config(raw: RawAlerts) -> Result<AlertsConfig, String> {
    let mut problems = Vec::new();
    let config = validate_alerts(raw, &mut problems);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems.join("\n"))
    }
}

/// Why a sink URL cannot be used; `None` when it can. `https://` and `http://` are accepted;
/// a bearer token (`with_token`) only over https or to a loopback address, so that it never
/// crosses a network in the clear.
pub fn sink_url_problem(url: &str, with_token: bool) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("must be an http:// or https:// URL".into());
    };
    match scheme.to_ascii_lowercase().as_str() {
        "https" => None,
        "http" if with_token && !is_loopback_authority(rest) => Some(
            "a bearer token is only sent over https, or over http to a loopback address \
             (127.0.0.0/8, ::1, localhost)"
                .into(),
        ),
        "http" => None,
        _ => Some("must be an http:// or https:// URL".into()),
    }
}

/// Whether the host of `rest` (a URL after `scheme://`) is a loopback address.
fn is_loopback_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Why a re-post interval could let Alertmanager resolve open alerts by itself; `None` when
/// it cannot. Alertmanager ends an alert `resolve_timeout` after it was last posted: the
/// interval must leave room for a re-post in chunks and for retries, so at most half of it.
pub fn repost_problem(repost: Duration, resolve_timeout: Duration) -> Option<String> {
    (repost * 2 > resolve_timeout).then(|| {
        format!(
            "a re-post every {} s could outlive Alertmanager's resolve_timeout of {} s (open \
             alerts would resolve by themselves); use at most {} s, or give the real \
             resolve_timeout as alertmanager_resolve_timeout_secs",
            repost.as_secs(),
            resolve_timeout.as_secs(),
            resolve_timeout.as_secs() / 2
        )
    })
}

fn validate_alerts(raw: RawAlerts, problems: &mut Vec<String>) -> AlertsConfig {
    let with_token = raw.webhook_token.is_some();
    for (name, url, token) in [
        ("webhook_url", &raw.webhook_url, with_token),
        ("alertmanager_url", &raw.alertmanager_url, false),
    ] {
        if let Some(problem) = url.as_deref().and_then(|url| sink_url_problem(url, token)) {
            problems.push(format!("alerts.{name}: {problem}"));
        }
    }
    let webhook_structured = match raw.webhook_mode.as_deref() {
        None | Some("batched") => false,
        Some("structured") => true,
        Some(other) => {
            problems.push(format!(
                "alerts.webhook_mode: `batched` or `structured`, not {other:?}"
            ));
            false
        }
    };
    let alertmanager_repost =
        Duration::from_secs(raw.alertmanager_repost_secs.unwrap_or(60).max(1));
    let resolve_timeout = Duration::from_secs(raw.alertmanager_resolve_timeout_secs.unwrap_or(300));
    if raw.alertmanager_url.is_some() {
        if let Some(problem) = repost_problem(alertmanager_repost, resolve_timeout) {
            problems.push(format!("alerts.alertmanager_repost_secs: {problem}"));
        }
    }
    let positive =
        |name: &str, value: Option<u64>, default: u64, problems: &mut Vec<String>| match value {
            Some(0) => {
                problems.push(format!("alerts.{name}: at least 1"));
                default as usize
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => default as usize,
        };
    let webhook_batch_max_alerts = positive(
        "webhook_batch_max_alerts",
        raw.webhook_batch_max_alerts,
        500,
        problems,
    );
    let webhook_batch_max_bytes = positive(
        "webhook_batch_max_bytes",
        raw.webhook_batch_max_bytes,
        1 << 20,
        problems,
    );
    let webhook_in_flight = positive("webhook_in_flight", raw.webhook_in_flight, 4, problems);
    if webhook_in_flight > 64 {
        problems.push("alerts.webhook_in_flight: at most 64".into());
    }
    if let Some(path) = &raw.ca_file {
        if !path.is_file() {
            problems.push(format!("alerts.ca_file: {} is not a file", path.display()));
        }
    }
    AlertsConfig {
        file: raw.file,
        stdout: raw.stdout,
        webhook_url: raw.webhook_url,
        webhook_token: raw.webhook_token.map(Secret::new),
        alertmanager_url: raw
            .alertmanager_url
            .map(|u| u.trim_end_matches('/').to_owned()),
        alertmanager_repost,
        sink_timeout: Duration::from_secs(raw.sink_timeout_secs.unwrap_or(10).max(1)),
        webhook_structured,
        webhook_batch_max_alerts,
        webhook_batch_max_bytes,
        webhook_in_flight,
        ca_file: raw.ca_file,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMULATOR: &str = "Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;EntityPath=hub";

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_emulator_string_implies_a_plain_amqp_endpoint() {
        let config = RawConfig::default()
            .with_environment(env(&[
                ("TWINWATCH_DATA_DIR", "/tmp/d"),
                ("TWINWATCH_EVENTHUB_CONNECTION_STRING", EMULATOR),
            ]))
            .validate()
            .expect("valid");
        assert_eq!(
            config.eventhub.custom_endpoint.as_deref(),
            Some("amqp://127.0.0.1:5673")
        );
        assert_eq!(config.eventhub.entity, "hub");
        assert_eq!(config.eventhub.partitions, Partitions::All);
        assert_eq!(config.eventhub.start_position, StartPosition::Earliest);
        assert!(
            !format!("{config:?}").contains("SAS_KEY_VALUE"),
            "the key leaked into Debug"
        );
    }

    #[test]
    fn every_problem_is_reported_without_the_secret() {
        let raw: RawConfig = toml::from_str(
            r#"
listen = "nowhere"
[eventhub]
connection_string = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=TOPSECRET"
start_position = "middle"
[batching]
max_messages = 0
"#,
        )
        .expect("parses");
        let error = raw.validate().expect_err("invalid").to_string();
        for expected in ["data_dir", "listen", "EntityPath", "max_messages"] {
            assert!(error.contains(expected), "{expected} missing from: {error}");
        }
        assert!(!error.contains("TOPSECRET"));
    }

    /// https is accepted; a bearer token over plain http only to loopback; a re-post
    /// interval that could outlive Alertmanager's resolve timeout is refused; the webhook's
    /// mode is one of two.
    #[test]
    fn sink_settings_are_checked() {
        let alerts = |text: &str| alerts_config(toml::from_str::<RawAlerts>(text).expect("parses"));
        let ok = alerts(
            "webhook_url = \"https://hooks.example.com/x\"\nwebhook_token = \"t\"\n\
             alertmanager_url = \"https://am.example.com/\"\nwebhook_mode = \"structured\"\n",
        )
        .expect("valid");
        assert!(ok.webhook_structured);
        assert_eq!(
            ok.alertmanager_url.as_deref(),
            Some("https://am.example.com")
        );
        assert_eq!(
            (ok.webhook_batch_max_alerts, ok.webhook_in_flight),
            (500, 4)
        );
        // What the service logs at start: no credentials of a URL.
        let with_secrets = alerts(
            "webhook_url = \"https://user:PASSWORD@hooks.example.com/x?key=KEY\"\nwebhook_token = \"TOKEN\"\n",
        )
        .expect("valid");
        let shown = format!("{with_secrets:?}");
        for secret in ["PASSWORD", "KEY", "TOKEN"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("https://hooks.example.com/x"), "{shown}");
        alerts("webhook_url = \"http://127.0.0.1:8080/x\"\nwebhook_token = \"t\"\n")
            .expect("a token to loopback");
        let error =
            alerts("webhook_url = \"http://hooks.example.com/x\"\nwebhook_token = \"SECRET\"\n")
                .expect_err("a token in the clear");
        assert!(
            error.contains("webhook_url") && error.contains("https"),
            "{error}"
        );
        assert!(!error.contains("SECRET"));
        let error =
            alerts("alertmanager_url = \"http://am:9093\"\nalertmanager_repost_secs = 200\n")
                .expect_err("longer than half the default resolve_timeout");
        assert!(error.contains("resolve_timeout"), "{error}");
        alerts(
            "alertmanager_url = \"http://am:9093\"\nalertmanager_repost_secs = 200\n\
             alertmanager_resolve_timeout_secs = 600\n",
        )
        .expect("within half of the given resolve_timeout");
        let error = alerts(
            "webhook_url = \"ftp://x/\"\nwebhook_mode = \"chunked\"\nwebhook_in_flight = 0\n",
        )
        .expect_err("invalid");
        for expected in ["webhook_url", "webhook_mode", "webhook_in_flight"] {
            assert!(error.contains(expected), "{expected} missing from: {error}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = toml::from_str::<RawConfig>("[eventhub]\nconection_string = \"x\"\n")
            .expect_err("unknown field")
            .to_string();
        assert!(error.contains("conection_string"), "{error}");
    }

    #[test]
    fn partitions_take_a_list() {
        let raw: RawConfig = toml::from_str(&format!(
            "data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\npartitions = [\"0\", 2]\n"
        ))
        .expect("parses");
        let config = raw.validate().expect("valid");
        assert_eq!(
            config.eventhub.partitions,
            Partitions::List(vec!["0".into(), "2".into()])
        );
    }

    /// Issue 23: two receivers on one partition were accepted.
    #[test]
    fn duplicate_partitions_are_refused() {
        let raw: RawConfig = toml::from_str(&format!(
            "data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\npartitions = [\"0\", 1, \"1\", \"0\", \"2\"]\n"
        ))
        .expect("parses");
        let error = raw.validate().expect_err("duplicates").to_string();
        assert!(
            error.contains("\"0\", \"1\" listed more than once"),
            "{error}"
        );
    }

    #[test]
    fn urls_lose_their_user_info_and_query() {
        for (url, expected) in [
            (
                "http://user:pa55@alerts.example:8080/hook?token=t0k#frag",
                "http://<redacted>@alerts.example:8080/hook?<redacted>",
            ),
            ("http://host:9093", "http://host:9093"),
            ("http://host/p?x", "http://host/p?<redacted>"),
            (
                "amqp://sas:key@127.0.0.1:5672",
                "amqp://<redacted>@127.0.0.1:5672",
            ),
            ("host/p", "host/p"),
            ("http://a@b@host/", "http://<redacted>@host/"),
        ] {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }

    /// Issue 23: `RawConfig` derived `Debug` with the connection string and tokens in clear,
    /// and the startup log printed sink URLs whole.
    #[test]
    fn debug_output_never_shows_a_secret() {
        let file = format!(
            r#"
data_dir = "/d"
api_token = "API-SECRET-1"
[eventhub]
connection_string = "{EMULATOR};SharedAccessSignature=SIG-SECRET-2"
custom_endpoint = "amqp://cuser:CUSTOM-SECRET-3@127.0.0.1:5672/?k=QUERY-SECRET-4"
[alerts]
webhook_url = "http://wuser:WEBHOOK-PASS-5@127.0.0.1:1/hook?token=WEBHOOK-QUERY-6"
webhook_token = "WEBHOOK-TOKEN-7"
alertmanager_url = "http://auser:AM-PASS-8@127.0.0.1:9093/?t=AM-QUERY-9"
"#
        );
        let raw: RawConfig = toml::from_str(&file).expect("parses");
        let raw_debug = format!("{raw:?}");
        let config = raw.validate().expect("valid");
        let config_debug = format!("{config:?}");
        for secret in [
            "SAS_KEY_VALUE",
            "API-SECRET-1",
            "SIG-SECRET-2",
            "CUSTOM-SECRET-3",
            "QUERY-SECRET-4",
            "WEBHOOK-PASS-5",
            "WEBHOOK-QUERY-6",
            "WEBHOOK-TOKEN-7",
            "AM-PASS-8",
            "AM-QUERY-9",
        ] {
            assert!(!raw_debug.contains(secret), "{secret} in {raw_debug}");
            assert!(!config_debug.contains(secret), "{secret} in {config_debug}");
        }
        // What is not secret still shows, so the log says which endpoints are meant.
        assert!(config_debug.contains("127.0.0.1:9093"), "{config_debug}");
        assert!(
            raw_debug.contains("api_token: Some(<redacted>)"),
            "{raw_debug}"
        );
    }

    #[test]
    fn the_api_is_served_on_loopback_or_with_a_token() {
        let base = format!("data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\n");
        let serves = |listen: &str, token: Option<&str>| {
            let raw: RawConfig =
                toml::from_str(&format!("listen = \"{listen}\"\n{base}")).expect("parses");
            let vars: Vec<(&str, &str)> = token
                .map(|t| vec![("TWINWATCH_API_TOKEN", t)])
                .unwrap_or_default();
            raw.with_environment(env(&vars))
                .validate()
                .expect("valid")
                .serves_api()
        };
        assert!(serves("127.0.0.1:9464", None));
        assert!(serves("[::1]:9464", None));
        assert!(!serves("0.0.0.0:9464", None));
        assert!(!serves("[::]:9464", None));
        assert!(!serves("10.1.2.3:9464", None));
        assert!(serves("0.0.0.0:9464", Some("t")));
    }

    /// A StatefulSet replica owns every `replicas`-th partition from its ordinal, which comes
    /// from `TWINWATCH_REPLICA_ORDINAL` or else from the pod's host name.
    #[test]
    fn partitions_by_ordinal_split_the_hub_between_replicas() {
        let file = format!(
            "data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\npartitions = \"ordinal\"\nreplicas = 3\n"
        );
        let hub: Vec<String> = (0..8).map(|i| i.to_string()).collect();
        let owned = |vars: &[(&str, &str)]| {
            let raw: RawConfig = toml::from_str(&file).expect("parses");
            let config = raw.with_environment(env(vars)).validate().expect("valid");
            config.eventhub.partitions.select(&hub).expect("select")
        };
        assert_eq!(owned(&[("HOSTNAME", "twinwatch-0")]), ["0", "3", "6"]);
        assert_eq!(owned(&[("HOSTNAME", "twinwatch-2")]), ["2", "5"]);
        assert_eq!(
            owned(&[
                ("TWINWATCH_REPLICA_ORDINAL", "1"),
                ("HOSTNAME", "twinwatch-2")
            ]),
            ["1", "4", "7"]
        );
        let mut all: Vec<String> = (0..3)
            .flat_map(|k| owned(&[("TWINWATCH_REPLICA_ORDINAL", &k.to_string())]))
            .collect();
        all.sort_by_key(|id| id.parse::<u32>().unwrap_or(u32::MAX));
        assert_eq!(all, hub, "every partition owned exactly once");
        for (vars, expected) in [
            (&[("HOSTNAME", "laptop")][..], "no ordinal"),
            (
                &[("TWINWATCH_REPLICA_ORDINAL", "3")][..],
                "not below replicas",
            ),
        ] {
            let raw: RawConfig = toml::from_str(&file).expect("parses");
            let error = raw
                .with_environment(env(vars))
                .validate()
                .expect_err("invalid")
                .to_string();
            assert!(error.contains(expected), "{expected} missing from: {error}");
        }
    }

    #[test]
    fn the_api_token_comes_from_the_environment_or_a_file() {
        let base = format!("data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\n");
        let raw: RawConfig = toml::from_str(&base).expect("parses");
        let config = raw
            .with_environment(env(&[("TWINWATCH_API_TOKEN", "t0ken")]))
            .validate()
            .expect("valid");
        assert_eq!(config.api_token.as_ref().map(Secret::expose), Some("t0ken"));
        assert!(!format!("{config:?}").contains("t0ken"), "the token leaked");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").expect("write");
        let raw: RawConfig = toml::from_str(&format!(
            "api_token_file = {:?}\n{base}",
            path.display().to_string()
        ))
        .expect("parses");
        let config = raw
            .with_environment(env(&[("TWINWATCH_API_TOKEN", "ignored")]))
            .validate()
            .expect("valid");
        assert_eq!(
            config.api_token.as_ref().map(Secret::expose),
            Some("from-file")
        );
    }

    /// The configuration files the repository ships (the example and the Kubernetes
    /// ConfigMap's) are valid as they are, with the secrets from the environment.
    #[test]
    fn the_shipped_configurations_are_valid() {
        let configmap: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(include_str!("../deploy/kubernetes/configmap.yaml"))
                .expect("configmap.yaml");
        let in_configmap = configmap["data"]["twinwatch.toml"]
            .as_str()
            .expect("the ConfigMap has twinwatch.toml");
        for (name, text) in [
            (
                "deploy/twinwatch.toml",
                include_str!("../deploy/twinwatch.toml"),
            ),
            ("the ConfigMap's twinwatch.toml", in_configmap),
        ] {
            let raw: RawConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let config = raw
                .with_environment(env(&[
                    ("TWINWATCH_EVENTHUB_CONNECTION_STRING", EMULATOR),
                    ("HOSTNAME", "twinwatch-1"),
                ]))
                .validate()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.data_dir, std::path::Path::new("/data"), "{name}");
        }
    }

    const IOTHUB: &str = "HostName=contoso-hub.azure-devices.net;SharedAccessKeyName=registryRead;SharedAccessKey=SU9USFVCLUtFWS1TRUNSRVQ=";

    /// `[seed]`: on with an IoT Hub connection string (from the environment or the file),
    /// with its defaults; off without one, and then its other settings are refused; bad
    /// values reported together; the key never shown.
    #[test]
    fn the_seed_section_is_validated() {
        let base = format!("data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\n");
        let parse = |extra: &str, vars: &[(&str, &str)]| {
            let raw: RawConfig = toml::from_str(&format!("{base}{extra}")).expect("parses");
            raw.with_environment(env(vars)).validate()
        };
        assert!(parse("", &[]).expect("valid").seed.is_none());
        let seed = parse("", &[("TWINWATCH_IOTHUB_CONNECTION_STRING", IOTHUB)])
            .expect("valid")
            .seed
            .expect("seeding on");
        assert_eq!(seed.hub(), "contoso-hub");
        assert!(seed.on_empty);
        assert_eq!(seed.reconcile_every, Some(Duration::from_secs(86_400)));
        assert_eq!(seed.grace, Duration::from_secs(3600));
        assert_eq!((seed.page_size, seed.as_of), (1000, None));
        assert!(!format!("{seed:?}").contains("SU9USFVCLUtFWS1TRUNSRVQ="));

        let seed = parse(
            &format!(
                "[seed]\nconnection_string = \"{IOTHUB}\"\non_empty = false\nreconcile_every_hours = 0.5\ngrace_secs = 0\npage_size = 50\nendpoint = \"http://127.0.0.1:9000\"\nas_of = \"2026-01-02T00:00:00Z\"\n"
            ),
            &[],
        )
        .expect("valid")
        .seed
        .expect("seeding on");
        assert!(!seed.on_empty);
        assert_eq!(seed.reconcile_every, Some(Duration::from_secs(1800)));
        assert_eq!(seed.grace, Duration::ZERO);
        assert_eq!(seed.page_size, 50);
        assert_eq!(
            seed.as_of.map(|t| t.to_string()).as_deref(),
            Some("2026-01-02T00:00:00.0000000Z")
        );
        let off = parse(
            &format!("[seed]\nconnection_string = \"{IOTHUB}\"\nreconcile_every_hours = 0\n"),
            &[],
        )
        .expect("valid");
        assert_eq!(off.seed.expect("seeding on").reconcile_every, None);

        let error = parse(
            &format!(
                "[seed]\nconnection_string = \"{IOTHUB}\"\nreconcile_every_hours = -1\npage_size = 0\nendpoint = \"http://hub.example.com\"\nas_of = \"yesterday\"\n"
            ),
            &[],
        )
        .expect_err("invalid")
        .to_string();
        for expected in [
            "reconcile_every_hours",
            "page_size",
            "seed.endpoint",
            "seed.as_of",
        ] {
            assert!(error.contains(expected), "{expected} missing from: {error}");
        }
        assert!(!error.contains("SU9USFVCLUtFWS1TRUNSRVQ="), "{error}");
        let error = parse("[seed]\non_empty = true\n", &[])
            .expect_err("no connection string")
            .to_string();
        assert!(
            error.contains("seed.on_empty") && error.contains("TWINWATCH_IOTHUB_CONNECTION_STRING"),
            "{error}"
        );
        let error = parse(
            "[seed]\nconnection_string = \"HostName=h;SharedAccessKey=SECRETKEY\"\n",
            &[],
        )
        .expect_err("no key name")
        .to_string();
        assert!(
            error.contains("seed.connection_string") && !error.contains("SECRETKEY"),
            "{error}"
        );
        let raw: RawConfig =
            toml::from_str(&format!("{base}[seed]\nconnection_string = \"{IOTHUB}\"\n"))
                .expect("parses");
        assert!(!format!("{raw:?}").contains("SU9USFVCLUtFWS1TRUNSRVQ="));
    }
}
