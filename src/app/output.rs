//! The commands that read a data directory (`export`, `deadletters`) or write files
//! (`generate`).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::json;

use super::Failure;
use crate::cli::{AvroCodec, DocumentsLayoutArg, GenerateArgs, GenerateFormat};
use crate::generate::avro::{write_avro, AvroKind};
use crate::generate::{write_json_lines, GenerateOptions};
use crate::model::SourceId;
use crate::store::Store;
use crate::twin::export_value;

pub(super) fn open(data_dir: &Path) -> Result<Store, Failure> {
    if !data_dir.join("CURRENT").exists() {
        return Err(Failure::usage(anyhow::anyhow!(
            "{} is not a twinwatch data directory",
            data_dir.display()
        )));
    }
    Store::open_read_only(data_dir)
        .with_context(|| format!("opening {}", data_dir.display()))
        .map_err(Failure::runtime)
}

/// A closed pipe (`twinwatch export | head`) ends the output quietly.
pub(super) fn finish_output(result: io::Result<()>) -> Result<ExitCode, Failure> {
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Failure::runtime(e)),
    }
}

/// `twinwatch export`: every twin, one JSON object per line, in key order.
pub fn export(data_dir: &Path) -> Result<ExitCode, Failure> {
    let store = open(data_dir)?;
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 20, stdout);
    let twins = store.twins().map_err(Failure::runtime)?;
    let result = (|| -> io::Result<()> {
        for item in twins {
            let (key, record) = item.map_err(io::Error::other)?;
            let value = export_value(key.as_key(), record.version, &record.doc);
            serde_json::to_writer(&mut out, &value)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    })();
    finish_output(result)
}

/// `twinwatch deadletters`: every dead letter with its reason and position.
pub fn dead_letters(data_dir: &Path) -> Result<ExitCode, Failure> {
    let store = open(data_dir)?;
    let mut out = BufWriter::new(io::stdout().lock());
    let letters = store.dead_letters().map_err(Failure::runtime)?;
    let result = (|| -> io::Result<()> {
        for item in letters {
            let (source, index, record) = item.map_err(io::Error::other)?;
            let mut line = match SourceId::from_text(&source) {
                Some(SourceId::File(path)) => json!({"file": path, "record": index}),
                Some(SourceId::Partition(id)) => json!({"partition": id, "sequenceNumber": index}),
                None => json!({"source": source, "index": index}),
            };
            line["reason"] = json!(record.reason);
            match String::from_utf8(record.raw) {
                Ok(text) => line["raw"] = json!(text),
                Err(e) => {
                    line["rawBase64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(e.as_bytes()))
                }
            }
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    })();
    finish_output(result)
}

/// `twinwatch violations`: every failing (twin, rule), sorted by twin key, then rule id; with
/// `pending`, the pending ones with their deadlines.
pub fn violations(data_dir: &Path, pending: bool) -> Result<ExitCode, Failure> {
    let store = open(data_dir)?;
    let mut out = BufWriter::new(io::stdout().lock());
    let violations: Box<dyn Iterator<Item = _>> = if pending {
        Box::new(store.pending_violations().map_err(Failure::runtime)?)
    } else {
        Box::new(store.violations().map_err(Failure::runtime)?)
    };
    let result = (|| -> io::Result<()> {
        for item in violations {
            let crate::store::StoredViolation { key, violation: v } =
                item.map_err(io::Error::other)?;
            let mut line = crate::compliance::violation_line(key.as_key(), &v.rule_id, &v);
            if let Some(pending) = &v.pending {
                line["deadline"] = json!(pending.deadline.to_string());
            }
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    })();
    finish_output(result)
}

/// `twinwatch policy check`: exit 0 and a count when valid; every problem and exit 2 when not.
pub fn policy_check(files: &[std::path::PathBuf]) -> Result<ExitCode, Failure> {
    match crate::policy::Policy::load(files) {
        Ok(policy) => {
            println!(
                "{} rules in {} files: valid",
                policy.rules().len(),
                files.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for error in &errors.0 {
                println!("{error}");
            }
            eprintln!("twinwatch: {} policy errors", errors.0.len());
            Ok(ExitCode::from(super::EXIT_USAGE))
        }
    }
}

/// `twinwatch generate`.
/// `generate --format twin-documents`: the fleet's twins as the twin query returns them.
fn generate_twin_documents(
    args: &GenerateArgs,
    options: &GenerateOptions,
) -> Result<ExitCode, Failure> {
    use crate::generate::documents::{write_twin_documents, DocumentStats, DocumentsLayout};
    let layout = match args.documents_layout {
        DocumentsLayoutArg::Array => DocumentsLayout::Array,
        DocumentsLayoutArg::Lines => DocumentsLayout::Lines,
    };
    let write = |out: &mut dyn Write| -> io::Result<DocumentStats> {
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let stats = write_twin_documents(options, args.as_of_event, layout, &mut out)?;
        out.flush()?;
        Ok(stats)
    };
    let result = write_to(&args.out, write)?;
    match result {
        Ok(stats) => {
            eprintln!(
                "generated {} device twins and {} module twins as of message {} of {} devices",
                stats.device_twins, stats.module_twins, stats.as_of_event, args.devices
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => finish_output(Err(e)),
    }
}

/// Runs `write` on standard output (`-`) or on the file `out`, created or truncated.
fn write_to<T>(
    out: &std::path::Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<T>,
) -> Result<io::Result<T>, Failure> {
    if out.as_os_str() == "-" {
        return Ok(write(&mut io::stdout().lock()));
    }
    let mut file = File::create(out)
        .with_context(|| format!("creating {}", out.display()))
        .map_err(Failure::runtime)?;
    Ok(write(&mut file))
}

pub fn generate(args: &GenerateArgs) -> Result<ExitCode, Failure> {
    if !(0.0..=1.0).contains(&args.noise) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--noise must be between 0 and 1, not {}",
            args.noise
        )));
    }
    let options = GenerateOptions {
        devices: args.devices,
        events: args.events,
        seed: args.seed,
        hub: args.hub.clone(),
        noise: args.noise,
    };
    if args.format == GenerateFormat::TwinDocuments {
        return generate_twin_documents(args, &options);
    }
    let write = |out: &mut dyn Write| -> io::Result<crate::generate::GenerateStats> {
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let codec = match args.avro_codec {
            AvroCodec::Null => apache_avro::Codec::Null,
            AvroCodec::Deflate => apache_avro::Codec::Deflate(Default::default()),
            AvroCodec::Snappy => apache_avro::Codec::Snappy,
        };
        let stats = match args.format {
            GenerateFormat::Json => write_json_lines(&options, &mut out)?,
            GenerateFormat::CaptureAvro => {
                write_avro(&options, AvroKind::Capture, codec, &mut out)?
            }
            GenerateFormat::StorageAvro => {
                write_avro(&options, AvroKind::Storage, codec, &mut out)?
            }
            GenerateFormat::TwinDocuments => unreachable!("handled above"),
        };
        out.flush()?;
        Ok(stats)
    };
    let result = write_to(&args.out, write)?;
    match result {
        Ok(stats) => {
            eprintln!(
                "generated {} messages ({} lifecycle, {} twin changes, {} noise) for {} devices",
                stats.messages, stats.lifecycle, stats.twin_changes, stats.noise, args.devices
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => finish_output(Err(e)),
    }
}

/// A summary's dead letters by reason, as a JSON object.
pub(super) fn dead_letters_by_reason(
    counts: &std::collections::BTreeMap<crate::model::DeadLetterReason, u64>,
) -> serde_json::Map<String, serde_json::Value> {
    counts
        .iter()
        .map(|(reason, n)| (reason.as_str().to_owned(), serde_json::json!(n)))
        .collect()
}
