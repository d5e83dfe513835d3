//! The service's configuration: one TOML file (`twinwatch run --config FILE`), environment
//! overrides for secrets and deployment settings, and command-line flags for what people change
//! per run. [`RawConfig`] is the file as written (every field documented, unknown fields
//! refused); [`RawConfig::validate`] turns it into the [`Config`] the rest of the program uses.

mod eventhub;
mod raw;
mod redact;
mod seed;
mod sinks;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use eventhub::{ordinal_of_host, validate_eventhub};
pub use eventhub::{EventHubConfig, Partitions, StartPosition, DEFAULT_CONSUMER_GROUP};
pub use raw::{RawAlerts, RawBatching, RawConfig, RawEventHub, RawSeed};
pub use redact::{redact_url, redacted_url};
use seed::validate_seed;
pub use seed::SeedConfig;
pub use seed::{DEFAULT_RECONCILE_EVERY_HOURS, DEFAULT_SEED_GRACE_SECS, MAX_SEED_GRACE_SECS};
use sinks::validate_alerts;
pub use sinks::{
    alerts_config, repost_problem, sink_url_problem, AlertsConfig, SinkSettingsFrom,
    DEFAULT_ALERTMANAGER_REPOST_SECS, DEFAULT_ALERTMANAGER_RESOLVE_TIMEOUT_SECS,
    DEFAULT_SINK_TIMEOUT_SECS, DEFAULT_WEBHOOK_BATCH_MAX_ALERTS, DEFAULT_WEBHOOK_BATCH_MAX_BYTES,
    DEFAULT_WEBHOOK_IN_FLIGHT, MAX_WEBHOOK_IN_FLIGHT,
};

// The defaults and limits of the settings the file and the flags share. Each is written once,
// here, and used by the flags (`cli`, whose `--help` shows the default), by the file's
// validation, and by the `Default` of the options they end up in (`pipeline::EngineOptions`,
// which is behind the `service` feature while this module is not). The doc comments of
// `RawConfig` and `deploy/twinwatch.toml` name the same numbers for readers.

/// The HTTP listener (/metrics, /healthz, /readyz, /v1/*) when `listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// Messages a batch commits after at most (`--batch-size`, `batching.max_messages`).
pub const DEFAULT_BATCH_MESSAGES: u64 = 8192;
/// The largest batch size allowed, messages.
pub const MAX_BATCH_MESSAGES: u64 = 1_000_000;
/// How old the open batch may get before it commits, milliseconds, for `replay` and `seed`
/// (`--batch-interval-ms`): there nobody waits for an alert, and longer batches write faster.
pub const DEFAULT_BATCH_INTERVAL_MS: u64 = 200;
/// The same for the service (`batching.max_delay_ms`): an alert leaves only once its batch
/// is committed, so a live feed's batches are cut short.
pub const SERVICE_BATCH_INTERVAL_MS: u64 = 50;
/// The longest batch interval allowed, milliseconds.
pub const MAX_BATCH_INTERVAL_MS: u64 = 60_000;
/// Memory for the cache of recently used twins, MiB (`--cache-mib`, `batching.cache_mib`).
pub const DEFAULT_CACHE_MIB: u64 = 256;
/// The largest body size limit allowed (`--max-body-bytes`, `batching.max_body_bytes`); the
/// default is the decoder's, [`crate::decode::DEFAULT_MAX_BODY_BYTES`].
pub const MAX_BODY_BYTES_LIMIT: u64 = 1 << 30;
/// How long a stop may take, seconds (`shutdown_deadline_secs`).
pub const DEFAULT_SHUTDOWN_DEADLINE_SECS: u64 = 30;
/// Consuming pauses below this much free disk, MiB (`min_free_disk_mib`).
pub const DEFAULT_MIN_FREE_DISK_MIB: u64 = 256;
/// How late an event may arrive, seconds (`allowed_event_delay_secs`).
pub const DEFAULT_ALLOWED_EVENT_DELAY_SECS: u64 = 60;

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
        let listen = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: Option<SocketAddr> = listen.parse().ok();
        if listen.is_none() {
            problems.push(format!(
                "listen: {:?} is not an address such as {DEFAULT_LISTEN}",
                self.listen.as_deref().unwrap_or(DEFAULT_LISTEN)
            ));
        }
        let eventhub = validate_eventhub(self.eventhub, &mut problems);
        let alerts = validate_alerts(self.alerts, SinkSettingsFrom::File, &mut problems);
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
            DEFAULT_BATCH_MESSAGES,
            MAX_BATCH_MESSAGES,
            &mut problems,
        );
        let batch_delay = positive(
            "batching.max_delay_ms",
            self.batching.max_delay_ms,
            SERVICE_BATCH_INTERVAL_MS,
            MAX_BATCH_INTERVAL_MS,
            &mut problems,
        );
        let cache_mib = self.batching.cache_mib.unwrap_or(DEFAULT_CACHE_MIB);
        let max_body = positive(
            "batching.max_body_bytes",
            self.batching.max_body_bytes,
            crate::decode::DEFAULT_MAX_BODY_BYTES as u64,
            MAX_BODY_BYTES_LIMIT,
            &mut problems,
        );
        let deadline = positive(
            "shutdown_deadline_secs",
            self.shutdown_deadline_secs,
            DEFAULT_SHUTDOWN_DEADLINE_SECS,
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
        let allowed_event_delay = self
            .allowed_event_delay_secs
            .unwrap_or(DEFAULT_ALLOWED_EVENT_DELAY_SECS);
        if allowed_event_delay > 86_400 {
            problems.push(format!(
                "allowed_event_delay_secs must be at most 86400, not {allowed_event_delay}"
            ));
        }
        let (Some(listen), Some(eventhub), true) = (listen, eventhub, problems.is_empty()) else {
            return Err(ConfigError::Invalid(problems.join("\n")));
        };
        Ok(Config {
            data_dir,
            listen,
            policies: self.policies,
            eventhub,
            alerts,
            batch_messages: batch_messages as usize,
            batch_interval: Duration::from_millis(batch_delay),
            cache_bytes: (cache_mib as usize) << 20,
            max_body_bytes: max_body as usize,
            shutdown_deadline: Duration::from_secs(deadline),
            api_token: api_token.map(Secret::new),
            min_free_bytes: self.min_free_disk_mib.unwrap_or(DEFAULT_MIN_FREE_DISK_MIB) << 20,
            allowed_event_delay: Duration::from_secs(allowed_event_delay),
            seed,
        })
    }
}
