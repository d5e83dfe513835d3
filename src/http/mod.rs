//! The service's HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (connected to the Event Hub, every owned partition's receiver attached,
//! the pipeline running; the store was opened before the listener started; seed passes are
//! reported in its body, never waited for).
//!
//! [`serve`] runs the listener with hyper's own limits rather than `axum::serve`'s none: a
//! client must send its request's headers within [`Limits::header_read_timeout`] (idle
//! keep-alive connections included), a request must be answered within
//! [`Limits::request_timeout`], and at most [`Limits::max_connections`] connections are open
//! at once, so slow or idle clients cannot hold the listener (issue 23).

pub mod api;
mod state;

pub use state::ServiceState;

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The listener's limits against slow, idle or too many clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A connection that has not sent a whole request head this long after it opened (or
    /// after its previous response) is closed.
    pub header_read_timeout: Duration,
    /// A request not answered within this is answered `408` (the handler is dropped).
    pub request_timeout: Duration,
    /// Connections beyond this many are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Limits {
    /// The service's: Prometheus scrapes and probes send their headers at once; the query
    /// API's longest page is well within 30 s; 1024 connections leave room for probes while a
    /// client misbehaves (the query API has its own, lower limit on concurrent requests).
    pub const SERVICE: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        max_connections: 1024,
    };
}

/// Serves `app` on `listener` until `cancel`, within `limits`; then stops accepting, lets
/// the requests under way finish (each within the request timeout) and returns.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, cancel: CancellationToken) {
    let app = app.layer(
        tower::ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                (StatusCode::REQUEST_TIMEOUT, "the request timed out\n")
            }))
            .timeout(limits.request_timeout),
    );
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let mut refused: u64 = 0;
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: give the open connections a moment to end.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max_connections = limits.max_connections,
                    "too many HTTP connections: new ones are closed"
                );
            }
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "an HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

pub fn router(state: Arc<ServiceState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<ServiceState>>) -> impl IntoResponse {
    // RocksDB's properties are read from memory: quick enough for the runtime.
    state.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

/// Readiness never waits for a seed pass (the snapshot is usable while one runs); with a
/// `[seed]` section, the body reports the pass under way and the last one in `seed`.
async fn readyz(State(state): State<Arc<ServiceState>>) -> impl IntoResponse {
    let problems = state.problems();
    let mut body = if problems.is_empty() {
        json!({"ready": true})
    } else {
        json!({"ready": false, "problems": problems})
    };
    if let (Some(seed), Some(out)) = (&state.seed, body.as_object_mut()) {
        out.insert("seed".to_owned(), seed.details());
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Instant;

    use super::*;
    use crate::store::{Store, StoreOptions};
    use crate::telemetry::Metrics;

    fn service_state(dir: &std::path::Path) -> Arc<ServiceState> {
        Arc::new(ServiceState {
            metrics: Metrics::new().expect("metrics"),
            store: Arc::new(Store::open(dir, &StoreOptions::default()).expect("store")),
            health: std::sync::OnceLock::new(),
            connect_error: std::sync::Mutex::new(None),
            failed: std::sync::Mutex::new(None),
            violations_counted: std::sync::atomic::AtomicBool::new(false),
            delivery: None,
            seed: None,
        })
    }

    /// `GET path` on a connection of its own: the status code and the body.
    fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("response");
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        (status, body)
    }

    /// Reads until the server closes the connection; how long that took.
    fn wait_closed(stream: &mut TcpStream, limit: Duration) -> Duration {
        let started = Instant::now();
        stream.set_read_timeout(Some(limit)).expect("timeout");
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return started.elapsed(),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return started.elapsed()
                }
                Err(e) => panic!("the connection was not closed within {limit:?}: {e}"),
            }
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Issue 23: 400 connections that never finished their headers were never closed. Now
    /// the probes answer at once while they are open, and each is closed after the
    /// header-read timeout.
    #[test]
    fn slow_clients_are_closed_and_the_probes_answer_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let limits = Limits {
            header_read_timeout: Duration::from_secs(2),
            ..Limits::SERVICE
        };
        let server = rt.spawn(serve(
            listener,
            router(service_state(dir.path())),
            limits,
            cancel.clone(),
        ));
        let opened = Instant::now();
        let mut slow: Vec<TcpStream> = (0..400)
            .map(|_| {
                let mut stream = TcpStream::connect(addr).expect("connect");
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
                    .expect("half a head");
                stream
            })
            .collect();
        // An idle keep-alive connection (a whole request answered, then nothing) is a slow
        // client too.
        let mut idle = TcpStream::connect(addr).expect("connect");
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .expect("request");
        for path in ["/healthz", "/metrics", "/readyz"] {
            let started = Instant::now();
            let (status, body) = http_get(addr, path);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{path} took {:?} with 400 slow connections open",
                started.elapsed()
            );
            match path {
                "/healthz" => assert_eq!((status, body.as_str()), (200, "ok\n")),
                "/metrics" => {
                    assert_eq!(status, 200);
                    assert!(body.contains("twinwatch_"), "{body}");
                }
                _ => assert_eq!(status, 503, "not connected: not ready"),
            }
        }
        for stream in slow.iter_mut().chain([&mut idle]) {
            wait_closed(stream, Duration::from_secs(15));
        }
        let all_closed = opened.elapsed();
        assert!(
            all_closed >= Duration::from_millis(1900) && all_closed < Duration::from_secs(10),
            "closed after {all_closed:?}, expected about the 2 s header-read timeout"
        );
        // The listener still serves after all that.
        assert_eq!(http_get(addr, "/healthz").0, 200);
        cancel.cancel();
        rt.block_on(server).expect("the listener stops");
    }

    #[test]
    fn a_request_that_outlives_the_request_timeout_is_answered_408() {
        let rt = runtime();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route("/fast", get(|| async { "fast" }));
        let limits = Limits {
            request_timeout: Duration::from_millis(500),
            ..Limits::SERVICE
        };
        let server = rt.spawn(serve(listener, app, limits, cancel.clone()));
        let started = Instant::now();
        assert_eq!(http_get(addr, "/slow").0, 408);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(http_get(addr, "/fast"), (200, "fast".to_owned()));
        cancel.cancel();
        rt.block_on(server).expect("the listener stops");
    }

    #[test]
    fn connections_beyond_the_limit_are_closed_at_once() {
        let rt = runtime();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let app = Router::new().route("/healthz", get(|| async { "ok" }));
        let limits = Limits {
            max_connections: 8,
            ..Limits::SERVICE
        };
        let server = rt.spawn(serve(listener, app, limits, cancel.clone()));
        let held: Vec<TcpStream> = (0..8)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        // Accepted by the kernel, closed by the listener without an answer.
        let mut extra = TcpStream::connect(addr).expect("connect");
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
        assert!(wait_closed(&mut extra, Duration::from_secs(5)) < Duration::from_secs(5));
        drop(held);
        // Once they are gone, new connections are served again.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answered = std::panic::catch_unwind(|| http_get(addr, "/healthz").0);
            if answered.ok() == Some(200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not served after the others closed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cancel.cancel();
        rt.block_on(server).expect("the listener stops");
    }
}
