//! Prometheus Alertmanager (API v2): violation alerts become Alertmanager alerts, open ones
//! are kept firing by re-posting them, resolved ones get an `endsAt`.
//!
//! The re-post of the open set goes in chunks, one per [`Sink::tick`], so that new alerts are
//! delivered between the chunks of a large re-post instead of waiting for all of them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::poster::{redacted_url, HttpOptions, Poster};
use super::sinks::{Failed, Sink, SinkError};
use crate::compliance::wire::{AlertChange, CloudEvent};

/// Alerts per Alertmanager POST: large runs are split so that no request body grows without
/// bound (Alertmanager reads the whole array before validating it).
const ALERTMANAGER_CHUNK: usize = 500;
/// Longest wait before a failed re-post of the open alerts is tried again: the delivery
/// thread ticks every 200 ms, and an unreachable Alertmanager should not be hammered (nor the
/// log flooded) at that rate.
const REPOST_RETRY: Duration = Duration::from_secs(5);
/// The `source` label of every alert, so that Alertmanager routes can pick twinwatch's.
const SOURCE_LABEL: &str = "twinwatch";

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
        let event = CloudEvent::parse(alert)?;
        let Some(change) = event.change() else {
            return Err(EventError::OtherType(event.kind));
        };
        let mut data = event.data;
        // An empty module id is no module (and Alertmanager would drop the empty label).
        data.module_id = data.module_id.filter(|m| !m.is_empty());
        let twin = match &data.module_id {
            Some(module) => format!("Module twin {}/modules/{module}", data.device_id),
            None => format!("Device twin {}", data.device_id),
        };
        let hub = &data.hub_name;
        let rule = &data.rule_id;
        let version = data.twin_version;
        let (kind, description) = match change {
            AlertChange::Opened => (
                ViolationKind::Opened,
                format!("{twin} in hub {hub} violates rule {rule} as of twin version {version}."),
            ),
            AlertChange::Deleted => (
                ViolationKind::Resolved,
                format!(
                    "{twin} in hub {hub} was deleted at twin version {version}, which resolves rule {rule}."
                ),
            ),
            AlertChange::Resolved => (
                ViolationKind::Resolved,
                format!(
                    "{twin} in hub {hub} no longer violates rule {rule} as of twin version {version}."
                ),
            ),
        };
        Ok(ViolationEvent {
            kind,
            time: event.time,
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
/// must stay well below that (the configuration refuses one above half of it). The open set
/// is memory only too; the service seeds it at start with [`AlertmanagerSink::seed_open`].
pub struct AlertmanagerSink {
    url: String,
    /// `alertmanager <url without credentials>`, naming the sink in errors.
    label: String,
    poster: Poster,
    body: Vec<u8>,
    repost_interval: Duration,
    /// The alerts Alertmanager should see as firing, by label set.
    open: BTreeMap<AlertLabels, OpenAlert>,
    /// When the next re-post of the open alerts starts.
    next_repost: Instant,
    /// The re-post under way: the label sets still to post (those resolved meanwhile are
    /// skipped), and when it started.
    reposting: Option<(std::collections::VecDeque<AlertLabels>, Instant)>,
}

impl AlertmanagerSink {
    /// A sink posting to `{base_url}/api/v2/alerts`, re-posting the open alerts every
    /// `repost_interval`.
    pub fn new(base_url: String, repost_interval: Duration, http: HttpOptions) -> AlertmanagerSink {
        let url = format!("{}/api/v2/alerts", base_url.trim_end_matches('/'));
        AlertmanagerSink {
            label: format!("alertmanager {}", redacted_url(&url)),
            url,
            poster: Poster::new(&http),
            body: Vec::new(),
            repost_interval,
            open: BTreeMap::new(),
            next_repost: Instant::now() + repost_interval,
            reposting: None,
        }
    }

    /// POSTs one JSON array of alerts.
    fn post(&mut self, alerts: &[PostableAlert<'_>]) -> Result<(), SinkError> {
        self.body.clear();
        if let Err(e) = serde_json::to_writer(&mut self.body, alerts) {
            // Alerts made of strings always serialize; say so rather than panic.
            return Err(SinkError::Config {
                sink: self.label.clone(),
                detail: format!("cannot serialize alerts: {e}"),
            });
        }
        self.poster
            .post(&self.label, &self.url, "application/json", None, &self.body)
    }

    /// Adds the still-open violations, as their `opened` events, to the alerts kept firing,
    /// and makes the next [`Sink::tick`] start posting them all: Alertmanager may have
    /// resolved them while the service was down, or lost them in a restart of its own.
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
                    sink = %self.label,
                    "a resolved event given as an open violation; ignored"
                ),
                Err(error) => tracing::warn!(
                    sink = %self.label,
                    error = %error,
                    "an open violation that cannot be read; ignored"
                ),
            }
        }
        self.next_repost = Instant::now();
    }
}

/// One alert to send, and what it changes in the open set once accepted.
struct Outgoing {
    /// Its index in the run.
    index: usize,
    labels: AlertLabels,
    annotations: Annotations,
    starts_at: String,
    ends_at: Option<String>,
}

impl Sink for AlertmanagerSink {
    fn name(&self) -> &'static str {
        "alertmanager"
    }

    fn stop_by(&mut self, at: Instant) {
        self.poster.stop_by = Some(at);
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), Failed> {
        // The alerts of the run, built against the open set as each accepted chunk leaves
        // it, so that a retry of the rest builds the very same alerts (a resolved one keeps
        // its `startsAt`).
        let mut staged: BTreeMap<AlertLabels, Option<OpenAlert>> = BTreeMap::new();
        let mut outgoing: Vec<Outgoing> = Vec::with_capacity(alerts.len());
        for (index, alert) in alerts.iter().enumerate() {
            let event = match ViolationEvent::parse(alert) {
                Ok(event) => event,
                // Bad input is data: skipping it keeps it from blocking the outbox forever.
                Err(error) => {
                    tracing::warn!(sink = %self.label, error = %error, "alert skipped");
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
                        index,
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
                        index,
                        labels: event.labels,
                        annotations: event.annotations,
                        starts_at,
                        ends_at: Some(event.time),
                    });
                }
            }
        }
        for chunk in outgoing.chunks(ALERTMANAGER_CHUNK) {
            let postable: Vec<PostableAlert<'_>> = chunk
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
            if let Err(error) = self.post(&postable) {
                return Err(Failed {
                    accepted: chunk[0].index,
                    error,
                });
            }
            for o in chunk {
                match &o.ends_at {
                    None => {
                        self.open.insert(
                            o.labels.clone(),
                            OpenAlert {
                                annotations: o.annotations.clone(),
                                starts_at: o.starts_at.clone(),
                            },
                        );
                    }
                    Some(_) => {
                        self.open.remove(&o.labels);
                    }
                }
            }
        }
        Ok(())
    }

    fn busy(&self) -> bool {
        self.reposting.is_some()
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        let now = Instant::now();
        let (mut queue, started) = match self.reposting.take() {
            Some(under_way) => under_way,
            None if now < self.next_repost => return Ok(()),
            None => (self.open.keys().cloned().collect(), now),
        };
        // One chunk of the open alerts not yet re-posted (those resolved meanwhile are gone
        // from the open set, and skipped).
        let mut taken = Vec::with_capacity(ALERTMANAGER_CHUNK);
        while taken.len() < ALERTMANAGER_CHUNK {
            let Some(labels) = queue.pop_front() else {
                break;
            };
            if self.open.contains_key(&labels) {
                taken.push(labels);
            }
        }
        let posted = {
            let open = &self.open;
            let postable: Vec<PostableAlert<'_>> = taken
                .iter()
                .filter_map(|labels| {
                    let alert = open.get(labels)?;
                    Some(PostableAlert::new(
                        labels,
                        &alert.annotations,
                        &alert.starts_at,
                        None,
                    ))
                })
                .collect();
            if postable.is_empty() {
                Ok(())
            } else {
                let mut body = std::mem::take(&mut self.body);
                body.clear();
                let result = match serde_json::to_writer(&mut body, &postable) {
                    Ok(()) => {
                        self.poster
                            .post(&self.label, &self.url, "application/json", None, &body)
                    }
                    Err(e) => Err(SinkError::Config {
                        sink: self.label.clone(),
                        detail: format!("cannot serialize alerts: {e}"),
                    }),
                };
                self.body = body;
                result
            }
        };
        match posted {
            Ok(()) if queue.is_empty() => {
                self.next_repost = started + self.repost_interval;
                Ok(())
            }
            Ok(()) => {
                self.reposting = Some((queue, started));
                Ok(())
            }
            Err(error) => {
                // The whole re-post starts over, a little later.
                self.next_repost = now + self.repost_interval.min(REPOST_RETRY);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    use serde_json::{json, Value};

    use super::*;
    use crate::alert::testserver::*;

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
            HttpOptions::new(Duration::from_secs(5)),
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
        let mut sink = AlertmanagerSink::new(
            server.url("/am"),
            interval,
            HttpOptions::new(Duration::from_secs(5)),
        );
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

        assert_failed(sink.deliver(&run), 0, 503);
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
        // ...after it, every open alert is posted again, without `endsAt`, a chunk a tick,
        // and new alerts go between the chunks.
        std::thread::sleep(interval);
        sink.tick().expect("re-posted");
        assert!(sink.busy(), "the re-post is under way");
        // Device names sort as strings: dev-999 is the last of the open set.
        let twin = Twin {
            hub: "hub-1",
            device: "dev-999",
            module: None,
        };
        let resolved = event(
            "e#r",
            false,
            &twin,
            &HIGH_RULE,
            "2026-01-02T03:05:00.0000000Z",
            2,
        );
        sink.deliver(&[&resolved]).expect("accepted between chunks");
        sink.tick().expect("re-posted");
        // What is left of the re-post was resolved meanwhile: nothing is posted for it.
        sink.tick().expect("re-posted");
        assert!(!sink.busy());
        let arrays = posted_arrays(&server);
        assert_eq!(arrays.len(), 7);
        assert_eq!(arrays[5].len(), 1);
        assert_eq!(arrays[5][0]["labels"]["device"], "dev-999");
        assert!(arrays[5][0].get("endsAt").is_some());
        let reposted: Vec<&Value> = arrays[4].iter().chain(&arrays[6]).collect();
        assert_eq!(reposted.len(), 1000);
        assert!(reposted.iter().all(|a| a.get("endsAt").is_none()
            && a["startsAt"] == "2026-01-02T03:04:05.0000000Z"
            && a["labels"]["device"] != "dev-999"));
    }

    #[test]
    fn alertmanager_repost_failure_waits_before_trying_again() {
        let server = TestServer::start(vec![503]);
        let interval = Duration::from_millis(100);
        let mut sink = AlertmanagerSink::new(
            server.url("/am"),
            interval,
            HttpOptions::new(Duration::from_secs(5)),
        );
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
            let agent = crate::alert::poster::agent(&HttpOptions::new(Duration::from_millis(500)))
                .expect("an agent");
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
            let mut response =
                crate::alert::poster::agent(&HttpOptions::new(Duration::from_secs(5)))
                    .expect("an agent")
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
        let mut sink = AlertmanagerSink::new(
            am.base_url.clone(),
            interval,
            HttpOptions::new(Duration::from_secs(5)),
        );
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
        let mut restarted = AlertmanagerSink::new(
            am.base_url.clone(),
            interval,
            HttpOptions::new(Duration::from_secs(5)),
        );
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
