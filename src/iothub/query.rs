//! The blocking twin query client: `POST {endpoint}/devices/query`, page by page.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

use super::{sas, ConnectionString, IotHubError, QueryError};

/// The REST API version sent with every query (the one Microsoft's service clients use).
pub const API_VERSION: &str = "2021-04-12";

/// Bytes of a page read at most: a 1,000-twin page of large twins is a few MiB; this bounds
/// memory against a misbehaving endpoint.
const PAGE_LIMIT: u64 = 256 * 1024 * 1024;
/// Bytes of an error response kept as the error's detail.
const DETAIL_LIMIT: u64 = 512;
/// How often a wait looks at the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// How the client connects and retries.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// Replaces `https://<HostName>`: an emulator, a private endpoint, a proxy. Plain `http://`
    /// is allowed (the signature still travels in the clear then: loopback only).
    pub endpoint: Option<String>,
    /// `x-ms-max-item-count`: twins asked for per page (the hub may send fewer).
    pub page_size: u32,
    /// A PEM file of extra CA certificates to trust besides the system's (an emulator's).
    pub ca_file: Option<PathBuf>,
    /// Retries of one page after a 429, a 503 or a dropped connection, before the run fails.
    pub max_retries: u32,
    /// Timeout of one request (connect, send, receive).
    pub timeout: Duration,
    /// The first wait after a 503 or a dropped connection (doubled each time up to
    /// `max_backoff`); a 429's own `Retry-After` takes precedence.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts, `Retry-After` included.
    pub max_backoff: Duration,
    /// How long each signature is valid (a new one is made for every request).
    pub token_lifetime: Duration,
    /// When set and true, the run stops (with [`IotHubError::Cancelled`]) before its next
    /// request or during a wait.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for QueryOptions {
    fn default() -> Self {
        QueryOptions {
            endpoint: None,
            page_size: super::DEFAULT_PAGE_SIZE,
            ca_file: None,
            max_retries: 10,
            timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(120),
            token_lifetime: Duration::from_secs(3600),
            cancel: None,
        }
    }
}

/// Progress of a run, for progress bars, logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryEvent {
    /// Page `page` (from 0) was read and handed over: `bytes` long; `more` when a
    /// continuation token came with it.
    PageRead { page: u64, bytes: usize, more: bool },
    /// The hub answered 429: waiting `wait` before attempt `attempt` (from 1) of the page.
    Throttled { wait: Duration, attempt: u32 },
    /// A 503 or a dropped connection (`cause`): waiting `wait` before retry `attempt`.
    Retrying {
        cause: String,
        wait: Duration,
        attempt: u32,
    },
}

/// What a complete run read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryStats {
    pub pages: u64,
    pub bytes: u64,
    /// 429 answers waited out.
    pub throttled: u64,
    /// Other retries (503, dropped connections).
    pub retries: u64,
    /// Time spent waiting before retries.
    pub waited: Duration,
}

/// A client of one hub's twin query. Cheap to share by reference; holds a pool of
/// keep-alive connections.
pub struct QueryClient {
    agent: ureq::Agent,
    url: String,
    host_name: String,
    hub: String,
    key_name: String,
    key: Vec<u8>,
    options: QueryOptions,
}

impl std::fmt::Debug for QueryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryClient")
            .field("url", &self.url)
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

/// The outcome of one attempt at a page.
enum Attempt {
    Page {
        body: Vec<u8>,
        continuation: Option<String>,
    },
    /// Wait (the hub's `Retry-After` when it gave one) and try again.
    Again {
        throttled: bool,
        retry_after: Option<Duration>,
        cause: String,
        status: Option<u16>,
    },
}

impl QueryClient {
    /// A client for the hub of `conn`.
    ///
    /// # Errors
    ///
    /// [`IotHubError::BadEndpoint`] for an endpoint that is not an `http://` or `https://`
    /// URL; [`IotHubError::CaFile`] for a CA file that cannot be read or holds no certificate.
    pub fn new(conn: &ConnectionString, options: QueryOptions) -> Result<QueryClient, IotHubError> {
        let base = match &options.endpoint {
            Some(endpoint) => {
                let trimmed = endpoint.trim().trim_end_matches('/');
                let host = trimmed
                    .strip_prefix("https://")
                    .or_else(|| trimmed.strip_prefix("http://"));
                match host {
                    Some(host) if !host.is_empty() && !host.contains(['?', '#', '@']) => {
                        trimmed.to_string()
                    }
                    _ => {
                        return Err(IotHubError::BadEndpoint {
                            endpoint: endpoint.clone(),
                            reason: "expected http://HOST[:PORT][/PATH] or https://...".into(),
                        })
                    }
                }
            }
            None => format!("https://{}", conn.host_name()),
        };
        if options.page_size == 0 {
            return Err(IotHubError::BadEndpoint {
                endpoint: base,
                reason: "the page size must be at least 1".into(),
            });
        }
        let tls = tls_config(options.ca_file.as_deref())?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(options.timeout))
            .max_redirects(0)
            .user_agent(concat!("twinwatch/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build()
            .into();
        Ok(QueryClient {
            agent,
            url: format!("{base}/devices/query?api-version={API_VERSION}"),
            host_name: conn.host_name().to_string(),
            hub: conn.hub_name().to_string(),
            key_name: conn.key_name().to_string(),
            key: conn.key().to_vec(),
            options,
        })
    }

    /// The URL every query is posted to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `query` to its last page; calls `on_page` with each page's raw response body (the
    /// JSON array bytes exactly as received) in order, and `on_event` with progress (page
    /// read, throttled and waiting, retrying). Returns the stats, or the error that ended it
    /// (then the pass is incomplete: the pages already handed over were all there was).
    pub fn run_query<E>(
        &self,
        query: &str,
        on_page: &mut dyn FnMut(&[u8]) -> Result<(), E>,
        on_event: &mut dyn FnMut(QueryEvent),
    ) -> Result<QueryStats, QueryError<E>> {
        let body = serde_json::json!({ "query": query }).to_string();
        let mut stats = QueryStats::default();
        let mut continuation: Option<String> = None;
        loop {
            let mut attempt = 0u32;
            let (page, next) = loop {
                self.check_cancelled()?;
                match self.attempt(&body, continuation.as_deref())? {
                    Attempt::Page { body, continuation } => break (body, continuation),
                    Attempt::Again {
                        throttled,
                        retry_after,
                        cause,
                        status,
                    } => {
                        attempt += 1;
                        if attempt > self.options.max_retries {
                            let attempts = attempt;
                            let hub = self.hub.clone();
                            return Err(QueryError::Hub(match (throttled, status) {
                                (true, _) => IotHubError::Throttled { hub, attempts },
                                (false, Some(status)) => IotHubError::Unavailable {
                                    hub,
                                    status,
                                    attempts,
                                },
                                (false, None) => IotHubError::Transport {
                                    hub,
                                    attempts,
                                    detail: cause,
                                },
                            }));
                        }
                        let wait = retry_after
                            .unwrap_or_else(|| self.backoff(attempt))
                            .min(self.options.max_backoff);
                        if throttled {
                            stats.throttled += 1;
                            on_event(QueryEvent::Throttled { wait, attempt });
                        } else {
                            stats.retries += 1;
                            on_event(QueryEvent::Retrying {
                                cause,
                                wait,
                                attempt,
                            });
                        }
                        tracing::debug!(hub = %self.hub, attempt, wait_ms = wait.as_millis() as u64, throttled, "waiting before retrying a query page");
                        self.sleep(wait)?;
                        stats.waited += wait;
                    }
                }
            };
            on_page(&page).map_err(QueryError::Page)?;
            on_event(QueryEvent::PageRead {
                page: stats.pages,
                bytes: page.len(),
                more: next.is_some(),
            });
            stats.pages += 1;
            stats.bytes += page.len() as u64;
            match next {
                Some(token) => continuation = Some(token),
                None => return Ok(stats),
            }
        }
    }

    fn attempt(&self, body: &str, continuation: Option<&str>) -> Result<Attempt, IotHubError> {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.options.token_lifetime)
            .as_secs();
        let token = sas::token(&self.host_name, &self.key_name, &self.key, expiry);
        let mut request = self
            .agent
            .post(&self.url)
            .header("Authorization", &token)
            .header("Content-Type", "application/json; charset=utf-8")
            .header("Accept", "application/json")
            .header("x-ms-max-item-count", self.options.page_size.to_string());
        if let Some(token) = continuation {
            request = request.header("x-ms-continuation", token);
        }
        let mut response = match request.send(body.as_bytes()) {
            Ok(response) => response,
            Err(error) => return self.transport_error(error),
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        match status {
            200 => {
                let continuation = header("x-ms-continuation").filter(|t| !t.is_empty());
                let body = match response
                    .body_mut()
                    .with_config()
                    .limit(PAGE_LIMIT)
                    .read_to_vec()
                {
                    Ok(body) => body,
                    Err(ureq::Error::BodyExceedsLimit(limit)) => {
                        return Err(IotHubError::BadResponse {
                            hub: self.hub.clone(),
                            detail: format!("a page larger than {limit} bytes"),
                        })
                    }
                    Err(error) => return self.transport_error(error),
                };
                let first = body.iter().find(|b| !b.is_ascii_whitespace());
                if first != Some(&b'[') {
                    return Err(IotHubError::BadResponse {
                        hub: self.hub.clone(),
                        detail: "the body is not a JSON array".into(),
                    });
                }
                Ok(Attempt::Page { body, continuation })
            }
            401 | 403 => Err(IotHubError::Unauthorized {
                hub: self.hub.clone(),
                status,
            }),
            429 | 503 => {
                let retry_after = header("retry-after").and_then(|v| parse_retry_after(&v));
                drain(&mut response);
                Ok(Attempt::Again {
                    throttled: status == 429,
                    retry_after,
                    cause: format!("HTTP {status}"),
                    status: Some(status),
                })
            }
            _ => {
                let detail = response
                    .body_mut()
                    .with_config()
                    .limit(DETAIL_LIMIT)
                    .read_to_vec()
                    .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                    .unwrap_or_default();
                Err(IotHubError::Status {
                    hub: self.hub.clone(),
                    status,
                    detail: if detail.is_empty() {
                        "no detail".into()
                    } else {
                        detail
                    },
                })
            }
        }
    }

    /// A dropped connection or a timeout is worth another attempt; an endpoint that does not
    /// resolve, a bad URL or a TLS failure is not.
    fn transport_error(&self, error: ureq::Error) -> Result<Attempt, IotHubError> {
        // rustls' errors (an untrusted certificate, a name mismatch) reach ureq as IO errors.
        if let ureq::Error::Io(io) = &error {
            if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                return Err(IotHubError::Tls {
                    hub: self.hub.clone(),
                    detail: tls.to_string(),
                });
            }
        }
        match error {
            ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_) => Ok(Attempt::Again {
                throttled: false,
                retry_after: None,
                cause: error.to_string(),
                status: None,
            }),
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) => Err(IotHubError::Tls {
                hub: self.hub.clone(),
                detail: error.to_string(),
            }),
            ureq::Error::BadUri(_) => Err(IotHubError::BadEndpoint {
                endpoint: self.url.clone(),
                reason: error.to_string(),
            }),
            other => Err(IotHubError::Transport {
                hub: self.hub.clone(),
                attempts: 1,
                detail: other.to_string(),
            }),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.options.initial_backoff.saturating_mul(factor)
    }

    fn check_cancelled(&self) -> Result<(), IotHubError> {
        match &self.options.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(IotHubError::Cancelled {
                hub: self.hub.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn sleep(&self, wait: Duration) -> Result<(), IotHubError> {
        let until = Instant::now() + wait;
        loop {
            self.check_cancelled()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(CANCEL_POLL));
        }
    }
}

/// Reads a little of a response so that its connection can be reused.
fn drain(response: &mut ureq::http::Response<ureq::Body>) {
    let _ = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_vec();
}

/// `Retry-After` in seconds (fractions allowed). The HTTP-date form is not used by IoT Hub
/// and is ignored (the backoff applies then).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)))
}

/// TLS for the hub: the system's CA certificates plus those of `ca_file`, with the
/// aws-lc-rs provider the rest of the binary already uses (Mozilla's roots when the system has
/// none).
fn tls_config(ca_file: Option<&Path>) -> Result<TlsConfig, IotHubError> {
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    let native = rustls_native_certs::load_native_certs();
    for cert in &native.certs {
        roots.push(Certificate::from_der(cert.as_ref()).to_owned());
    }
    if let Some(path) = ca_file {
        let ca_error = |reason: String| IotHubError::CaFile {
            path: path.to_path_buf(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        let mut added = 0usize;
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(cert)) => {
                    roots.push(cert);
                    added += 1;
                }
                Ok(_) => {}
                Err(error) => return Err(ca_error(error.to_string())),
            }
        }
        if added == 0 {
            return Err(ca_error("no PEM certificate in it".into()));
        }
    }
    let root_certs = if roots.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::Specific(Arc::new(roots))
    };
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(root_certs)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .build())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn retry_after_is_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        let conn = ConnectionString::new("contoso-hub.azure-devices.net", "p", vec![1]);
        let with = |endpoint: Option<&str>| QueryOptions {
            endpoint: endpoint.map(str::to_owned),
            ..QueryOptions::default()
        };
        let client = QueryClient::new(&conn, with(None)).expect("default endpoint");
        assert_eq!(
            client.url(),
            "https://contoso-hub.azure-devices.net/devices/query?api-version=2021-04-12"
        );
        let client = QueryClient::new(&conn, with(Some("http://127.0.0.1:8080/"))).expect("http");
        assert_eq!(
            client.url(),
            "http://127.0.0.1:8080/devices/query?api-version=2021-04-12"
        );
        for bad in ["127.0.0.1:8080", "ftp://x", "https://", "https://u@h"] {
            let error = QueryClient::new(&conn, with(Some(bad))).expect_err(bad);
            assert_eq!(error.kind(), "bad_endpoint", "{bad}");
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, "not a certificate\n").expect("write");
        let error = tls_config(Some(&file)).expect_err("no certificate");
        assert_eq!(error.kind(), "ca_file");
        let error = tls_config(Some(&dir.path().join("missing.pem"))).expect_err("missing");
        assert!(error.to_string().contains("missing.pem"), "{error}");
    }
}
