//! The client against the emulator's twin query (in process, over real sockets): pages and
//! continuation tokens, 429 with `Retry-After`, 503, dropped connections, bounded retries,
//! a wrong key, an untrusted certificate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;
use crate::emulator::query::{QueryEmulator, QueryEmulatorConfig, QueryFault, TwinDocuments};

const HUB: &str = "contoso-hub";

struct Setup {
    /// Keeps the emulator's tasks running while the blocking client works on the test thread.
    runtime: tokio::runtime::Runtime,
    emulator: Option<QueryEmulator>,
    ca_dir: tempfile::TempDir,
    devices: Vec<Value>,
    modules: Vec<Value>,
}

impl Setup {
    fn new(n_devices: usize, n_modules: usize) -> Setup {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let devices: Vec<Value> = (0..n_devices)
            .map(|i| {
                json!({"deviceId": format!("dev-{i:04}"), "etag": "AAAAAAAAAAE=", "version": i + 2,
                       "tags": {"env": "prod"},
                       "properties": {"desired": {"$metadata": {}, "$version": 1},
                                      "reported": {"$metadata": {}, "$version": 1}}})
            })
            .collect();
        let modules: Vec<Value> = (0..n_modules)
            .map(|i| {
                json!({"deviceId": format!("dev-{i:04}"), "moduleId": "azureiotsecurity",
                       "version": 3, "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}})
            })
            .collect();
        let mut twins = TwinDocuments::new();
        // Interleaved on purpose: the emulator sorts them into the two collections.
        for pair in devices
            .iter()
            .zip(modules.iter().map(Some).chain(std::iter::repeat(None)))
        {
            twins.push(pair.0);
            if let Some(module) = pair.1 {
                twins.push(module);
            }
        }
        let localhost: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let emulator = runtime
            .block_on(QueryEmulator::start(
                QueryEmulatorConfig::new(HUB, Some(localhost), Some(localhost)),
                twins,
            ))
            .expect("emulator starts");
        let ca_dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(ca_dir.path().join("ca.pem"), emulator.ca_certificate_pem()).expect("ca");
        Setup {
            runtime,
            emulator: Some(emulator),
            ca_dir,
            devices,
            modules,
        }
    }

    fn emulator(&self) -> &QueryEmulator {
        self.emulator.as_ref().expect("running")
    }

    /// Fast retries, so that the tests wait for `Retry-After` only.
    fn options(&self) -> QueryOptions {
        QueryOptions {
            endpoint: self.emulator().https_endpoint(),
            page_size: 100,
            ca_file: Some(self.ca_dir.path().join("ca.pem")),
            max_retries: 3,
            timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(5),
            ..QueryOptions::default()
        }
    }

    fn client(&self, options: QueryOptions) -> QueryClient {
        QueryClient::new(&self.emulator().connection_string(), options).expect("client")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(emulator) = self.emulator.take() {
            self.runtime.block_on(emulator.shutdown());
        }
    }
}

struct Run {
    documents: Vec<Value>,
    events: Vec<QueryEvent>,
    result: Result<QueryStats, QueryError<String>>,
}

fn run(client: &QueryClient, query: &str) -> Run {
    let mut documents = Vec::new();
    let mut events = Vec::new();
    let result = client.run_query(
        query,
        &mut |page: &[u8]| {
            let array: Vec<Value> =
                serde_json::from_slice(page).map_err(|e| format!("page is not JSON: {e}"))?;
            documents.extend(array);
            Ok(())
        },
        &mut |event| events.push(event),
    );
    Run {
        documents,
        events,
        result,
    }
}

fn pages_read(events: &[QueryEvent]) -> Vec<bool> {
    events
        .iter()
        .filter_map(|e| match e {
            QueryEvent::PageRead { more, .. } => Some(*more),
            _ => None,
        })
        .collect()
}

#[test]
fn reads_every_twin_page_by_page_over_https_and_http() {
    let setup = Setup::new(250, 120);
    let client = setup.client(setup.options());
    let devices = run(&client, "SELECT * FROM devices");
    let stats = devices.result.expect("devices");
    assert_eq!(devices.documents, setup.devices);
    assert_eq!(pages_read(&devices.events), [true, true, false]);
    assert_eq!((stats.pages, stats.throttled, stats.retries), (3, 0, 0));
    let modules = run(&client, "SELECT * FROM devices.modules");
    modules.result.expect("modules");
    assert_eq!(modules.documents, setup.modules);
    assert_eq!(pages_read(&modules.events), [true, false]);

    let plain = setup.client(QueryOptions {
        endpoint: setup.emulator().http_endpoint(),
        ca_file: None,
        page_size: 1000,
        ..setup.options()
    });
    let devices = run(&plain, "select * from devices");
    assert_eq!(devices.result.expect("http").pages, 1);
    assert_eq!(devices.documents, setup.devices);
    assert_eq!(setup.emulator().pages(), 6);
}

#[test]
fn throttling_waits_for_retry_after_then_goes_on() {
    let setup = Setup::new(150, 0);
    let client = setup.client(setup.options());
    // The first page is answered; the second is throttled twice.
    setup.emulator().inject_after(
        1,
        QueryFault::Throttle {
            retry_after_secs: 1,
        },
        2,
    );
    let started = Instant::now();
    let devices = run(&client, "SELECT * FROM devices");
    let stats = devices.result.expect("completes");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(devices.documents, setup.devices);
    assert_eq!(stats.throttled, 2);
    assert_eq!(stats.waited, Duration::from_secs(2));
    let throttles: Vec<&QueryEvent> = devices
        .events
        .iter()
        .filter(|e| matches!(e, QueryEvent::Throttled { .. }))
        .collect();
    assert_eq!(
        throttles,
        [
            &QueryEvent::Throttled {
                wait: Duration::from_secs(1),
                attempt: 1
            },
            &QueryEvent::Throttled {
                wait: Duration::from_secs(1),
                attempt: 2
            },
        ]
    );
    assert_eq!(setup.emulator().queries(), 4);
}

#[test]
fn unavailable_and_dropped_connections_are_retried() {
    let setup = Setup::new(250, 0);
    let client = setup.client(setup.options());
    setup.emulator().inject(QueryFault::Status(503), 1);
    setup.emulator().inject_after(1, QueryFault::Drop, 1);
    let devices = run(&client, "SELECT * FROM devices");
    let stats = devices.result.expect("completes");
    assert_eq!(devices.documents, setup.devices, "nothing doubled or lost");
    assert_eq!(stats.retries, 2);
    let causes: Vec<String> = devices
        .events
        .iter()
        .filter_map(|e| match e {
            QueryEvent::Retrying { cause, .. } => Some(cause.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(causes.len(), 2);
    assert_eq!(causes[0], "HTTP 503");
}

#[test]
fn retries_are_bounded_and_other_failures_are_not_retried() {
    let setup = Setup::new(250, 0);
    let client = setup.client(setup.options());
    setup
        .emulator()
        .inject_after(1, QueryFault::Status(503), 10);
    let devices = run(&client, "SELECT * FROM devices");
    let error = devices.result.expect_err("gives up");
    assert_eq!(error.kind(), "unavailable");
    assert!(error.is_retryable());
    assert!(error.to_string().contains(HUB), "{error}");
    assert_eq!(
        devices.documents.len(),
        100,
        "the first page was handed over"
    );
    assert_eq!(
        setup.emulator().queries(),
        1 + 4,
        "one page, then 1 + 3 retries"
    );

    let setup = Setup::new(250, 0);
    let client = setup.client(setup.options());
    setup.emulator().inject_after(1, QueryFault::Status(500), 1);
    let devices = run(&client, "SELECT * FROM devices");
    let error = devices.result.expect_err("a failed page ends the pass");
    assert_eq!(error.kind(), "http_status");
    assert_eq!(setup.emulator().queries(), 2, "500 is not retried");

    let error = run(&client, "SELECT deviceId FROM devices")
        .result
        .expect_err("unsupported query");
    assert!(
        matches!(
            error,
            QueryError::Hub(IotHubError::Status { status: 400, .. })
        ),
        "{error}"
    );
}

#[test]
fn a_wrong_key_is_a_clear_error_naming_the_hub_never_the_key() {
    let setup = Setup::new(10, 0);
    let wrong_key = b"not-the-emulators-key".to_vec();
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &wrong_key);
    let conn = ConnectionString::parse(&format!(
        "HostName={HUB}.azure-devices.net;SharedAccessKeyName=registryRead;SharedAccessKey={encoded}"
    ))
    .expect("parses");
    let client = QueryClient::new(&conn, setup.options()).expect("client");
    let devices = run(&client, "SELECT * FROM devices");
    let error = devices.result.expect_err("refused");
    assert_eq!(error.kind(), "unauthorized");
    assert!(!error.is_retryable());
    let message = error.to_string();
    assert!(message.contains(HUB), "{message}");
    assert!(!message.contains(&encoded), "{message}");
    assert!(devices.documents.is_empty());
    assert_eq!(setup.emulator().refused(), 1, "never retried");
}

#[test]
fn an_untrusted_certificate_is_a_tls_error() {
    let setup = Setup::new(1, 0);
    let client = setup.client(QueryOptions {
        ca_file: None,
        ..setup.options()
    });
    let error = run(&client, "SELECT * FROM devices")
        .result
        .expect_err("untrusted");
    assert_eq!(error.kind(), "tls", "{error}");
}

#[test]
fn a_page_handler_error_ends_the_run() {
    let setup = Setup::new(250, 0);
    let client = setup.client(setup.options());
    let mut pages = 0;
    let result = client.run_query(
        "SELECT * FROM devices",
        &mut |_page: &[u8]| {
            pages += 1;
            if pages == 2 {
                Err("disk full")
            } else {
                Ok(())
            }
        },
        &mut |_| {},
    );
    match result {
        Err(QueryError::Page(reason)) => assert_eq!(reason, "disk full"),
        other => panic!("expected the handler's error, got {other:?}"),
    }
    assert_eq!(setup.emulator().pages(), 2);
}

#[test]
fn cancelling_stops_a_wait() {
    let setup = Setup::new(10, 0);
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = setup.client(QueryOptions {
        cancel: Some(cancel.clone()),
        ..setup.options()
    });
    setup.emulator().inject(
        QueryFault::Throttle {
            retry_after_secs: 3,
        },
        1,
    );
    let started = Instant::now();
    let result =
        client.run_query::<Infallible>("SELECT * FROM devices", &mut |_| Ok(()), &mut |event| {
            if matches!(event, QueryEvent::Throttled { .. }) {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    assert_eq!(result.expect_err("cancelled").kind(), "cancelled");
    assert!(started.elapsed() < Duration::from_secs(2));
}
