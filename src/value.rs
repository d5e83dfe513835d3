//! The JSON value that twins are made of.
//!
//! Twins are kept as [`Map`]s: objects whose entries are sorted by key bytes. Twin objects are
//! small (a few to a few dozen keys), so a sorted vector is both the most compact layout and
//! the fastest to look up, merge, encode and decode; it also makes every serialisation
//! deterministic. Values come from simd-json tapes ([`from_tape`]), with `$metadata` removed
//! on the way in, and are merged with RFC 7386 JSON merge patch straight from a tape
//! ([`merge_from_tape`]), so a patch never becomes a value of its own.
//!
//! The binary codec ([`Map::encode`], [`Map::decode`]) is what the store keeps on disk and in
//! its cache: tagged, length-prefixed, no escaping, about the size of the JSON text.

use std::hash::BuildHasher;

use std::fmt;

use serde::ser::{SerializeMap, SerializeSeq};
use simd_json::{Node, StaticNode};

/// The key that IoT Hub's twin documents use for per-property metadata. It is never stored.
pub const METADATA_KEY: &str = "$metadata";

/// The strings of values: object keys and string values. Twins' keys and most of their
/// strings are short, and a string of up to 24 bytes is kept inline, without an allocation
/// (replaying, the apply thread called the allocator half as often as with boxed strings).
pub type Str = compact_str::CompactString;

/// A JSON value.
#[derive(Clone, Debug, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    String(Str),
    Array(Vec<Value>),
    Object(Map),
}

/// A JSON object, its entries sorted by key bytes, keys unique.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Map {
    entries: Vec<(Str, Value)>,
}

impl Map {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: Vec::with_capacity(capacity),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|(k, _)| k.as_bytes().cmp(key.as_bytes()))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.position(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self.position(key) {
            Ok(i) => Some(&mut self.entries[i].1),
            Err(_) => None,
        }
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: &str, value: Value) -> Option<Value> {
        match self.position(key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key.into(), value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        match self.position(key) {
            Ok(i) => Some(self.entries.remove(i).1),
            Err(_) => None,
        }
    }

    /// The value at `key`, inserted as `default()` first when absent.
    pub fn entry_or_insert_with(
        &mut self,
        key: &str,
        default: impl FnOnce() -> Value,
    ) -> &mut Value {
        let i = match self.position(key) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (key.into(), default()));
                i
            }
        };
        &mut self.entries[i].1
    }

    /// The object at `key`: an existing object, or a new empty one that replaces whatever
    /// was there (merge patch treats a non-object target as `{}`).
    pub fn object_mut(&mut self, key: &str) -> &mut Map {
        let value = self.entry_or_insert_with(key, || Value::Object(Map::new()));
        if !matches!(value, Value::Object(_)) {
            *value = Value::Object(Map::new());
        }
        match value {
            Value::Object(map) => map,
            _ => unreachable!("the value was just made an object"),
        }
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (&**k, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.entries.iter().map(|(k, _)| &**k)
    }

    /// Builds a map from entries in any order; of duplicate keys the last wins, as in most
    /// JSON parsers.
    pub fn from_entries(mut entries: Vec<(Str, Value)>) -> Self {
        if !entries.is_sorted_by(|a, b| a.0.as_bytes() < b.0.as_bytes()) {
            // A stable sort keeps duplicates in input order; keep the last of each run (the
            // later entry moves into the earlier one's place, which stays).
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            entries.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    std::mem::swap(later, kept);
                }
                same
            });
        }
        Self { entries }
    }
}

impl Value {
    pub fn as_object(&self) -> Option<&Map> {
        match self {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an `f64`, for any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::I64(n) => Some(n as f64),
            Value::U64(n) => Some(n as f64),
            Value::F64(n) => Some(n),
            _ => None,
        }
    }

    /// The value as an integer, for a number with no fractional part that fits in an `i128`.
    pub fn as_integer(&self) -> Option<i128> {
        match *self {
            Value::I64(n) => Some(n.into()),
            Value::U64(n) => Some(n.into()),
            Value::F64(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1.7e38 => {
                Some(f as i128)
            }
            _ => None,
        }
    }

    pub fn is_number(&self) -> bool {
        matches!(self, Value::I64(_) | Value::U64(_) | Value::F64(_))
    }

    /// The JSON type name: `null`, `boolean`, `number`, `string`, `array` or `object`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::I64(_) | Value::U64(_) | Value::F64(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Resolves an already split RFC 6901 pointer (unescaped reference tokens).
    pub fn pointer<'a, S: AsRef<str>>(&'a self, tokens: &[S]) -> Option<&'a Value> {
        let mut current = self;
        for token in tokens {
            current = current.child(token.as_ref())?;
        }
        Some(current)
    }

    /// One step of a JSON pointer: a key of an object, or an index of an array (`0`, or a
    /// decimal without a leading zero).
    pub fn child(&self, token: &str) -> Option<&Value> {
        match self {
            Value::Object(map) => map.get(token),
            Value::Array(items) => {
                let valid = !token.is_empty()
                    && token.bytes().all(|b| b.is_ascii_digit())
                    && (token == "0" || !token.starts_with('0'));
                if !valid {
                    return None;
                }
                token.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            _ => None,
        }
    }
}

/// JSON equality: numbers by numeric value, objects regardless of key order.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::String(a), Value::String(b)) => a == b,
            (Value::Array(a), Value::Array(b)) => a == b,
            (Value::Object(a), Value::Object(b)) => a == b,
            (a, b) if a.is_number() && b.is_number() => numbers_equal(a, b),
            _ => false,
        }
    }
}

fn numbers_equal(a: &Value, b: &Value) -> bool {
    match (a.as_integer(), b.as_integer()) {
        (Some(x), Some(y)) => x == y,
        // At least one side has a fraction (or is out of the integer range).
        _ => a.as_f64() == b.as_f64(),
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.into())
    }
}

impl From<Map> for Value {
    fn from(map: Map) -> Self {
        Value::Object(map)
    }
}

impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::I64(n) => serializer.serialize_i64(*n),
            Value::U64(n) => serializer.serialize_u64(*n),
            Value::F64(n) => serializer.serialize_f64(*n),
            Value::String(s) => serializer.serialize_str(s),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Object(map) => map.serialize(serializer),
        }
    }
}

impl serde::Serialize for Map {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            out.serialize_entry(k, v)?;
        }
        out.end()
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// Converts a `serde_json::Value` (tests, fixtures, policy files).
impl From<&serde_json::Value> for Value {
    fn from(v: &serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::I64(i)
                } else if let Some(u) = n.as_u64() {
                    Value::U64(u)
                } else {
                    Value::F64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            serde_json::Value::String(s) => Value::String(s.as_str().into()),
            serde_json::Value::Array(items) => {
                Value::Array(items.iter().map(Value::from).collect())
            }
            serde_json::Value::Object(map) => Value::Object(Map::from_entries(
                map.iter()
                    .map(|(k, v)| (k.as_str().into(), Value::from(v)))
                    .collect(),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tapes

/// The number of tape nodes that the value starting at `nodes[0]` spans (itself included).
pub fn tape_span(nodes: &[Node<'_>]) -> usize {
    match nodes.first() {
        Some(Node::Object { count, .. }) | Some(Node::Array { count, .. }) => count + 1,
        Some(_) => 1,
        None => 0,
    }
}

/// Whether the value at `nodes[0]` nests containers at most `max_depth` deep (a scalar is 0
/// deep, an object or array holding only scalars 1, and so on) and no object in it has a key
/// twice: both checks of a body in one pass over its tape, stopping at the first fault. JSON
/// leaves an object with a repeated key to the reader, and readers differ (first wins, last
/// wins, error): a body with one is refused rather than given a meaning IoT Hub may not share.
/// The walk recurses once per level, so `max_depth` counts as at most
/// [`MAX_RECURSIVE_CHECK`].
pub fn tape_is_well_formed(nodes: &[Node<'_>], max_depth: usize) -> bool {
    let end = tape_span(nodes).min(nodes.len());
    let max_depth = max_depth.min(MAX_RECURSIVE_CHECK);
    let mut keys = Vec::new();
    end == 0 || well_formed_at(&nodes[..end], 0, max_depth, &mut keys) == Some(end)
}

/// The deepest `max_depth` that [`tape_is_well_formed`] checks (it recurses, a small frame per
/// level; bodies are refused beyond 64).
pub const MAX_RECURSIVE_CHECK: usize = 128;

/// Checks the value at `nodes[i]`, inside which `room` more containers may nest; returns the
/// index after it, `None` at the first fault. Scalars in containers are stepped over in the
/// container's own loop: most of a body's nodes cost a tag test and, for keys, a bucket.
fn well_formed_at<'i>(
    nodes: &[Node<'i>],
    i: usize,
    room: usize,
    keys: &mut Vec<(u64, &'i str)>,
) -> Option<usize> {
    let value_end = |at: usize, keys: &mut Vec<(u64, &'i str)>| -> Option<usize> {
        match nodes.get(at)? {
            Node::Object { .. } | Node::Array { .. } => {
                well_formed_at(nodes, at, room.checked_sub(1)?, keys)
            }
            _ => Some(at + 1),
        }
    };
    match *nodes.get(i)? {
        Node::Object { len, count } => {
            if room == 0 {
                return None;
            }
            // Large objects are sorted instead.
            let large = len > 64;
            if large && object_has_duplicate_key(&nodes[i..], keys) {
                return None;
            }
            let mut taken = KeyBuckets::default();
            let mut j = i + 1;
            for _ in 0..len {
                let Node::String(key) = *nodes.get(j)? else {
                    return None;
                };
                // Compared with the object's earlier keys only when its bucket is taken,
                // which most keys' is not.
                if !large && taken.take(key) && has_earlier_key(nodes, i, j, key) {
                    return None;
                }
                j = value_end(j + 1, keys)?;
            }
            (j == i + 1 + count).then_some(j)
        }
        Node::Array { len, count } => {
            if room == 0 {
                return None;
            }
            let mut j = i + 1;
            for _ in 0..len {
                j = value_end(j, keys)?;
            }
            (j == i + 1 + count).then_some(j)
        }
        _ => Some(i + 1),
    }
}

/// Whether the object at `nodes[start]` has `key` among its keys before index `at`.
fn has_earlier_key(nodes: &[Node<'_>], start: usize, at: usize, key: &str) -> bool {
    let mut j = start + 1;
    while j < at {
        if matches!(nodes[j], Node::String(k) if k == key) {
            return true;
        }
        j += 1 + tape_span(&nodes[j + 1..]);
    }
    false
}

/// Whether the object at `nodes[0]` itself (not those inside it) has a key twice; `keys` is
/// scratch space.
pub fn object_has_duplicate_key<'i>(nodes: &[Node<'i>], keys: &mut Vec<(u64, &'i str)>) -> bool {
    let len = match nodes.first() {
        Some(Node::Object { len, .. }) => *len,
        _ => return false,
    };
    if len <= 64 {
        // One pass; a key is compared with the earlier ones only when its cheap bucket
        // (length, first and last byte; 256 of them) is already taken, which most keys'
        // is not. Larger objects are sorted instead.
        let mut taken = KeyBuckets::default();
        return object_entries(nodes).enumerate().any(|(i, (key, _))| {
            taken.take(key)
                && object_entries(nodes)
                    .take(i)
                    .any(|(earlier, _)| earlier == key)
        });
    }
    // Sorted by a hash first: keys are compared as text only where two hashes agree.
    let hasher = foldhash::fast::FixedState::default();
    keys.clear();
    keys.extend(object_entries(nodes).map(|(key, _)| (hasher.hash_one(key), key)));
    keys.sort_unstable();
    keys.windows(2).any(|pair| pair[0] == pair[1])
}

/// The buckets (256, by length, first and last byte) that an object's keys so far took: equal
/// keys share a bucket, so a key whose bucket is free is new without a compare.
#[derive(Default)]
struct KeyBuckets([u64; 4]);

impl KeyBuckets {
    /// Takes `key`'s bucket; whether it was taken already (the key may be a repeat).
    fn take(&mut self, key: &str) -> bool {
        let bytes = key.as_bytes();
        let bucket = match bytes {
            [] => 0,
            [first, .., last] => (bytes.len() as u32)
                .wrapping_mul(31)
                .wrapping_add(u32::from(*first).wrapping_mul(7))
                .wrapping_add(u32::from(*last)),
            [only] => (bytes.len() as u32).wrapping_mul(31) ^ u32::from(*only),
        } as usize
            & 255;
        let (word, bit) = (bucket / 64, 1u64 << (bucket % 64));
        let taken = self.0[word] & bit != 0;
        self.0[word] |= bit;
        taken
    }
}

/// Converts the value at `nodes[0]` into a [`Value`], dropping every `$metadata` key at any
/// depth. The caller bounds the depth first ([`tape_is_well_formed`]): this recurses.
pub fn from_tape(nodes: &[Node<'_>]) -> Value {
    match nodes.first() {
        Some(Node::Static(s)) => from_static(*s),
        Some(Node::String(s)) => Value::String((*s).into()),
        Some(Node::Array { len, .. }) => {
            let mut items = Vec::with_capacity(*len);
            let mut i = 1;
            for _ in 0..*len {
                items.push(from_tape(&nodes[i..]));
                i += tape_span(&nodes[i..]);
            }
            Value::Array(items)
        }
        Some(Node::Object { .. }) => Value::Object(map_from_tape(nodes)),
        None => Value::Null,
    }
}

/// Converts an object on the tape into a [`Map`] (an empty map for anything else).
pub fn map_from_tape(nodes: &[Node<'_>]) -> Map {
    let len = match nodes.first() {
        Some(Node::Object { len, .. }) => *len,
        _ => 0,
    };
    let mut entries = Vec::with_capacity(len);
    for (key, value) in object_entries(nodes) {
        if key != METADATA_KEY {
            entries.push((key.into(), from_tape(value)));
        }
    }
    Map::from_entries(entries)
}

fn from_static(s: StaticNode) -> Value {
    match s {
        StaticNode::Null => Value::Null,
        StaticNode::Bool(b) => Value::Bool(b),
        StaticNode::I64(n) => Value::I64(n),
        StaticNode::U64(n) => Value::U64(n),
        StaticNode::F64(n) => Value::F64(n),
        #[allow(unreachable_patterns)]
        _ => Value::Null,
    }
}

/// The entries of the object at `nodes[0]`: each key with the tape slice of its value.
pub fn object_entries<'t, 'i>(nodes: &'t [Node<'i>]) -> ObjectEntries<'t, 'i> {
    match nodes.first() {
        Some(Node::Object { len, .. }) => ObjectEntries {
            nodes,
            next: 1,
            remaining: *len,
        },
        _ => ObjectEntries {
            nodes,
            next: 0,
            remaining: 0,
        },
    }
}

/// Iterator over an object's entries on a tape; see [`object_entries`].
pub struct ObjectEntries<'t, 'i> {
    nodes: &'t [Node<'i>],
    next: usize,
    remaining: usize,
}

impl<'t, 'i> Iterator for ObjectEntries<'t, 'i> {
    type Item = (&'i str, &'t [Node<'i>]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let key = match self.nodes.get(self.next) {
            Some(Node::String(key)) => *key,
            _ => return None,
        };
        let value = &self.nodes[self.next + 1..];
        self.next += 1 + tape_span(value);
        Some((key, value))
    }
}

/// The value of `key` in an object at `nodes[0]` known to hold each key once (checked with
/// [`tape_is_well_formed`] or [`object_has_duplicate_key`]): the scan stops at the match.
pub fn tape_find<'t, 'i>(nodes: &'t [Node<'i>], key: &str) -> Option<&'t [Node<'i>]> {
    object_entries(nodes)
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// The value of `key` in the object at `nodes[0]`; of duplicate keys the last wins.
pub fn tape_get<'t, 'i>(nodes: &'t [Node<'i>], key: &str) -> Option<&'t [Node<'i>]> {
    object_entries(nodes)
        .filter(|(k, _)| *k == key)
        .last()
        .map(|(_, v)| v)
}

pub fn tape_is_object(nodes: &[Node<'_>]) -> bool {
    matches!(nodes.first(), Some(Node::Object { .. }))
}

pub fn tape_is_null(nodes: &[Node<'_>]) -> bool {
    matches!(nodes.first(), Some(Node::Static(StaticNode::Null)))
}

/// RFC 7386 merge patch of the patch on the tape into `target`, with `$metadata` keys of the
/// patch dropped at any depth (as if they had been removed from the patch first).
pub fn merge_from_tape(target: &mut Value, patch: &[Node<'_>]) {
    if tape_is_object(patch) {
        if !matches!(target, Value::Object(_)) {
            *target = Value::Object(Map::new());
        }
        let Value::Object(map) = target else {
            unreachable!("the target was just made an object")
        };
        merge_map_from_tape(map, patch);
    } else {
        *target = from_tape(patch);
    }
}

/// [`merge_from_tape`] for a target that is an object and a patch that is one.
pub fn merge_map_from_tape(target: &mut Map, patch: &[Node<'_>]) {
    for (key, value) in object_entries(patch) {
        if key == METADATA_KEY {
            continue;
        }
        if tape_is_null(value) {
            target.remove(key);
        } else {
            let slot = target.entry_or_insert_with(key, || Value::Null);
            merge_from_tape(slot, value);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Binary codec

const TAG_NULL: u8 = 0;
const TAG_FALSE: u8 = 1;
const TAG_TRUE: u8 = 2;
const TAG_I64: u8 = 3;
const TAG_U64: u8 = 4;
const TAG_F64: u8 = 5;
const TAG_STRING: u8 = 6;
const TAG_ARRAY: u8 = 7;
const TAG_OBJECT: u8 = 8;

/// Deeper data than this is refused by the decoder (the encoder only ever sees bodies that
/// decoding bounded to 64 levels).
const MAX_DECODE_DEPTH: usize = 128;

/// Stored bytes that do not decode: a corrupt or foreign record.
#[derive(Debug, thiserror::Error)]
#[error("corrupt twin document at byte {offset}")]
pub struct CodecError {
    pub offset: usize,
}

impl CodecError {
    /// A bounded label for metrics and logs, like the error enums' (a codec error has one
    /// kind: the bytes do not decode).
    pub fn kind(&self) -> &'static str {
        "corrupt"
    }
}

impl Map {
    /// Appends the binary encoding of this object to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.len() as u64);
        for (k, v) in self.iter() {
            put_str(out, k);
            v.encode(out);
        }
    }

    /// Decodes an object written by [`Map::encode`]; the whole input must be used.
    pub fn decode(bytes: &[u8]) -> Result<Map, CodecError> {
        let mut reader = Reader { bytes, pos: 0 };
        let map = reader.map(0)?;
        if reader.pos != bytes.len() {
            return Err(CodecError { offset: reader.pos });
        }
        Ok(map)
    }
}

impl Value {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.push(TAG_NULL),
            Value::Bool(false) => out.push(TAG_FALSE),
            Value::Bool(true) => out.push(TAG_TRUE),
            Value::I64(n) => {
                out.push(TAG_I64);
                put_varint(out, ((n << 1) ^ (n >> 63)) as u64);
            }
            Value::U64(n) => {
                out.push(TAG_U64);
                put_varint(out, *n);
            }
            Value::F64(n) => {
                out.push(TAG_F64);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Value::String(s) => {
                out.push(TAG_STRING);
                put_str(out, s);
            }
            Value::Array(items) => {
                out.push(TAG_ARRAY);
                put_varint(out, items.len() as u64);
                for item in items {
                    item.encode(out);
                }
            }
            Value::Object(map) => {
                out.push(TAG_OBJECT);
                map.encode(out);
            }
        }
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn error(&self) -> CodecError {
        CodecError { offset: self.pos }
    }

    fn byte(&mut self) -> Result<u8, CodecError> {
        let b = *self.bytes.get(self.pos).ok_or_else(|| self.error())?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(n);
            }
        }
        Err(self.error())
    }

    fn len(&mut self) -> Result<usize, CodecError> {
        let n = self.varint()?;
        // Every element takes at least one byte: a longer length is corrupt, and this bound
        // keeps a corrupt length from reserving unbounded memory.
        if n > (self.bytes.len() - self.pos) as u64 {
            return Err(self.error());
        }
        Ok(n as usize)
    }

    fn str(&mut self) -> Result<&'a str, CodecError> {
        let n = self.len()?;
        let raw = &self.bytes[self.pos..self.pos + n];
        let s = std::str::from_utf8(raw).map_err(|_| self.error())?;
        self.pos += n;
        Ok(s)
    }

    fn map(&mut self, depth: usize) -> Result<Map, CodecError> {
        if depth > MAX_DECODE_DEPTH {
            return Err(self.error());
        }
        let n = self.len()?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let key = self.str()?;
            let value = self.value(depth + 1)?;
            entries.push((Str::from(key), value));
        }
        if !entries.is_sorted_by(|a, b| a.0.as_bytes() < b.0.as_bytes()) {
            return Err(self.error());
        }
        Ok(Map { entries })
    }

    fn value(&mut self, depth: usize) -> Result<Value, CodecError> {
        if depth > MAX_DECODE_DEPTH {
            return Err(self.error());
        }
        Ok(match self.byte()? {
            TAG_NULL => Value::Null,
            TAG_FALSE => Value::Bool(false),
            TAG_TRUE => Value::Bool(true),
            TAG_I64 => {
                let z = self.varint()?;
                Value::I64(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            TAG_U64 => Value::U64(self.varint()?),
            TAG_F64 => {
                let end = self.pos + 8;
                let raw = self.bytes.get(self.pos..end).ok_or_else(|| self.error())?;
                let n = f64::from_le_bytes(raw.try_into().expect("the slice has 8 bytes"));
                self.pos = end;
                Value::F64(n)
            }
            TAG_STRING => Value::String(self.str()?.into()),
            TAG_ARRAY => {
                let n = self.len()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            TAG_OBJECT => Value::Object(self.map(depth + 1)?),
            _ => {
                return Err(CodecError {
                    offset: self.pos - 1,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tape_value(json: &str) -> Value {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).expect("valid json");
        from_tape(&tape.0)
    }

    fn json(v: &Value) -> serde_json::Value {
        serde_json::to_value(v).expect("serializable")
    }

    /// The container nesting depth of the value at `nodes[0]`, the plain way.
    fn tape_depth(nodes: &[Node<'_>]) -> usize {
        match nodes.first() {
            Some(Node::Object { .. }) => {
                1 + object_entries(nodes)
                    .map(|(_, v)| tape_depth(v))
                    .max()
                    .unwrap_or(0)
            }
            Some(Node::Array { len, .. }) => {
                let mut i = 1;
                1 + (0..*len)
                    .map(|_| {
                        let depth = tape_depth(&nodes[i..]);
                        i += tape_span(&nodes[i..]);
                        depth
                    })
                    .max()
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Whether an object anywhere in the value at `nodes[0]` has a key twice, the plain way: a
    /// set of keys per object.
    fn tape_has_duplicate_key(nodes: &[Node<'_>]) -> bool {
        match nodes.first() {
            Some(Node::Object { .. }) => {
                let mut seen = std::collections::HashSet::new();
                object_entries(nodes).any(|(k, v)| !seen.insert(k) || tape_has_duplicate_key(v))
            }
            Some(Node::Array { len, .. }) => {
                let mut i = 1;
                (0..*len).any(|_| {
                    let value = &nodes[i..];
                    i += tape_span(value);
                    tape_has_duplicate_key(value)
                })
            }
            _ => false,
        }
    }

    #[test]
    fn duplicate_keys_are_found_in_any_object_at_any_depth() {
        let has = |json: &str| {
            let mut bytes = json.as_bytes().to_vec();
            let tape = simd_json::to_tape(&mut bytes).expect("valid json");
            tape_has_duplicate_key(&tape.0)
        };
        assert!(!has(r#"{"a":1,"b":{"a":1,"c":[{"a":1},{"a":2}]}}"#));
        assert!(!has(r#"{"a":{"x":1},"b":{"x":1}}"#));
        assert!(has(r#"{"a":1,"a":1}"#));
        assert!(has(r#"{"a":1,"b":{"c":[1,{"k":1,"j":2,"k":3}]}}"#));
        // Both paths: 40 and 100 distinct keys, then one repeated at the end.
        for n in [40, 100] {
            let keys: Vec<String> = (0..n).map(|i| format!(r#""k{i}":{i}"#)).collect();
            assert!(!has(&format!("{{{}}}", keys.join(","))));
            assert!(has(&format!("{{{},\"k7\":0}}", keys.join(","))));
        }
        // A value equal to a key is not a key.
        assert!(!has(r#"{"a":"b","b":"a"}"#));
    }

    #[test]
    fn metadata_is_dropped_at_every_depth() {
        let v = tape_value(
            r#"{"a":{"$metadata":{"x":1},"b":[{"$metadata":2,"c":3}]},"$metadata":{},"$version":4}"#,
        );
        assert_eq!(
            json(&v),
            serde_json::json!({"a":{"b":[{"c":3}]},"$version":4})
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The examples of RFC 7386 section 3, with $metadata added to the patch.
        let mut target = tape_value(
            r#"{"title":"Goodbye!","author":{"givenName":"John","familyName":"Doe"},"tags":["example","sample"],"content":"This will be unchanged"}"#,
        );
        let mut patch = br#"{"title":"Hello!","phoneNumber":"+01-234-567-8910","author":{"familyName":null,"$metadata":1},"tags":["example"]}"#.to_vec();
        let tape = simd_json::to_tape(&mut patch).expect("valid json");
        merge_from_tape(&mut target, &tape.0);
        assert_eq!(
            json(&target),
            serde_json::json!({"title":"Hello!","author":{"givenName":"John"},"tags":["example"],"content":"This will be unchanged","phoneNumber":"+01-234-567-8910"})
        );
    }

    #[test]
    fn merge_into_non_object_target_starts_from_empty() {
        let mut target = Value::I64(5);
        let mut patch = br#"{"a":{"b":null,"c":1}}"#.to_vec();
        let tape = simd_json::to_tape(&mut patch).expect("valid json");
        merge_from_tape(&mut target, &tape.0);
        assert_eq!(json(&target), serde_json::json!({"a":{"c":1}}));
    }

    #[test]
    fn codec_round_trips() {
        let v = tape_value(
            r#"{"s":"x\u0000y","n":-5,"u":18446744073709551615,"f":1.5,"b":true,"z":null,"a":[1,[2,{"k":"v"}]],"e":{}}"#,
        );
        let Value::Object(map) = v else {
            panic!("object")
        };
        let mut bytes = Vec::new();
        map.encode(&mut bytes);
        assert_eq!(Map::decode(&bytes).expect("decodes"), map);
        for cut in 0..bytes.len() {
            assert!(
                Map::decode(&bytes[..cut]).is_err(),
                "prefix {cut} must not decode"
            );
        }
    }

    #[test]
    fn duplicate_keys_keep_the_last() {
        let v = tape_value(r#"{"a":1,"b":2,"a":3}"#);
        assert_eq!(json(&v), serde_json::json!({"a":3,"b":2}));
    }

    #[test]
    fn the_one_pass_check_agrees_with_depth_and_duplicates() {
        let keys: Vec<String> = (0..70).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let large = format!("{{{}}}", keys.join(","));
        for json in [
            "1",
            "{}",
            r#"{"a":[1,{"b":{}}],"c":{}}"#,
            r#"{"a":1,"b":{"c":[1,{"k":1,"j":2,"k":3}]}}"#,
            r#"{"ab":1,"ba":2,"aab":3,"abb":4,"a":{"x":{"y":{"z":{}}}}}"#,
            r#"[[],[[]],{"q":{"q":{"q":1}}}]"#,
            r#"{"a":{"b":1,"c":{"b":2}},"d":[{"e":1,"f":2,"e":3}]}"#,
            &large,
            &large.replace(r#""k69":69"#, r#""k3":69"#),
            &format!(r#"{{"x":{{"y":[1,{large}]}}}}"#),
        ] {
            let mut bytes = json.as_bytes().to_vec();
            let tape = simd_json::to_tape(&mut bytes).expect("valid json");
            for max in 0..6 {
                assert_eq!(
                    tape_is_well_formed(&tape.0, max),
                    tape_depth(&tape.0) <= max && !tape_has_duplicate_key(&tape.0),
                    "{json} at most {max} deep"
                );
            }
        }
    }

    #[test]
    fn depth_counts_containers() {
        let depth = |s: &str| {
            let mut bytes = s.as_bytes().to_vec();
            let tape = simd_json::to_tape(&mut bytes).expect("valid json");
            tape_depth(&tape.0)
        };
        assert_eq!(depth("1"), 0);
        assert_eq!(depth("{}"), 1);
        assert_eq!(depth(r#"{"a":[1,{"b":{}}],"c":{}}"#), 4);
        assert_eq!(depth(r#"[[],[[]],{}]"#), 3);
    }

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(Value::I64(1), Value::F64(1.0));
        assert_eq!(Value::U64(7), Value::I64(7));
        assert_ne!(Value::F64(1.5), Value::I64(1));
    }
}
