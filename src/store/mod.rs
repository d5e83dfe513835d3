//! The snapshot on disk: the only module that touches RocksDB.
//!
//! Column families (names in [`keys`]): `twins` (key → version, `createdAt`, document),
//! `tombstones` (key → version, `deletedAt`), `checkpoints` (source → position),
//! `deadletters` (source and position → reason and raw bytes) and `meta` (the data format).
//! Every change of one batch goes into one [`Batch`] and is written atomically with the
//! sources' checkpoints, so a crash at any point leaves the snapshot at a batch boundary.
//! Records are encoded in `codec` (violations too: readers get them decoded, typed), keys in
//! [`keys`].

mod codec;
pub mod keys;

use std::path::Path;

use crate::model::Slot;
use crate::model::{DeadLetterReason, OwnedTwinKey, SourceId, Violation};
use crate::time::Ticks;
use crate::value::CodecError;
use codec::{
    decode_tombstone, decode_violation, encode_tombstone, encode_violation, read_violation,
    twin_header, OUTBOX_HEADER,
};
pub use codec::{
    decode_twin, decode_twin_doc, encode_twin, Checkpoint, DeadLetterRecord, OutboxEntry,
    StoredViolation, TwinAndViolations, TwinRecord, EXPIRED_REASON,
};
use keys::*;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

/// The data format this build reads and writes. A directory written by another format is
/// refused rather than misread.
pub const FORMAT: &str = "twinwatch-snapshot-1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("data directory {path} holds format {found:?}; this twinwatch reads {FORMAT:?}")]
    Format { path: String, found: String },
    #[error("corrupt {what} record in the data directory: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("column family {0} is missing")]
    MissingColumnFamily(&'static str),
    #[error("{0}")]
    NoSpace(String),
}

impl StoreError {
    /// A stored key that is not an encoded twin key.
    pub fn bad_key(key: &[u8]) -> StoreError {
        StoreError::Corrupt {
            what: "key",
            detail: format!("{key:?}"),
        }
    }

    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Rocks(_) => "rocksdb",
            StoreError::Format { .. } => "format",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::MissingColumnFamily(_) => "missing_cf",
            StoreError::NoSpace(_) => "no_space",
        }
    }
}

impl From<CodecError> for StoreError {
    fn from(e: CodecError) -> Self {
        StoreError::Corrupt {
            what: "twin",
            detail: e.to_string(),
        }
    }
}

/// Tuning that callers may set.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// RocksDB block cache, bytes.
    pub block_cache_bytes: usize,
    /// Size of one memtable, bytes.
    pub write_buffer_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 64 << 20,
        }
    }
}

/// A `meta` entry: its key (a prefix cut off) and value.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

thread_local! {
    /// The value [`Store::put_outbox`] builds, reused (the pipeline queues alerts by the
    /// thousand in a storm).
    static OUTBOX_VALUE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One atomic write: build it with the `Store` methods, then [`Store::write`] it.
#[derive(Default)]
pub struct Batch {
    inner: WriteBatch,
}

impl Batch {
    /// An empty batch with room for `bytes` of writes (allocated, not touched).
    pub fn with_capacity(bytes: usize) -> Batch {
        Batch {
            inner: WriteBatch::with_capacity_bytes(bytes),
        }
    }

    /// The size of the batch's writes, in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.inner.size_in_bytes()
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    pub fn clear(&mut self) {
        self.inner.clear();
    }
}

/// Raw twins in key order ([`Store::twin_cursor`]): the encoded key and the encoded record
/// ([`decode_twin`]), borrowed until the cursor moves.
pub struct TwinCursor<'a> {
    inner: rocksdb::DBRawIterator<'a>,
}

impl TwinCursor<'_> {
    /// Moves to the first twin at or after `key`.
    pub fn seek(&mut self, key: &[u8]) {
        self.inner.seek(key);
    }

    /// Moves to the next twin; only when [`TwinCursor::current`] is `Some`.
    pub fn next(&mut self) {
        self.inner.next();
    }

    /// The twin under the cursor: `None` past the end or after a read error
    /// ([`TwinCursor::status`] tells which).
    pub fn current(&self) -> Option<(&[u8], &[u8])> {
        self.inner.item()
    }

    pub fn status(&self) -> Result<(), StoreError> {
        Ok(self.inner.status()?)
    }
}

/// The RocksDB snapshot.
pub struct Store {
    db: DB,
    write_options: WriteOptions,
    path: std::path::PathBuf,
    /// Why writes are waiting for disk space (`None`: they are not).
    space_problem: std::sync::Mutex<Option<String>>,
    /// Set when the service stops: a write waiting for space gives up.
    stop_waiting: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens (creating if needed) the data directory for reading and writing.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.increase_parallelism(2);
        db_options.set_max_background_jobs(2);
        db_options.set_bytes_per_sync(1 << 20);
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(DBCompressionType::Lz4);
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            if *name == CF_TWINS || *name == CF_TOMBSTONES {
                // A point read on a key that is absent from a file costs a bloom probe, not a
                // block read.
                table.set_bloom_filter(10.0, false);
                table.set_cache_index_and_filter_blocks(true);
                table.set_pin_l0_filter_and_index_blocks_in_cache(true);
                cf.set_write_buffer_size(options.write_buffer_bytes);
            }
            cf.set_block_based_table_factory(&table);
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&db_options, path, cfs)?;
        let store = Store::from_db(db, path);
        store.check_format(path, true)?;
        Ok(store)
    }

    /// Opens an existing data directory read-only (export, queries); works beside a running
    /// writer.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        // Only the column families the directory has: one written by an older twinwatch
        // lacks those added since (created at the next read-write open).
        let present = DB::list_cf(&Options::default(), path).unwrap_or_default();
        let cfs = ALL_CFS
            .iter()
            .filter(|name| present.is_empty() || present.iter().any(|p| p == *name));
        let db = DB::open_cf_for_read_only(&Options::default(), path, cfs, false)?;
        let store = Store::from_db(db, path);
        store.check_format(path, false)?;
        Ok(store)
    }

    fn from_db(db: DB, path: &Path) -> Store {
        let mut write_options = WriteOptions::default();
        // The WAL is on and survives a process crash; syncing each batch would only protect
        // against a machine crash, at the cost of a disk flush per batch.
        write_options.set_sync(false);
        Store {
            db,
            write_options,
            path: path.to_owned(),
            space_problem: std::sync::Mutex::new(None),
            stop_waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Free bytes on the data directory's filesystem (for an unprivileged process).
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::ffi::OsStrExt as _;
        let path = std::ffi::CString::new(self.path.as_os_str().as_bytes())
            .map_err(std::io::Error::other)?;
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is a NUL-terminated string and `stat` a buffer of the right type,
        // which statvfs fills when it returns 0.
        let stat = unsafe {
            if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            stat.assume_init()
        };
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
    }

    /// Waits until the filesystem has `min_free` bytes free, so that a write never meets a
    /// full disk half-way (RocksDB stops accepting writes after one). While it waits, the
    /// reason is in [`Store::space_problem`] and the writer, and so the whole pipeline, pauses.
    /// Gives up with [`StoreError::NoSpace`] once [`Store::stop_waiting`] was called.
    pub fn wait_for_space(&self, min_free: u64) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let mut warned = false;
        loop {
            let free = self.free_bytes().unwrap_or(u64::MAX);
            if free >= min_free {
                if warned {
                    tracing::info!(free_mib = free >> 20, "disk space is back: writing again");
                }
                self.set_space_problem(None);
                return Ok(());
            }
            let problem = format!(
                "the data directory's disk is full: {} MiB free on {}, {} MiB needed to write; consuming is paused until space is freed",
                free >> 20,
                self.path.display(),
                min_free >> 20
            );
            if !warned {
                tracing::error!("{problem}");
                warned = true;
            }
            self.set_space_problem(Some(problem.clone()));
            if self.stop_waiting.load(Ordering::SeqCst) {
                return Err(StoreError::NoSpace(problem));
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    fn set_space_problem(&self, problem: Option<String>) {
        if let Ok(mut slot) = self.space_problem.lock() {
            *slot = problem;
        }
    }

    /// Why writes are paused, if they are.
    pub fn space_problem(&self) -> Option<String> {
        self.space_problem.lock().ok().and_then(|p| p.clone())
    }

    /// Makes a write waiting for space give up (the service is stopping).
    pub fn stop_waiting(&self) {
        self.stop_waiting
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_format(&self, path: &Path, writable: bool) -> Result<(), StoreError> {
        let meta = self.cf(CF_META)?;
        match self.db.get_cf(meta, META_FORMAT)? {
            Some(found) if found == FORMAT.as_bytes() => Ok(()),
            Some(found) => Err(StoreError::Format {
                path: path.display().to_string(),
                found: String::from_utf8_lossy(&found).into_owned(),
            }),
            None if writable => {
                self.db.put_cf(meta, META_FORMAT, FORMAT)?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    }

    /// The encoded twin record at an encoded key.
    pub fn twin_bytes(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_TWINS)?, key)?)
    }

    pub fn checkpoint(&self, source: &SourceId) -> Result<Option<Checkpoint>, StoreError> {
        let Some(raw) = self
            .db
            .get_cf(self.cf(CF_CHECKPOINTS)?, source.to_text().as_bytes())?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                what: "checkpoint",
                detail: e.to_string(),
            })
    }

    /// Every committed checkpoint, by source.
    pub fn checkpoints(&self) -> Result<Vec<(SourceId, Checkpoint)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CHECKPOINTS)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            let corrupt = |detail: String| StoreError::Corrupt {
                what: "checkpoint",
                detail,
            };
            let source = std::str::from_utf8(&k)
                .ok()
                .and_then(SourceId::from_text)
                .ok_or_else(|| corrupt("bad source key".into()))?;
            let checkpoint = serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
            out.push((source, checkpoint));
        }
        Ok(out)
    }

    /// Calls `f` with every key's [`Slot`]: each twin's header and each tombstone.
    pub fn for_each_slot(&self, mut f: impl FnMut(OwnedTwinKey, Slot)) -> Result<(), StoreError> {
        for item in self.db.iterator_cf(self.cf(CF_TWINS)?, IteratorMode::Start) {
            let (k, v) = item?;
            let key = decode_twin_key(&k).ok_or_else(|| StoreError::bad_key(&k))?;
            let (version, created_at, last_change, _) = twin_header(&v)?;
            f(
                key,
                Slot::Live {
                    version,
                    created_at,
                    last_change,
                },
            );
        }
        for item in self
            .db
            .iterator_cf(self.cf(CF_TOMBSTONES)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            let key = decode_twin_key(&k).ok_or_else(|| StoreError::bad_key(&k))?;
            let (version, deleted_at) = decode_tombstone(&v)?;
            f(
                key,
                Slot::Dead {
                    version,
                    deleted_at,
                },
            );
        }
        Ok(())
    }

    /// Every twin in key order (the export order).
    pub fn twins(
        &self,
    ) -> Result<impl Iterator<Item = Result<(OwnedTwinKey, TwinRecord), StoreError>> + '_, StoreError>
    {
        let iter = self.db.iterator_cf(self.cf(CF_TWINS)?, IteratorMode::Start);
        Ok(iter.map(|item| {
            let (k, v) = item?;
            let key = decode_twin_key(&k).ok_or_else(|| StoreError::bad_key(&k))?;
            Ok((key, decode_twin(&v)?))
        }))
    }

    /// Every dead letter in source and position order: `(source, index, record)`.
    pub fn dead_letters(
        &self,
    ) -> Result<
        impl Iterator<Item = Result<(String, u64, DeadLetterRecord), StoreError>> + '_,
        StoreError,
    > {
        let iter = self
            .db
            .iterator_cf(self.cf(CF_DEAD_LETTERS)?, IteratorMode::Start);
        Ok(iter.map(|item| {
            let (k, v) = item?;
            let corrupt = |detail: String| StoreError::Corrupt {
                what: "dead letter",
                detail,
            };
            let (source, index) =
                decode_dead_letter_key(&k).ok_or_else(|| corrupt(format!("key {k:?}")))?;
            let record = serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
            Ok((source, index, record))
        }))
    }

    /// A value of the `meta` column family.
    pub fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_META)?, key)?)
    }

    /// The `meta` entries whose key starts with `prefix`, with the prefix cut off, in key order.
    pub fn meta_with_prefix(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, StoreError> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_META)?,
            IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            let Some(rest) = k.strip_prefix(prefix) else {
                break;
            };
            out.push((rest.to_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// The encoded keys of the twins a seed pass touched and has not yet evaluated, in order.
    pub fn seed_touched(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SEED_TOUCHED)?, IteratorMode::Start)
        {
            let (k, _) = item?;
            out.push(k.into_vec());
        }
        Ok(out)
    }

    /// A cursor over the stored twins' raw bytes, in key order: for passes that read on one
    /// thread and decode on others.
    pub fn twin_cursor(&self) -> Result<TwinCursor<'_>, StoreError> {
        // A pass reads every block once: it reads ahead, and leaves the block cache to the
        // twins the feed reads.
        let mut options = rocksdb::ReadOptions::default();
        options.fill_cache(false);
        options.set_readahead_size(2 << 20);
        Ok(TwinCursor {
            inner: self.db.raw_iterator_cf_opt(self.cf(CF_TWINS)?, options),
        })
    }

    // Batch building --------------------------------------------------------------------------

    pub fn put_meta(&self, batch: &mut Batch, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        batch.inner.put_cf(self.cf(CF_META)?, key, value);
        Ok(())
    }

    pub fn delete_meta(&self, batch: &mut Batch, key: &[u8]) -> Result<(), StoreError> {
        batch.inner.delete_cf(self.cf(CF_META)?, key);
        Ok(())
    }

    pub fn put_seed_touched(&self, batch: &mut Batch, key: &[u8]) -> Result<(), StoreError> {
        batch.inner.put_cf(self.cf(CF_SEED_TOUCHED)?, key, b"");
        Ok(())
    }

    /// Deletes the `seed_touched` entries from the first of `keys` (sorted) to the last, and
    /// any between them.
    pub fn delete_seed_touched_range(
        &self,
        batch: &mut Batch,
        keys: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        if let (Some(first), Some(last)) = (keys.first(), keys.last()) {
            // The key right after `last` in byte order: `last` and a zero byte.
            let end = [last.as_slice(), &[0]].concat();
            batch.inner.delete_range_cf(
                self.cf(CF_SEED_TOUCHED)?,
                first.as_slice(),
                end.as_slice(),
            );
        }
        Ok(())
    }

    pub fn delete_seed_touched(&self, batch: &mut Batch, key: &[u8]) -> Result<(), StoreError> {
        batch.inner.delete_cf(self.cf(CF_SEED_TOUCHED)?, key);
        Ok(())
    }

    pub fn put_twin(&self, batch: &mut Batch, key: &[u8], record: &[u8]) -> Result<(), StoreError> {
        batch.inner.put_cf(self.cf(CF_TWINS)?, key, record);
        Ok(())
    }

    pub fn delete_twin(&self, batch: &mut Batch, key: &[u8]) -> Result<(), StoreError> {
        batch.inner.delete_cf(self.cf(CF_TWINS)?, key);
        Ok(())
    }

    pub fn put_tombstone(
        &self,
        batch: &mut Batch,
        key: &[u8],
        version: i64,
        deleted_at: Ticks,
    ) -> Result<(), StoreError> {
        batch.inner.put_cf(
            self.cf(CF_TOMBSTONES)?,
            key,
            encode_tombstone(version, deleted_at),
        );
        Ok(())
    }

    pub fn delete_tombstone(&self, batch: &mut Batch, key: &[u8]) -> Result<(), StoreError> {
        batch.inner.delete_cf(self.cf(CF_TOMBSTONES)?, key);
        Ok(())
    }

    pub fn put_checkpoint(
        &self,
        batch: &mut Batch,
        source: &SourceId,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(checkpoint).map_err(|e| StoreError::Corrupt {
            what: "checkpoint",
            detail: e.to_string(),
        })?;
        batch
            .inner
            .put_cf(self.cf(CF_CHECKPOINTS)?, source.to_text().as_bytes(), value);
        Ok(())
    }

    /// Records events a partition's retention dropped before they were read (sequence
    /// numbers `first..=last`) as a dead letter of reason [`EXPIRED_REASON`] at `first`: not a
    /// message, a gap, which `twinwatch deadletters` shows beside the messages that could not
    /// be applied. Its raw record is `{"firstSequenceNumber", "lastSequenceNumber", "events"}`.
    pub fn put_expired(
        &self,
        batch: &mut Batch,
        source: &str,
        first: u64,
        last: u64,
    ) -> Result<(), StoreError> {
        let raw = serde_json::json!({
            "firstSequenceNumber": first,
            "lastSequenceNumber": last,
            "events": last.saturating_sub(first).saturating_add(1),
        });
        let record = DeadLetterRecord {
            reason: EXPIRED_REASON.to_owned(),
            raw: raw.to_string().into_bytes(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
            what: "dead letter",
            detail: e.to_string(),
        })?;
        batch.inner.put_cf(
            self.cf(CF_DEAD_LETTERS)?,
            dead_letter_key(source, first),
            value,
        );
        Ok(())
    }

    pub fn put_dead_letter(
        &self,
        batch: &mut Batch,
        source: &str,
        index: u64,
        reason: DeadLetterReason,
        raw: &[u8],
    ) -> Result<(), StoreError> {
        let record = DeadLetterRecord {
            reason: reason.as_str().to_owned(),
            raw: raw.to_vec(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
            what: "dead letter",
            detail: e.to_string(),
        })?;
        batch.inner.put_cf(
            self.cf(CF_DEAD_LETTERS)?,
            dead_letter_key(source, index),
            value,
        );
        Ok(())
    }

    /// Writes a violation of the twin `twin_key` in the column family of its state: `pending`
    /// while it is pending (`docs/semantics.md` §9), else `violations`.
    pub fn put_violation(
        &self,
        batch: &mut Batch,
        twin_key: &[u8],
        violation: &Violation,
    ) -> Result<(), StoreError> {
        let cf = if violation.pending.is_some() {
            CF_PENDING
        } else {
            CF_VIOLATIONS
        };
        batch.inner.put_cf(
            self.cf(cf)?,
            violation_key(twin_key, &violation.rule_id),
            encode_violation(violation),
        );
        Ok(())
    }

    pub fn delete_violation(
        &self,
        batch: &mut Batch,
        twin_key: &[u8],
        rule_id: &str,
    ) -> Result<(), StoreError> {
        batch
            .inner
            .delete_cf(self.cf(CF_VIOLATIONS)?, violation_key(twin_key, rule_id));
        Ok(())
    }

    pub fn delete_pending(
        &self,
        batch: &mut Batch,
        twin_key: &[u8],
        rule_id: &str,
    ) -> Result<(), StoreError> {
        batch
            .inner
            .delete_cf(self.cf(CF_PENDING)?, violation_key(twin_key, rule_id));
        Ok(())
    }

    /// Every violation in twin-then-rule order, decoded (a record that does not decode is
    /// [`StoreError::Corrupt`]).
    pub fn violations(
        &self,
    ) -> Result<impl Iterator<Item = Result<StoredViolation, StoreError>> + '_, StoreError> {
        self.violations_of(CF_VIOLATIONS)
    }

    /// Every pending violation (`docs/semantics.md` §9) in twin-then-rule order.
    pub fn pending_violations(
        &self,
    ) -> Result<impl Iterator<Item = Result<StoredViolation, StoreError>> + '_, StoreError> {
        self.violations_of(CF_PENDING)
    }

    fn violations_of(
        &self,
        cf: &'static str,
    ) -> Result<impl Iterator<Item = Result<StoredViolation, StoreError>> + '_, StoreError> {
        let iter = self.db.iterator_cf(self.cf(cf)?, IteratorMode::Start);
        Ok(iter.map(|item| {
            let (k, v) = item?;
            let (key, rule_id) = decode_violation_key(&k).ok_or_else(|| StoreError::Corrupt {
                what: "violation key",
                detail: format!("{k:?}"),
            })?;
            let violation = read_violation(&key.as_key(), &rule_id, &v)?;
            Ok(StoredViolation { key, violation })
        }))
    }

    /// Queues `alert` at `seq`, stamped with the time now (Unix milliseconds, in a small
    /// header before the alert: see [`OutboxEntry`]), which is when its batch is committed
    /// give or take the batch interval: the outbox's oldest-age gauge and `/readyz` use it.
    pub fn put_outbox(&self, batch: &mut Batch, seq: u64, alert: &[u8]) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        OUTBOX_VALUE.with_borrow_mut(|value| -> Result<(), StoreError> {
            value.clear();
            value.extend_from_slice(&OUTBOX_HEADER);
            value.extend_from_slice(&now.to_be_bytes());
            value.extend_from_slice(alert);
            batch
                .inner
                .put_cf(self.cf(CF_OUTBOX)?, outbox_key(seq), &value[..]);
            Ok(())
        })
    }

    /// Up to `limit` outbox entries from sequence number `from` on, in order, with the time
    /// each was committed (`None` for entries written before the time was recorded).
    pub fn outbox_entries(&self, from: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let start = outbox_key(from);
        let iter = self.db.iterator_cf(
            self.cf(CF_OUTBOX)?,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            let seq =
                u64::from_be_bytes(k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    what: "outbox key",
                    detail: format!("{k:?}"),
                })?);
            out.push(OutboxEntry::decode(seq, &v));
        }
        Ok(out)
    }

    /// Deletes the outbox entries from `from` up to (not including) `to` in `batch`: those
    /// every sink has accepted (or set aside as dead letters).
    pub fn delete_outbox_range(
        &self,
        batch: &mut Batch,
        from: u64,
        to: u64,
    ) -> Result<(), StoreError> {
        if from < to {
            batch
                .inner
                .delete_range_cf(self.cf(CF_OUTBOX)?, outbox_key(from), outbox_key(to));
        }
        Ok(())
    }

    /// The delivery cursor of the sink named `sink`: the outbox sequence number from which it
    /// has not accepted anything yet (`None`: it never accepted anything here).
    pub fn sink_cursor(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        match self.db.get_cf(self.cf(CF_META)?, sink_cursor_key(sink))? {
            Some(raw) => Ok(Some(u64::from_be_bytes(
                raw.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    what: "sink cursor",
                    detail: format!("{raw:?}"),
                })?,
            ))),
            None => Ok(None),
        }
    }

    /// Records the delivery cursor of the sink named `sink` in `batch`.
    pub fn put_sink_cursor(
        &self,
        batch: &mut Batch,
        sink: &str,
        next: u64,
    ) -> Result<(), StoreError> {
        batch
            .inner
            .put_cf(self.cf(CF_META)?, sink_cursor_key(sink), next.to_be_bytes());
        Ok(())
    }

    /// Records an alert dead letter (the outbox entry `seq` refused for good by `sink`;
    /// `record` is its JSON description) in `batch`.
    pub fn put_alert_dead_letter(
        &self,
        batch: &mut Batch,
        seq: u64,
        sink: &str,
        record: &[u8],
    ) -> Result<(), StoreError> {
        batch.inner.put_cf(
            self.cf(CF_ALERT_DEAD_LETTERS)?,
            alert_dead_letter_key(seq, sink),
            record,
        );
        Ok(())
    }

    /// Every alert dead letter's record, in outbox order (none in a data directory written
    /// before alert dead letters existed, opened read-only).
    pub fn alert_dead_letters(
        &self,
    ) -> Result<impl Iterator<Item = Result<Vec<u8>, StoreError>> + '_, StoreError> {
        let iter = self
            .db
            .cf_handle(CF_ALERT_DEAD_LETTERS)
            .map(|cf| self.db.iterator_cf(cf, IteratorMode::Start));
        Ok(iter
            .into_iter()
            .flatten()
            .map(|item| Ok(item?.1.into_vec())))
    }

    pub fn delete_outbox(&self, batch: &mut Batch, seq: u64) -> Result<(), StoreError> {
        batch.inner.delete_cf(self.cf(CF_OUTBOX)?, outbox_key(seq));
        Ok(())
    }

    /// Up to `limit` outbox entries from sequence number `from` on, in order.
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .outbox_entries(from, limit)?
            .into_iter()
            .map(|entry| (entry.seq, entry.alert))
            .collect())
    }

    /// The next outbox sequence number: past every entry ever queued (the recorded high-water
    /// mark) and past every entry present.
    pub fn next_outbox_seq(&self) -> Result<u64, StoreError> {
        let recorded = match self.db.get_cf(self.cf(CF_META)?, META_OUTBOX_NEXT)? {
            Some(raw) => {
                u64::from_be_bytes(raw.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    what: "outbox high-water mark",
                    detail: format!("{raw:?}"),
                })?)
            }
            None => 0,
        };
        Ok(recorded.max(self.outbox_end()?))
    }

    /// Records the next outbox sequence number in `batch`.
    pub fn put_outbox_next(&self, batch: &mut Batch, next: u64) -> Result<(), StoreError> {
        batch
            .inner
            .put_cf(self.cf(CF_META)?, META_OUTBOX_NEXT, next.to_be_bytes());
        Ok(())
    }

    /// The sequence number after the last outbox entry present (0 when empty).
    fn outbox_end(&self) -> Result<u64, StoreError> {
        let mut iter = self.db.iterator_cf(self.cf(CF_OUTBOX)?, IteratorMode::End);
        match iter.next() {
            Some(item) => {
                let (k, _) = item?;
                let seq =
                    u64::from_be_bytes(k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                        what: "outbox key",
                        detail: format!("{k:?}"),
                    })?);
                Ok(seq + 1)
            }
            None => Ok(0),
        }
    }

    /// Writes a batch atomically.
    pub fn write(&self, batch: &mut Batch) -> Result<(), StoreError> {
        let inner = std::mem::take(&mut batch.inner);
        self.db.write_opt(inner, &self.write_options)?;
        Ok(())
    }

    /// A twin and its violations (decoded, by rule id), read from one
    /// snapshot so that they agree; `None` when the twin does not exist (deleted or never
    /// seen). A device twin's key is a prefix of its own violations' keys but of none of its
    /// modules' (their key has the module id where the device's has the terminator).
    pub fn twin_with_violations(
        &self,
        key: &[u8],
    ) -> Result<Option<TwinAndViolations>, StoreError> {
        let snapshot = self.db.snapshot();
        let Some(bytes) = snapshot.get_cf(self.cf(CF_TWINS)?, key)? else {
            return Ok(None);
        };
        let twin = decode_twin(&bytes)?;
        let mut violations = Vec::new();
        let iter = snapshot.iterator_cf(
            self.cf(CF_VIOLATIONS)?,
            IteratorMode::From(key, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            let Some(rule) = k.strip_prefix(key) else {
                break;
            };
            let rule = String::from_utf8(rule.to_vec()).map_err(|_| StoreError::Corrupt {
                what: "violation key",
                detail: format!("{k:?}"),
            })?;
            let violation = decode_violation(&rule, &v).ok_or_else(|| StoreError::Corrupt {
                what: "violation",
                detail: format!("{k:?}"),
            })?;
            violations.push(violation);
        }
        Ok(Some((twin, violations)))
    }

    /// Violations in key order from just after `after` (or from the start of `prefix`), those
    /// under `prefix` only, that `keep` accepts (each is decoded first; one that does not decode
    /// is [`StoreError::Corrupt`]): at most `limit` of them, looking at no more
    /// than `max_scan` entries. Also returns where to continue: `None` when nothing further
    /// matches, else the last key looked at.
    pub fn violations_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_scan: usize,
        keep: impl FnMut(&Violation) -> bool,
    ) -> Result<(Vec<StoredViolation>, Option<Vec<u8>>), StoreError> {
        self.page_of(CF_VIOLATIONS, prefix, after, limit, max_scan, keep)
    }

    /// [`Store::violations_page`] of the pending violations (`docs/semantics.md` §9).
    pub fn pending_violations_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_scan: usize,
        keep: impl FnMut(&Violation) -> bool,
    ) -> Result<(Vec<StoredViolation>, Option<Vec<u8>>), StoreError> {
        self.page_of(CF_PENDING, prefix, after, limit, max_scan, keep)
    }

    fn page_of(
        &self,
        cf: &'static str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_scan: usize,
        mut keep: impl FnMut(&Violation) -> bool,
    ) -> Result<(Vec<StoredViolation>, Option<Vec<u8>>), StoreError> {
        let start = after.unwrap_or(prefix);
        let iter = self.db.iterator_cf(
            self.cf(cf)?,
            IteratorMode::From(start, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        for (scanned, item) in iter.enumerate() {
            let (k, v) = item?;
            if after == Some(&k[..]) {
                continue;
            }
            if !k.starts_with(prefix) {
                return Ok((out, None));
            }
            if scanned >= max_scan {
                return Ok((out, last));
            }
            let (twin, rule_id) = decode_violation_key(&k).ok_or_else(|| StoreError::Corrupt {
                what: "violation key",
                detail: format!("{k:?}"),
            })?;
            let violation = read_violation(&twin.as_key(), &rule_id, &v)?;
            if keep(&violation) {
                if out.len() == limit {
                    // One more matches: the page is full and there is more.
                    return Ok((out, last));
                }
                out.push(StoredViolation {
                    key: twin,
                    violation,
                });
            }
            last = Some(k.into_vec());
        }
        Ok((out, None))
    }

    /// RocksDB's figures that matter to an operator, summed over the column families (the
    /// block cache is shared: read once).
    pub fn stats(&self) -> StoreStats {
        let sum = |property: &str| -> u64 {
            ALL_CFS
                .iter()
                .filter_map(|name| self.db.cf_handle(name))
                .filter_map(|cf| self.db.property_int_value_cf(cf, property).ok().flatten())
                .sum()
        };
        let first_cf = self.db.cf_handle(CF_TWINS);
        StoreStats {
            memtable_bytes: sum("rocksdb.cur-size-all-mem-tables"),
            pending_compaction_bytes: sum("rocksdb.estimate-pending-compaction-bytes"),
            live_sst_bytes: sum("rocksdb.live-sst-files-size"),
            block_cache_bytes: first_cf
                .and_then(|cf| {
                    self.db
                        .property_int_value_cf(cf, "rocksdb.block-cache-usage")
                        .ok()
                        .flatten()
                })
                .unwrap_or(0),
        }
    }
}

/// See [`Store::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub memtable_bytes: u64,
    pub pending_compaction_bytes: u64,
    pub block_cache_bytes: u64,
    pub live_sst_bytes: u64,
}

#[cfg(test)]
mod tests;
