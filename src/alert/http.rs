//! The HTTP sinks: a CloudEvents webhook ([`WebhookSink`]) and Prometheus Alertmanager
//! ([`AlertmanagerSink`]).
//!
//! Both run on the delivery thread and block there, each with its own `ureq` agent (a pool of
//! keep-alive connections) and a timeout on every request, so that a receiver that stops
//! answering costs one timeout per attempt and never stalls delivery for good. Neither sink
//! retries by itself: a failed run is retried, with backoff, by the delivery thread.
//!
//! Credentials never reach an error or a log line: the bearer token is only ever put in a
//! header (marked sensitive), and URLs are shown without their user-info and query.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ureq::http::HeaderValue;

use super::sinks::{Sink, SinkError};

/// The CloudEvents HTTP binding's structured mode: the whole event is the body.
const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";
/// Alerts per Alertmanager POST: large runs are split so that no request body grows without
/// bound (Alertmanager reads the whole array before validating it).
const ALERTMANAGER_CHUNK: usize = 500;
/// Bytes of an error response's body kept as the error's detail.
const DETAIL_LIMIT: u64 = 512;
/// Bytes of a success response's body read (and dropped) so that its connection can be
/// reused; a receiver that answers more than this only costs a new connection.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// Longest wait before a failed re-post of the open alerts is tried again: the delivery
/// thread ticks every 200 ms, and an unreachable Alertmanager should not be hammered (nor the
/// log flooded) at that rate.
const REPOST_RETRY: Duration = Duration::from_secs(5);
/// The `source` label of every alert, so that Alertmanager routes can pick twinwatch's.
const SOURCE_LABEL: &str = "twinwatch";
const OPENED_TYPE: &str = "io.twinwatch.violation.opened";
const RESOLVED_TYPE: &str = "io.twinwatch.violation.resolved";

/// An agent whose every request gives up after `timeout` (connect, send and receive
/// together), that hands back every status instead of turning 4xx/5xx into errors, and
/// that never follows redirects (a redirected POST would be re-sent as a GET, or with its
/// body to a place nobody configured).
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .user_agent(concat!("twinwatch/", env!("CARGO_PKG_VERSION")))
        // https:// through rustls with the binary's one crypto provider (aws-lc-rs) and
        // Mozilla's roots: ureq would otherwise look for a process-wide default provider,
        // and panic on the first https:// request when none was installed.
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .build(),
        )
        .build()
        .into()
}

/// `url` without user-info (`user:password@`), query or fragment, which may hold secrets:
/// the form that names a sink in errors and logs.
fn redacted_url(url: &str) -> String {
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

/// An HTTP sink's client: its agent, and once the service is stopping, the moment every
/// request must be over by.
struct Poster {
    agent: ureq::Agent,
    timeout: Duration,
    stop_by: Option<Instant>,
}

impl Poster {
    fn new(timeout: Duration) -> Poster {
        Poster {
            agent: agent(timeout),
            timeout,
            stop_by: None,
        }
    }

    /// POSTs `body` to `url` and succeeds on a 2xx answer. Any other answer is an error with
    /// its status and the start of its body; no answer at all (refused, reset, timed out, the
    /// stop deadline reached) is status 0.
    fn post(
        &self,
        sink: &str,
        url: &str,
        content_type: &str,
        authorization: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<(), SinkError> {
        let limit = match self.stop_by {
            None => None,
            Some(stop_by) => {
                let left = stop_by.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(SinkError::Http {
                        sink: sink.to_owned(),
                        status: 0,
                        detail: "not sent: the service's stop deadline has passed".into(),
                    });
                }
                Some(left.min(self.timeout))
            }
        };
        post(
            &self.agent,
            limit,
            sink,
            url,
            content_type,
            authorization,
            body,
        )
    }
}

/// POSTs `body` to `url` (see [`Poster::post`]), within `limit` when given instead of the
/// agent's timeout.
fn post(
    agent: &ureq::Agent,
    limit: Option<Duration>,
    sink: &str,
    url: &str,
    content_type: &str,
    authorization: Option<&HeaderValue>,
    body: &[u8],
) -> Result<(), SinkError> {
    let mut request = agent.post(url).header("Content-Type", content_type);
    if let Some(limit) = limit {
        request = request.config().timeout_global(Some(limit)).build();
    }
    if let Some(value) = authorization {
        request = request.header("Authorization", value.clone());
    }
    let mut response = request.send(body).map_err(|error| SinkError::Http {
        sink: sink.to_owned(),
        status: 0,
        detail: match error {
            // Its message can quote the whole URL, credentials and all.
            ureq::Error::BadUri(_) => "the URL is not a valid http:// or https:// URL".into(),
            error => error.to_string(),
        },
    })?;
    let status = response.status();
    if status.is_success() {
        // The receiver has accepted: a failure to read the rest of its answer changes nothing.
        let _ = std::io::copy(
            &mut response.body_mut().as_reader().take(DRAIN_LIMIT),
            &mut std::io::sink(),
        );
        return Ok(());
    }
    let mut start = Vec::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(DETAIL_LIMIT)
        .read_to_end(&mut start);
    let text = String::from_utf8_lossy(&start);
    let detail = match text.trim() {
        "" => status.canonical_reason().unwrap_or("no reason").to_owned(),
        text => text.to_owned(),
    };
    Err(SinkError::Http {
        sink: sink.to_owned(),
        status: status.as_u16(),
        detail,
    })
}

/// The `Authorization` header a webhook sends, prepared once.
enum Authorization {
    None,
    Bearer(HeaderValue),
    /// The configured token cannot be a header value (a control character, say): every
    /// delivery fails, saying so, rather than sending without it.
    Invalid,
}

/// Identifies a run of alerts, so that a retry of the same run can be recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RunFingerprint {
    n_alerts: usize,
    hash: u64,
}

impl RunFingerprint {
    /// A 64-bit hash of every byte of the run: the delivery thread retries with the very same
    /// alerts, and two different runs of the same length colliding would at worst skip the
    /// already-accepted prefix of a run that was never sent, with odds of 2^-64.
    fn of(alerts: &[&[u8]]) -> RunFingerprint {
        let mut hasher = DefaultHasher::new();
        alerts.hash(&mut hasher);
        RunFingerprint {
            n_alerts: alerts.len(),
            hash: hasher.finish(),
        }
    }
}

/// How far a run that failed part-way got.
#[derive(Clone, Copy, Debug)]
struct RunProgress {
    run: RunFingerprint,
    n_accepted: usize,
}

/// POSTs every alert, one request each, to a webhook, in the CloudEvents HTTP binding's
/// structured mode.
///
/// A run that fails part-way is retried from the first alert not yet accepted, so a receiver
/// sees each alert once per successful delivery; a crash in between can still repeat a few
/// (at-least-once, with the same ids, which receivers can use to drop duplicates).
pub struct WebhookSink {
    url: String,
    /// `webhook <url without credentials>`, naming the sink in errors.
    label: String,
    authorization: Authorization,
    poster: Poster,
    progress: Option<RunProgress>,
}

impl WebhookSink {
    /// A sink posting to `url`, with `Authorization: Bearer <bearer_token>` when a token is
    /// given, each request giving up after `timeout`.
    pub fn new(url: String, bearer_token: Option<String>, timeout: Duration) -> WebhookSink {
        let authorization = match bearer_token {
            None => Authorization::None,
            Some(token) => match HeaderValue::try_from(format!("Bearer {token}")) {
                Ok(mut value) => {
                    // Keeps the value out of `Debug` output, of `http`'s and of ureq's logs.
                    value.set_sensitive(true);
                    Authorization::Bearer(value)
                }
                Err(_) => Authorization::Invalid,
            },
        };
        WebhookSink {
            label: format!("webhook {}", redacted_url(&url)),
            url,
            authorization,
            poster: Poster::new(timeout),
            progress: None,
        }
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn stop_by(&mut self, at: Instant) {
        self.poster.stop_by = Some(at);
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError> {
        let authorization = match &self.authorization {
            Authorization::None => None,
            Authorization::Bearer(value) => Some(value),
            Authorization::Invalid => {
                return Err(SinkError::Http {
                    sink: self.label.clone(),
                    status: 0,
                    detail: "the bearer token is not a valid HTTP header value".into(),
                })
            }
        };
        let run = RunFingerprint::of(alerts);
        let n_skipped = match self.progress {
            Some(progress) if progress.run == run => progress.n_accepted,
            _ => 0,
        };
        if n_skipped > 0 {
            tracing::debug!(
                sink = %self.label,
                n_skipped,
                "retrying a run after the alerts the webhook already accepted"
            );
        }
        for (i, alert) in alerts.iter().enumerate().skip(n_skipped) {
            let posted = self.poster.post(
                &self.label,
                &self.url,
                CLOUDEVENTS_CONTENT_TYPE,
                authorization,
                alert,
            );
            if let Err(error) = posted {
                self.progress = Some(RunProgress { run, n_accepted: i });
                return Err(error);
            }
        }
        // Forgotten once the run is in, so that nothing carries over to the next run.
        self.progress = None;
        Ok(())
    }
}

/// The labels that identify one Alertmanager alert: one (twin, rule).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct AlertLabels {
    alertname: String,
    severity: String,
    hub: String,
    device: String,
    /// Only for module twins.
    module: Option<String>,
}

impl AlertLabels {
    fn wire(&self) -> WireLabels<'_> {
        WireLabels {
            alertname: &self.alertname,
            severity: &self.severity,
            hub: &self.hub,
            device: &self.device,
            module: self.module.as_deref(),
            source: SOURCE_LABEL,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Annotations {
    summary: String,
    description: String,
}

/// An alert that Alertmanager should see as firing, as last sent.
#[derive(Clone, Debug)]
struct OpenAlert {
    annotations: Annotations,
    starts_at: String,
}

/// One alert to send.
struct Outgoing {
    labels: AlertLabels,
    annotations: Annotations,
    starts_at: String,
    ends_at: Option<String>,
}

/// Alertmanager's `postableAlert` (API v2).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert<'a> {
    labels: WireLabels<'a>,
    annotations: WireAnnotations<'a>,
    starts_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ends_at: Option<&'a str>,
}

#[derive(Serialize)]
struct WireLabels<'a> {
    alertname: &'a str,
    severity: &'a str,
    hub: &'a str,
    device: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<&'a str>,
    source: &'a str,
}

#[derive(Serialize)]
struct WireAnnotations<'a> {
    summary: &'a str,
    description: &'a str,
}

impl<'a> PostableAlert<'a> {
    fn new(
        labels: &'a AlertLabels,
        annotations: &'a Annotations,
        starts_at: &'a str,
        ends_at: Option<&'a str>,
    ) -> PostableAlert<'a> {
        PostableAlert {
            labels: labels.wire(),
            annotations: WireAnnotations {
                summary: &annotations.summary,
                description: &annotations.description,
            },
            starts_at,
            ends_at,
        }
    }
}

/// The parts of a twinwatch CloudEvent that the Alertmanager sink reads.
#[derive(Deserialize)]
struct EventEnvelope {
    #[serde(rename = "type")]
    kind: String,
    time: String,
    data: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ViolationData {
    hub_name: String,
    device_id: String,
    module_id: Option<String>,
    rule_id: String,
    title: String,
    severity: String,
    twin_version: i64,
    reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ViolationKind {
    Opened,
    Resolved,
}

/// A violation alert, read back from its CloudEvent.
struct ViolationEvent {
    kind: ViolationKind,
    time: String,
    labels: AlertLabels,
    annotations: Annotations,
}

#[derive(Debug, thiserror::Error)]
enum EventError {
    #[error("not a JSON CloudEvent: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a violation event: type {0}")]
    OtherType(String),
}

impl ViolationEvent {
    fn parse(alert: &[u8]) -> Result<ViolationEvent, EventError> {
        let envelope: EventEnvelope = serde_json::from_slice(alert)?;
        let kind = match envelope.kind.as_str() {
            OPENED_TYPE => ViolationKind::Opened,
            RESOLVED_TYPE => ViolationKind::Resolved,
            _ => return Err(EventError::OtherType(envelope.kind)),
        };
        let mut data: ViolationData = serde_json::from_value(envelope.data)?;
        // An empty module id is no module (and Alertmanager would drop the empty label).
        data.module_id = data.module_id.filter(|m| !m.is_empty());
        let twin = match &data.module_id {
            Some(module) => format!("Module twin {}/modules/{module}", data.device_id),
            None => format!("Device twin {}", data.device_id),
        };
        let hub = &data.hub_name;
        let rule = &data.rule_id;
        let version = data.twin_version;
        let description = match (kind, data.reason.as_deref()) {
            (ViolationKind::Opened, _) => {
                format!("{twin} in hub {hub} violates rule {rule} as of twin version {version}.")
            }
            (ViolationKind::Resolved, Some("deleted")) => format!(
                "{twin} in hub {hub} was deleted at twin version {version}, which resolves rule {rule}."
            ),
            (ViolationKind::Resolved, _) => format!(
                "{twin} in hub {hub} no longer violates rule {rule} as of twin version {version}."
            ),
        };
        Ok(ViolationEvent {
            kind,
            time: envelope.time,
            labels: AlertLabels {
                alertname: data.rule_id,
                severity: data.severity,
                hub: data.hub_name,
                device: data.device_id,
                module: data.module_id,
            },
            annotations: Annotations {
                summary: data.title,
                description,
            },
        })
    }
}

/// The earlier of two alert times. Every time here is written by `Ticks`'s `Display`
/// (UTC, `Z`, always seven fraction digits), so string order is time order.
fn earlier<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a <= b {
        a
    } else {
        b
    }
}

/// Turns violation alerts into Prometheus Alertmanager alerts (API v2), keeps the open ones
/// firing by re-posting them, and resolves them with `endsAt`.
///
/// Alertmanager keeps alerts in memory only and resolves one by itself `resolve_timeout`
/// (5 minutes by default) after it was last posted without an `endsAt`: `repost_interval`
/// must stay well below that. The open set is memory only too; the service seeds it at start
/// with [`AlertmanagerSink::seed_open`].
pub struct AlertmanagerSink {
    client: AlertmanagerClient,
    repost_interval: Duration,
    /// The alerts Alertmanager should see as firing, by label set.
    open: BTreeMap<AlertLabels, OpenAlert>,
    /// When the open alerts are next all re-posted.
    next_repost: Instant,
}

/// Where and how the Alertmanager sink posts.
struct AlertmanagerClient {
    url: String,
    /// `alertmanager <url without credentials>`, naming the sink in errors.
    label: String,
    poster: Poster,
    body: Vec<u8>,
}

impl AlertmanagerClient {
    /// POSTs `alerts` as JSON arrays of at most [`ALERTMANAGER_CHUNK`]. After a failure the
    /// caller sends them all again, chunks already accepted included: Alertmanager identifies
    /// alerts by their labels, so it takes those as updates of the same alerts.
    fn post_all(&mut self, alerts: &[PostableAlert<'_>]) -> Result<(), SinkError> {
        for chunk in alerts.chunks(ALERTMANAGER_CHUNK) {
            self.body.clear();
            serde_json::to_writer(&mut self.body, chunk)
                .expect("alerts made of strings always serialize");
            self.poster
                .post(&self.label, &self.url, "application/json", None, &self.body)?;
        }
        Ok(())
    }
}

impl AlertmanagerSink {
    /// A sink posting to `{base_url}/api/v2/alerts`, re-posting the open alerts every
    /// `repost_interval`, each request giving up after `timeout`.
    pub fn new(base_url: String, repost_interval: Duration, timeout: Duration) -> AlertmanagerSink {
        let url = format!("{}/api/v2/alerts", base_url.trim_end_matches('/'));
        AlertmanagerSink {
            client: AlertmanagerClient {
                label: format!("alertmanager {}", redacted_url(&url)),
                url,
                poster: Poster::new(timeout),
                body: Vec::new(),
            },
            repost_interval,
            open: BTreeMap::new(),
            next_repost: Instant::now() + repost_interval,
        }
    }

    /// Adds the still-open violations, as their `opened` events, to the alerts kept firing,
    /// and makes the next [`Sink::tick`] post them all: Alertmanager may have resolved them
    /// while the service was down, or lost them in a restart of its own.
    pub fn seed_open(&mut self, opened_events: &[Vec<u8>]) {
        for event in opened_events {
            match ViolationEvent::parse(event) {
                Ok(event) if event.kind == ViolationKind::Opened => {
                    self.open.insert(
                        event.labels,
                        OpenAlert {
                            annotations: event.annotations,
                            starts_at: event.time,
                        },
                    );
                }
                Ok(_) => tracing::warn!(
                    sink = %self.client.label,
                    "a resolved event given as an open violation; ignored"
                ),
                Err(error) => tracing::warn!(
                    sink = %self.client.label,
                    error = %error,
                    "an open violation that cannot be read; ignored"
                ),
            }
        }
        self.next_repost = Instant::now();
    }
}

impl Sink for AlertmanagerSink {
    fn name(&self) -> &'static str {
        "alertmanager"
    }

    fn stop_by(&mut self, at: Instant) {
        self.client.poster.stop_by = Some(at);
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError> {
        // Changes to the open set wait until the whole run is accepted, so that a retry
        // builds the very same alerts (a resolved one keeps its `startsAt`).
        let mut staged: BTreeMap<AlertLabels, Option<OpenAlert>> = BTreeMap::new();
        let mut outgoing: Vec<Outgoing> = Vec::with_capacity(alerts.len());
        for alert in alerts {
            let event = match ViolationEvent::parse(alert) {
                Ok(event) => event,
                // Bad input is data: skipping it keeps it from blocking the outbox forever.
                Err(error) => {
                    tracing::warn!(sink = %self.client.label, error = %error, "alert skipped");
                    continue;
                }
            };
            match event.kind {
                ViolationKind::Opened => {
                    staged.insert(
                        event.labels.clone(),
                        Some(OpenAlert {
                            annotations: event.annotations.clone(),
                            starts_at: event.time.clone(),
                        }),
                    );
                    outgoing.push(Outgoing {
                        labels: event.labels,
                        annotations: event.annotations,
                        starts_at: event.time,
                        ends_at: None,
                    });
                }
                ViolationKind::Resolved => {
                    let known = match staged.get(&event.labels) {
                        Some(staged) => staged.as_ref(),
                        None => self.open.get(&event.labels),
                    };
                    // Alertmanager rejects an alert that ends before it starts; one opened
                    // before this process knew of it starts when it ends.
                    let starts_at = known
                        .map_or(event.time.as_str(), |open| {
                            earlier(&open.starts_at, &event.time)
                        })
                        .to_owned();
                    staged.insert(event.labels.clone(), None);
                    outgoing.push(Outgoing {
                        labels: event.labels,
                        annotations: event.annotations,
                        starts_at,
                        ends_at: Some(event.time),
                    });
                }
            }
        }
        let postable: Vec<PostableAlert<'_>> = outgoing
            .iter()
            .map(|o| {
                PostableAlert::new(
                    &o.labels,
                    &o.annotations,
                    &o.starts_at,
                    o.ends_at.as_deref(),
                )
            })
            .collect();
        self.client.post_all(&postable)?;
        for (labels, change) in staged {
            match change {
                Some(open) => self.open.insert(labels, open),
                None => self.open.remove(&labels),
            };
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        let now = Instant::now();
        if now < self.next_repost {
            return Ok(());
        }
        let postable: Vec<PostableAlert<'_>> = self
            .open
            .iter()
            .map(|(labels, alert)| {
                PostableAlert::new(labels, &alert.annotations, &alert.starts_at, None)
            })
            .collect();
        let posted = self.client.post_all(&postable);
        self.next_repost = match posted {
            Ok(()) => now + self.repost_interval,
            Err(_) => now + self.repost_interval.min(REPOST_RETRY),
        };
        posted
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde_json::{json, Value};

    use super::*;

    // ---- Alerts, rendered like `compliance::cloud_event` (this module cannot call it: it
    // sits below the pipeline, and its scratch build has only the sinks).

    struct Twin<'a> {
        hub: &'a str,
        device: &'a str,
        module: Option<&'a str>,
    }

    const DEVICE_TWIN: Twin<'static> = Twin {
        hub: "hub-1",
        device: "dev-1",
        module: None,
    };
    const MODULE_TWIN: Twin<'static> = Twin {
        hub: "hub-1",
        device: "dev-2",
        module: Some("azureiotsecurity"),
    };

    struct Rule<'a> {
        id: &'a str,
        severity: &'a str,
        title: &'a str,
    }

    const HIGH_RULE: Rule<'static> = Rule {
        id: "tls-required",
        severity: "high",
        title: "TLS must be required",
    };
    const LOW_RULE: Rule<'static> = Rule {
        id: "firmware-current",
        severity: "low",
        title: "Firmware is current",
    };

    fn event(
        id: &str,
        opened: bool,
        twin: &Twin,
        rule: &Rule,
        time: &str,
        version: i64,
    ) -> Vec<u8> {
        let mut data = json!({
            "hubName": twin.hub,
            "deviceId": twin.device,
            "ruleId": rule.id,
            "title": rule.title,
            "severity": rule.severity,
            "twinVersion": version,
        });
        let subject = match twin.module {
            Some(module) => {
                data["moduleId"] = json!(module);
                format!("{}/modules/{module}", twin.device)
            }
            None => twin.device.to_owned(),
        };
        let kind = if opened { OPENED_TYPE } else { RESOLVED_TYPE };
        serde_json::to_vec(&json!({
            "specversion": "1.0",
            "id": id,
            "type": kind,
            "source": format!("/iothub/{}", twin.hub),
            "subject": subject,
            "time": time,
            "datacontenttype": "application/json",
            "data": data,
        }))
        .expect("a JSON value always serializes")
    }

    /// `at` as `Ticks` writes it: UTC, seven fraction digits.
    fn rfc3339(at: SystemTime) -> String {
        let since_epoch = at.duration_since(UNIX_EPOCH).expect("after 1970");
        let seconds = since_epoch.as_secs() as i64;
        let ticks = since_epoch.subsec_nanos() / 100;
        let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ticks:07}Z",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60
        )
    }

    #[test]
    fn rfc3339_matches_a_known_instant() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_654_122_470_261_258_600);
        assert_eq!(rfc3339(at), "2022-06-01T22:27:50.2612586Z");
    }

    fn ago(seconds: u64) -> String {
        rfc3339(SystemTime::now() - Duration::from_secs(seconds))
    }

    // ---- A real HTTP/1.1 server: keep-alive, `Content-Length` bodies, scripted statuses.

    #[derive(Clone, Debug)]
    struct Received {
        request_line: String,
        /// Names lower-cased.
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Received {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    struct TestServer {
        addr: SocketAddr,
        received: Arc<Mutex<Vec<Received>>>,
        stop: Arc<AtomicBool>,
        accepting: Option<JoinHandle<()>>,
    }

    impl TestServer {
        /// Answers the i-th request (from 0) with `statuses[i]`, and 200 once they run out.
        fn start(statuses: Vec<u16>) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
            let addr = listener.local_addr().expect("a bound address");
            let received = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let statuses = Arc::new(statuses);
            let accepting = std::thread::spawn({
                let received = received.clone();
                let stop = stop.clone();
                move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(stream) = stream else { continue };
                        let received = received.clone();
                        let statuses = statuses.clone();
                        std::thread::spawn(move || serve(stream, &received, &statuses));
                    }
                }
            });
            TestServer {
                addr,
                received,
                stop,
                accepting: Some(accepting),
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn received(&self) -> Vec<Received> {
            self.received
                .lock()
                .expect("no test thread panicked")
                .clone()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so that it sees the flag.
            let _ = TcpStream::connect(self.addr);
            if let Some(accepting) = self.accepting.take() {
                let _ = accepting.join();
            }
        }
    }

    /// Serves the requests of one connection until the client closes it.
    fn serve(stream: TcpStream, received: &Mutex<Vec<Received>>, statuses: &[u16]) {
        // Bounds a test whose client went silent.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        loop {
            let mut request_line = String::new();
            match reader.read_line(&mut request_line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                }
            }
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let status = {
                let mut received = received.lock().expect("no test thread panicked");
                received.push(Received {
                    request_line: request_line.trim_end().to_owned(),
                    headers,
                    body,
                });
                statuses.get(received.len() - 1).copied().unwrap_or(200)
            };
            let (reason, answer) = match status {
                200 => ("OK", ""),
                _ => ("Service Unavailable", "try again later"),
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            );
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn assert_http_error(result: Result<(), SinkError>, expected_status: u16) -> String {
        match result {
            Err(SinkError::Http { status, detail, .. }) if status == expected_status => detail,
            other => panic!("expected an HTTP {expected_status} error, got {other:?}"),
        }
    }

    // ---- The webhook.

    #[test]
    fn webhook_fails_while_the_server_fails_then_delivers_each_alert_in_order() {
        let server = TestServer::start(vec![503, 503]);
        let token = "s3cr3t-token";
        let mut sink = WebhookSink::new(
            server.url("/hooks/twinwatch"),
            Some(token.into()),
            Duration::from_secs(5),
        );
        let alerts = [
            event("src#1.0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(30), 4),
            event("src#1.1", true, &MODULE_TWIN, &LOW_RULE, &ago(30), 9),
            event("src#2.0", false, &DEVICE_TWIN, &HIGH_RULE, &ago(20), 5),
        ];
        let run: Vec<&[u8]> = alerts.iter().map(Vec::as_slice).collect();

        for _ in 0..2 {
            let error = sink.deliver(&run).expect_err("the server answers 503");
            assert_eq!(error.kind(), "http_status");
            let text = error.to_string();
            assert!(
                text.contains("503") && text.contains("try again later"),
                "{text}"
            );
            assert!(!text.contains(token), "the token leaked into {text}");
        }
        sink.deliver(&run).expect("the server answers 200");

        let received = server.received();
        // Two refused attempts at the first alert, then the three alerts once each.
        assert_eq!(received.len(), 5);
        let bodies: Vec<&[u8]> = received.iter().map(|r| r.body.as_slice()).collect();
        assert_eq!(bodies, [&run[..1], &run[..1], &run[..]].concat());
        for request in &received {
            assert_eq!(request.request_line, "POST /hooks/twinwatch HTTP/1.1");
            assert_eq!(
                request.header("content-type"),
                Some("application/cloudevents+json; charset=utf-8")
            );
            assert_eq!(request.header("authorization"), Some("Bearer s3cr3t-token"));
        }
    }

    #[test]
    fn webhook_retry_resumes_after_the_accepted_alerts_and_a_new_run_starts_over() {
        // Accepts the first alert, refuses the second, then accepts everything.
        let server = TestServer::start(vec![200, 503]);
        let mut sink = WebhookSink::new(server.url("/"), None, Duration::from_secs(5));
        let first: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                event(
                    &format!("a#{i}"),
                    true,
                    &DEVICE_TWIN,
                    &HIGH_RULE,
                    &ago(10),
                    i,
                )
            })
            .collect();
        let first: Vec<&[u8]> = first.iter().map(Vec::as_slice).collect();
        let second: Vec<Vec<u8>> = (0..2)
            .map(|i| event(&format!("b#{i}"), true, &MODULE_TWIN, &LOW_RULE, &ago(5), i))
            .collect();
        let second: Vec<&[u8]> = second.iter().map(Vec::as_slice).collect();

        assert_http_error(sink.deliver(&first), 503);
        sink.deliver(&first).expect("the retry is accepted");
        sink.deliver(&second).expect("the next run is accepted");
        // A run identical to one already delivered is a new run: sent in full.
        sink.deliver(&second).expect("accepted again");

        let bodies: Vec<Vec<u8>> = server.received().into_iter().map(|r| r.body).collect();
        let expected: Vec<&[u8]> = [
            &first[..2], // the first accepted, the second refused
            &first[1..], // the retry resumes at the refused one
            &second[..],
            &second[..],
        ]
        .concat();
        assert_eq!(bodies, expected);
        assert!(server
            .received()
            .iter()
            .all(|r| r.header("authorization").is_none()));
    }

    #[test]
    fn webhook_progress_is_forgotten_when_another_run_comes() {
        let server = TestServer::start(vec![200, 503]);
        let mut sink = WebhookSink::new(server.url("/"), None, Duration::from_secs(5));
        let a = event("a#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(10), 1);
        let b = event("a#1", true, &DEVICE_TWIN, &LOW_RULE, &ago(10), 1);
        let c = event("c#0", true, &MODULE_TWIN, &LOW_RULE, &ago(10), 1);
        assert_http_error(sink.deliver(&[&a, &b]), 503);
        // Not a retry of the failed run: nothing of it is skipped.
        sink.deliver(&[&a, &c]).expect("accepted");
        let bodies: Vec<Vec<u8>> = server.received().into_iter().map(|r| r.body).collect();
        assert_eq!(bodies, [a.clone(), b, a, c]);
    }

    #[test]
    fn webhook_times_out_against_a_server_that_never_answers() {
        // Connections complete in the kernel's backlog; nobody ever reads or answers.
        let silent = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let url = format!("http://{}/", silent.local_addr().expect("bound"));
        let timeout = Duration::from_millis(300);
        let mut sink = WebhookSink::new(url, Some("t".into()), timeout);
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let started = Instant::now();
        let result = sink.deliver(&[&alert]);
        let elapsed = started.elapsed();
        let detail = assert_http_error(result, 0);
        assert!(detail.contains("timeout"), "{detail}");
        assert!(elapsed >= timeout, "gave up after {elapsed:?}");
        assert!(
            elapsed < timeout + Duration::from_secs(2),
            "took {elapsed:?}"
        );
    }

    #[test]
    fn webhook_reports_a_refused_connection_as_unreachable() {
        let port = free_port();
        let mut sink = WebhookSink::new(
            format!("http://user:password@127.0.0.1:{port}/hook?key=secret"),
            None,
            Duration::from_secs(2),
        );
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let error = sink.deliver(&[&alert]).expect_err("nothing listens");
        assert_eq!(error.kind(), "unreachable");
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("webhook http://127.0.0.1:{port}/hook: HTTP 0: ")),
            "{text}"
        );
        assert!(
            !text.contains("password") && !text.contains("secret"),
            "{text}"
        );
    }

    #[test]
    fn webhook_with_a_bad_url_fails_without_quoting_it() {
        let mut sink = WebhookSink::new(
            "user:secret@example.com/hook".into(),
            None,
            Duration::from_secs(2),
        );
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let error = sink.deliver(&[&alert]).expect_err("not a URL");
        let text = error.to_string();
        assert_eq!(error.kind(), "unreachable");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn webhook_with_an_impossible_token_fails_without_sending() {
        let server = TestServer::start(vec![]);
        let mut sink = WebhookSink::new(
            server.url("/"),
            Some("line\nbreak".into()),
            Duration::from_secs(2),
        );
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let detail = assert_http_error(sink.deliver(&[&alert]), 0);
        assert!(detail.contains("bearer token"), "{detail}");
        assert!(server.received().is_empty());
    }

    #[test]
    fn urls_lose_their_credentials_in_labels() {
        assert_eq!(
            redacted_url("https://u:p@example.com:8443/a/b?token=x#f"),
            "https://example.com:8443/a/b"
        );
        assert_eq!(redacted_url("http://host"), "http://host");
        assert_eq!(redacted_url("host:1/p"), "host:1/p");
    }

    // ---- The Alertmanager sink's requests, seen by the test server.

    fn posted_arrays(server: &TestServer) -> Vec<Vec<Value>> {
        server
            .received()
            .into_iter()
            .map(|r| {
                assert_eq!(r.request_line, "POST /am/api/v2/alerts HTTP/1.1");
                assert_eq!(r.header("content-type"), Some("application/json"));
                serde_json::from_slice(&r.body).expect("a JSON array of alerts")
            })
            .collect()
    }

    #[test]
    fn alertmanager_payload_follows_the_events() {
        let server = TestServer::start(vec![]);
        let mut sink = AlertmanagerSink::new(
            server.url("/am/"),
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        let t0 = "2026-01-02T03:04:05.1234567Z";
        let t1 = "2026-01-02T03:09:00.0000001Z";
        let run = [
            event("e#0", true, &MODULE_TWIN, &HIGH_RULE, t0, 7),
            b"not json".to_vec(),
            br#"{"specversion":"1.0","type":"io.example.other","time":"x","data":{}}"#.to_vec(),
            event("e#1", false, &MODULE_TWIN, &HIGH_RULE, t1, 8),
            // Resolving an alert this process never saw open: it starts when it ends.
            event("e#2", false, &DEVICE_TWIN, &LOW_RULE, t1, 3),
        ];
        let run: Vec<&[u8]> = run.iter().map(Vec::as_slice).collect();
        sink.deliver(&run).expect("accepted");
        let module_labels = json!({
            "alertname": "tls-required", "severity": "high", "hub": "hub-1",
            "device": "dev-2", "module": "azureiotsecurity", "source": "twinwatch",
        });
        let expected = json!([
            {
                "labels": module_labels,
                "annotations": {
                    "summary": "TLS must be required",
                    "description": "Module twin dev-2/modules/azureiotsecurity in hub hub-1 violates rule tls-required as of twin version 7.",
                },
                "startsAt": t0,
            },
            {
                "labels": module_labels,
                "annotations": {
                    "summary": "TLS must be required",
                    "description": "Module twin dev-2/modules/azureiotsecurity in hub hub-1 no longer violates rule tls-required as of twin version 8.",
                },
                "startsAt": t0,
                "endsAt": t1,
            },
            {
                "labels": {
                    "alertname": "firmware-current", "severity": "low", "hub": "hub-1",
                    "device": "dev-1", "source": "twinwatch",
                },
                "annotations": {
                    "summary": "Firmware is current",
                    "description": "Device twin dev-1 in hub hub-1 no longer violates rule firmware-current as of twin version 3.",
                },
                "startsAt": t1,
                "endsAt": t1,
            },
        ]);
        assert_eq!(
            posted_arrays(&server),
            [expected.as_array().expect("an array").clone()]
        );

        // Nothing is open any more: ticks past the interval post nothing.
        std::thread::sleep(Duration::from_millis(150));
        sink.tick().expect("nothing to post");
        assert_eq!(server.received().len(), 1);
    }

    #[test]
    fn alertmanager_batches_runs_and_reposts_only_what_was_accepted() {
        // Refuses the first POST.
        let server = TestServer::start(vec![503]);
        let interval = Duration::from_millis(200);
        let mut sink = AlertmanagerSink::new(server.url("/am"), interval, Duration::from_secs(5));
        let events: Vec<Vec<u8>> = (0..1001)
            .map(|i| {
                let device = format!("dev-{i}");
                let twin = Twin {
                    hub: "hub-1",
                    device: &device,
                    module: None,
                };
                event(
                    &format!("e#{i}"),
                    true,
                    &twin,
                    &HIGH_RULE,
                    "2026-01-02T03:04:05.0000000Z",
                    1,
                )
            })
            .collect();
        let run: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();

        assert_http_error(sink.deliver(&run), 503);
        // The refused run opened nothing: a tick has nothing to re-post.
        std::thread::sleep(interval);
        sink.tick().expect("nothing to post");
        assert_eq!(server.received().len(), 1);

        sink.deliver(&run).expect("accepted");
        let sizes: Vec<usize> = posted_arrays(&server).iter().map(Vec::len).collect();
        assert_eq!(sizes, [500, 500, 500, 1]);

        // Before the interval has passed since the last re-post, a tick does nothing...
        sink.tick().expect("ticks");
        assert_eq!(server.received().len(), 4);
        // ...after it, every open alert is posted again, without `endsAt`.
        std::thread::sleep(interval);
        sink.tick().expect("re-posted");
        let arrays = posted_arrays(&server);
        assert_eq!(arrays.len(), 7);
        let reposted: Vec<&Value> = arrays[4..].iter().flatten().collect();
        assert_eq!(reposted.len(), 1001);
        assert!(reposted
            .iter()
            .all(|a| a.get("endsAt").is_none() && a["startsAt"] == "2026-01-02T03:04:05.0000000Z"));
    }

    #[test]
    fn alertmanager_repost_failure_waits_before_trying_again() {
        let server = TestServer::start(vec![503]);
        let interval = Duration::from_millis(100);
        let mut sink = AlertmanagerSink::new(server.url("/am"), interval, Duration::from_secs(5));
        let opened = event("e#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(5), 1);
        sink.seed_open(&[opened]);
        // Seeded alerts are due at once.
        assert_http_error(sink.tick(), 503);
        sink.tick().expect("not due yet after a failure");
        assert_eq!(server.received().len(), 1);
        std::thread::sleep(interval);
        sink.tick().expect("re-posted");
        assert_eq!(server.received().len(), 2);
    }

    // ---- A real Alertmanager.

    /// The Debian package `prometheus-alertmanager` installs it here.
    const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

    fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.local_addr().expect("bound").port()
    }

    /// An Alertmanager process, killed on drop. Alerts live only in its memory, so a restart
    /// forgets them all.
    struct Alertmanager {
        child: Child,
        base_url: String,
        log: PathBuf,
    }

    impl Alertmanager {
        fn start(dir: &Path, port: u16) -> Alertmanager {
            assert!(
                Path::new(ALERTMANAGER).exists(),
                "{ALERTMANAGER} is missing: install the Debian package prometheus-alertmanager \
                 (apt-get install -y prometheus-alertmanager)"
            );
            let config = dir.join("alertmanager.yml");
            std::fs::write(
                &config,
                "route:\n  receiver: discard\nreceivers:\n  - name: discard\n",
            )
            .expect("write the config");
            let log = dir.join(format!("alertmanager-{port}.log"));
            let log_file = std::fs::File::create(&log).expect("create the log");
            let child = Command::new(ALERTMANAGER)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--cluster.listen-address=")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("start prometheus-alertmanager");
            let mut am = Alertmanager {
                child,
                base_url: format!("http://127.0.0.1:{port}"),
                log,
            };
            am.wait_ready();
            am
        }

        fn wait_ready(&mut self) {
            let agent = agent(Duration::from_millis(500));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("alertmanager exited ({status}):\n{}", self.log_text());
                }
                let ready = agent
                    .get(format!("{}/-/ready", self.base_url))
                    .call()
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "alertmanager not ready after 20 s:\n{}",
                    self.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        fn log_text(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// The active alerts (`GET /api/v2/alerts` lists no resolved ones), by alert name
        /// then device.
        fn active_alerts(&self) -> Vec<Value> {
            let mut response = agent(Duration::from_secs(5))
                .get(format!("{}/api/v2/alerts?active=true", self.base_url))
                .call()
                .expect("alertmanager answers");
            assert_eq!(response.status().as_u16(), 200);
            let text = response.body_mut().read_to_string().expect("a body");
            let mut alerts: Vec<Value> = serde_json::from_str(&text).expect("a JSON array");
            alerts.sort_by_key(|a| {
                (
                    a["labels"]["alertname"].to_string(),
                    a["labels"]["device"].to_string(),
                )
            });
            alerts
        }
    }

    impl Drop for Alertmanager {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// An event time as Alertmanager gives it back: milliseconds.
    fn millis(time: &str) -> String {
        format!("{}Z", &time[..23])
    }

    #[test]
    fn alertmanager_sink_against_a_real_alertmanager() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let mut am = Alertmanager::start(dir.path(), port);
        let interval = Duration::from_secs(1);
        let mut sink = AlertmanagerSink::new(am.base_url.clone(), interval, Duration::from_secs(5));
        let created = Instant::now();

        // Opened: both active, with their labels and annotations, from the event times
        // (seven fraction digits, which Alertmanager reads, keeping milliseconds).
        let opened_at = ago(60);
        let opened_device = event("s#1.0", true, &DEVICE_TWIN, &HIGH_RULE, &opened_at, 4);
        let opened_module = event("s#1.1", true, &MODULE_TWIN, &LOW_RULE, &opened_at, 9);
        sink.deliver(&[&opened_device, &opened_module])
            .expect("accepted");
        let alerts = am.active_alerts();
        assert_eq!(alerts.len(), 2, "{alerts:#?}");
        let (module_alert, device_alert) = (&alerts[0], &alerts[1]);
        assert_eq!(
            device_alert["labels"],
            json!({"alertname": "tls-required", "severity": "high", "hub": "hub-1",
                   "device": "dev-1", "source": "twinwatch"})
        );
        assert_eq!(
            device_alert["annotations"],
            json!({"summary": "TLS must be required",
                   "description": "Device twin dev-1 in hub hub-1 violates rule tls-required as of twin version 4."})
        );
        assert_eq!(
            module_alert["labels"],
            json!({"alertname": "firmware-current", "severity": "low", "hub": "hub-1",
                   "device": "dev-2", "module": "azureiotsecurity", "source": "twinwatch"})
        );
        assert_eq!(
            module_alert["annotations"]["summary"],
            "Firmware is current"
        );
        for alert in &alerts {
            assert_eq!(alert["status"]["state"], "active");
            assert_eq!(alert["startsAt"], millis(&opened_at));
        }

        // Alertmanager restarts and forgets them; the first tick once the interval has
        // passed brings them back, unchanged.
        drop(am);
        am = Alertmanager::start(dir.path(), port);
        assert!(am.active_alerts().is_empty());
        std::thread::sleep(interval.saturating_sub(created.elapsed()));
        sink.tick().expect("re-posted");
        let reposted = am.active_alerts();
        assert_eq!(reposted.len(), 2);
        for (before, after) in alerts.iter().zip(&reposted) {
            for field in ["labels", "annotations", "startsAt", "fingerprint"] {
                assert_eq!(before[field], after[field], "{field}");
            }
        }
        // A tick before the next interval has passed posts nothing: `updatedAt` stays.
        sink.tick().expect("not due");
        let updated_at = |alerts: &[Value]| -> Vec<Value> {
            alerts.iter().map(|a| a["updatedAt"].clone()).collect()
        };
        assert_eq!(updated_at(&am.active_alerts()), updated_at(&reposted));

        // Resolved: the device twin's alert is no longer active, the module twin's still is.
        let resolved_device = event("s#2.0", false, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 5);
        sink.deliver(&[&resolved_device]).expect("accepted");
        let alerts = am.active_alerts();
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        assert_eq!(alerts[0]["labels"]["device"], "dev-2");
        assert_eq!(alerts[0]["updatedAt"], reposted[0]["updatedAt"]);

        // The next re-post refreshes the open one and leaves the resolved one resolved.
        std::thread::sleep(interval);
        sink.tick().expect("re-posted");
        let alerts = am.active_alerts();
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        assert_eq!(alerts[0]["labels"]["device"], "dev-2");
        assert_ne!(alerts[0]["updatedAt"], reposted[0]["updatedAt"]);

        // The service restarts along with Alertmanager: a sink seeded with the stored open
        // violation posts it at its first tick, and resolves it.
        drop(am);
        am = Alertmanager::start(dir.path(), port);
        let mut restarted =
            AlertmanagerSink::new(am.base_url.clone(), interval, Duration::from_secs(5));
        restarted.seed_open(&[opened_module]);
        restarted.tick().expect("posted");
        let alerts = am.active_alerts();
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        assert_eq!(alerts[0]["labels"]["module"], "azureiotsecurity");
        assert_eq!(alerts[0]["startsAt"], millis(&opened_at));
        let resolved_module = event("s#3.0", false, &MODULE_TWIN, &LOW_RULE, &ago(1), 10);
        restarted.deliver(&[&resolved_module]).expect("accepted");
        assert!(am.active_alerts().is_empty());
    }
}
