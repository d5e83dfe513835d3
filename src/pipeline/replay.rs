//! The replay's way into the engine (`twinwatch replay`): the reader thread's chunks of
//! parsed lines or decoded records, applied in file order, each file resumed after its
//! checkpoint; the engine's timer runs while the reader is behind.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossbeam_channel::RecvTimeoutError;

use super::{Counters, Engine, EngineOptions};
use crate::model::SourceId;
use crate::source::avro::RecordMessage;
use crate::source::replay::{spawn_reader, FileStart, ReadEvent, ReplayFile};
use crate::store::{Checkpoint, Store};

/// What a replay did.
pub struct ReplayReport {
    pub counters: Counters,
    pub n_files: usize,
    /// Files that could not be read, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    pub elapsed: Duration,
}

/// Replays `files` in order into `store`, resuming each file at its checkpoint.
pub fn replay(
    store: Arc<Store>,
    files: &[ReplayFile],
    options: EngineOptions,
) -> anyhow::Result<ReplayReport> {
    replay_observed(store, files, options, &mut |_| {})
}

/// What a replay tells its observer (`twinwatch replay`'s progress bar) as it goes.
pub enum ReplayProgress {
    /// The bytes left to read, once every file's checkpoint is known.
    Start { bytes: u64 },
    /// A chunk of `bytes` was applied; `messages` in all so far, at `rate` a second.
    Read {
        bytes: u64,
        messages: u64,
        rate: f64,
    },
    /// Every file is read and the last batch committed.
    Done,
}

/// [`replay`], telling `observe` how far it has come.
pub fn replay_observed(
    store: Arc<Store>,
    files: &[ReplayFile],
    options: EngineOptions,
    observe: &mut dyn FnMut(ReplayProgress),
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
    observe(ReplayProgress::Start { bytes: total_bytes });
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
                let chunk = *chunk;
                let handle = handles[chunk.file];
                if chunk.records.is_empty() {
                    for i in 0..chunk.lines.len() {
                        let raw = chunk.raw(i);
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
                let seconds = started.elapsed().as_secs_f64().max(1e-9);
                let messages = engine.counters().messages;
                observe(ReplayProgress::Read {
                    bytes: chunk.n_bytes,
                    messages,
                    rate: messages as f64 / seconds,
                });
                // The reader may have stopped already; then the buffers are simply dropped.
                if chunk.data.capacity() > 0 {
                    let _ = reader.recycle.try_send(chunk.data);
                }
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
    observe(ReplayProgress::Done);
    Ok(ReplayReport {
        counters,
        n_files: files.len(),
        failed,
        elapsed: started.elapsed(),
    })
}
