//! The alert sinks' settings validated: the `[alerts]` table and the commands' sink flags
//! alike ([`alerts_config`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::RawAlerts;
use super::redact::redacted_url;
use super::Secret;

/// Alerts per webhook request at most, batched mode (`--webhook-batch-max-alerts`,
/// `alerts.webhook_batch_max_alerts`).
pub const DEFAULT_WEBHOOK_BATCH_MAX_ALERTS: u64 = 500;
/// Bytes per webhook request body at most, batched mode (a larger alert goes alone).
pub const DEFAULT_WEBHOOK_BATCH_MAX_BYTES: u64 = 1 << 20;
/// Webhook requests in flight at once.
pub const DEFAULT_WEBHOOK_IN_FLIGHT: u64 = 4;
/// The most webhook requests in flight allowed (each holds a connection).
pub const MAX_WEBHOOK_IN_FLIGHT: u64 = 64;
/// How often open alerts are re-sent to Alertmanager, seconds.
pub const DEFAULT_ALERTMANAGER_REPOST_SECS: u64 = 60;
/// Alertmanager's own default `resolve_timeout`, seconds: what the re-post interval is checked
/// against unless told otherwise.
pub const DEFAULT_ALERTMANAGER_RESOLVE_TIMEOUT_SECS: u64 = 300;
/// Timeout of one HTTP request to a sink, seconds.
pub const DEFAULT_SINK_TIMEOUT_SECS: u64 = 10;

/// Where sink settings were written: the configuration file's `[alerts]` table or a command's
/// flags. Both are validated by the same code; a problem names what the user wrote
/// (`alerts.webhook_url` or `--webhook-url`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkSettingsFrom {
    File,
    Flags,
}

impl SinkSettingsFrom {
    /// How the setting `key` (a key of `[alerts]`) is written here.
    pub fn name(self, key: &str) -> String {
        match self {
            SinkSettingsFrom::File => format!("alerts.{key}"),
            SinkSettingsFrom::Flags => match key {
                "file" => "--alerts-file".to_owned(),
                "stdout" => "--alerts-stdout".to_owned(),
                "ca_file" => "--sink-ca-file".to_owned(),
                _ => format!("--{}", key.replace('_', "-")),
            },
        }
    }
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

/// The validated sinks of `raw` (the `[alerts]` table, or a command's sink flags: `from`
/// says which), or what is wrong with them, one problem a line.
pub fn alerts_config(raw: RawAlerts, from: SinkSettingsFrom) -> Result<AlertsConfig, String> {
    let mut problems = Vec::new();
    let config = validate_alerts(raw, from, &mut problems);
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
pub(super) fn is_loopback_authority(rest: &str) -> bool {
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
/// `resolve_timeout_name` is how the user gives the real one (a key or a flag).
pub fn repost_problem(
    repost: Duration,
    resolve_timeout: Duration,
    resolve_timeout_name: &str,
) -> Option<String> {
    (repost * 2 > resolve_timeout).then(|| {
        format!(
            "a re-post every {} s could outlive Alertmanager's resolve_timeout of {} s (open \
             alerts would resolve by themselves); use at most {} s, or give the real \
             resolve_timeout as {resolve_timeout_name}",
            repost.as_secs(),
            resolve_timeout.as_secs(),
            resolve_timeout.as_secs() / 2
        )
    })
}

/// The one validation of sink settings, wherever they were written (`from`); every problem
/// goes to `problems`, named as the user wrote it.
pub(super) fn validate_alerts(
    raw: RawAlerts,
    from: SinkSettingsFrom,
    problems: &mut Vec<String>,
) -> AlertsConfig {
    let with_token = raw.webhook_token.is_some();
    for (name, url, token) in [
        ("webhook_url", &raw.webhook_url, with_token),
        ("alertmanager_url", &raw.alertmanager_url, false),
    ] {
        if let Some(problem) = url.as_deref().and_then(|url| sink_url_problem(url, token)) {
            problems.push(format!("{}: {problem}", from.name(name)));
        }
    }
    let webhook_structured = match raw.webhook_mode.as_deref() {
        None | Some("batched") => false,
        Some("structured") => true,
        Some(other) => {
            problems.push(format!(
                "{}: `batched` or `structured`, not {other:?}",
                from.name("webhook_mode")
            ));
            false
        }
    };
    let alertmanager_repost = Duration::from_secs(
        raw.alertmanager_repost_secs
            .unwrap_or(DEFAULT_ALERTMANAGER_REPOST_SECS)
            .max(1),
    );
    let resolve_timeout = Duration::from_secs(
        raw.alertmanager_resolve_timeout_secs
            .unwrap_or(DEFAULT_ALERTMANAGER_RESOLVE_TIMEOUT_SECS),
    );
    if raw.alertmanager_url.is_some() {
        let resolve_timeout_name = from.name("alertmanager_resolve_timeout_secs");
        if let Some(problem) =
            repost_problem(alertmanager_repost, resolve_timeout, &resolve_timeout_name)
        {
            problems.push(format!(
                "{}: {problem}",
                from.name("alertmanager_repost_secs")
            ));
        }
    }
    let positive =
        |name: &str, value: Option<u64>, default: u64, problems: &mut Vec<String>| match value {
            Some(0) => {
                problems.push(format!("{}: at least 1", from.name(name)));
                default as usize
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => default as usize,
        };
    let webhook_batch_max_alerts = positive(
        "webhook_batch_max_alerts",
        raw.webhook_batch_max_alerts,
        DEFAULT_WEBHOOK_BATCH_MAX_ALERTS,
        problems,
    );
    let webhook_batch_max_bytes = positive(
        "webhook_batch_max_bytes",
        raw.webhook_batch_max_bytes,
        DEFAULT_WEBHOOK_BATCH_MAX_BYTES,
        problems,
    );
    let webhook_in_flight = positive(
        "webhook_in_flight",
        raw.webhook_in_flight,
        DEFAULT_WEBHOOK_IN_FLIGHT,
        problems,
    );
    if webhook_in_flight as u64 > MAX_WEBHOOK_IN_FLIGHT {
        problems.push(format!(
            "{}: at most {MAX_WEBHOOK_IN_FLIGHT}",
            from.name("webhook_in_flight")
        ));
    }
    if let Some(path) = &raw.ca_file {
        if !path.is_file() {
            problems.push(format!(
                "{}: {} is not a file",
                from.name("ca_file"),
                path.display()
            ));
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
        sink_timeout: Duration::from_secs(
            raw.sink_timeout_secs
                .unwrap_or(DEFAULT_SINK_TIMEOUT_SECS)
                .max(1),
        ),
        webhook_structured,
        webhook_batch_max_alerts,
        webhook_batch_max_bytes,
        webhook_in_flight,
        ca_file: raw.ca_file,
    }
}
