//! `twinwatch replay`: captured files through the pipeline into a data directory.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossbeam_channel::RecvTimeoutError;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::Failure;
use crate::alert::spawn_delivery;
use crate::cli::{ReplayArgs, TuningArgs};
use crate::model::SourceId;
use crate::pipeline::{Counters, Engine, EngineOptions};
use crate::source::avro::RecordMessage;
use crate::source::replay::{expand_paths, spawn_reader, FileStart, ReadEvent, ReplayFile};
use crate::store::{Checkpoint, Store, StoreOptions};

impl TuningArgs {
    /// The engine's options from the flags (which clap has checked against the bounds the
    /// configuration file's `[batching]` shares, `crate::config::MAX_*`); their defaults are
    /// `EngineOptions::default()`'s.
    pub fn engine_options(
        &self,
        policy: Arc<crate::policy::Policy>,
        queue_alerts: bool,
    ) -> EngineOptions {
        EngineOptions {
            batch_messages: self.batch_size as usize,
            batch_interval: Duration::from_millis(self.batch_interval_ms),
            max_body_bytes: self.max_body_bytes as usize,
            cache_bytes: (self.cache_mib as usize) << 20,
            policy,
            queue_alerts,
            metrics: None,
            min_free_bytes: None,
            continue_seed: None,
        }
    }
}

/// How long a finished replay waits for its sinks to accept the last alerts; what they have
/// not accepted by then stays in the outbox for the next run.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// What a replay did.
pub struct ReplayReport {
    pub counters: Counters,
    pub n_files: usize,
    /// Files that could not be read, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    pub elapsed: Duration,
}

impl ReplayReport {
    fn summary_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let dead: serde_json::Map<String, serde_json::Value> = c
            .dead_lettered
            .iter()
            .map(|(reason, n)| (reason.as_str().to_owned(), json!(n)))
            .collect();
        json!({
            "messages": c.messages,
            "applied": c.applied,
            "stale": c.stale,
            "ignored": c.ignored,
            "dead_lettered": dead,
            "alerts": {"opened": c.alerts_opened, "resolved": c.alerts_resolved},
            "files": self.n_files,
            "failed_files": self.failed.iter()
                .map(|(path, error)| json!({"path": path.display().to_string(), "error": error}))
                .collect::<Vec<_>>(),
        })
    }

    fn one_line(&self) -> String {
        let c = &self.counters;
        let seconds = self.elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            c.messages as f64 / seconds
        } else {
            0.0
        };
        format!(
            "replayed {} messages from {} files in {seconds:.2} s ({rate:.0}/s): {} applied, {} stale, {} ignored, {} dead-lettered; alerts {} opened, {} resolved{}",
            c.messages,
            self.n_files,
            c.applied,
            c.stale,
            c.ignored,
            c.n_dead_lettered(),
            c.alerts_opened,
            c.alerts_resolved,
            if self.failed.is_empty() {
                String::new()
            } else {
                format!("; {} files unreadable", self.failed.len())
            }
        )
    }
}

/// Gives the sinks up to [`DRAIN_DEADLINE`] to accept the last alerts and stops delivery;
/// what they have not accepted stays in the outbox for the next run.
pub(super) fn drain(delivery: crate::alert::Delivery) -> Result<(), Failure> {
    let delivered = delivery
        .drain_and_stop(DRAIN_DEADLINE)
        .map_err(Failure::runtime)?;
    if delivered.left_in_outbox > 0 {
        tracing::warn!(
            left = delivered.left_in_outbox,
            "some alerts were not accepted by every sink; they stay queued for the next run"
        );
    }
    if delivered.dead_lettered > 0 {
        tracing::warn!(
            dead_lettered = delivered.dead_lettered,
            "some alerts were refused for good by a sink: see `twinwatch deadletters --alerts`"
        );
    }
    Ok(())
}

/// Writes a run's summary as pretty JSON.
pub(super) fn write_summary(
    path: &std::path::Path,
    summary: &serde_json::Value,
) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(summary).map_err(Failure::runtime)?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("writing {}", path.display()))
        .map_err(Failure::runtime)
}

pub fn run(args: ReplayArgs) -> Result<ExitCode, Failure> {
    let policy = Arc::new(super::load_policy(&args.policies)?);
    let files = expand_paths(&args.paths).map_err(Failure::usage)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))
        .map_err(Failure::runtime)?;
    let store = Store::open(&args.data_dir, &StoreOptions::default())
        .with_context(|| format!("opening {}", args.data_dir.display()))
        .map_err(Failure::runtime)?;
    let store = Arc::new(store);
    let sinks = super::sinks::build(&args.sinks, &store)?;
    let queue_alerts = !sinks.is_empty();
    // Delivery starts first: alerts left in the outbox by an interrupted run go out now.
    let delivery = if queue_alerts {
        Some(spawn_delivery(store.clone(), sinks, None).map_err(Failure::runtime)?)
    } else {
        None
    };
    let options = args.tuning.engine_options(policy, queue_alerts);
    let report = replay(store, &files, options).map_err(Failure::runtime)?;
    if let Some(delivery) = delivery {
        drain(delivery)?;
    }
    for (path, error) in &report.failed {
        tracing::error!(path = %path.display(), error = %error, "file not replayed");
    }
    println!("{}", report.one_line());
    if let Some(path) = &args.summary {
        write_summary(path, &report.summary_json())?;
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

/// Replays `files` in order into `store`, resuming each file at its checkpoint.
pub fn replay(
    store: Arc<Store>,
    files: &[ReplayFile],
    options: EngineOptions,
) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let tick = options.batch_interval;
    let mut engine = Engine::new(store, options)?;
    let mut handles = Vec::with_capacity(files.len());
    let mut starts = Vec::with_capacity(files.len());
    let mut total_bytes = 0u64;
    for file in files {
        let path = &file.path;
        let canonical =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        let (handle, checkpoint) = engine.add_source(
            SourceId::File(canonical.to_string_lossy().into_owned()),
            file.name.clone(),
        )?;
        let byte_offset = checkpoint.byte_offset.unwrap_or(0);
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        total_bytes += size.saturating_sub(byte_offset);
        handles.push(handle);
        starts.push(FileStart {
            path: path.clone(),
            next_record: checkpoint.next_index,
            byte_offset,
        });
    }
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total_bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let reader = spawn_reader(starts)?;
    let mut failed = Vec::new();
    loop {
        let event = match reader.events.recv_timeout(tick) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                engine.tick()?;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match event {
            ReadEvent::Chunk(chunk) => {
                let handle = handles[chunk.file];
                if chunk.records.is_empty() {
                    for (i, &(start, end)) in chunk.lines.iter().enumerate() {
                        let raw = &chunk.data[start as usize..end as usize];
                        let next_offset = chunk.base_offset + chunk.line_ends[i];
                        engine.ingest_parsed_line(
                            handle,
                            chunk.first_record + i as u64,
                            next_offset,
                            chunk.parsed.line_nodes(i),
                            chunk.parsed.verdict(i),
                            raw,
                        )?;
                    }
                } else {
                    for (i, record) in chunk.records.iter().enumerate() {
                        let (start, end) = chunk.lines[i];
                        let message = RecordMessage {
                            record,
                            body_bytes: &chunk.data[start as usize..end as usize],
                            body_nodes: chunk.parsed.line_nodes(i),
                            body_verdict: chunk.parsed.verdict(i).body,
                        };
                        engine.ingest_message(
                            handle,
                            chunk.first_record + i as u64,
                            &message,
                            &|| message.raw(),
                        )?;
                    }
                }
                progress.inc(chunk.data.len() as u64);
                let seconds = started.elapsed().as_secs_f64().max(1e-9);
                progress.set_message(format!(
                    "{:.0} msg/s",
                    engine.counters().messages as f64 / seconds
                ));
                // The reader may have stopped already; then the buffers are simply dropped.
                let _ = reader.recycle.try_send(chunk.data);
                if chunk.records.capacity() > 0 {
                    // Not cleared: the reader decodes into these records again.
                    let _ = reader.recycle_records.try_send(chunk.records);
                }
                let _ = reader.recycle.try_send(chunk.parsed.into_buffer());
            }
            ReadEvent::FileEnd {
                file,
                byte_offset,
                next_record,
            } => engine.set_position(
                handles[file],
                Checkpoint {
                    next_index: next_record,
                    byte_offset,
                    offset: None,
                },
            ),
            ReadEvent::FileError { file, error } => failed.push((files[file].path.clone(), error)),
        }
    }
    reader
        .handle
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
    let counters = engine.finish()?;
    progress.finish_and_clear();
    Ok(ReplayReport {
        counters,
        n_files: files.len(),
        failed,
        elapsed: started.elapsed(),
    })
}
