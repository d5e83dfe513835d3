//! The CloudEvents webhook: alerts POSTed to a URL, in the HTTP binding's batched mode (a JSON
//! array of events, `application/cloudevents-batch+json`, up to a count and a size per
//! request) or, for receivers that need it, its structured mode (one event a request), with a
//! few requests in flight at once on the sink's keep-alive connections.
//!
//! A run is cut into requests in order; up to `in_flight` are sent at once, and the run counts
//! as accepted up to the first request that failed (later ones that succeeded are sent again
//! with the retry: at-least-once, with the same ids, which receivers can use to drop
//! duplicates).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ureq::http::HeaderValue;

use super::poster::{redacted_url, HttpOptions, Poster};
use super::sinks::{Failed, Sink, SinkError};

/// The CloudEvents HTTP binding's structured mode: the whole event is the body.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";
/// Its batched mode: a JSON array of events.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json; charset=utf-8";

/// How alerts go in requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WebhookMode {
    /// A JSON array of up to `max_batch_alerts` alerts and `max_batch_bytes` bytes a request.
    #[default]
    Batched,
    /// One alert a request.
    Structured,
}

/// A webhook's settings.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    pub url: String,
    pub bearer_token: Option<String>,
    pub http: HttpOptions,
    pub mode: WebhookMode,
    /// Alerts per request at most (batched mode).
    pub max_batch_alerts: usize,
    /// Bytes of a request body at most (batched mode); an alert larger than this goes alone.
    pub max_batch_bytes: usize,
    /// Requests sent at once.
    pub in_flight: usize,
}

impl WebhookOptions {
    /// The defaults (the configuration's, `crate::config::DEFAULT_WEBHOOK_*`): batched, 500
    /// alerts or 1 MiB a request, 4 requests in flight.
    pub fn new(url: String, bearer_token: Option<String>, http: HttpOptions) -> WebhookOptions {
        WebhookOptions {
            url,
            bearer_token,
            http,
            mode: WebhookMode::Batched,
            max_batch_alerts: crate::config::DEFAULT_WEBHOOK_BATCH_MAX_ALERTS as usize,
            max_batch_bytes: crate::config::DEFAULT_WEBHOOK_BATCH_MAX_BYTES as usize,
            in_flight: crate::config::DEFAULT_WEBHOOK_IN_FLIGHT as usize,
        }
    }
}

/// The `Authorization` header a webhook sends, prepared once.
enum Authorization {
    None,
    Bearer(HeaderValue),
    /// The configured token cannot be a header value (a control character, say): every
    /// delivery fails, saying so, rather than sending without it.
    Invalid,
}

/// POSTs alerts to a webhook (see the module's documentation).
pub struct WebhookSink {
    url: String,
    /// `webhook <url without credentials>`, naming the sink in errors.
    label: String,
    authorization: Authorization,
    poster: Poster,
    mode: WebhookMode,
    max_batch_alerts: usize,
    max_batch_bytes: usize,
    in_flight: usize,
}

impl WebhookSink {
    pub fn new(options: WebhookOptions) -> WebhookSink {
        let authorization = match options.bearer_token {
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
        let in_flight = options.in_flight.max(1);
        let http = HttpOptions {
            connections: in_flight,
            ..options.http
        };
        WebhookSink {
            label: format!("webhook {}", redacted_url(&options.url)),
            url: options.url,
            authorization,
            poster: Poster::new(&http),
            mode: options.mode,
            max_batch_alerts: options.max_batch_alerts.max(1),
            max_batch_bytes: options.max_batch_bytes.max(1),
            in_flight,
        }
    }

    /// The requests of a run: each the range of alerts it carries.
    fn requests(&self, alerts: &[&[u8]]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        match self.mode {
            WebhookMode::Structured => out.extend((0..alerts.len()).map(|i| i..i + 1)),
            WebhookMode::Batched => {
                let mut start = 0;
                // `[`, `]`, and a comma between alerts.
                let mut bytes = 2;
                for (i, alert) in alerts.iter().enumerate() {
                    let more = alert.len() + usize::from(i > start);
                    if i > start
                        && (i - start >= self.max_batch_alerts
                            || bytes + more > self.max_batch_bytes)
                    {
                        out.push(start..i);
                        start = i;
                        bytes = 2 + alert.len();
                    } else {
                        bytes += more;
                    }
                }
                if start < alerts.len() {
                    out.push(start..alerts.len());
                }
            }
        }
        out
    }

    fn send(&self, alerts: &[&[u8]], authorization: Option<&HeaderValue>) -> Result<(), SinkError> {
        match self.mode {
            WebhookMode::Structured => self.poster.post(
                &self.label,
                &self.url,
                STRUCTURED_CONTENT_TYPE,
                authorization,
                alerts[0],
            ),
            WebhookMode::Batched => {
                let mut body =
                    Vec::with_capacity(alerts.iter().map(|a| a.len() + 1).sum::<usize>() + 2);
                body.push(b'[');
                for (i, alert) in alerts.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(alert);
                }
                body.push(b']');
                self.poster.post(
                    &self.label,
                    &self.url,
                    BATCH_CONTENT_TYPE,
                    authorization,
                    &body,
                )
            }
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

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), Failed> {
        let authorization = match &self.authorization {
            Authorization::None => None,
            Authorization::Bearer(value) => Some(value),
            Authorization::Invalid => {
                return Err(SinkError::Config {
                    sink: self.label.clone(),
                    detail: "the bearer token is not a valid HTTP header value".into(),
                }
                .into())
            }
        };
        let requests = self.requests(alerts);
        if requests.is_empty() {
            return Ok(());
        }
        // Each request's outcome; the first failure in request order decides.
        let outcomes: Vec<Mutex<Option<Result<(), SinkError>>>> =
            requests.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let work = || loop {
            // After a failure no new request starts: those after it would be sent again.
            if failed.load(Ordering::SeqCst) {
                return;
            }
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(range) = requests.get(i) else {
                return;
            };
            let result = self.send(&alerts[range.clone()], authorization);
            if result.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            if let Ok(mut slot) = outcomes[i].lock() {
                *slot = Some(result);
            }
        };
        let workers = self.in_flight.min(requests.len());
        if workers == 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 1..workers {
                    scope.spawn(work);
                }
                work();
            });
        }
        for (range, outcome) in requests.iter().zip(outcomes) {
            match outcome.into_inner().ok().flatten() {
                Some(Ok(())) => {}
                Some(Err(error)) => {
                    return Err(Failed {
                        accepted: range.start,
                        error,
                    })
                }
                // Not sent: a request before it failed, and is found first.
                None => {
                    return Err(Failed {
                        accepted: range.start,
                        error: SinkError::Http {
                            sink: self.label.clone(),
                            status: 0,
                            detail: "not sent after an earlier request failed".into(),
                            retry_after: None,
                        },
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::alert::testserver::*;
    use crate::compliance::wire::CloudEvent;

    fn sink(url: String, token: Option<&str>, mode: WebhookMode) -> WebhookSink {
        let mut options = WebhookOptions::new(
            url,
            token.map(str::to_owned),
            HttpOptions::new(Duration::from_secs(5)),
        );
        options.mode = mode;
        // One at a time: the scripted answers go to requests in a known order.
        options.in_flight = 1;
        WebhookSink::new(options)
    }

    fn alerts(n: usize, prefix: &str) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                event(
                    &format!("{prefix}#{i}"),
                    true,
                    &DEVICE_TWIN,
                    &HIGH_RULE,
                    &ago(10),
                    i as i64,
                )
            })
            .collect()
    }

    fn ids(server: &TestServer) -> Vec<String> {
        server
            .received()
            .iter()
            .flat_map(|r| CloudEvent::parse_body(&r.body).expect("CloudEvents"))
            .map(|e| e.id)
            .collect()
    }

    #[test]
    fn structured_webhook_fails_while_the_server_fails_then_delivers_each_alert_in_order() {
        let server = TestServer::start(vec![503, 503]);
        let token = "s3cr3t-token";
        let mut sink = sink(
            server.url("/hooks/twinwatch"),
            Some(token),
            WebhookMode::Structured,
        );
        let alerts = [
            event("src#1.0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(30), 4),
            event("src#1.1", true, &MODULE_TWIN, &LOW_RULE, &ago(30), 9),
            event("src#2.0", false, &DEVICE_TWIN, &HIGH_RULE, &ago(20), 5),
        ];
        let run: Vec<&[u8]> = alerts.iter().map(Vec::as_slice).collect();
        for _ in 0..2 {
            let error = sink.deliver(&run).expect_err("the server answers 503");
            assert_eq!(error.accepted, 0);
            assert_eq!(error.error.kind(), "server_error");
            assert!(!error.error.is_permanent());
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
                Some(STRUCTURED_CONTENT_TYPE)
            );
            assert_eq!(request.header("authorization"), Some("Bearer s3cr3t-token"));
        }
    }

    #[test]
    fn batched_webhook_sends_arrays_within_the_count_and_size_limits() {
        let server = TestServer::start(vec![]);
        let mut options = WebhookOptions::new(
            server.url("/"),
            None,
            HttpOptions::new(Duration::from_secs(5)),
        );
        options.max_batch_alerts = 4;
        let events = alerts(10, "b");
        let one = events[0].len();
        // Room for three alerts a request: the size, not the count, cuts.
        options.max_batch_bytes = 2 + 3 * one + 2 + 5;
        options.in_flight = 1;
        let mut sink = WebhookSink::new(options);
        let run: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
        sink.deliver(&run).expect("accepted");
        let received = server.received();
        let sizes: Vec<usize> = received
            .iter()
            .map(|r| {
                assert_eq!(r.header("content-type"), Some(BATCH_CONTENT_TYPE));
                CloudEvent::parse_body(&r.body).expect("an array").len()
            })
            .collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
        let expected: Vec<String> = (0..10).map(|i| format!("b#{i}")).collect();
        assert_eq!(ids(&server), expected);
        // The count cuts when the size allows more.
        let server = TestServer::start(vec![]);
        let mut options = WebhookOptions::new(
            server.url("/"),
            None,
            HttpOptions::new(Duration::from_secs(5)),
        );
        options.max_batch_alerts = 4;
        let mut sink = WebhookSink::new(options);
        sink.deliver(&run).expect("accepted");
        let mut sizes: Vec<usize> = server
            .received()
            .iter()
            .map(|r| CloudEvent::parse_body(&r.body).expect("an array").len())
            .collect();
        sizes.sort();
        assert_eq!(sizes, [2, 4, 4]);
    }

    /// A refused request: the failure says how many alerts of the run were accepted before
    /// it (the requests before it), and that it is permanent.
    #[test]
    fn batched_webhook_reports_the_accepted_prefix_and_a_permanent_refusal() {
        let script: Script = Arc::new(|_, request: &Received| {
            let events = CloudEvent::parse_body(&request.body).expect("CloudEvents");
            if events.iter().any(|e| e.id == "r#5") {
                (422, Vec::new(), "rule refused".into())
            } else {
                answer(200)
            }
        });
        let server = TestServer::scripted(script, Duration::ZERO, None);
        let mut options = WebhookOptions::new(
            server.url("/"),
            None,
            HttpOptions::new(Duration::from_secs(5)),
        );
        options.max_batch_alerts = 2;
        options.in_flight = 3;
        let mut sink = WebhookSink::new(options);
        let events = alerts(8, "r");
        let run: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
        let error = sink.deliver(&run).expect_err("refused");
        assert_eq!(error.accepted, 4);
        assert!(error.error.is_permanent());
        assert!(error.error.to_string().contains("rule refused"));
    }

    #[test]
    fn retry_after_is_read_from_a_throttling_answer() {
        let script: Script = Arc::new(|_, _: &Received| {
            (
                429,
                vec![("Retry-After".into(), "7".into())],
                "slow down".into(),
            )
        });
        let server = TestServer::scripted(script, Duration::ZERO, None);
        let mut sink = sink(server.url("/"), None, WebhookMode::Batched);
        let events = alerts(1, "t");
        let error = sink.deliver(&[&events[0]]).expect_err("throttled");
        assert_eq!(error.error.kind(), "throttled");
        assert_eq!(error.error.retry_after(), Some(Duration::from_secs(7)));
        assert!(!error.error.is_permanent());
    }

    /// https with the receiver's own CA given as the sink's CA file; without it the
    /// receiver's certificate is not trusted, and the token is never sent.
    #[test]
    fn webhook_over_tls_with_its_own_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, config) = test_ca(dir.path());
        let server = TestServer::scripted(
            Arc::new(|_, _: &Received| answer(200)),
            Duration::ZERO,
            Some(config),
        );
        let url = server.url("/tls");
        assert!(url.starts_with("https://"));
        let events = alerts(3, "s");
        let run: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();

        let mut untrusting = sink(url.clone(), Some("t0k3n"), WebhookMode::Batched);
        let error = untrusting.deliver(&run).expect_err("an unknown CA");
        assert_eq!(error.error.kind(), "unreachable", "{error}");
        assert!(server.received().is_empty());

        let mut http = HttpOptions::new(Duration::from_secs(5));
        http.ca_file = Some(ca);
        let mut trusting = WebhookSink::new(WebhookOptions::new(url, Some("t0k3n".into()), http));
        trusting.deliver(&run).expect("delivered over TLS");
        let received = server.received();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].header("authorization"), Some("Bearer t0k3n"));
        assert_eq!(ids(&server), ["s#0", "s#1", "s#2"]);
    }

    #[test]
    fn webhook_times_out_against_a_server_that_never_answers() {
        // Connections complete in the kernel's backlog; nobody ever reads or answers.
        let silent = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let url = format!("http://{}/", silent.local_addr().expect("bound"));
        let timeout = Duration::from_millis(300);
        let mut sink = WebhookSink::new(WebhookOptions::new(
            url,
            Some("t".into()),
            HttpOptions::new(timeout),
        ));
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let started = Instant::now();
        let result = sink.deliver(&[&alert]);
        let elapsed = started.elapsed();
        let detail = assert_failed(result, 0, 0);
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
        let mut sink = sink(
            format!("http://user:password@127.0.0.1:{port}/hook?key=secret"),
            None,
            WebhookMode::Batched,
        );
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let error = sink.deliver(&[&alert]).expect_err("nothing listens").error;
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
        let mut sink = sink(
            "user:secret@example.com/hook".into(),
            None,
            WebhookMode::Batched,
        );
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let error = sink.deliver(&[&alert]).expect_err("not a URL").error;
        let text = error.to_string();
        assert_eq!(error.kind(), "unreachable");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn webhook_with_an_impossible_token_fails_without_sending() {
        let server = TestServer::start(vec![]);
        let mut sink = sink(server.url("/"), Some("line\nbreak"), WebhookMode::Batched);
        let alert = event("x#0", true, &DEVICE_TWIN, &HIGH_RULE, &ago(1), 1);
        let error = sink.deliver(&[&alert]).expect_err("no token").error;
        assert_eq!(error.kind(), "config");
        assert!(!error.is_permanent());
        assert!(error.to_string().contains("bearer token"), "{error}");
        assert!(server.received().is_empty());
    }
}
