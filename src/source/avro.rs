//! Avro object container files: Event Hubs Capture (`EventData`) and IoT Hub's storage-route
//! `Message` records (reference §7), with the null, deflate and snappy codecs.
//!
//! Records are read on the reader thread into [`AvroRecord`]s (owned, so they can cross to the
//! apply thread) whose bodies are packed into one buffer and parsed there like JSON lines;
//! [`AvroMessage`] is the [`Message`] view the apply thread decodes.

use std::borrow::Cow;
use std::io::Read;

use apache_avro::types::Value as AvroValue;
use base64::Engine as _;
use serde_json::json;
use simd_json::Node;

use crate::decode::{Body, Message, Prop};

/// A property value as Avro carries it (Capture's maps are of union long/double/string/bytes;
/// the storage route's are of strings).
#[derive(Clone, Debug, PartialEq)]
pub enum AvroProp {
    Str(String),
    Bytes(Vec<u8>),
    Long(i64),
    Double(f64),
}

impl AvroProp {
    fn as_prop(&self) -> Prop<'_> {
        match self {
            AvroProp::Str(s) => Prop::Str(s),
            AvroProp::Bytes(b) => Prop::Bytes(b),
            AvroProp::Long(n) => Prop::Int(*n),
            AvroProp::Double(_) => Prop::Other,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            AvroProp::Str(s) => json!(s),
            AvroProp::Bytes(b) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
            AvroProp::Long(n) => json!(n),
            AvroProp::Double(f) => json!(f),
        }
    }
}

/// One record of a Capture or storage-route file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AvroRecord {
    pub enqueued_time_utc: Option<String>,
    pub properties: Vec<(String, AvroProp)>,
    pub system_properties: Vec<(String, AvroProp)>,
    /// The body's range in the block's body buffer; `None` for a null body.
    pub body: Option<(u32, u32)>,
}

/// Why a file could not be read as Avro.
#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    #[error("not a readable Avro container: {0}")]
    Container(String),
    #[error(
        "unknown record schema (neither Event Hubs Capture EventData nor IoT Hub Message): {0}"
    )]
    Schema(String),
    #[error("corrupt record {index}: {detail}")]
    Record { index: u64, detail: String },
}

/// Reads a container's records in order, checking the schema first.
pub struct AvroFile<R: Read> {
    reader: apache_avro::Reader<'static, R>,
    next_index: u64,
}

impl<R: Read> AvroFile<R> {
    pub fn open(input: R) -> Result<Self, AvroError> {
        let reader =
            apache_avro::Reader::new(input).map_err(|e| AvroError::Container(e.to_string()))?;
        let schema = reader.writer_schema();
        let text = schema.canonical_form();
        let has = |field: &str| text.contains(&format!("\"name\":\"{field}\""));
        if !(has("Body") && has("Properties") && has("SystemProperties")) {
            return Err(AvroError::Schema(text));
        }
        Ok(Self {
            reader,
            next_index: 0,
        })
    }

    /// The next record, its body appended to `bodies`; `None` at the end.
    pub fn next_record(&mut self, bodies: &mut Vec<u8>) -> Option<Result<AvroRecord, AvroError>> {
        let index = self.next_index;
        let value = match self.reader.next()? {
            Ok(value) => value,
            Err(e) => {
                return Some(Err(AvroError::Record {
                    index,
                    detail: e.to_string(),
                }))
            }
        };
        self.next_index += 1;
        Some(record(value, bodies).map_err(|detail| AvroError::Record { index, detail }))
    }
}

fn record(value: AvroValue, bodies: &mut Vec<u8>) -> Result<AvroRecord, String> {
    let AvroValue::Record(fields) = value else {
        return Err("not a record".into());
    };
    let mut out = AvroRecord::default();
    for (name, value) in fields {
        match name.as_str() {
            "EnqueuedTimeUtc" => {
                if let AvroValue::String(s) = unwrap_union(value) {
                    out.enqueued_time_utc = Some(s);
                }
            }
            "Properties" => out.properties = map(value)?,
            "SystemProperties" => out.system_properties = map(value)?,
            "Body" => match unwrap_union(value) {
                AvroValue::Bytes(b) | AvroValue::Fixed(_, b) => {
                    let start = bodies.len() as u32;
                    bodies.extend_from_slice(&b);
                    out.body = Some((start, bodies.len() as u32));
                }
                AvroValue::String(s) => {
                    let start = bodies.len() as u32;
                    bodies.extend_from_slice(s.as_bytes());
                    out.body = Some((start, bodies.len() as u32));
                }
                _ => out.body = None,
            },
            _ => {}
        }
    }
    Ok(out)
}

fn unwrap_union(value: AvroValue) -> AvroValue {
    match value {
        AvroValue::Union(_, inner) => *inner,
        other => other,
    }
}

fn map(value: AvroValue) -> Result<Vec<(String, AvroProp)>, String> {
    let AvroValue::Map(entries) = unwrap_union(value) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(String, AvroProp)> = entries
        .into_iter()
        .filter_map(|(k, v)| {
            let prop = match unwrap_union(v) {
                AvroValue::String(s) => AvroProp::Str(s),
                AvroValue::Bytes(b) | AvroValue::Fixed(_, b) => AvroProp::Bytes(b),
                AvroValue::Long(n) | AvroValue::TimestampMillis(n) => AvroProp::Long(n),
                AvroValue::Int(n) => AvroProp::Long(n.into()),
                AvroValue::Double(f) => AvroProp::Double(f),
                AvroValue::Float(f) => AvroProp::Double(f.into()),
                AvroValue::Boolean(b) => AvroProp::Str(b.to_string()),
                _ => return None,
            };
            Some((k, prop))
        })
        .collect();
    // Maps come in hash order: sort, so that a dead letter's rendering is stable.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The [`Message`] view of one record, with its body's tape when the body parsed as JSON.
pub struct AvroMessage<'a> {
    pub record: &'a AvroRecord,
    /// The body's bytes (empty when the record has none).
    pub body_bytes: &'a [u8],
    pub body_nodes: Option<&'a [Node<'a>]>,
}

fn find<'a>(props: &'a [(String, AvroProp)], name: &str) -> Option<Prop<'a>> {
    props
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_prop())
}

impl<'a> Message<'a> for AvroMessage<'a> {
    fn app_property(&self, name: &str) -> Option<Prop<'a>> {
        find(&self.record.properties, name)
    }

    fn system_property(&self, name: &str, storage_name: &str) -> Option<Prop<'a>> {
        find(&self.record.system_properties, name)
            .or_else(|| find(&self.record.system_properties, storage_name))
    }

    fn eventhubs_enqueued_time(&self) -> Option<Prop<'a>> {
        self.record.enqueued_time_utc.as_deref().map(Prop::Str)
    }

    fn body_size(&self) -> usize {
        self.body_bytes.len()
    }

    fn body(&self) -> Body<'a> {
        match (self.record.body, self.body_nodes) {
            (None, _) => Body::Absent,
            (Some(_), Some(nodes)) => Body::Tape(nodes),
            (Some(_), None) => Body::Bytes(self.body_bytes),
        }
    }
}

impl AvroMessage<'_> {
    /// The record as JSON, for a dead letter: the storage-route JSON shape, with the body
    /// embedded when it is UTF-8 and base64 otherwise.
    pub fn raw(&self) -> Cow<'static, [u8]> {
        let props = |p: &[(String, AvroProp)]| -> serde_json::Map<String, serde_json::Value> {
            p.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()
        };
        let body = match (self.record.body, std::str::from_utf8(self.body_bytes)) {
            (None, _) => serde_json::Value::Null,
            (Some(_), Ok(text)) => json!(text),
            (Some(_), Err(_)) => {
                json!(base64::engine::general_purpose::STANDARD.encode(self.body_bytes))
            }
        };
        let value = json!({
            "EnqueuedTimeUtc": self.record.enqueued_time_utc,
            "Properties": props(&self.record.properties),
            "SystemProperties": props(&self.record.system_properties),
            "Body": body,
        });
        Cow::Owned(serde_json::to_vec(&value).unwrap_or_default())
    }
}
