//! What the emulator stores for an event, how IoT Hub's storage-route names map to the AMQP
//! message a consumer of the Event Hub-compatible endpoint receives (reference
//! `iothub-formats.md` §1, §6.4, §7.2), and that message.

use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};

use crate::generate::{GeneratedBody, GeneratedMessage};

/// An event as the emulator stores it: what a sender (IoT Hub) put on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatedEvent {
    /// The body, sent as one AMQP `data` section.
    pub body: Vec<u8>,
    /// AMQP application-properties (`hubName`, `deviceId`, `opType`, ...), all strings.
    pub properties: Vec<(String, String)>,
    /// Message annotations besides the `x-opt-*` ones the emulator sets itself
    /// (`iothub-connection-device-id`, `iothub-enqueuedtime`, `iothub-message-source`, ...).
    pub system_properties: Vec<(String, SystemValue)>,
    /// The AMQP `message-id` property.
    pub message_id: Option<String>,
    /// The AMQP `user-id` property (IoT Hub puts the hub name's bytes there).
    pub user_id: Option<Vec<u8>>,
    /// The AMQP `content-type` property.
    pub content_type: Option<String>,
    /// The AMQP `content-encoding` property.
    pub content_encoding: Option<String>,
    /// The AMQP `correlation-id` property.
    pub correlation_id: Option<String>,
    /// What places the event (IoT Hub uses the device id): partition = stable hash of it.
    /// It is not sent as `x-opt-partition-key`, which IoT Hub is not documented to set.
    pub partition_key: String,
    /// The Event Hubs enqueued time to record, in ms since the Unix epoch: a replayed file's
    /// `EnqueuedTimeUtc`; `None` means the time of publishing. A time before the partition's
    /// last enqueued time is raised to it, so enqueued times never decrease in a partition.
    pub enqueued_time_ms: Option<i64>,
}

/// The value of a message annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemValue {
    /// An AMQP string.
    Str(String),
    /// An AMQP long.
    Long(i64),
    /// An AMQP timestamp, in ms since the Unix epoch.
    Timestamp(i64),
}

impl EmulatedEvent {
    /// The event IoT Hub would put on its Event Hub-compatible endpoint for a generated
    /// message. See [`EmulatedEvent::from_storage_record`] for the mapping; a corrupt record
    /// (a torn line, which no endpoint would deliver) becomes an event with those bytes as
    /// its body.
    pub fn from_generated(message: &GeneratedMessage) -> EmulatedEvent {
        let body = match &message.body {
            GeneratedBody::Json(bytes)
            | GeneratedBody::Bytes(bytes)
            | GeneratedBody::Corrupt(bytes) => bytes.clone(),
        };
        EmulatedEvent::from_storage_record(
            &message.enqueued_time_utc,
            &message.properties,
            &message.system_properties,
            body,
        )
    }

    /// The event for a record of IoT Hub's storage-route encoding (JSON or Avro: the same
    /// fields), whose system properties use the storage names (`iothub-formats.md` §7.2):
    ///
    /// | storage name | on the Event Hubs endpoint |
    /// |---|---|
    /// | `messageId`, `correlationId` | AMQP `message-id`, `correlation-id` |
    /// | `userId` (else the `hubName` property) | AMQP `user-id` (UTF-8 bytes) |
    /// | `contentType`, `contentEncoding` | AMQP `content-type`, `content-encoding` |
    /// | `connectionDeviceId` | annotation `iothub-connection-device-id` |
    /// | `connectionModuleId` | annotation `iothub-connection-module-id` |
    /// | `connectionDeviceGenerationId` | annotation `iothub-connection-auth-generation-id` |
    /// | `connectionAuthMethod` | annotation `iothub-connection-auth-method` |
    /// | `enqueuedTime` | annotation `iothub-enqueuedtime` (timestamp) |
    /// | anything else (`iothub-message-source`, `dt-dataschema`, ...) | annotation of that name |
    ///
    /// The partition key is `connectionDeviceId`, else the `deviceId` property, else empty.
    /// `enqueued_time_utc` (ISO 8601) becomes the recorded enqueued time when it parses.
    pub fn from_storage_record(
        enqueued_time_utc: &str,
        properties: &[(String, String)],
        system_properties: &[(String, String)],
        body: Vec<u8>,
    ) -> EmulatedEvent {
        let mut event = EmulatedEvent {
            body,
            properties: properties.to_vec(),
            system_properties: Vec::with_capacity(system_properties.len()),
            message_id: None,
            user_id: None,
            content_type: None,
            content_encoding: None,
            correlation_id: None,
            partition_key: String::new(),
            enqueued_time_ms: parse_iso8601_ms(enqueued_time_utc),
        };
        let mut device_id = None;
        for (name, value) in system_properties {
            let annotation = match name.as_str() {
                "messageId" => {
                    event.message_id = Some(value.clone());
                    continue;
                }
                "correlationId" => {
                    event.correlation_id = Some(value.clone());
                    continue;
                }
                "userId" => {
                    event.user_id = Some(value.as_bytes().to_vec());
                    continue;
                }
                "contentType" => {
                    event.content_type = Some(value.clone());
                    continue;
                }
                "contentEncoding" => {
                    event.content_encoding = Some(value.clone());
                    continue;
                }
                "connectionDeviceId" => {
                    device_id = Some(value.clone());
                    "iothub-connection-device-id"
                }
                "connectionModuleId" => "iothub-connection-module-id",
                "connectionDeviceGenerationId" => "iothub-connection-auth-generation-id",
                "connectionAuthMethod" => "iothub-connection-auth-method",
                "enqueuedTime" => {
                    let value = match parse_iso8601_ms(value) {
                        Some(ms) => SystemValue::Timestamp(ms),
                        None => SystemValue::Str(value.clone()),
                    };
                    event
                        .system_properties
                        .push(("iothub-enqueuedtime".to_string(), value));
                    continue;
                }
                other => other,
            };
            event
                .system_properties
                .push((annotation.to_string(), SystemValue::Str(value.clone())));
        }
        let property = |wanted: &str| {
            properties
                .iter()
                .find(|(name, _)| name == wanted)
                .map(|(_, value)| value.clone())
        };
        if event.user_id.is_none() {
            event.user_id = property("hubName").map(String::into_bytes);
        }
        event.partition_key = device_id
            .filter(|id| !id.is_empty())
            .or_else(|| property("deviceId"))
            .unwrap_or_default();
        event
    }

    /// The bytes this event adds to its partition's offset: the body and the properties plus
    /// a fixed 64 bytes, so offsets increase strictly even for empty events.
    pub(crate) fn stored_size(&self) -> u64 {
        let properties: usize = self
            .properties
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum();
        let annotations: usize = self
            .system_properties
            .iter()
            .map(|(name, value)| {
                name.len()
                    + match value {
                        SystemValue::Str(text) => text.len(),
                        SystemValue::Long(_) | SystemValue::Timestamp(_) => 8,
                    }
            })
            .sum();
        (64 + self.body.len() + properties + annotations) as u64
    }
}

/// Where an event sits in its partition, as Event Hubs numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPosition {
    /// `x-opt-sequence-number`: 0, 1, 2, ... in each partition.
    pub sequence_number: i64,
    /// `x-opt-offset` (sent as its decimal string).
    pub offset: u64,
    /// `x-opt-enqueued-time`, ms since the Unix epoch.
    pub enqueued_time_ms: i64,
}

/// The AMQP message a receiver gets for `event` at `position`.
pub(crate) fn amqp_message(event: &EmulatedEvent, position: EventPosition) -> Message<Data> {
    let mut annotations = MessageAnnotations::builder()
        .insert(
            Symbol::from("x-opt-sequence-number"),
            Value::Long(position.sequence_number),
        )
        .insert(
            Symbol::from("x-opt-offset"),
            Value::String(position.offset.to_string()),
        )
        .insert(
            Symbol::from("x-opt-enqueued-time"),
            Value::Timestamp(Timestamp::from_milliseconds(position.enqueued_time_ms)),
        );
    for (name, value) in &event.system_properties {
        let value = match value {
            SystemValue::Str(text) => Value::String(text.clone()),
            SystemValue::Long(number) => Value::Long(*number),
            SystemValue::Timestamp(ms) => Value::Timestamp(Timestamp::from_milliseconds(*ms)),
        };
        annotations = annotations.insert(Symbol::from(name.as_str()), value);
    }
    let mut application_properties = ApplicationProperties::builder();
    for (name, value) in &event.properties {
        application_properties =
            application_properties.insert(name.clone(), SimpleValue::String(value.clone()));
    }
    let properties = Properties {
        message_id: event.message_id.clone().map(MessageId::String),
        user_id: event.user_id.clone().map(Binary::from),
        correlation_id: event.correlation_id.clone().map(MessageId::String),
        content_type: event.content_type.as_deref().map(Symbol::from),
        content_encoding: event.content_encoding.as_deref().map(Symbol::from),
        ..Properties::default()
    };
    Message::builder()
        .message_annotations(annotations.build())
        .application_properties(application_properties.build())
        .properties(properties)
        .data(Binary::from(event.body.clone()))
        .build()
}

/// Milliseconds since the Unix epoch of an ISO 8601 UTC time as IoT Hub writes them
/// (`2026-01-01T00:00:00.0050000Z`, `...+00:00`, any number of fraction digits), or `None`.
pub fn parse_iso8601_ms(text: &str) -> Option<i64> {
    crate::time::Ticks::parse_lenient(text).map(crate::time::Ticks::unix_millis)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iothub_times() {
        assert_eq!(parse_iso8601_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_iso8601_ms("2026-01-01T00:00:00.0050000Z"),
            Some(1_767_225_600_005)
        );
        assert_eq!(
            parse_iso8601_ms("2022-06-01T22:27:50.2612586Z"),
            Some(1_654_122_470_261)
        );
        assert_eq!(
            parse_iso8601_ms("2020-10-21T10:01:40.1281138+00:00"),
            Some(1_603_274_500_128)
        );
        assert_eq!(
            parse_iso8601_ms("2020-10-21T12:01:40.1+02:00"),
            Some(1_603_274_500_100)
        );
        assert_eq!(parse_iso8601_ms("2020-10-21"), None);
        assert_eq!(parse_iso8601_ms("2020-13-21T00:00:00Z"), None);
        assert_eq!(parse_iso8601_ms("2020-10-21T00:00:00.Z"), None);
        assert_eq!(parse_iso8601_ms("not a time at all!!"), None);
    }

    #[test]
    fn maps_storage_names_to_amqp() {
        let pairs = |items: &[(&str, &str)]| -> Vec<(String, String)> {
            items
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect()
        };
        let event = EmulatedEvent::from_storage_record(
            "2026-01-01T00:00:01.0000000Z",
            &pairs(&[
                ("hubName", "hub1"),
                ("deviceId", "dev-7"),
                ("opType", "updateTwin"),
            ]),
            &pairs(&[
                ("correlationId", "c0ffee"),
                ("connectionDeviceId", "dev-7"),
                ("connectionModuleId", "azureiotsecurity"),
                ("enqueuedTime", "2026-01-01T00:00:00.9990000Z"),
                ("contentType", "application/json"),
                ("contentEncoding", "utf-8"),
                ("iothub-message-source", "twinChangeEvents"),
            ]),
            b"{}".to_vec(),
        );
        assert_eq!(event.partition_key, "dev-7");
        assert_eq!(event.user_id.as_deref(), Some(&b"hub1"[..]));
        assert_eq!(event.correlation_id.as_deref(), Some("c0ffee"));
        assert_eq!(event.content_type.as_deref(), Some("application/json"));
        assert_eq!(event.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(event.enqueued_time_ms, Some(1_767_225_601_000));
        assert_eq!(
            event.system_properties,
            vec![
                (
                    "iothub-connection-device-id".to_string(),
                    SystemValue::Str("dev-7".to_string())
                ),
                (
                    "iothub-connection-module-id".to_string(),
                    SystemValue::Str("azureiotsecurity".to_string())
                ),
                (
                    "iothub-enqueuedtime".to_string(),
                    SystemValue::Timestamp(1_767_225_600_999)
                ),
                (
                    "iothub-message-source".to_string(),
                    SystemValue::Str("twinChangeEvents".to_string())
                ),
            ]
        );
    }
}
