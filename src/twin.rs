//! Applying twin events to the snapshot (`docs/semantics.md` §2–3).
//!
//! Pure: [`apply`] reads and writes twins only through the [`Twins`] trait, which the pipeline
//! implements over its in-memory directory, cache and store, and tests implement over a map.
//! Staleness is decided from [`Slot`]s (version, `createdAt`, tombstone), which are always in
//! memory; a twin's document is read only when an `updateTwin` merges into it.

use std::collections::BTreeMap;

use simd_json::Node;

pub use crate::model::Slot;
use crate::model::{Op, OwnedTwinKey, TwinDocument, TwinEvent, TwinKey};
use crate::time::Ticks;
use crate::value::{map_from_tape, merge_map_from_tape, tape_find, Map, Value};

/// The snapshot as `apply` sees it.
pub trait Twins {
    type Error;

    fn slot(&self, key: TwinKey<'_>) -> Option<Slot>;
    /// The document of a live twin (every stored field but the identity and `version`).
    fn take_doc(&mut self, key: TwinKey<'_>) -> Result<Map, Self::Error>;
    /// Makes the twin live with this document, clearing any tombstone; `last_change` is the
    /// opTime of the event (or the as-of time of the document) that made this state.
    fn put_live(
        &mut self,
        key: TwinKey<'_>,
        version: i64,
        created_at: Option<Ticks>,
        last_change: Ticks,
        doc: Map,
    );
    /// Removes the twin, leaving this tombstone.
    fn put_dead(&mut self, key: TwinKey<'_>, version: i64, deleted_at: Ticks);
    /// The module ids (non-empty) of the live module twins of a device, sorted.
    fn live_modules(&self, hub: &str, device_id: &str) -> Vec<Box<str>>;
    /// The as-of time of the hub's latest complete seed pass (`docs/semantics.md` §7), if any.
    fn seeded_as_of(&self, hub: &str) -> Option<Ticks>;
}

/// What an event did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed (`docs/semantics.md` §3's stale conditions).
    Stale,
    /// The event's twin exists with its new version; `appeared` when it did not exist before.
    Upserted { appeared: bool },
    /// The event's twin was removed, and for a device twin, these module twins with it
    /// (sorted by module id).
    Removed { cascaded: Vec<Box<str>> },
}

/// `normalize(body)` of `docs/semantics.md` §2, without `version` (kept beside the document).
pub fn normalize(body: &[Node<'_>]) -> Map {
    let mut doc = map_from_tape(body);
    for key in ["hubName", "deviceId", "moduleId", "version"] {
        doc.remove(key);
    }
    ensure_sections(&mut doc);
    doc
}

/// `tags`, `properties`, `properties.desired` and `properties.reported` set to `{}` where
/// missing or not objects.
fn ensure_sections(doc: &mut Map) {
    doc.object_mut("tags");
    let properties = doc.object_mut("properties");
    properties.object_mut("desired");
    properties.object_mut("reported");
}

/// The document a twin starts from when an `updateTwin` finds none.
pub fn empty_doc() -> Map {
    let mut doc = Map::new();
    ensure_sections(&mut doc);
    doc
}

/// Whether an event is stale (`docs/semantics.md` §3): applying it would change nothing.
pub fn is_stale<T: Twins>(event: &TwinEvent<'_>, twins: &T) -> bool {
    let key = event.key;
    // An update, replace, create or delete older than the twin's creation belongs to an
    // earlier life of the key.
    let before_creation =
        |created_at: Option<Ticks>| created_at.is_some_and(|created_at| event.op_time < created_at);
    match (event.op, twins.slot(key)) {
        (
            Op::UpdateTwin | Op::ReplaceTwin | Op::CreateIdentity,
            Some(Slot::Live {
                version,
                created_at,
                ..
            }),
        ) => event.version <= version || before_creation(created_at),
        (Op::UpdateTwin | Op::ReplaceTwin, Some(Slot::Dead { version, .. })) => {
            event.version <= version
        }
        // A seeded hub's twin that is neither live nor deleted was not alive at the seed's
        // as-of time: an older update patches a twin that is gone.
        (Op::UpdateTwin | Op::ReplaceTwin, None) => twins
            .seeded_as_of(key.hub)
            .is_some_and(|as_of| event.op_time < as_of),
        (Op::CreateIdentity, Some(Slot::Dead { deleted_at, .. })) => event.op_time <= deleted_at,
        (Op::CreateIdentity, None) => false,
        (Op::DeleteIdentity, Some(Slot::Live { created_at, .. })) => before_creation(created_at),
        (Op::DeleteIdentity, _) => true,
    }
}

/// Applies one event.
pub fn apply<T: Twins>(event: &TwinEvent<'_>, twins: &mut T) -> Result<Outcome, T::Error> {
    if is_stale(event, twins) {
        return Ok(Outcome::Stale);
    }
    let key = event.key;
    let live = match twins.slot(key) {
        Some(Slot::Live {
            version,
            created_at,
            ..
        }) => Some((version, created_at)),
        _ => None,
    };
    match event.op {
        Op::UpdateTwin | Op::ReplaceTwin => {
            let created_at = live.and_then(|(_, created_at)| created_at);
            let doc = if event.op == Op::ReplaceTwin {
                normalize(event.body)
            } else {
                let mut doc = match live {
                    Some(_) => twins.take_doc(key)?,
                    None => empty_doc(),
                };
                merge_update(&mut doc, event.body);
                doc
            };
            twins.put_live(key, event.version, created_at, event.op_time, doc);
            Ok(Outcome::Upserted {
                appeared: live.is_none(),
            })
        }
        Op::CreateIdentity => {
            twins.put_live(
                key,
                event.version,
                Some(event.op_time),
                event.op_time,
                normalize(event.body),
            );
            Ok(Outcome::Upserted {
                appeared: live.is_none(),
            })
        }
        Op::DeleteIdentity => {
            let Some((version, _)) = live else {
                return Ok(Outcome::Stale);
            };
            twins.put_dead(key, version, event.op_time);
            let mut cascaded = Vec::new();
            if key.is_device_twin() {
                cascaded = twins.live_modules(key.hub, key.device_id);
                for module_id in &cascaded {
                    let module_key = TwinKey { module_id, ..key };
                    if let Some(Slot::Live { version, .. }) = twins.slot(module_key) {
                        twins.put_dead(module_key, version, event.op_time);
                    }
                }
            }
            Ok(Outcome::Removed { cascaded })
        }
    }
}

/// Whether a seed pass's document is stale (`docs/semantics.md` §7's table).
pub fn document_is_stale<T: Twins>(document: &TwinDocument<'_>, as_of: Ticks, twins: &T) -> bool {
    slot_makes_document_stale(twins.slot(document.key), document, as_of)
}

/// [`document_is_stale`] given the twin's slot, looked up once by the caller.
fn slot_makes_document_stale(
    slot: Option<Slot>,
    document: &TwinDocument<'_>,
    as_of: Ticks,
) -> bool {
    match slot {
        Some(Slot::Live {
            version,
            created_at,
            ..
        }) => document.version <= version || created_at.is_some_and(|c| c > as_of),
        Some(Slot::Dead { deleted_at, .. }) => deleted_at >= as_of,
        None => false,
    }
}

/// Applies one document of a seed pass whose as-of time is `as_of` (`docs/semantics.md` §7's
/// table).
pub fn apply_document<T: Twins>(
    document: &TwinDocument<'_>,
    as_of: Ticks,
    twins: &mut T,
) -> Result<Outcome, T::Error> {
    let key = document.key;
    // One directory lookup for the three questions (each was a lookup of its own).
    let slot = twins.slot(key);
    if slot_makes_document_stale(slot, document, as_of) {
        return Ok(Outcome::Stale);
    }
    let created_at = match slot {
        Some(Slot::Live { created_at, .. }) => created_at.unwrap_or(as_of),
        _ => as_of,
    };
    let appeared = !matches!(slot, Some(Slot::Live { .. }));
    twins.put_live(
        key,
        document.version,
        Some(created_at),
        as_of,
        normalize(document.body),
    );
    Ok(Outcome::Upserted { appeared })
}

/// Merges an `updateTwin` body into a document: `tags`, `properties.desired` and
/// `properties.reported`, each where present; the rest of the body is ignored. Decoding has
/// checked that each present section is an object.
fn merge_update(doc: &mut Map, body: &[Node<'_>]) {
    if let Some(tags) = tape_find(body, "tags") {
        merge_map_from_tape(doc.object_mut("tags"), tags);
    }
    if let Some(properties) = tape_find(body, "properties") {
        for section in ["desired", "reported"] {
            if let Some(patch) = tape_find(properties, section) {
                merge_map_from_tape(doc.object_mut("properties").object_mut(section), patch);
            }
        }
    }
}

/// The exported form of a twin (`docs/semantics.md` §2, §6): identity, version, then the
/// document.
pub fn export_value(key: TwinKey<'_>, version: i64, doc: &Map) -> Value {
    let mut out = doc.clone();
    out.insert("hubName", Value::from(key.hub));
    out.insert("deviceId", Value::from(key.device_id));
    if !key.is_device_twin() {
        out.insert("moduleId", Value::from(key.module_id));
    }
    out.insert("version", Value::I64(version));
    Value::Object(out)
}

/// A snapshot held in memory: the reference implementation of [`Twins`] for tests and tools.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryTwins {
    pub slots: BTreeMap<OwnedTwinKey, Slot>,
    pub docs: BTreeMap<OwnedTwinKey, Map>,
    /// Each seeded hub's latest as-of time.
    pub seeded: BTreeMap<Box<str>, Ticks>,
}

impl Twins for MemoryTwins {
    type Error = std::convert::Infallible;

    fn slot(&self, key: TwinKey<'_>) -> Option<Slot> {
        self.slots.get(&key.to_owned_key()).copied()
    }

    fn take_doc(&mut self, key: TwinKey<'_>) -> Result<Map, Self::Error> {
        Ok(self.docs.remove(&key.to_owned_key()).unwrap_or_default())
    }

    fn put_live(
        &mut self,
        key: TwinKey<'_>,
        version: i64,
        created_at: Option<Ticks>,
        last_change: Ticks,
        doc: Map,
    ) {
        let key = key.to_owned_key();
        self.slots.insert(
            key.clone(),
            Slot::Live {
                version,
                created_at,
                last_change,
            },
        );
        self.docs.insert(key, doc);
    }

    fn put_dead(&mut self, key: TwinKey<'_>, version: i64, deleted_at: Ticks) {
        let key = key.to_owned_key();
        self.docs.remove(&key);
        self.slots.insert(
            key,
            Slot::Dead {
                version,
                deleted_at,
            },
        );
    }

    fn live_modules(&self, hub: &str, device_id: &str) -> Vec<Box<str>> {
        let from = TwinKey {
            hub,
            device_id,
            module_id: "",
        }
        .to_owned_key();
        self.slots
            .range(from..)
            .take_while(|(k, _)| &*k.hub == hub && &*k.device_id == device_id)
            .filter(|(k, slot)| !k.module_id.is_empty() && matches!(slot, Slot::Live { .. }))
            .map(|(k, _)| k.module_id.clone())
            .collect()
    }

    fn seeded_as_of(&self, hub: &str) -> Option<Ticks> {
        self.seeded.get(hub).copied()
    }
}

impl MemoryTwins {
    /// Every live twin in export form, sorted by key.
    pub fn export(&self) -> Vec<Value> {
        self.slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Live { version, .. } => {
                    let doc = self.docs.get(key)?;
                    Some(export_value(key.as_key(), *version, doc))
                }
                Slot::Dead { .. } => None,
            })
            .collect()
    }
}
