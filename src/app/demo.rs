//! `twinwatch demo`: a first look without any Azure resource. It generates a synthetic fleet
//! (with some noise: duplicates, stale versions, telemetry, malformed messages), replays it
//! into a fresh snapshot, and shows what came out.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use super::replay::replay;
use super::Failure;
use crate::cli::DemoArgs;
use crate::generate::{write_json_lines, GenerateOptions};
use crate::pipeline::EngineOptions;
use crate::store::{Store, StoreOptions};
use crate::twin::export_value;

pub fn run(args: &DemoArgs) -> Result<ExitCode, Failure> {
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {}", dir.display()))
                .map_err(Failure::runtime)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().map_err(Failure::runtime)?;
            temp.path().to_path_buf()
        }
    };
    let fleet = dir.join("fleet.json");
    let data_dir = dir.join("data");
    let options = GenerateOptions {
        devices: args.devices,
        events: args.events,
        seed: 1,
        hub: "contoso-hub".into(),
        noise: 0.02,
    };
    println!(
        "generating {} messages for a fleet of {} devices into {}",
        args.events,
        args.devices,
        fleet.display()
    );
    let file = std::fs::File::create(&fleet).map_err(Failure::runtime)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    write_json_lines(&options, &mut out).map_err(Failure::runtime)?;
    std::io::Write::flush(&mut out).map_err(Failure::runtime)?;
    drop(out);

    println!("replaying into {}", data_dir.display());
    let store = Store::open(&data_dir, &StoreOptions::default()).map_err(Failure::runtime)?;
    let store = Arc::new(store);
    let files = crate::source::replay::expand_paths(&[fleet]).map_err(Failure::runtime)?;
    let report =
        replay(store.clone(), &files, EngineOptions::default()).map_err(Failure::runtime)?;
    let c = &report.counters;
    let seconds = report.elapsed.as_secs_f64();
    println!(
        "{} messages in {seconds:.2} s ({:.0}/s): {} applied, {} stale, {} ignored, {} dead-lettered",
        c.messages,
        c.messages as f64 / seconds.max(1e-9),
        c.applied,
        c.stale,
        c.ignored,
        c.n_dead_lettered()
    );
    for (reason, n) in &c.dead_lettered {
        println!("  dead letters {reason}: {n}");
    }
    let mut n_twins = 0u64;
    let mut sample = None;
    for item in store.twins().map_err(Failure::runtime)? {
        let (key, record) = item.map_err(Failure::runtime)?;
        n_twins += 1;
        if sample.is_none() && key.module_id.as_ref() == "azureiotsecurity" {
            sample = Some(export_value(key.as_key(), record.version, &record.doc));
        }
    }
    println!("the snapshot holds {n_twins} twins; one security module twin:");
    if let Some(sample) = sample {
        let pretty = serde_json::to_string_pretty(&sample).map_err(Failure::runtime)?;
        println!("{pretty}");
    }
    if args.dir.is_some() {
        println!(
            "explore it: twinwatch export --data-dir {0} | head; twinwatch deadletters --data-dir {0} | head",
            data_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
