//! `twinwatch emulator`: a local Event Hubs endpoint preloaded with generated events and
//! captured files, and optionally publishing a generated fleet at a steady rate; beside it,
//! IoT Hub's twin query over a documents file or the generated fleet's twins; until SIGTERM
//! or Ctrl-C.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use super::Failure;
use crate::cli::EmulatorArgs;
use crate::emulator::query::{QueryEmulator, QueryEmulatorConfig, TwinDocuments};
use crate::emulator::{EmulatedEvent, Emulator, EmulatorConfig};
use crate::generate::{messages, GenerateOptions, GeneratedBody};
use crate::source::avro::{AvroFile, OwnedProp};
use crate::source::replay::expand_paths;

fn text(prop: &OwnedProp) -> String {
    match prop {
        OwnedProp::Str(s) => s.clone(),
        OwnedProp::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        OwnedProp::Long(n) => n.to_string(),
        OwnedProp::Double(f) => f.to_string(),
        OwnedProp::Time(t) => t.to_string(),
    }
}

/// Every message of a captured file (any replay format) as an emulated event.
pub fn events_of_file(path: &Path) -> anyhow::Result<Vec<EmulatedEvent>> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = std::io::Read::read(&mut file, &mut magic)?;
    drop(file);
    let mut out = Vec::new();
    if n == 4 && &magic == crate::source::replay::AVRO_MAGIC {
        let reader = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut avro =
            AvroFile::open(reader).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut bodies = Vec::new();
        while let Some(record) = avro.next_record(&mut bodies) {
            let record = record.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let pairs =
                |p: &[(crate::source::avro::PropName, OwnedProp)]| -> Vec<(String, String)> {
                    p.iter().map(|(k, v)| (k.to_string(), text(v))).collect()
                };
            let body = record
                .body
                .map(|(s, e)| bodies[s as usize..e as usize].to_vec())
                .unwrap_or_default();
            let time = record.enqueued_time.as_ref().map(text).unwrap_or_default();
            out.push(EmulatedEvent::from_storage_record(
                &time,
                &pairs(&record.properties),
                &pairs(&record.system_properties),
                body,
            ));
            bodies.clear();
        }
        return Ok(out);
    }
    let reader = std::io::BufReader::new(std::fs::File::open(path)?);
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
            // Not a message at all: the emulator carries it as an opaque body, so that the
            // consumer dead-letters it as the replay would.
            out.push(EmulatedEvent::from_storage_record(
                "",
                &[],
                &[],
                line.clone(),
            ));
            tracing::debug!(line = i, "not JSON; published as an opaque body");
            continue;
        };
        let strings = |v: &serde_json::Value| -> Vec<(String, String)> {
            v.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let body = match &value["Body"] {
            serde_json::Value::String(b64) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap_or_else(|_| b64.as_bytes().to_vec())
            }
            serde_json::Value::Null => Vec::new(),
            other => serde_json::to_vec(other)?,
        };
        out.push(EmulatedEvent::from_storage_record(
            value["EnqueuedTimeUtc"].as_str().unwrap_or(""),
            &strings(&value["Properties"]),
            &strings(&value["SystemProperties"]),
            body,
        ));
    }
    Ok(out)
}

/// Generated events after the first `skip` (publishing continues a preloaded fleet). With
/// `enqueued_now`, each is enqueued when published (a live hub), not at its generated time.
pub fn generated_events(
    options: GenerateOptions,
    skip: u64,
    enqueued_now: bool,
) -> impl Iterator<Item = EmulatedEvent> + Send {
    messages(&options)
        .skip(skip as usize)
        .filter(|m| !matches!(m.body, GeneratedBody::Corrupt(_)))
        .map(move |m| {
            let mut event = EmulatedEvent::from_generated(&m);
            if enqueued_now {
                event.enqueued_time_ms = None;
            }
            event
        })
}

pub fn run(args: &EmulatorArgs) -> Result<ExitCode, Failure> {
    let listen: SocketAddr = args.listen.parse().map_err(|_| {
        Failure::usage(anyhow::anyhow!("--listen: not an address: {}", args.listen))
    })?;
    let query_listen: SocketAddr = args.query_listen.parse().map_err(|_| {
        Failure::usage(anyhow::anyhow!(
            "--query-listen: not an address: {}",
            args.query_listen
        ))
    })?;
    let query_http_listen: SocketAddr = args.query_http_listen.parse().map_err(|_| {
        Failure::usage(anyhow::anyhow!(
            "--query-http-listen: not an address: {}",
            args.query_http_listen
        ))
    })?;
    let files = expand_paths(&args.paths).map_err(Failure::usage)?;
    let fleet = GenerateOptions {
        devices: args.devices,
        events: u64::MAX / 2,
        seed: args.seed,
        hub: args.hub.clone(),
        noise: 0.0,
    };
    let has_fleet = args.events > 0 || args.rate > 0.0;
    // The twin query serves the documents file, else the generated fleet as of the events
    // preloaded: a seed as of that point and the feed from there describe one fleet.
    let twins = match &args.twins {
        Some(path) => {
            Some(TwinDocuments::read(path).map_err(|e| Failure::usage(anyhow::anyhow!(e)))?)
        }
        None if has_fleet => Some(TwinDocuments::generated(&fleet, args.events)),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::runtime)?;
    runtime.block_on(async {
        let emulator = Emulator::start(EmulatorConfig::new(listen, args.hub.clone(), args.partitions))
            .await
            .with_context(|| format!("listening on {listen}"))
            .map_err(Failure::runtime)?;
        let mut n = 0usize;
        if args.events > 0 {
            let preload = GenerateOptions {
                events: args.events,
                ..fleet.clone()
            };
            for event in generated_events(preload, 0, false) {
                emulator.publish(event);
                n += 1;
            }
        }
        for file in &files {
            for event in events_of_file(&file.path).map_err(Failure::runtime)? {
                emulator.publish(event);
                n += 1;
            }
        }
        if args.rate > 0.0 {
            emulator.spawn_publisher(generated_events(fleet.clone(), args.events, true), args.rate);
        }
        let query = match twins {
            None => None,
            Some(twins) => {
                let iothub = args.iothub_name.clone().unwrap_or_else(|| args.hub.clone());
                let (devices, modules) = (twins.device_count(), twins.module_count());
                let query = QueryEmulator::start(
                    QueryEmulatorConfig::new(&iothub, Some(query_listen), Some(query_http_listen)),
                    twins,
                )
                .await
                .with_context(|| format!("twin query on {query_listen} and {query_http_listen}"))
                .map_err(Failure::runtime)?;
                let ca_path = args.ca_cert_out.clone().unwrap_or_else(|| {
                    std::env::temp_dir()
                        .join(format!("twinwatch-emulator-{}-ca.pem", std::process::id()))
                });
                std::fs::write(&ca_path, query.ca_certificate_pem())
                    .with_context(|| format!("writing {}", ca_path.display()))
                    .map_err(Failure::runtime)?;
                tracing::info!(devices, modules, hub = %iothub, "twin query ready");
                Some((query, ca_path))
            }
        };
        // The Event Hubs connection string stays the first line (scripts read it so); the
        // twin query's lines are labelled.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", emulator.connection_string());
        if let Some((query, ca_path)) = &query {
            let _ = writeln!(
                out,
                "iothub-connection-string: {}",
                query.connection_string().to_secret_string()
            );
            if let Some(endpoint) = query.https_endpoint() {
                let _ = writeln!(out, "iothub-endpoint: {endpoint}");
            }
            if let Some(endpoint) = query.http_endpoint() {
                let _ = writeln!(out, "iothub-endpoint-http: {endpoint}");
            }
            let _ = writeln!(out, "iothub-ca-certificate: {}", ca_path.display());
        }
        let _ = out.flush();
        drop(out);
        tracing::info!(address = %emulator.local_addr(), preloaded = n, partitions = args.partitions, hub = %args.hub, rate = args.rate, "emulator ready");
        let _ = tokio::signal::ctrl_c().await;
        if let Some((query, _)) = query {
            query.shutdown().await;
        }
        emulator.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
