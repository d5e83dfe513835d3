//! The batch side of the apply thread: cutting a batch (by size and time), handing it to
//! the writer thread with the sources' checkpoints, and taking the writer's acknowledgements
//! (what the store now holds, which the sources may resume after); and the writer thread
//! itself.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::snapshot::{TwinWrites, Written};
use super::{EngineOptions, PipelineError, State};
use crate::store::keys::META_HIGH_WATER;
use crate::store::{Batch, Store, StoreError};

/// A batch for the writer thread: its number, the batch so far, and the twins it encodes
/// into it.
pub(super) type ToWrite = (u64, Batch, TwinWrites);

/// A written batch: its number, its encoded twins (for the document cache) and its size in
/// bytes.
pub(super) type WriteResult = Result<(u64, Written, usize), StoreError>;

/// The apply thread's ends of the writer thread: batches to it, results from it, the thread.
type WriterEnds = (Sender<ToWrite>, Receiver<WriteResult>, JoinHandle<()>);

/// Starts the writer thread: it takes batches from the apply thread (at most two waiting),
/// encodes their twins, writes each atomically, and answers with what it wrote. Returns the
/// apply thread's ends of both channels and the thread.
pub(super) fn spawn_writer(
    store: &Arc<Store>,
    options: &EngineOptions,
) -> Result<WriterEnds, PipelineError> {
    // Two batches may wait for the writer: the apply thread builds the next one while
    // RocksDB writes the last, and is slowed down only when it gets further ahead.
    let (to_writer, writer_input) = crossbeam_channel::bounded::<ToWrite>(1);
    let (writer_output, from_writer) = crossbeam_channel::bounded::<WriteResult>(4);
    let writer_store = store.clone();
    let commit_seconds = options.metrics.as_ref().map(|m| m.commit_seconds.clone());
    let min_free = options.min_free_bytes;
    let writer = std::thread::Builder::new()
        .name("twinwatch-writer".into())
        .spawn(move || {
            for (batch_no, mut batch, twins) in writer_input {
                if let Some(min_free) = min_free {
                    if let Err(e) = writer_store.wait_for_space(min_free) {
                        let _ = writer_output.send(Err(e));
                        return;
                    }
                }
                crate::failpoint::hit(crate::failpoint::WRITER_BEFORE_WRITE);
                let started = Instant::now();
                let result = twins
                    .encode_into(&writer_store, &mut batch)
                    .and_then(|written| {
                        let bytes = batch.size_in_bytes();
                        writer_store.write(&mut batch)?;
                        Ok((batch_no, written, bytes))
                    });
                crate::failpoint::hit(crate::failpoint::WRITER_AFTER_WRITE);
                if let Some(histogram) = &commit_seconds {
                    histogram.observe(started.elapsed().as_secs_f64());
                }
                let failed = result.is_err();
                if writer_output.send(result).is_err() || failed {
                    return;
                }
            }
        })
        .map_err(PipelineError::Thread)?;
    Ok((to_writer, from_writer, writer))
}

impl State {
    pub(super) fn after_message(&mut self) -> Result<(), PipelineError> {
        self.n_in_batch += 1;
        let started = *self.batch_started.get_or_insert_with(Instant::now);
        if self.n_in_batch >= self.options.batch_messages
            || started.elapsed() >= self.options.batch_interval
        {
            self.commit()?;
        }
        Ok(())
    }

    pub(super) fn commit(&mut self) -> Result<(), PipelineError> {
        let any_source_moved = self.sources.iter().any(|s| s.dirty);
        if self.n_in_batch == 0 && !any_source_moved && self.batch.is_empty() {
            self.batch_started = None;
            return Ok(());
        }
        self.batch_no += 1;
        let started = self.options.metrics.is_some().then(Instant::now);
        // A quarter more than the last: batches vary, and one that outgrows its room is
        // copied whole.
        let next = Batch::with_capacity(self.batch_bytes + self.batch_bytes / 4);
        let mut batch = std::mem::replace(&mut self.batch, next);
        let twins = self.snapshot.take_writes(self.batch_no);
        if self.outbox_grew {
            self.store
                .put_outbox_next(&mut batch, self.next_outbox_seq)?;
            self.outbox_grew = false;
        }
        if self.high_water_moved {
            self.store.put_meta(
                &mut batch,
                META_HIGH_WATER,
                &self.high_water.0.to_be_bytes(),
            )?;
            self.high_water_moved = false;
        }
        let mut positions = Vec::new();
        for (i, source) in self.sources.iter_mut().enumerate().filter(|(_, s)| s.dirty) {
            self.store
                .put_checkpoint(&mut batch, &source.id, &source.checkpoint)?;
            source.dirty = false;
            positions.push((i, source.checkpoint.next_index));
        }
        self.uncommitted.push_back((self.batch_no, positions));
        if let (Some(metrics), Some(started)) = (&self.options.metrics, started) {
            let busy = std::mem::take(&mut self.busy) + started.elapsed();
            metrics.apply_seconds.observe(busy.as_secs_f64());
            metrics.batch_size.observe(self.n_in_batch as f64);
        }
        let to_writer = self.to_writer.as_ref().ok_or(PipelineError::WriterGone)?;
        crate::failpoint::hit(crate::failpoint::APPLY_BEFORE_HANDOFF);
        // A full channel blocks here: the backpressure that keeps the apply thread at most
        // two batches ahead of RocksDB.
        to_writer
            .send((self.batch_no, batch, twins))
            .map_err(|_| PipelineError::WriterGone)?;
        self.counters.batches += 1;
        self.n_in_batch = 0;
        self.batch_started = None;
        self.drain_acks(false)
    }

    /// Commits what is open and waits until the writer has written every batch, so that the
    /// store holds all that was applied (the writer thread goes on).
    pub(super) fn flush(&mut self) -> Result<(), PipelineError> {
        self.commit()?;
        while !self.uncommitted.is_empty() {
            let result = self
                .from_writer
                .recv()
                .map_err(|_| PipelineError::WriterGone)?;
            self.acknowledged(result?);
        }
        Ok(())
    }

    pub(super) fn drain_acks(&mut self, until_closed: bool) -> Result<(), PipelineError> {
        loop {
            let result = if until_closed {
                match self.from_writer.recv() {
                    Ok(result) => result,
                    Err(_) => return Ok(()),
                }
            } else {
                match self.from_writer.try_recv() {
                    Ok(result) => result,
                    Err(crossbeam_channel::TryRecvError::Empty) => return Ok(()),
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        return Err(PipelineError::WriterGone)
                    }
                }
            };
            self.acknowledged(result?);
        }
    }

    /// The writer wrote every batch up to `batch_no`, the last one's twins as `written` and
    /// in `bytes`.
    pub(super) fn acknowledged(&mut self, (batch_no, written, bytes): (u64, Written, usize)) {
        self.snapshot.committed(batch_no, written);
        self.batch_bytes = bytes;
        while self
            .uncommitted
            .front()
            .is_some_and(|(n, _)| *n <= batch_no)
        {
            if let Some((_, positions)) = self.uncommitted.pop_front() {
                for (source, next_index) in positions {
                    if self.committed.len() <= source {
                        self.committed.resize(source + 1, None);
                    }
                    self.committed[source] = Some(next_index);
                }
            }
        }
    }
}
