//! IoT Hub's service API, the part a seed pass needs: the connection string
//! ([`ConnectionString`]), shared access signatures ([`sas`]) and a blocking client of the twin
//! query, `POST /devices/query` ([`QueryClient`]); reference `iothub-query.md`, contract
//! `docs/semantics.md` §7.
//!
//! The client only fetches: it hands each page's bytes, exactly as received, to its caller and
//! knows nothing of twins, the snapshot or the policy. It waits and retries where the hub asks
//! it to (429 with `Retry-After`, 503, a dropped connection), a bounded number of times per
//! page, and stops at once on anything else (401/403 above all: a wrong key is never retried).
//!
//! Promises: the key never appears in an error, a log line or a `Debug` output; no request is
//! sent anywhere but the endpoint configured (`https://<HostName>`, or the one given); the
//! continuation token is sent back exactly as received.

mod connection;
// The client and the signatures need the `service` feature's crates; the connection string
// (which the configuration parses) does not.
#[cfg(feature = "service")]
mod query;
#[cfg(feature = "service")]
pub mod sas;

#[cfg(all(test, feature = "service"))]
mod tests;

pub use connection::ConnectionString;
#[cfg(feature = "service")]
pub use query::{QueryClient, QueryEvent, QueryOptions, QueryStats, API_VERSION};

/// Twins asked for per page of the twin query (`x-ms-max-item-count`) unless told otherwise
/// (`twinwatch seed --page-size`, `seed.page_size`).
pub const DEFAULT_PAGE_SIZE: u32 = 1000;
/// The most twins a page may be asked for.
pub const MAX_PAGE_SIZE: u32 = 10_000;

use std::path::PathBuf;

/// What went wrong speaking to the hub.
#[derive(Debug, thiserror::Error)]
pub enum IotHubError {
    #[error("bad IoT Hub connection string: {reason}")]
    BadConnectionString { reason: String },
    #[error("bad IoT Hub endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("cannot use CA certificate file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "IoT Hub {hub} refused the credentials (HTTP {status}): check the connection string's \
         SharedAccessKeyName and SharedAccessKey, and that the policy has the registry read permission"
    )]
    Unauthorized { hub: String, status: u16 },
    #[error("IoT Hub {hub} is still throttling after {attempts} attempts (HTTP 429)")]
    Throttled { hub: String, attempts: u32 },
    #[error("IoT Hub {hub} is still unavailable after {attempts} attempts (HTTP {status})")]
    Unavailable {
        hub: String,
        status: u16,
        attempts: u32,
    },
    #[error("cannot reach IoT Hub {hub} after {attempts} attempts: {detail}")]
    Transport {
        hub: String,
        attempts: u32,
        detail: String,
    },
    #[error("TLS with IoT Hub {hub} failed: {detail}")]
    Tls { hub: String, detail: String },
    #[error("IoT Hub {hub} answered HTTP {status}: {detail}")]
    Status {
        hub: String,
        status: u16,
        detail: String,
    },
    #[error("IoT Hub {hub} sent a response that is not a page of twins: {detail}")]
    BadResponse { hub: String, detail: String },
    #[error("the query of IoT Hub {hub} was cancelled")]
    Cancelled { hub: String },
}

impl IotHubError {
    /// A bounded label for metrics and summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            IotHubError::BadConnectionString { .. } => "bad_connection_string",
            IotHubError::BadEndpoint { .. } => "bad_endpoint",
            IotHubError::CaFile { .. } => "ca_file",
            IotHubError::Unauthorized { .. } => "unauthorized",
            IotHubError::Throttled { .. } => "throttled",
            IotHubError::Unavailable { .. } => "unavailable",
            IotHubError::Transport { .. } => "transport",
            IotHubError::Tls { .. } => "tls",
            IotHubError::Status { .. } => "http_status",
            IotHubError::BadResponse { .. } => "bad_response",
            IotHubError::Cancelled { .. } => "cancelled",
        }
    }

    /// Whether running the pass again later may succeed without anyone changing anything
    /// (the hub was busy or unreachable); the others need a fix to the configuration, the
    /// credentials or the hub.
    pub fn is_retryable(&self) -> bool {
        match self {
            IotHubError::Throttled { .. }
            | IotHubError::Unavailable { .. }
            | IotHubError::Transport { .. }
            | IotHubError::Cancelled { .. } => true,
            IotHubError::Status { status, .. } => *status >= 500,
            IotHubError::BadConnectionString { .. }
            | IotHubError::BadEndpoint { .. }
            | IotHubError::CaFile { .. }
            | IotHubError::Unauthorized { .. }
            | IotHubError::Tls { .. }
            | IotHubError::BadResponse { .. } => false,
        }
    }
}

/// What ended a query run: the hub, or the caller's page handler.
#[derive(Debug, thiserror::Error)]
pub enum QueryError<E> {
    #[error(transparent)]
    Hub(#[from] IotHubError),
    /// `on_page` returned this error; the run stopped there.
    #[error("{0}")]
    Page(E),
}

impl<E> QueryError<E> {
    /// A bounded label: the hub error's kind, or `page_handler`.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::Hub(error) => error.kind(),
            QueryError::Page(_) => "page_handler",
        }
    }

    /// See [`IotHubError::is_retryable`]; a page handler's error is not (the caller knows).
    pub fn is_retryable(&self) -> bool {
        match self {
            QueryError::Hub(error) => error.is_retryable(),
            QueryError::Page(_) => false,
        }
    }
}
