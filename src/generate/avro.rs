//! The generated fleet in Avro containers: Event Hubs Capture `EventData` and IoT Hub's
//! storage-route `Message`, with the schemas Microsoft publishes (reference §7), so that one
//! fleet can be replayed from every container twinwatch reads.

use std::collections::HashMap;
use std::io::{self, Write};

use apache_avro::types::{Record, Value as AvroValue};
use apache_avro::{Codec, Schema, Writer};

use super::{messages, GenerateOptions, GenerateStats, GeneratedBody, GeneratedMessage};
use crate::time::Ticks;

/// Event Hubs Capture's record, as `avro-tools getschema` prints it.
pub const CAPTURE_SCHEMA: &str = r#"{"type":"record","name":"EventData","namespace":"Microsoft.ServiceBus.Messaging","fields":[{"name":"SequenceNumber","type":"long"},{"name":"Offset","type":"string"},{"name":"EnqueuedTimeUtc","type":"string"},{"name":"SystemProperties","type":{"type":"map","values":["long","double","string","bytes"]}},{"name":"Properties","type":{"type":"map","values":["long","double","string","bytes"]}},{"name":"Body","type":["null","bytes"]}]}"#;

/// IoT Hub's storage-route record.
pub const STORAGE_SCHEMA: &str = r#"{"type":"record","name":"Message","namespace":"Microsoft.Azure.Devices","fields":[{"name":"EnqueuedTimeUtc","type":"string"},{"name":"Properties","type":{"type":"map","values":"string"}},{"name":"SystemProperties","type":{"type":"map","values":"string"}},{"name":"Body","type":["null","bytes"]}]}"#;

/// Which Avro container to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AvroKind {
    Capture,
    Storage,
}

fn avro_error(e: apache_avro::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// A system property's Event Hubs (AMQP) name, as Capture keeps the annotations.
fn eventhubs_name(storage_name: &str) -> &str {
    match storage_name {
        "connectionDeviceId" => "iothub-connection-device-id",
        "connectionModuleId" => "iothub-connection-module-id",
        "connectionAuthMethod" => "iothub-connection-auth-method",
        "connectionDeviceGenerationId" => "iothub-connection-auth-generation-id",
        "enqueuedTime" => "iothub-enqueuedtime",
        "contentType" => "content-type",
        "contentEncoding" => "content-encoding",
        "correlationId" => "correlation-id",
        "messageId" => "message-id",
        "userId" => "user-id",
        other => other,
    }
}

fn union(index: u32, value: AvroValue) -> AvroValue {
    AvroValue::Union(index, Box::new(value))
}

/// Capture's map of union `[long, double, string, bytes]`: times as epoch milliseconds, the
/// user id as bytes, the rest as strings.
fn capture_system_properties(message: &GeneratedMessage) -> AvroValue {
    let mut map = HashMap::new();
    for (name, value) in &message.system_properties {
        let name = eventhubs_name(name);
        let value = match name {
            "iothub-enqueuedtime" => match Ticks::parse_lenient(value) {
                Some(t) => union(0, AvroValue::Long(t.unix_millis())),
                None => union(2, AvroValue::String(value.clone())),
            },
            "user-id" => union(3, AvroValue::Bytes(value.as_bytes().to_vec())),
            _ => union(2, AvroValue::String(value.clone())),
        };
        map.insert(name.to_owned(), value);
    }
    AvroValue::Map(map)
}

fn body(message: &GeneratedMessage) -> Option<AvroValue> {
    match &message.body {
        GeneratedBody::Json(b) | GeneratedBody::Bytes(b) => {
            Some(union(1, AvroValue::Bytes(b.clone())))
        }
        // A record that is not valid in any encoding has no Avro form: an Avro container
        // holds only well-formed records.
        GeneratedBody::Corrupt(_) => None,
    }
}

/// Writes the fleet for `opts` as one Avro container; returns the counts, without the
/// corrupt records that only the JSON-lines encoding can hold.
pub fn write_avro(
    opts: &GenerateOptions,
    kind: AvroKind,
    codec: Codec,
    out: &mut impl Write,
) -> io::Result<GenerateStats> {
    let schema = Schema::parse_str(match kind {
        AvroKind::Capture => CAPTURE_SCHEMA,
        AvroKind::Storage => STORAGE_SCHEMA,
    })
    .map_err(avro_error)?;
    let mut writer = Writer::with_codec(&schema, out, codec).map_err(avro_error)?;
    let mut stats = GenerateStats::default();
    let mut sequence_number = 0i64;
    let mut offset = 0u64;
    for message in messages(opts) {
        let Some(body) = body(&message) else {
            continue;
        };
        let mut record = Record::new(writer.schema())
            .ok_or_else(|| io::Error::other("schema is not a record"))?;
        record.put("EnqueuedTimeUtc", message.enqueued_time_utc.clone());
        match kind {
            AvroKind::Capture => {
                record.put("SequenceNumber", sequence_number);
                record.put("Offset", offset.to_string());
                record.put("SystemProperties", capture_system_properties(&message));
                let properties: HashMap<String, AvroValue> = message
                    .properties
                    .iter()
                    .map(|(k, v)| (k.clone(), union(2, AvroValue::String(v.clone()))))
                    .collect();
                record.put("Properties", AvroValue::Map(properties));
            }
            AvroKind::Storage => {
                let strings = |pairs: &[(String, String)]| {
                    AvroValue::Map(
                        pairs
                            .iter()
                            .map(|(k, v)| (k.clone(), AvroValue::String(v.clone())))
                            .collect(),
                    )
                };
                record.put("SystemProperties", strings(&message.system_properties));
                record.put("Properties", strings(&message.properties));
            }
        }
        if let AvroValue::Union(_, inner) = &body {
            if let AvroValue::Bytes(b) = inner.as_ref() {
                offset += b.len() as u64;
            }
        }
        record.put("Body", body);
        writer.append_value(record).map_err(avro_error)?;
        sequence_number += 1;
        stats.record(message.kind);
    }
    writer.flush().map_err(avro_error)?;
    Ok(stats)
}
