//! The `[seed]` table validated: seed passes of the service from IoT Hub's twin query.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::RawSeed;
use super::redact::{redact_url, redacted_url_opt};
use super::sinks::is_loopback_authority;
use crate::iothub::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

/// Twins that changed within this many seconds before a pass began are never removed by it
/// (`twinwatch seed --grace`, `seed.grace_secs`): the twin query's results may lag.
pub const DEFAULT_SEED_GRACE_SECS: u64 = 3600;
/// The longest grace allowed in the file, seconds (30 days).
pub const MAX_SEED_GRACE_SECS: u64 = 30 * 86_400;
/// The service reconciles this often, hours (`seed.reconcile_every_hours`).
pub const DEFAULT_RECONCILE_EVERY_HOURS: f64 = 24.0;

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

/// The `[seed]` table validated: `None` without an IoT Hub connection string (then no other
/// seed setting may be given).
pub(super) fn validate_seed(raw: RawSeed, problems: &mut Vec<String>) -> Option<SeedConfig> {
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
    let hours = raw
        .reconcile_every_hours
        .unwrap_or(DEFAULT_RECONCILE_EVERY_HOURS);
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
    let grace_secs = raw.grace_secs.unwrap_or(DEFAULT_SEED_GRACE_SECS);
    if grace_secs > MAX_SEED_GRACE_SECS {
        problems.push(format!(
            "seed.grace_secs must be at most {MAX_SEED_GRACE_SECS} (30 days), not {grace_secs}"
        ));
    }
    let page_size = raw.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
        problems.push(format!(
            "seed.page_size must be between 1 and {MAX_PAGE_SIZE}, not {page_size}"
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
