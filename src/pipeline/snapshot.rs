//! The live snapshot as the apply thread sees it: the [`Twins`] implementation over
//! an in-memory directory of slots, the current batch, a bounded cache of encoded twins, the
//! batches still being written, and RocksDB.
//!
//! The directory holds every key's [`Slot`] (version, `createdAt` or tombstone), so staleness,
//! existence and a device's module list never need a read. Documents are read only for
//! `updateTwin`, looked up in this order: the current batch, the batches in flight (decoded,
//! newest first: the writer thread encodes them), the cache (which takes a batch's encoded
//! twins once it is written), then RocksDB.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use foldhash::fast::RandomState;
use lru::LruCache;
use smallvec::SmallVec;

use crate::model::Slot;
use crate::model::TwinKey;
use crate::store::keys::encode_twin_key;
use crate::store::{decode_twin_doc, encode_twin, Batch, Store, StoreError};
use crate::time::Ticks;
use crate::twin::Twins;
use crate::value::{Map, Str};

type FastMap<K, V> = HashMap<K, V, RandomState>;

/// A device's twins: module id (`""` for the device twin) and slot, sorted by module id.
/// Most devices have no module twin: their one slot is kept in place, and ids are inline
/// strings, so that a lookup reads the table's entry and nothing else (the directory is
/// the apply thread's largest structure, and every event looks it up).
type DeviceTwins = SmallVec<[(Str, Slot); 1]>;

/// A hub's devices by id.
type Devices = FastMap<Str, DeviceTwins>;

/// Every key's slot, by hub, then device, then module id.
#[derive(Default)]
pub struct Directory {
    /// A few hubs at most: found by a scan, which is cheaper than hashing the name.
    hubs: Vec<(Box<str>, Devices)>,
    n_live: usize,
    n_dead: usize,
}

impl Directory {
    fn devices(&self, hub: &str) -> Option<&Devices> {
        self.hubs
            .iter()
            .find(|(name, _)| **name == *hub)
            .map(|(_, devices)| devices)
    }

    fn device(&self, hub: &str, device_id: &str) -> Option<&DeviceTwins> {
        self.devices(hub)?.get(device_id)
    }

    pub fn slot(&self, key: TwinKey<'_>) -> Option<Slot> {
        let twins = self.device(key.hub, key.device_id)?;
        let i = twins
            .binary_search_by(|(m, _)| m.as_bytes().cmp(key.module_id.as_bytes()))
            .ok()?;
        Some(twins[i].1)
    }

    pub fn set(&mut self, key: TwinKey<'_>, slot: Slot) {
        let i = match self.hubs.iter().position(|(name, _)| **name == *key.hub) {
            Some(i) => i,
            None => {
                self.hubs.push((key.hub.into(), Devices::default()));
                self.hubs.len() - 1
            }
        };
        let devices = &mut self.hubs[i].1;
        let twins = match devices.get_mut(key.device_id) {
            Some(twins) => twins,
            None => devices.entry(key.device_id.into()).or_default(),
        };
        let old = match twins.binary_search_by(|(m, _)| m.as_bytes().cmp(key.module_id.as_bytes()))
        {
            Ok(i) => Some(std::mem::replace(&mut twins[i].1, slot)),
            Err(i) => {
                twins.insert(i, (key.module_id.into(), slot));
                None
            }
        };
        match old {
            Some(Slot::Live { .. }) => self.n_live -= 1,
            Some(Slot::Dead { .. }) => self.n_dead -= 1,
            None => {}
        }
        match slot {
            Slot::Live { .. } => self.n_live += 1,
            Slot::Dead { .. } => self.n_dead += 1,
        }
    }

    pub fn live_modules(&self, hub: &str, device_id: &str) -> Vec<Box<str>> {
        self.device(hub, device_id)
            .map(|twins| {
                twins
                    .iter()
                    .filter(|(m, slot)| !m.is_empty() && matches!(slot, Slot::Live { .. }))
                    .map(|(m, _)| Box::from(m.as_str()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The live twins of a hub: `(device id, module id, slot)`, in no particular order.
    pub fn live_of_hub<'d>(
        &'d self,
        hub: &str,
    ) -> impl Iterator<Item = (&'d str, &'d str, Slot)> + 'd {
        self.devices(hub).into_iter().flat_map(|devices| {
            devices.iter().flat_map(|(device_id, twins)| {
                twins
                    .iter()
                    .filter(|(_, slot)| matches!(slot, Slot::Live { .. }))
                    .map(move |(module_id, slot)| (&**device_id, &**module_id, *slot))
            })
        })
    }

    /// Twins that exist.
    pub fn n_live(&self) -> usize {
        self.n_live
    }

    /// Tombstones.
    pub fn n_dead(&self) -> usize {
        self.n_dead
    }

    pub fn load(store: &Store) -> Result<Directory, StoreError> {
        let mut directory = Directory::default();
        store.for_each_slot(|key, slot| directory.set(key.as_key(), slot))?;
        Ok(directory)
    }
}

/// A key's final state in a batch, with its document held as `D`: owned while the batch is
/// open ([`Pending`]), shared with the writer thread once it is cut ([`TwinWrite`]).
enum TwinState<D> {
    Live {
        version: i64,
        created_at: Option<Ticks>,
        last_change: Ticks,
        doc: D,
        /// The key had a tombstone, which the write must delete.
        clear_tombstone: bool,
    },
    Dead {
        version: i64,
        deleted_at: Ticks,
    },
}

/// A key's final state in the current batch.
type Pending = TwinState<Map>;

/// One twin's write, as the writer thread encodes it into the batch.
type TwinWrite = TwinState<Arc<Map>>;

impl Pending {
    /// The state as the writer thread takes it: the document shared.
    fn into_write(self) -> TwinWrite {
        match self {
            TwinState::Live {
                version,
                created_at,
                last_change,
                doc,
                clear_tombstone,
            } => TwinState::Live {
                version,
                created_at,
                last_change,
                doc: Arc::new(doc),
                clear_tombstone,
            },
            TwinState::Dead {
                version,
                deleted_at,
            } => TwinState::Dead {
                version,
                deleted_at,
            },
        }
    }
}

/// Encoded twin bytes as the cache holds them.
pub type Encoded = Arc<[u8]>;

/// The documents of a batch being written: `None` for a removed twin. The writer thread
/// encodes them; until it has, reads find them here, decoded.
type InFlight = FastMap<Box<[u8]>, Option<Arc<Map>>>;

/// The twins a batch writes, in key order. Encoding them is the writer thread's work, so that
/// the apply thread (the pipeline's limit) does not spend its time on it.
#[derive(Default)]
pub struct TwinWrites(Vec<(Box<[u8]>, TwinWrite)>);

/// What a written batch leaves for the document cache: each key's encoded twin (`None` for a
/// removed one), and the documents it was encoded from, handed back so that the apply thread
/// frees them (the allocator frees cheapest on the thread that allocated).
pub struct Written {
    encoded: Vec<(Box<[u8]>, Option<Encoded>)>,
    documents: Vec<Arc<Map>>,
}

impl TwinWrites {
    /// Puts the twins and tombstones into `batch`; returns the encoded twins for the cache.
    pub fn encode_into(self, store: &Store, batch: &mut Batch) -> Result<Written, StoreError> {
        let mut written = Written {
            encoded: Vec::with_capacity(self.0.len()),
            documents: Vec::with_capacity(self.0.len()),
        };
        let mut buf = Vec::with_capacity(1024);
        for (key, write) in self.0 {
            match write {
                TwinState::Live {
                    version,
                    created_at,
                    last_change,
                    doc,
                    clear_tombstone,
                } => {
                    buf.clear();
                    encode_twin(version, created_at, last_change, &doc, &mut buf);
                    store.put_twin(batch, &key, &buf)?;
                    if clear_tombstone {
                        store.delete_tombstone(batch, &key)?;
                    }
                    written.encoded.push((key, Some(Arc::from(&buf[..]))));
                    written.documents.push(doc);
                }
                TwinState::Dead {
                    version,
                    deleted_at,
                } => {
                    store.delete_twin(batch, &key)?;
                    store.put_tombstone(batch, &key, version, deleted_at)?;
                    written.encoded.push((key, None));
                }
            }
        }
        Ok(written)
    }
}

/// The [`Twins`] of the running pipeline.
pub struct Snapshot {
    store: Arc<Store>,
    pub directory: Directory,
    pending: FastMap<Box<[u8]>, Pending>,
    /// Recently used twins, encoded, as written (the batches in flight are newer).
    cache: LruCache<Box<[u8]>, Encoded, RandomState>,
    cache_bytes: usize,
    cache_limit: usize,
    in_flight: VecDeque<(u64, InFlight)>,
    key_buf: Vec<u8>,
    /// Reads from RocksDB (cache misses), for metrics and tuning.
    pub n_store_reads: u64,
    /// Each seeded hub's latest complete pass's as-of time (`docs/semantics.md` §7).
    pub seeded: FastMap<Box<str>, Ticks>,
}

/// A cache this large is freed on a thread of its own.
const FREE_ASIDE_BYTES: usize = 16 << 20;

impl Drop for Snapshot {
    /// Freeing a full cache is a few hundred thousand frees (a quarter of a second for the
    /// default 256 MiB): another thread does it, so that a pass or a replay that ends does
    /// not wait for it, and the process may exit before it is done.
    fn drop(&mut self) {
        if self.cache_bytes < FREE_ASIDE_BYTES {
            return;
        }
        let cache = std::mem::replace(
            &mut self.cache,
            LruCache::unbounded_with_hasher(RandomState::default()),
        );
        // Should the thread not start, the cache is freed here, as it would have been.
        let _ = std::thread::Builder::new()
            .name("twinwatch-free".into())
            .spawn(move || drop(cache));
    }
}

impl Snapshot {
    pub fn new(store: Arc<Store>, directory: Directory, cache_limit: usize) -> Snapshot {
        Snapshot {
            store,
            directory,
            pending: FastMap::default(),
            cache: LruCache::unbounded_with_hasher(RandomState::default()),
            cache_bytes: 0,
            cache_limit,
            in_flight: VecDeque::new(),
            key_buf: Vec::with_capacity(128),
            n_store_reads: 0,
            seeded: FastMap::default(),
        }
    }

    fn encode_key(&mut self, key: TwinKey<'_>) {
        self.key_buf.clear();
        encode_twin_key(key, &mut self.key_buf);
    }

    /// Keys changed in the current batch.
    pub fn n_pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes the current batch's twins, in key order, for the writer thread; until it
    /// reports them written ([`Snapshot::committed`]), reads find them in flight.
    pub fn take_writes(&mut self, batch_no: u64) -> TwinWrites {
        let mut in_flight =
            InFlight::with_capacity_and_hasher(self.pending.len(), RandomState::default());
        // Keys in order: RocksDB inserts sorted keys into its memtable skiplist much faster
        // (each insert starts from the last one's position).
        let mut pending: Vec<(Box<[u8]>, Pending)> = self.pending.drain().collect();
        pending.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut writes = Vec::with_capacity(pending.len());
        for (key, pending) in pending {
            let write = pending.into_write();
            let doc = match &write {
                TwinState::Live { doc, .. } => Some(doc.clone()),
                TwinState::Dead { .. } => None,
            };
            in_flight.insert(key.clone(), doc);
            writes.push((key, write));
        }
        self.in_flight.push_back((batch_no, in_flight));
        TwinWrites(writes)
    }

    /// The writer committed batch `batch_no` (and every one before it), whose twins were
    /// encoded as `written`: they move from the in-flight list to the cache.
    pub fn committed(&mut self, batch_no: u64, written: Written) {
        while self.in_flight.front().is_some_and(|(n, _)| *n <= batch_no) {
            self.in_flight.pop_front();
        }
        drop(written.documents);
        for (key, encoded) in written.encoded {
            match encoded {
                Some(encoded) => {
                    let key_len = key.len();
                    self.cache_bytes += encoded.len() + key_len;
                    if let Some(old) = self.cache.put(key, encoded) {
                        self.cache_bytes -= old.len() + key_len;
                    }
                }
                None => {
                    if let Some(old) = self.cache.pop(&key) {
                        self.cache_bytes -= old.len() + key.len();
                    }
                }
            }
        }
        while self.cache_bytes > self.cache_limit {
            match self.cache.pop_lru() {
                Some((k, v)) => self.cache_bytes -= v.len() + k.len(),
                None => break,
            }
        }
    }

    /// Bytes held by the document cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }
}

impl Snapshot {
    /// A live twin's version and document, for evaluation: borrowed from the current batch,
    /// the cache or the batches in flight, or read from the store.
    pub fn live_doc(
        &mut self,
        key: TwinKey<'_>,
    ) -> Result<Option<(i64, Cow<'_, Map>)>, StoreError> {
        let Some(Slot::Live { version, .. }) = self.directory.slot(key) else {
            return Ok(None);
        };
        self.encode_key(key);
        let key_buf = &self.key_buf[..];
        // Where it is first, then the borrow: a borrow returned from one branch would
        // outlive the lookups of the others.
        if matches!(self.pending.get(key_buf), Some(Pending::Live { .. })) {
            return Ok(match self.pending.get(key_buf) {
                Some(Pending::Live { doc, .. }) => Some((version, Cow::Borrowed(doc))),
                _ => None,
            });
        }
        Ok(Some((version, Cow::Owned(self.take_doc(key)?))))
    }

    /// A live twin's document from the store (a cache miss).
    fn read_doc(&mut self, key: TwinKey<'_>) -> Result<Map, StoreError> {
        self.n_store_reads += 1;
        match self.store.twin_bytes(&self.key_buf)? {
            Some(bytes) => decode_twin_doc(&bytes),
            None => Err(StoreError::Corrupt {
                what: "twin",
                detail: format!("{key} is live in the directory but absent from the store"),
            }),
        }
    }
}

impl Twins for Snapshot {
    type Error = StoreError;

    fn slot(&self, key: TwinKey<'_>) -> Option<Slot> {
        self.directory.slot(key)
    }

    fn take_doc(&mut self, key: TwinKey<'_>) -> Result<Map, StoreError> {
        self.encode_key(key);
        if let Some(Pending::Live { doc, .. }) = self.pending.get_mut(&self.key_buf[..]) {
            return Ok(std::mem::take(doc));
        }
        // The batches in flight are newer than the cache (it takes a batch's twins once the
        // batch is written), the newest first.
        for (_, batch) in self.in_flight.iter().rev() {
            if let Some(entry) = batch.get(&self.key_buf[..]) {
                return Ok(match entry {
                    Some(doc) => Map::clone(doc),
                    // The directory says live, so a later batch re-created it; that batch
                    // would have been found first. Treat as empty rather than fail.
                    None => Map::new(),
                });
            }
        }
        if let Some(encoded) = self.cache.get(&self.key_buf[..]) {
            return decode_twin_doc(encoded);
        }
        self.read_doc(key)
    }

    fn put_live(
        &mut self,
        key: TwinKey<'_>,
        version: i64,
        created_at: Option<Ticks>,
        last_change: Ticks,
        doc: Map,
    ) {
        let had_tombstone = matches!(self.directory.slot(key), Some(Slot::Dead { .. }));
        self.directory.set(
            key,
            Slot::Live {
                version,
                created_at,
                last_change,
            },
        );
        self.encode_key(key);
        match self.pending.get_mut(&self.key_buf[..]) {
            Some(slot) => {
                // A tombstone written by an earlier batch stays to be deleted even after the
                // key went dead and live again within this one.
                let clear_tombstone = had_tombstone
                    || matches!(
                        slot,
                        Pending::Live {
                            clear_tombstone: true,
                            ..
                        }
                    )
                    || matches!(slot, Pending::Dead { .. });
                *slot = Pending::Live {
                    version,
                    created_at,
                    last_change,
                    doc,
                    clear_tombstone,
                };
            }
            None => {
                let pending = Pending::Live {
                    version,
                    created_at,
                    last_change,
                    doc,
                    clear_tombstone: had_tombstone,
                };
                self.pending.insert(self.key_buf.as_slice().into(), pending);
            }
        }
    }

    fn put_dead(&mut self, key: TwinKey<'_>, version: i64, deleted_at: Ticks) {
        self.directory.set(
            key,
            Slot::Dead {
                version,
                deleted_at,
            },
        );
        self.encode_key(key);
        let pending = Pending::Dead {
            version,
            deleted_at,
        };
        match self.pending.get_mut(&self.key_buf[..]) {
            Some(slot) => *slot = pending,
            None => {
                self.pending.insert(self.key_buf.as_slice().into(), pending);
            }
        }
    }

    fn live_modules(&self, hub: &str, device_id: &str) -> Vec<Box<str>> {
        self.directory.live_modules(hub, device_id)
    }

    fn seeded_as_of(&self, hub: &str) -> Option<Ticks> {
        self.seeded.get(hub).copied()
    }
}
