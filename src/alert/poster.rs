//! What the HTTP sinks share: the `ureq` agent (keep-alive pool, timeouts, no redirects, TLS
//! with the system's roots and an optional CA file), the POST that turns an answer into a
//! [`SinkError`], and the URL checks and redaction.
//!
//! Credentials never reach an error or a log line: a bearer token is only ever put in a header
//! (marked sensitive), and URLs are shown without their user-info and query.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::http::HeaderValue;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use super::sinks::SinkError;

/// Bytes of an error response's body kept as the error's detail.
const DETAIL_LIMIT: u64 = 512;
/// Bytes of a success response's body read (and dropped) so that its connection can be
/// reused; a receiver that answers more than this only costs a new connection.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// The longest `Retry-After` honoured: a receiver asking for more is asked again then.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How an HTTP sink connects.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// Every request gives up after this long (connect, send and receive together).
    pub timeout: Duration,
    /// A PEM file of CA certificates trusted for https besides the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Connections kept per host (the requests a sink has in flight at once).
    pub connections: usize,
}

impl HttpOptions {
    pub fn new(timeout: Duration) -> HttpOptions {
        HttpOptions {
            timeout,
            ca_file: None,
            connections: 1,
        }
    }
}

/// Why a sink URL cannot be used (see the configuration's check, which this is).
pub use crate::config::sink_url_problem as url_problem;

/// `url` without user-info, query or fragment (see the configuration's, which this is).
pub use crate::config::redacted_url;

/// The TLS configuration: the system's root certificates and those of `ca_file`, with
/// rustls' aws-lc-rs provider (the one the Event Hubs client already uses).
pub fn tls_config(ca_file: Option<&Path>) -> Result<TlsConfig, String> {
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    let native = rustls_native_certs::load_native_certs();
    for cert in &native.certs {
        roots.push(Certificate::from_der(cert.as_ref()).to_owned());
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("reading the CA file {}: {e}", path.display()))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(cert)) => roots.push(cert),
                Ok(_) => {}
                Err(e) => return Err(format!("the CA file {}: {e}", path.display())),
            }
        }
        if roots.len() == before {
            return Err(format!(
                "the CA file {} holds no PEM certificate",
                path.display()
            ));
        }
    } else if roots.is_empty() {
        tracing::warn!(
            errors = native.errors.len(),
            "no system root certificates found: https sinks will fail unless a CA file is given"
        );
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .build())
}

/// An agent whose every request gives up after `options.timeout` (connect, send and receive
/// together), that hands back every status instead of turning 4xx/5xx into errors, and
/// that never follows redirects (a redirected POST would be re-sent as a GET, or with its
/// body to a place nobody configured).
pub fn agent(options: &HttpOptions) -> Result<ureq::Agent, String> {
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(options.timeout))
        .max_redirects(0)
        .max_idle_connections_per_host(options.connections.max(1))
        .max_idle_connections(options.connections.max(1) * 2)
        .tls_config(tls_config(options.ca_file.as_deref())?)
        .user_agent(concat!("twinwatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .into())
}

/// An HTTP sink's client: its agent (shared by the sink's requests in flight), and once the
/// service is stopping, the moment every request must be over by.
#[derive(Clone)]
pub struct Poster {
    agent: ureq::Agent,
    timeout: Duration,
    pub stop_by: Option<Instant>,
    /// Set when the agent could not be built (an unreadable CA file): every POST fails so.
    broken: Option<String>,
}

impl Poster {
    pub fn new(options: &HttpOptions) -> Poster {
        let (agent, broken) = match agent(options) {
            Ok(agent) => (agent, None),
            Err(e) => (
                agent(&HttpOptions {
                    ca_file: None,
                    ..options.clone()
                })
                .unwrap_or_else(|_| ureq::Agent::new_with_defaults()),
                Some(e),
            ),
        };
        Poster {
            agent,
            timeout: options.timeout,
            stop_by: None,
            broken,
        }
    }

    /// POSTs `body` to `url` and succeeds on a 2xx answer. Any other answer is an error with
    /// its status, the start of its body and its `Retry-After`; no answer at all (refused,
    /// reset, timed out, the stop deadline reached) is status 0.
    pub fn post(
        &self,
        sink: &str,
        url: &str,
        content_type: &str,
        authorization: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<(), SinkError> {
        if let Some(problem) = &self.broken {
            return Err(SinkError::Config {
                sink: sink.to_owned(),
                detail: problem.clone(),
            });
        }
        let limit = match self.stop_by {
            None => None,
            Some(stop_by) => {
                let left = stop_by.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(SinkError::Http {
                        sink: sink.to_owned(),
                        status: 0,
                        detail: "not sent: the service's stop deadline has passed".into(),
                        retry_after: None,
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
        retry_after: None,
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
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
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
        retry_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_labels() {
        assert_eq!(
            redacted_url("https://u:p@example.com:8443/a/b?token=x#f"),
            "https://example.com:8443/a/b"
        );
        assert_eq!(redacted_url("http://host"), "http://host");
        assert_eq!(redacted_url("host:1/p"), "host:1/p");
    }

    #[test]
    fn a_token_goes_over_plain_http_only_to_loopback() {
        for ok in [
            "https://example.com/hook",
            "http://127.0.0.1:8080/hook",
            "http://127.3.2.1/",
            "http://[::1]:9/x",
            "http://localhost:9093",
            "http://u:p@127.0.0.1/",
        ] {
            assert_eq!(url_problem(ok, true), None, "{ok}");
        }
        for refused in [
            "http://example.com/hook",
            "http://10.0.0.1/",
            "http://127.0.0.1.example.com/",
            "http://localhost.evil/",
        ] {
            assert!(url_problem(refused, true).is_some(), "{refused}");
            assert_eq!(url_problem(refused, false), None, "{refused}");
        }
        assert!(url_problem("ftp://x/", false).is_some());
        assert!(url_problem("example.com/hook", false).is_some());
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        assert!(tls_config(Some(&missing)).is_err());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"").expect("write");
        let Err(error) = tls_config(Some(&empty)) else {
            panic!("a CA file without a certificate was accepted");
        };
        assert!(error.contains("no PEM certificate"), "{error}");
    }
}
