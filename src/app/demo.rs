//! `twinwatch demo`: a first look without any Azure resource. A generated fleet is preloaded
//! into the embedded Event Hubs emulator, which keeps publishing more of it at a steady rate;
//! the embedded twin query serves the fleet's twins as of the preloaded events, and the
//! service seeds its snapshot from it as it starts (`docs/semantics.md` §7), then consumes the
//! feed with the built-in baseline policy, shows a compact summary (twins failing and pending
//! by rule, the alerts of the last minute: `summary.rs`) rather than a line per alert, writes
//! every alert to `--alerts-file` when given, and serves /metrics on localhost, until Ctrl-C.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;

use super::emulator::generated_events;
use super::Failure;
use crate::cli::DemoArgs;
use crate::config::RawConfig;
use crate::emulator::query::{QueryEmulator, QueryEmulatorConfig, TwinDocuments};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::generate::GenerateOptions;
use crate::time::Ticks;

/// The as-of time of the fleet after its first `events` messages: just after the latest
/// operation time among them. The generated fleet has a clock of its own (it starts at
/// 2026-01-01), so a pass as of the wall clock would make every later event stale.
fn as_of_after(options: &GenerateOptions, events: u64) -> Ticks {
    let latest = crate::generate::messages(options)
        .take(usize::try_from(events).unwrap_or(usize::MAX))
        .filter_map(|m| {
            let (_, time) = m
                .properties
                .iter()
                .find(|(name, _)| name == "operationTimestamp")?;
            Ticks::parse_lenient(time)
        })
        .max()
        .unwrap_or_default();
    Ticks(latest.0.saturating_add(1))
}

pub fn run(args: &DemoArgs) -> Result<ExitCode, Failure> {
    let temp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().map_err(Failure::runtime)?;
            temp.path().to_path_buf()
        }
    };
    let listen: SocketAddr = args.listen.parse().map_err(|_| {
        Failure::usage(anyhow::anyhow!("--listen: not an address: {}", args.listen))
    })?;
    // The emulator runs on a runtime of its own, beside the service's.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("twinwatch-emulator")
        .enable_all()
        .build()
        .map_err(Failure::runtime)?;
    let hub = "contoso-hub";
    let emulator = runtime
        .block_on(Emulator::start(EmulatorConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            "iothub-ehub-contoso-demo",
            4,
        )))
        .context("starting the embedded emulator")
        .map_err(Failure::runtime)?;
    let options = GenerateOptions {
        devices: args.devices,
        events: u64::MAX / 2,
        seed: 1,
        hub: hub.into(),
        noise: 0.01,
    };
    // The twin query serves the fleet as of the preloaded events; the service seeds from it.
    let documents = TwinDocuments::generated(&options, args.events);
    let (devices, modules) = (documents.device_count(), documents.module_count());
    let as_of = as_of_after(&options, args.events);
    let query = runtime
        .block_on(QueryEmulator::start(
            QueryEmulatorConfig::new(hub, None, Some(SocketAddr::from(([127, 0, 0, 1], 0)))),
            documents,
        ))
        .context("starting the embedded twin query")
        .map_err(Failure::runtime)?;
    let query_endpoint = query.http_endpoint().unwrap_or_default();
    let mut events = generated_events(options, 0, true);
    for event in events.by_ref().take(args.events as usize) {
        emulator.publish(event);
    }
    {
        let _guard = runtime.enter();
        emulator.spawn_publisher(events, args.rate);
    }
    let connection_string = emulator.connection_string();
    println!("twinwatch demo");
    println!(
        "  a fleet of {} devices: {} events preloaded, then {} events/s",
        args.devices, args.events, args.rate
    );
    println!(
        "  seeding:   the twin query ({query_endpoint}) serves the fleet as of those events \
         ({devices} device twins, {modules} module twins); the service reads them as it starts, \
         beside the feed, and says \"seed pass ended\" in its log"
    );
    println!("  emulator:  {}", emulator.local_addr());
    println!("  snapshot:  {}", dir.join("data").display());
    println!("  metrics:   http://{listen}/metrics   (also /healthz, /readyz)");
    if let Some(file) = &args.alerts_file {
        println!(
            "  alerts:    {}   (every alert, CloudEvents JSON lines)",
            file.display()
        );
    }
    if args.dir.is_some() {
        println!(
            "  explore:   twinwatch export --data-dir {0}  |  twinwatch violations --data-dir {0}",
            dir.join("data").display()
        );
    }
    println!("  Ctrl-C to stop\n");
    let mut raw = RawConfig {
        data_dir: Some(dir.join("data")),
        listen: Some(listen.to_string()),
        eventhub: crate::config::RawEventHub {
            connection_string: Some(connection_string),
            ..Default::default()
        },
        seed: crate::config::RawSeed {
            connection_string: Some(query.connection_string().to_secret_string()),
            endpoint: Some(query_endpoint),
            // The twin query serves one fixed moment of the fleet: reconciling against it
            // later would remove every twin created since.
            reconcile_every_hours: Some(0.0),
            ..Default::default()
        },
        ..Default::default()
    };
    raw.alerts.file = args.alerts_file.clone();
    let mut config = raw
        .validate()
        .map_err(|e| Failure::runtime(anyhow::anyhow!("the demo's configuration: {e}")))?;
    if let Some(seed) = &mut config.seed {
        seed.as_of = Some(as_of);
    }
    let summary = super::summary::Summary::start(
        listen,
        std::io::stdout().is_terminal(),
        args.alerts_file.as_ref().map(|f| f.display().to_string()),
    )
    .map_err(Failure::runtime)?;
    let result = super::run::run_with(config, Vec::new());
    summary.stop();
    runtime.block_on(query.shutdown());
    runtime.block_on(emulator.shutdown());
    result
}
