//! A direct reader for the two Avro schemas twinwatch replays most: Event Hubs Capture
//! `EventData` and IoT Hub's storage-route `Message`. It reads the object container (header,
//! blocks, sync markers, the null/deflate/snappy codecs) and decodes each datum straight into a
//! [`OwnedMessage`], with no generic `Value` in between and one reused decompression buffer: the
//! generic reader spent most of its time allocating (BENCHMARKS.md, "Avro replay"). Files of
//! any other schema go through apache-avro ([`super::avro::AvroFile`]).

use std::io::Read;

use super::avro::{prop_name, AvroError, OwnedMessage, OwnedProp, PropName};

/// The schema of a file this reader handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnownSchema {
    Capture,
    Storage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codec {
    Null,
    Deflate,
    Snappy,
}

fn capture_fields() -> serde_json::Value {
    serde_json::json!([
        {"name": "SequenceNumber", "type": "long"},
        {"name": "Offset", "type": "string"},
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "SystemProperties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Properties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Body", "type": ["null", "bytes"]}
    ])
}

fn storage_fields() -> serde_json::Value {
    serde_json::json!([
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": "string"}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": ["null", "bytes"]}
    ])
}

/// Recognises a writer schema (its JSON) as one of the two known ones: same fields, same types,
/// in the same order (names, namespaces and docs aside).
pub fn known_schema(schema_json: &[u8]) -> Option<KnownSchema> {
    let schema: serde_json::Value = serde_json::from_slice(schema_json).ok()?;
    if schema["type"] != "record" {
        return None;
    }
    let fields: Vec<serde_json::Value> = schema["fields"]
        .as_array()?
        .iter()
        .map(|f| serde_json::json!({"name": f["name"], "type": f["type"]}))
        .collect();
    let fields = serde_json::Value::Array(fields);
    if fields == capture_fields() {
        Some(KnownSchema::Capture)
    } else if fields == storage_fields() {
        Some(KnownSchema::Storage)
    } else {
        None
    }
}

/// A cursor over bytes with Avro's primitive decodings.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn long(&mut self) -> Option<i64> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.pos)?;
            self.pos += 1;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
        }
        None
    }

    fn raw(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.long()?).ok()?;
        self.raw(n)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn double(&mut self) -> Option<f64> {
        Some(f64::from_le_bytes(self.raw(8)?.try_into().ok()?))
    }

    /// A map into `out`, overwriting its entries in place so that their names and strings keep
    /// their allocations from one record to the next; `value` decodes an entry's value into
    /// its slot.
    fn map_into(
        &mut self,
        out: &mut Vec<(PropName, OwnedProp)>,
        mut value: impl FnMut(&mut Self, &mut OwnedProp) -> Option<()>,
    ) -> Option<()> {
        let mut n = 0;
        loop {
            let mut count = self.long()?;
            if count == 0 {
                out.truncate(n);
                return Some(());
            }
            if count < 0 {
                count = count.checked_neg()?;
                self.long()?; // the block's byte size
            }
            for _ in 0..count {
                let key = self.str()?;
                if n == out.len() {
                    out.push((PropName::Borrowed(""), OwnedProp::Long(0)));
                }
                let (name, slot) = &mut out[n];
                set_name(name, key);
                value(self, slot)?;
                n += 1;
            }
        }
    }
}

/// Sets a property name, reusing an owned name's allocation for an unusual one.
fn set_name(name: &mut PropName, key: &str) {
    match (prop_name(key), &mut *name) {
        (PropName::Owned(_), PropName::Owned(existing)) => {
            existing.clear();
            existing.push_str(key);
        }
        (fresh, _) => *name = fresh,
    }
}

/// Sets a string property, reusing the slot's allocation when it held a string.
fn set_str(slot: &mut OwnedProp, value: &str) {
    if let OwnedProp::Str(existing) = slot {
        existing.clear();
        existing.push_str(value);
    } else {
        *slot = OwnedProp::Str(value.to_owned());
    }
}

fn union_prop(c: &mut Cursor<'_>, slot: &mut OwnedProp) -> Option<()> {
    match c.long()? {
        0 => *slot = OwnedProp::Long(c.long()?),
        1 => *slot = OwnedProp::Double(c.double()?),
        2 => set_str(slot, c.str()?),
        3 => {
            let bytes = c.bytes()?;
            if let OwnedProp::Bytes(existing) = slot {
                existing.clear();
                existing.extend_from_slice(bytes);
            } else {
                *slot = OwnedProp::Bytes(bytes.to_vec());
            }
        }
        _ => return None,
    }
    Some(())
}

fn string_prop(c: &mut Cursor<'_>, slot: &mut OwnedProp) -> Option<()> {
    set_str(slot, c.str()?);
    Some(())
}

/// Decodes one datum into `record` (reusing its allocations), appending its body to `bodies`.
fn datum(
    schema: KnownSchema,
    c: &mut Cursor<'_>,
    bodies: &mut Vec<u8>,
    record: &mut OwnedMessage,
) -> Option<()> {
    let enqueued = record
        .enqueued_time
        .get_or_insert_with(|| OwnedProp::Str(String::new()));
    match schema {
        KnownSchema::Capture => {
            c.long()?; // SequenceNumber
            c.bytes()?; // Offset
            set_str(enqueued, c.str()?);
            c.map_into(&mut record.system_properties, union_prop)?;
            c.map_into(&mut record.properties, union_prop)?;
        }
        KnownSchema::Storage => {
            set_str(enqueued, c.str()?);
            c.map_into(&mut record.properties, string_prop)?;
            c.map_into(&mut record.system_properties, string_prop)?;
        }
    }
    match c.long()? {
        0 => record.body = None,
        1 => {
            let body = c.bytes()?;
            let start = bodies.len() as u32;
            bodies.extend_from_slice(body);
            record.body = Some((start, bodies.len() as u32));
        }
        _ => return None,
    }
    record.index_names();
    Some(())
}

/// Reads a container of a known schema.
pub struct FastAvroFile<R: Read> {
    input: R,
    schema: KnownSchema,
    codec: Codec,
    sync: [u8; 16],
    /// The current block, decompressed, and the read position in it.
    block: Vec<u8>,
    compressed: Vec<u8>,
    inflater: libdeflater::Decompressor,
    pos: usize,
    left_in_block: u64,
    next_index: u64,
    done: bool,
}

fn container_error(detail: impl Into<String>) -> AvroError {
    AvroError::Container(detail.into())
}

/// Reads a zigzag long from a stream.
fn read_long(input: &mut impl Read) -> std::io::Result<Option<i64>> {
    let mut n: u64 = 0;
    for (i, shift) in (0..64).step_by(7).enumerate() {
        let mut byte = [0u8; 1];
        if input.read(&mut byte)? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "truncated length",
                ))
            };
        }
        n |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] < 0x80 {
            return Ok(Some(((n >> 1) as i64) ^ -((n & 1) as i64)));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "overlong varint",
    ))
}

impl<R: Read> FastAvroFile<R> {
    /// Reads the header; `Ok(None)` when the schema is not one this reader knows (the caller
    /// then reads the file with apache-avro from the start).
    pub fn open(mut input: R) -> Result<Option<Self>, AvroError> {
        super::avro::limit_allocations();
        let io = |e: std::io::Error| container_error(e.to_string());
        let mut magic = [0u8; 4];
        input.read_exact(&mut magic).map_err(io)?;
        if &magic != b"Obj\x01" {
            return Err(container_error("not an Avro object container"));
        }
        let mut schema_json = None;
        let mut codec = Codec::Null;
        loop {
            let mut count = read_long(&mut input)
                .map_err(io)?
                .ok_or_else(|| container_error("truncated header"))?;
            if count == 0 {
                break;
            }
            if count < 0 {
                count = count
                    .checked_neg()
                    .ok_or_else(|| container_error("bad header"))?;
                read_long(&mut input).map_err(io)?;
            }
            for _ in 0..count {
                let key = read_bytes(&mut input).map_err(io)?;
                let value = read_bytes(&mut input).map_err(io)?;
                match key.as_slice() {
                    b"avro.schema" => schema_json = Some(value),
                    b"avro.codec" => {
                        codec = match value.as_slice() {
                            b"null" | b"" => Codec::Null,
                            b"deflate" => Codec::Deflate,
                            b"snappy" => Codec::Snappy,
                            other => {
                                return Err(container_error(format!(
                                    "unsupported codec {}",
                                    String::from_utf8_lossy(other)
                                )))
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut sync = [0u8; 16];
        input.read_exact(&mut sync).map_err(io)?;
        let schema_json =
            schema_json.ok_or_else(|| container_error("no avro.schema in the header"))?;
        let Some(schema) = known_schema(&schema_json) else {
            return Ok(None);
        };
        Ok(Some(Self {
            input,
            schema,
            codec,
            sync,
            block: Vec::new(),
            compressed: Vec::new(),
            inflater: libdeflater::Decompressor::new(),
            pos: 0,
            left_in_block: 0,
            next_index: 0,
            done: false,
        }))
    }

    /// Loads the next block; `Ok(false)` at the end of the file.
    fn next_block(&mut self) -> Result<bool, AvroError> {
        let index = self.next_index;
        let corrupt = |detail: String| AvroError::Record { index, detail };
        let io = |e: std::io::Error| AvroError::Record {
            index,
            detail: e.to_string(),
        };
        let Some(count) = read_long(&mut self.input).map_err(io)? else {
            return Ok(false);
        };
        let size = read_long(&mut self.input)
            .map_err(io)?
            .ok_or_else(|| corrupt("truncated block header".into()))?;
        let (Ok(count), Ok(size)) = (u64::try_from(count), usize::try_from(size)) else {
            return Err(corrupt("negative block count or size".into()));
        };
        if size > MAX_BLOCK_BYTES {
            return Err(corrupt(format!(
                "a block of {size} bytes (at most {MAX_BLOCK_BYTES})"
            )));
        }
        // Read what is there rather than allocate what the header claims: the buffer grows
        // with the bytes that arrive, so a lying size on a short file costs nothing.
        self.compressed.clear();
        let read = (&mut self.input)
            .take(size as u64)
            .read_to_end(&mut self.compressed)
            .map_err(io)?;
        if read != size {
            return Err(corrupt(format!(
                "a truncated block: {read} of its {size} bytes"
            )));
        }
        let mut sync = [0u8; 16];
        self.input.read_exact(&mut sync).map_err(io)?;
        if sync != self.sync {
            return Err(corrupt("sync marker mismatch: a corrupt block".into()));
        }
        match self.codec {
            Codec::Null => std::mem::swap(&mut self.block, &mut self.compressed),
            Codec::Deflate => inflate(&mut self.inflater, &self.compressed, &mut self.block)
                .map_err(|e| corrupt(format!("deflate: {e}")))?,
            Codec::Snappy => {
                let n = self.compressed.len();
                if n < 4 {
                    return Err(corrupt("snappy block without its checksum".into()));
                }
                let (data, crc) = self.compressed.split_at(n - 4);
                let len =
                    snap::raw::decompress_len(data).map_err(|e| corrupt(format!("snappy: {e}")))?;
                // The length is the stream's own claim: check it against the cap and against
                // what the compressed bytes can expand to before allocating it.
                if len > MAX_BLOCK_BYTES || len > data.len().saturating_mul(SNAPPY_MAX_RATIO) {
                    return Err(corrupt(format!(
                        "snappy: a block claiming {len} bytes from {} compressed (at most \
                         {MAX_BLOCK_BYTES}, and at most {SNAPPY_MAX_RATIO} times the compressed size)",
                        data.len()
                    )));
                }
                self.block.resize(len, 0);
                snap::raw::Decoder::new()
                    .decompress(data, &mut self.block)
                    .map_err(|e| corrupt(format!("snappy: {e}")))?;
                let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
                if crc32fast::hash(&self.block) != expected {
                    return Err(corrupt("snappy block checksum mismatch".into()));
                }
            }
        }
        self.pos = 0;
        self.left_in_block = count;
        Ok(true)
    }

    /// Decodes the next record into `record` (reusing its allocations), its body appended to
    /// `bodies`; `None` at the end.
    pub fn next_record_into(
        &mut self,
        record: &mut OwnedMessage,
        bodies: &mut Vec<u8>,
    ) -> Option<Result<(), AvroError>> {
        if self.done {
            return None;
        }
        while self.left_in_block == 0 {
            match self.next_block() {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        let index = self.next_index;
        let mut cursor = Cursor {
            bytes: &self.block,
            pos: self.pos,
        };
        let decoded = datum(self.schema, &mut cursor, bodies, record);
        self.pos = cursor.pos;
        self.left_in_block -= 1;
        self.next_index += 1;
        match decoded {
            Some(()) => Some(Ok(())),
            None => {
                self.done = true;
                Some(Err(AvroError::Record {
                    index,
                    detail: "a datum that does not decode".into(),
                }))
            }
        }
    }

    /// The next record, its body appended to `bodies`; `None` at the end.
    pub fn next_record(&mut self, bodies: &mut Vec<u8>) -> Option<Result<OwnedMessage, AvroError>> {
        let mut record = OwnedMessage::default();
        self.next_record_into(&mut record, bodies)
            .map(|result| result.map(|()| record))
    }
}

/// The largest block, compressed or not, any codec may produce (a bound against lying headers
/// and decompression bombs). Event Hubs messages are at most 1 MB and Capture writes blocks of
/// a few MB, so 256 MiB is far above any real file and far below the service's memory.
pub const MAX_BLOCK_BYTES: usize = 256 << 20;

/// The largest block an inflated deflate block may grow to.
const MAX_INFLATED: usize = MAX_BLOCK_BYTES;

/// Snappy cannot expand more than this: its densest element, a copy with a two-byte offset,
/// is 3 bytes for at most 64 (21.3 times); a claimed length beyond it is a lie.
const SNAPPY_MAX_RATIO: usize = 24;

/// Inflates a raw deflate stream into `out` with libdeflate (about twice as fast as miniz_oxide
/// here, where inflating was a tenth of the replay's CPU), reusing `out`'s allocation: blocks
/// are decompressed one after the other, and a fresh buffer each time cost page faults.
fn inflate(
    decompressor: &mut libdeflater::Decompressor,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let mut capacity = out.capacity().max(input.len() * 4).max(4096);
    loop {
        // Only grown, never zeroed again: libdeflate writes over it.
        if out.len() < capacity {
            out.resize(capacity, 0);
        }
        match decompressor.deflate_decompress(input, out) {
            Ok(n) => {
                out.truncate(n);
                return Ok(());
            }
            Err(libdeflater::DecompressionError::InsufficientSpace) if capacity < MAX_INFLATED => {
                capacity = (capacity * 2).min(MAX_INFLATED);
            }
            Err(libdeflater::DecompressionError::InsufficientSpace) => {
                return Err(format!("a block inflating beyond {MAX_INFLATED} bytes"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn read_bytes(input: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = read_long(input)?.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated header")
    })?;
    let n = usize::try_from(n)
        .ok()
        .filter(|n| *n < 1 << 24)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad header length"))?;
    let mut out = vec![0u8; n];
    input.read_exact(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::avro::{CAPTURE_SCHEMA, STORAGE_SCHEMA};
    use crate::source::avro::AvroFile;

    #[test]
    fn the_published_schemas_are_recognised_and_variants_are_not() {
        assert_eq!(
            known_schema(CAPTURE_SCHEMA.as_bytes()),
            Some(KnownSchema::Capture)
        );
        assert_eq!(
            known_schema(STORAGE_SCHEMA.as_bytes()),
            Some(KnownSchema::Storage)
        );
        let variant = STORAGE_SCHEMA.replace(
            r#"{"name":"Body","type":["null","bytes"]}"#,
            r#"{"name":"Body","type":["null","bytes"]},{"name":"Extra","type":"string"}"#,
        );
        assert_ne!(variant, STORAGE_SCHEMA);
        assert_eq!(known_schema(variant.as_bytes()), None);
    }

    /// A container of the storage schema with `codec` and the one raw block given.
    fn container(codec: &str, count: i64, size: i64, block: &[u8]) -> Vec<u8> {
        fn long(out: &mut Vec<u8>, n: i64) {
            let mut z = ((n << 1) ^ (n >> 63)) as u64;
            loop {
                let b = (z & 0x7f) as u8;
                z >>= 7;
                if z == 0 {
                    out.push(b);
                    return;
                }
                out.push(b | 0x80);
            }
        }
        let mut out = b"Obj\x01".to_vec();
        long(&mut out, 2);
        for (key, value) in [("avro.schema", STORAGE_SCHEMA), ("avro.codec", codec)] {
            long(&mut out, key.len() as i64);
            out.extend_from_slice(key.as_bytes());
            long(&mut out, value.len() as i64);
            out.extend_from_slice(value.as_bytes());
        }
        long(&mut out, 0);
        let sync = [7u8; 16];
        out.extend_from_slice(&sync);
        long(&mut out, count);
        long(&mut out, size);
        out.extend_from_slice(block);
        out.extend_from_slice(&sync);
        out
    }

    /// Issue 23: a block's size was allocated as claimed before its bytes were read.
    #[test]
    fn a_block_claiming_more_than_the_file_holds_is_corrupt_without_allocating_it() {
        for codec in ["null", "deflate", "snappy"] {
            let file = container(codec, 1, (MAX_BLOCK_BYTES - 1) as i64, b"only a few bytes");
            let mut reader = FastAvroFile::open(&file[..])
                .expect("header")
                .expect("known");
            let mut bodies = Vec::new();
            let error = reader
                .next_record(&mut bodies)
                .expect("an error")
                .expect_err("truncated");
            assert!(error.to_string().contains("truncated block"), "{error}");
            assert!(
                reader.compressed.capacity() < 1 << 20,
                "{codec}: {} bytes allocated for a block of 16",
                reader.compressed.capacity()
            );
            let file = container(codec, 1, (MAX_BLOCK_BYTES + 1) as i64, b"");
            let mut reader = FastAvroFile::open(&file[..])
                .expect("header")
                .expect("known");
            let error = reader
                .next_record(&mut bodies)
                .expect("an error")
                .expect_err("too big");
            assert!(error.to_string().contains("at most"), "{error}");
        }
    }

    /// Issue 23: a snappy block's claimed length was allocated whatever it was.
    #[test]
    fn a_snappy_block_claiming_a_huge_length_is_corrupt_without_allocating_it() {
        // The varint of 4 GiB - 1, a few literal bytes, and a checksum.
        let mut block = vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x08, b'a', b'b', b'c'];
        block.extend_from_slice(&crc32fast::hash(b"abc").to_be_bytes());
        let file = container("snappy", 1, block.len() as i64, &block);
        let mut reader = FastAvroFile::open(&file[..])
            .expect("header")
            .expect("known");
        let mut bodies = Vec::new();
        let error = reader
            .next_record(&mut bodies)
            .expect("an error")
            .expect_err("a lie");
        assert!(
            error.to_string().contains("snappy: a block claiming"),
            "{error}"
        );
        assert!(reader.block.capacity() < 1 << 20);
        // Snappy's best real ratio is within the bound the check assumes.
        let zeros = vec![0u8; 8 << 20];
        let compressed = snap::raw::Encoder::new()
            .compress_vec(&zeros)
            .expect("compress");
        assert!(zeros.len() <= compressed.len() * SNAPPY_MAX_RATIO);
    }

    /// A storage-route schema with an extra field is not the known one: the fast reader
    /// declines it, and the generic reader reads it.
    #[test]
    fn another_schema_falls_back_to_the_generic_reader() {
        let variant = STORAGE_SCHEMA.replace(
            r#"{"name":"Body","type":["null","bytes"]}"#,
            r#"{"name":"Body","type":["null","bytes"]},{"name":"Extra","type":"string"}"#,
        );
        let schema = apache_avro::Schema::parse_str(&variant).expect("schema");
        let mut out = Vec::new();
        {
            let mut writer = apache_avro::Writer::new(&schema, &mut out).expect("writer");
            let mut record = apache_avro::types::Record::new(writer.schema()).expect("record");
            record.put("EnqueuedTimeUtc", "2024-06-01T00:00:00Z");
            let props: std::collections::HashMap<String, apache_avro::types::Value> = [(
                "deviceId".to_owned(),
                apache_avro::types::Value::String("d1".into()),
            )]
            .into();
            record.put("Properties", apache_avro::types::Value::Map(props));
            record.put(
                "SystemProperties",
                apache_avro::types::Value::Map(std::collections::HashMap::new()),
            );
            record.put(
                "Body",
                apache_avro::types::Value::Union(
                    1,
                    Box::new(apache_avro::types::Value::Bytes(b"{}".to_vec())),
                ),
            );
            record.put("Extra", "x");
            writer.append_value(record).expect("append");
            writer.flush().expect("flush");
        }
        assert!(FastAvroFile::open(&out[..]).expect("header").is_none());
        let mut generic = AvroFile::open(&out[..]).expect("generic");
        let mut bodies = Vec::new();
        let record = generic
            .next_record(&mut bodies)
            .expect("one")
            .expect("valid");
        assert_eq!(record.properties.len(), 1);
        assert_eq!(&bodies, b"{}");
        assert!(generic.next_record(&mut bodies).is_none());
    }
}
