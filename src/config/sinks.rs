//! The alert sinks' settings validated: the `[alerts]` table and the commands' sink flags
//! alike ([`alerts_config`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::RawAlerts;
use super::redact::redacted_url;
use super::Secret;

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

pub(super) fn validate_alerts(raw: RawAlerts, problems: &mut Vec<String>) -> AlertsConfig {
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
