//! `twinwatch demo`: a first look without any Azure resource. A generated fleet is preloaded
//! into the embedded Event Hubs emulator, which keeps publishing more of it at a steady rate;
//! the service consumes it with the built-in baseline policy, shows a compact summary (twins
//! failing and pending by rule, the alerts of the last minute: `summary.rs`) rather than a line
//! per alert, writes every alert to `--alerts-file` when given, and serves /metrics on
//! localhost, until Ctrl-C.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;

use super::emulator::generated_events;
use super::Failure;
use crate::cli::DemoArgs;
use crate::config::RawConfig;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::generate::GenerateOptions;

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
        ..Default::default()
    };
    raw.alerts.file = args.alerts_file.clone();
    let config = raw
        .validate()
        .map_err(|e| Failure::runtime(anyhow::anyhow!("the demo's configuration: {e}")))?;
    let summary = super::summary::Summary::start(
        listen,
        std::io::stdout().is_terminal(),
        args.alerts_file.as_ref().map(|f| f.display().to_string()),
    )
    .map_err(Failure::runtime)?;
    let result = super::run::run_with(config, Vec::new());
    summary.stop();
    runtime.block_on(emulator.shutdown());
    result
}
