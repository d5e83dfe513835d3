//! A twin query pass over loopback: the emulator (in process) serving a generated fleet's
//! twins, and the client reading every page of `SELECT * FROM devices` and
//! `SELECT * FROM devices.modules`, over HTTPS and over plain HTTP, pages of 1,000.
//!
//! `cargo bench --bench iothub_query`; the fleet is `TWINWATCH_BENCH_DEVICES` devices
//! (default 210,000) after `TWINWATCH_BENCH_EVENTS` messages (default 600,000): about 400,000
//! twins. Prints one line per transport; BENCHMARKS.md keeps the figures.

use std::convert::Infallible;
use std::time::Instant;

use twinwatch::emulator::query::{QueryEmulator, QueryEmulatorConfig, TwinDocuments};
use twinwatch::generate::GenerateOptions;
use twinwatch::iothub::{QueryClient, QueryOptions};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let devices = env_or("TWINWATCH_BENCH_DEVICES", 210_000);
    let events = env_or("TWINWATCH_BENCH_EVENTS", 600_000);
    let fleet = GenerateOptions {
        devices,
        events,
        seed: 1,
        hub: "bench-hub".into(),
        noise: 0.0,
    };
    let started = Instant::now();
    let twins = TwinDocuments::generated(&fleet, events);
    let (n_devices, n_modules) = (twins.device_count(), twins.module_count());
    println!(
        "fleet: {n_devices} device twins + {n_modules} module twins generated in {:.2?}",
        started.elapsed()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let localhost = Some(([127, 0, 0, 1], 0).into());
    let emulator = runtime
        .block_on(QueryEmulator::start(
            QueryEmulatorConfig::new("bench-hub", localhost, localhost),
            twins,
        ))
        .expect("emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, emulator.ca_certificate_pem()).expect("ca");
    let transports = [
        ("https", emulator.https_endpoint(), Some(ca)),
        ("http", emulator.http_endpoint(), None),
    ];
    for (label, endpoint, ca_file) in transports {
        let client = QueryClient::new(
            &emulator.connection_string(),
            QueryOptions {
                endpoint,
                ca_file,
                page_size: 1000,
                ..QueryOptions::default()
            },
        )
        .expect("client");
        let started = Instant::now();
        let (mut pages, mut bytes) = (0, 0);
        for query in ["SELECT * FROM devices", "SELECT * FROM devices.modules"] {
            let stats = client
                .run_query::<Infallible>(query, &mut |_| Ok(()), &mut |_| {})
                .expect("the pass completes");
            pages += stats.pages;
            bytes += stats.bytes;
        }
        let seconds = started.elapsed().as_secs_f64();
        let n = (n_devices + n_modules) as f64;
        println!(
            "{label}: {} twins, {pages} pages, {:.1} MB in {seconds:.2} s: {:.0} twins/s, {:.0} MB/s",
            n_devices + n_modules,
            bytes as f64 / 1e6,
            n / seconds,
            bytes as f64 / 1e6 / seconds
        );
    }
    runtime.block_on(emulator.shutdown());
}
