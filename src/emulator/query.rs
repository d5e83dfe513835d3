//! IoT Hub's twin query, emulated: `POST /devices/query` over HTTPS (a certificate it
//! generates, signed by a CA it generates) and plain HTTP, serving the twin documents it was
//! given (a documents file, or the generated fleet's), as the hub does (reference
//! `iothub-query.md`):
//!
//! - every request must carry a shared access signature for the emulator's host name, signed
//!   with its key by its policy (401 otherwise, as the hub answers a wrong key);
//! - `SELECT * FROM devices` answers the device twins, `SELECT * FROM devices.modules` the
//!   module twins (keywords in any case, any spacing); any other query is a 400;
//! - pages hold `x-ms-max-item-count` documents (100 when absent, at most 1,000), with
//!   `x-ms-item-type: twin` and an opaque `x-ms-continuation` token while more remain;
//! - faults for tests ([`QueryFault`]): 429 with `Retry-After`, any status (500, 503), or a
//!   connection dropped without an answer, for the next requests in order; in process
//!   ([`QueryEmulator::inject`]) or over HTTP (`POST /_emulator/faults`, for a child process).
//!
//! Documents are kept as compact JSON bytes and sent as they are: the emulator does not
//! interpret a twin beyond telling device twins from module twins (a non-empty string
//! `moduleId`), so a test can serve documents that a seed pass must dead-letter.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::iothub::{sas, ConnectionString};

/// The policy name of the connection string the emulator prints.
pub const DEFAULT_POLICY: &str = "registryRead";
/// The key of the connection string the emulator prints (base64 of
/// `twinwatch-emulator-registry-read`): an emulator's key is no secret.
pub const DEFAULT_KEY: &[u8] = b"twinwatch-emulator-registry-read";
/// Page size when a request names none (the hub's default).
const DEFAULT_PAGE: usize = 100;
/// The largest page served, whatever a request asks.
const MAX_PAGE: usize = 1000;
/// Bytes of a query request body read at most.
const REQUEST_LIMIT: usize = 64 * 1024;
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Twin documents as the query returns them: device twins and module twins, each in the
/// order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TwinDocuments {
    devices: Vec<Vec<u8>>,
    modules: Vec<Vec<u8>>,
}

impl TwinDocuments {
    /// An empty set.
    pub fn new() -> TwinDocuments {
        TwinDocuments::default()
    }

    /// Adds one document: a module twin when it has a non-empty string `moduleId`, else a
    /// device twin (whatever else it is, so that bad documents can be served too).
    pub fn push(&mut self, document: &serde_json::Value) {
        let is_module = document
            .get("moduleId")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|m| !m.is_empty());
        // Serialising a `Value` cannot fail.
        let bytes = serde_json::to_vec(document).expect("a JSON value serialises");
        if is_module {
            self.modules.push(bytes);
        } else {
            self.devices.push(bytes);
        }
    }

    /// The twins of the generated fleet after its first `as_of_event` messages (see
    /// [`crate::generate::documents`]).
    pub fn generated(
        options: &crate::generate::GenerateOptions,
        as_of_event: u64,
    ) -> TwinDocuments {
        let mut documents = TwinDocuments::new();
        crate::generate::documents::twin_documents(
            options,
            Some(as_of_event),
            |json, is_module| {
                // The generator's documents are compact JSON objects already.
                if is_module {
                    documents.modules.push(json.to_vec());
                } else {
                    documents.devices.push(json.to_vec());
                }
            },
        );
        documents
    }

    /// Parses a documents file: one JSON array (as `az iot hub query` prints), or one
    /// document per line (blank lines skipped).
    ///
    /// # Errors
    ///
    /// A message naming the line (or the array) that is not JSON.
    pub fn parse(bytes: &[u8]) -> Result<TwinDocuments, String> {
        let mut documents = TwinDocuments::new();
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'[') {
            let array: Vec<serde_json::Value> =
                serde_json::from_slice(bytes).map_err(|e| format!("not a JSON array: {e}"))?;
            for document in &array {
                documents.push(document);
            }
            return Ok(documents);
        }
        for (number, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let document: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| format!("line {}: not JSON: {e}", number + 1))?;
            documents.push(&document);
        }
        Ok(documents)
    }

    /// [`TwinDocuments::parse`] of a file.
    pub fn read(path: &Path) -> Result<TwinDocuments, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        TwinDocuments::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Device twins.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Module twins.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    fn of(&self, collection: Collection) -> &[Vec<u8>] {
        match collection {
            Collection::Devices => &self.devices,
            Collection::Modules => &self.modules,
        }
    }
}

/// What a query selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collection {
    Devices,
    Modules,
}

impl Collection {
    fn of_query(query: &str) -> Option<Collection> {
        let words: Vec<String> = query
            .split_whitespace()
            .map(str::to_ascii_uppercase)
            .collect();
        match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["SELECT", "*", "FROM", "DEVICES"] => Some(Collection::Devices),
            ["SELECT", "*", "FROM", "DEVICES.MODULES"] => Some(Collection::Modules),
            _ => None,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Collection::Devices => "d",
            Collection::Modules => "m",
        }
    }
}

/// A fault served instead of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryFault {
    /// `429 Too Many Requests` with `Retry-After: <seconds>`.
    Throttle { retry_after_secs: u32 },
    /// This status (say 500 or 503) with an IoT Hub error body.
    Status(u16),
    /// Close the connection without answering.
    Drop,
}

/// Where and as whom the emulator serves.
#[derive(Debug, Clone)]
pub struct QueryEmulatorConfig {
    /// HTTPS listener (port 0: any free port); `None`: no HTTPS.
    pub https_listen: Option<SocketAddr>,
    /// Plain HTTP listener; `None`: no HTTP.
    pub http_listen: Option<SocketAddr>,
    /// The hub's host name: what tokens are signed for and the connection string's
    /// `HostName`; `<hub>.azure-devices.net` by [`QueryEmulatorConfig::new`]. It is also in
    /// the certificate, with `localhost`, `127.0.0.1` and `::1`.
    pub host_name: String,
    /// The shared access policy's name.
    pub policy: String,
    /// The policy's key (raw bytes; the connection string carries it in base64).
    pub key: Vec<u8>,
}

impl QueryEmulatorConfig {
    /// Hub `hub` on an HTTPS listener at `https_listen`, with the default policy and key.
    pub fn new(
        hub: &str,
        https_listen: Option<SocketAddr>,
        http_listen: Option<SocketAddr>,
    ) -> Self {
        QueryEmulatorConfig {
            https_listen,
            http_listen,
            host_name: format!("{hub}.azure-devices.net"),
            policy: DEFAULT_POLICY.to_string(),
            key: DEFAULT_KEY.to_vec(),
        }
    }
}

struct State {
    host_name: String,
    policy: String,
    key: Vec<u8>,
    twins: RwLock<Arc<TwinDocuments>>,
    /// One entry per coming authorised query request: `None` answers, `Some` faults.
    faults: Mutex<VecDeque<Option<QueryFault>>>,
    queries: AtomicU64,
    pages: AtomicU64,
    refused: AtomicU64,
}

/// A running twin query emulator.
pub struct QueryEmulator {
    state: Arc<State>,
    https_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    ca_pem: String,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl QueryEmulator {
    /// Generates a CA and a server certificate, binds the listeners and serves `twins` in the
    /// background on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// `InvalidInput` without any listener or for an empty host name; certificate generation
    /// and binding errors.
    pub async fn start(
        config: QueryEmulatorConfig,
        twins: TwinDocuments,
    ) -> std::io::Result<QueryEmulator> {
        if config.https_listen.is_none() && config.http_listen.is_none() {
            return Err(invalid_input("neither an HTTPS nor an HTTP listener"));
        }
        if config.host_name.is_empty() || config.key.is_empty() {
            return Err(invalid_input("the host name and the key must not be empty"));
        }
        let (ca_pem, acceptor) = certificates(&config.host_name)?;
        let state = Arc::new(State {
            host_name: config.host_name,
            policy: config.policy,
            key: config.key,
            twins: RwLock::new(Arc::new(twins)),
            faults: Mutex::new(VecDeque::new()),
            queries: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let https_addr = bind(
            config.https_listen,
            Some(acceptor),
            &state,
            &cancel,
            &tracker,
        )
        .await?;
        let http_addr = bind(config.http_listen, None, &state, &cancel, &tracker).await?;
        tracing::info!(https = ?https_addr, http = ?http_addr, host = %state.host_name, "IoT Hub query emulator listening");
        Ok(QueryEmulator {
            state,
            https_addr,
            http_addr,
            ca_pem,
            cancel,
            tracker,
        })
    }

    /// `https://127.0.0.1:PORT` (the listen address), when serving HTTPS.
    pub fn https_endpoint(&self) -> Option<String> {
        self.https_addr.map(|a| format!("https://{}", host_port(a)))
    }

    /// `http://127.0.0.1:PORT`, when serving plain HTTP.
    pub fn http_endpoint(&self) -> Option<String> {
        self.http_addr.map(|a| format!("http://{}", host_port(a)))
    }

    /// The HTTPS listener's address.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The connection string a client uses (its `HostName` is the emulated hub's host name,
    /// so the endpoint must be given separately, or the name resolved to the emulator).
    pub fn connection_string(&self) -> ConnectionString {
        ConnectionString::new(
            self.state.host_name.clone(),
            self.state.policy.clone(),
            self.state.key.clone(),
        )
    }

    /// The CA certificate (PEM) that signed the HTTPS certificate: what clients must trust.
    pub fn ca_certificate_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Replaces the documents served (continuation tokens already given stay usable).
    pub fn set_twins(&self, twins: TwinDocuments) {
        let mut guard = self.state.twins.write().unwrap_or_else(|p| p.into_inner());
        *guard = Arc::new(twins);
    }

    /// Fault injection: the next `count` authorised query requests, after those already
    /// scripted, get `fault` instead of their page.
    pub fn inject(&self, fault: QueryFault, count: u32) {
        self.state.script(0, fault, count);
    }

    /// Fault injection: after `after` more requests answered normally (following those
    /// already scripted), `count` requests get `fault`: a pass that fails mid-way.
    pub fn inject_after(&self, after: u32, fault: QueryFault, count: u32) {
        self.state.script(after, fault, count);
    }

    /// Query requests received with a valid signature (faulted ones included).
    pub fn queries(&self) -> u64 {
        self.state.queries.load(Ordering::Relaxed)
    }

    /// Pages answered.
    pub fn pages(&self) -> u64 {
        self.state.pages.load(Ordering::Relaxed)
    }

    /// Requests refused with 401.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }

    /// Stops the listeners and every connection, waiting a few seconds at most.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("query emulator tasks still running after the shutdown grace period");
        }
    }
}

impl Drop for QueryEmulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl State {
    fn script(&self, after: u32, fault: QueryFault, count: u32) {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.extend(std::iter::repeat_n(None, after as usize));
        faults.extend(std::iter::repeat_n(Some(fault), count as usize));
    }

    fn next_fault(&self) -> Option<QueryFault> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.pop_front().flatten()
    }
}

/// Binds `listen` (when given) and serves it in the background; returns the bound address.
async fn bind(
    listen: Option<SocketAddr>,
    tls: Option<TlsAcceptor>,
    state: &Arc<State>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<Option<SocketAddr>> {
    let Some(address) = listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    tracker.spawn(accept_loop(
        listener,
        tls,
        Arc::clone(state),
        cancel.clone(),
        tracker.clone(),
    ));
    Ok(Some(local))
}

fn host_port(address: SocketAddr) -> String {
    let ip = address.ip();
    if ip.is_unspecified() {
        format!("localhost:{}", address.port())
    } else {
        address.to_string()
    }
}

fn invalid_input(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_string())
}

/// A CA (its PEM) and a TLS acceptor whose certificate, signed by it, names `host_name`,
/// `localhost`, `127.0.0.1` and `::1`.
fn certificates(host_name: &str) -> std::io::Result<(String, TlsAcceptor)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let other = |e: &dyn std::fmt::Display| std::io::Error::other(format!("certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(|e| other(&e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| other(&e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "twinwatch emulator CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| other(&e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(|e| other(&e))?;
    // The host name may carry a port (`localhost:8443`): certificates name hosts only.
    let host = host_name.split(':').next().unwrap_or(host_name).to_string();
    let mut names = vec![host, "localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.dedup();
    let mut params = CertificateParams::new(names).map_err(|e| other(&e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "twinwatch emulator");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .map_err(|e| other(&e))?;

    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let chain = vec![server_cert.der().clone(), ca_cert.der().clone()];
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| other(&e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| other(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), TlsAcceptor::from(Arc::new(config))))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(
            stream,
            tls.clone(),
            Arc::clone(&state),
            cancel.clone(),
        ));
    }
}

async fn connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    cancel: CancellationToken,
) {
    let service = hyper::service::service_fn(move |request| handle(Arc::clone(&state), request));
    let builder = hyper::server::conn::http1::Builder::new();
    match tls {
        Some(acceptor) => {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = acceptor.accept(stream) => match accepted {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::debug!(%error, "TLS handshake failed");
                        return;
                    }
                },
            };
            let serving = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serving => {}
            }
        }
        None => {
            let serving = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serving => {}
            }
        }
    }
}

/// Returned by the service to make hyper close the connection without an answer.
#[derive(Debug)]
struct DroppedConnection;

impl std::fmt::Display for DroppedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for DroppedConnection {}

type Answer = Result<Response<Full<Bytes>>, DroppedConnection>;

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// An error body in IoT Hub's form.
fn hub_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "Message": format!("ErrorCode:{code};{message}"),
        "ExceptionMessage": "",
    });
    respond(status, body.to_string())
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_string();
    if path == "/_emulator/faults" {
        return Ok(control(&state, request).await);
    }
    if path != "/devices/query" {
        return Ok(hub_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "no such resource",
        ));
    }
    if request.method() != hyper::Method::POST {
        return Ok(hub_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the query is a POST",
        ));
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header("authorization");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if let Err(refusal) = sas::verify(
        authorization.as_deref(),
        &state.host_name,
        &state.policy,
        &state.key,
        now,
    ) {
        state.refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%refusal, "query refused");
        return Ok(hub_error(
            StatusCode::UNAUTHORIZED,
            "IotHubUnauthorizedAccess",
            &format!("Unauthorized: {refusal}"),
        ));
    }
    state.queries.fetch_add(1, Ordering::Relaxed);
    let page_size = header("x-ms-max-item-count")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(DEFAULT_PAGE, |n| n.clamp(1, MAX_PAGE));
    let continuation = header("x-ms-continuation").filter(|t| !t.is_empty());
    let body = match Limited::new(request.into_body(), REQUEST_LIMIT)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Ok(hub_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the request body could not be read",
            ))
        }
    };
    match state.next_fault() {
        None => {}
        Some(QueryFault::Drop) => return Err(DroppedConnection),
        Some(QueryFault::Throttle { retry_after_secs }) => {
            let mut response = hub_error(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingException",
                "IotHub throttling: the query quota is exceeded",
            );
            response.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(retry_after_secs),
            );
            return Ok(response);
        }
        Some(QueryFault::Status(status)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let code = if status == StatusCode::SERVICE_UNAVAILABLE {
                "ServiceUnavailable"
            } else {
                "ServerError"
            };
            return Ok(hub_error(status, code, "injected fault"));
        }
    }
    let query = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("query").and_then(|q| q.as_str()).map(str::to_owned));
    let Some(collection) = query.as_deref().and_then(Collection::of_query) else {
        return Ok(hub_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the emulator answers SELECT * FROM devices and SELECT * FROM devices.modules",
        ));
    };
    let start = match continuation {
        None => 0,
        Some(token) => match decode_token(&token, collection) {
            Some(start) => start,
            None => {
                return Ok(hub_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continuation token",
                ))
            }
        },
    };
    let twins = Arc::clone(&state.twins.read().unwrap_or_else(|p| p.into_inner()));
    let documents = twins.of(collection);
    let start = start.min(documents.len());
    let end = start.saturating_add(page_size).min(documents.len());
    let page = &documents[start..end];
    let mut out = Vec::with_capacity(page.iter().map(|d| d.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, document) in page.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(document);
    }
    out.push(b']');
    state.pages.fetch_add(1, Ordering::Relaxed);
    let mut response = respond(StatusCode::OK, out);
    let headers = response.headers_mut();
    headers.insert(
        "x-ms-item-type",
        hyper::header::HeaderValue::from_static("twin"),
    );
    if end < documents.len() {
        if let Ok(value) = hyper::header::HeaderValue::from_str(&encode_token(end, collection)) {
            headers.insert("x-ms-continuation", value);
        }
    }
    Ok(response)
}

/// An opaque token: base64 of `twinwatch:<collection>:<next index>`.
fn encode_token(next: usize, collection: Collection) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("twinwatch:{}:{next}", collection.tag()))
}

fn decode_token(token: &str, collection: Collection) -> Option<usize> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix("twinwatch:")?;
    let (tag, next) = rest.split_once(':')?;
    (tag == collection.tag()).then_some(())?;
    next.parse().ok()
}

/// `POST /_emulator/faults` with `{"fault": "throttle"|"status"|"drop", "count": N,
/// "after": N, "retry_after": SECS, "status": CODE}`: scripts faults in a running emulator
/// (a child process in a test). No signature needed: the emulator listens on loopback.
async fn control(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::POST {
        return hub_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "POST a fault",
        );
    }
    let body = match Limited::new(request.into_body(), REQUEST_LIMIT)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return hub_error(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return hub_error(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let number = |name: &str, default: u64| {
        spec.get(name)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(default)
            .min(u64::from(u32::MAX)) as u32
    };
    let fault = match spec.get("fault").and_then(serde_json::Value::as_str) {
        Some("throttle") => QueryFault::Throttle {
            retry_after_secs: number("retry_after", 1),
        },
        Some("status") => QueryFault::Status(number("status", 503).min(999) as u16),
        Some("drop") => QueryFault::Drop,
        _ => {
            return hub_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "fault must be throttle, status or drop",
            )
        }
    };
    state.script(number("after", 0), fault, number("count", 1));
    respond(StatusCode::OK, "{}")
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn queries_are_matched_in_any_case_and_spacing() {
        assert_eq!(
            Collection::of_query("SELECT * FROM devices"),
            Some(Collection::Devices)
        );
        assert_eq!(
            Collection::of_query("  select *\n from  Devices.Modules "),
            Some(Collection::Modules)
        );
        assert_eq!(
            Collection::of_query("SELECT * FROM devices WHERE x = 1"),
            None
        );
        assert_eq!(Collection::of_query(""), None);
    }

    #[test]
    fn tokens_belong_to_their_query() {
        let token = encode_token(300, Collection::Modules);
        assert_eq!(decode_token(&token, Collection::Modules), Some(300));
        assert_eq!(decode_token(&token, Collection::Devices), None);
        assert_eq!(decode_token("garbage", Collection::Devices), None);
    }

    #[test]
    fn documents_files_are_an_array_or_lines() {
        let lines = b"{\"deviceId\":\"a\",\"version\":1}\n\n{\"deviceId\":\"a\",\"moduleId\":\"m\",\"version\":2}\n{\"deviceId\":\"b\",\"moduleId\":\"\"}\n";
        let parsed = TwinDocuments::parse(lines).expect("lines");
        assert_eq!((parsed.device_count(), parsed.module_count()), (2, 1));
        let array = b" [{\"deviceId\":\"a\"}, {\"deviceId\":\"a\",\"moduleId\":\"m\"}, 3]";
        let parsed = TwinDocuments::parse(array).expect("array");
        assert_eq!((parsed.device_count(), parsed.module_count()), (2, 1));
        let error = TwinDocuments::parse(b"{\"deviceId\":\"a\"}\nnot json\n").expect_err("bad");
        assert!(error.starts_with("line 2:"), "{error}");
    }
}
