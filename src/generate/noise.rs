//! Noise: messages that are not the fleet's twin changes (duplicates, stale re-sends,
//! telemetry, connection-state events) and malformed ones, one for each dead-letter reason.

use rand::Rng;

use super::fleet::{pick_weighted, MICRO_AGENT_MODULE, SECURITY_AGENT_MODULE};
use super::json::{format_time, push_json_string, push_time, JsonWriter};
use super::stream::{pair, remove_property, set_property, Messages, Source};
use super::{GeneratedBody, GeneratedMessage, MessageKind, NoiseKind};

/// Duplicates copy one of this many most recent kept messages; stale re-sends one older.
const RECENT_DUPLICATE_WINDOW: usize = 16;
/// The body of a too-large message: more than IoT Hub's 262144-byte maximum.
const OVERSIZED_DUMP_LENGTH: usize = 270_000;
/// Noise kinds after the first round, relatively.
const NOISE_WEIGHTS: [(NoiseKind, u32); 12] = [
    (NoiseKind::Duplicate, 200),
    (NoiseKind::StaleResend, 150),
    (NoiseKind::Telemetry, 250),
    (NoiseKind::ConnectionState, 120),
    (NoiseKind::MissingDeviceId, 30),
    (NoiseKind::BadOpType, 30),
    (NoiseKind::BadOperationTimestamp, 30),
    (NoiseKind::BadBody, 30),
    (NoiseKind::BadVersion, 30),
    (NoiseKind::NonJsonBytes, 30),
    // Each is larger than 256 KiB, so keep them rare.
    (NoiseKind::BodyTooLarge, 1),
    (NoiseKind::CorruptLine, 10),
];

impl Messages {
    // ----- noise -----

    pub(super) fn noise_message(&mut self) -> GeneratedMessage {
        let kind = match NoiseKind::ALL.get(self.noise_cycle) {
            Some(&kind) => kind,
            None => {
                let weights = NOISE_WEIGHTS.map(|(_, weight)| weight);
                NOISE_WEIGHTS[pick_weighted(&mut self.rng, &weights)].0
            }
        };
        if let Some(message) = self.noise_of_kind(kind) {
            if self.noise_cycle < NoiseKind::ALL.len() {
                self.noise_cycle += 1;
            }
            return message;
        }
        // Duplicates and re-sends need earlier fleet messages; until there are some (or
        // always, in a run of only noise) another kind stands in.
        let weights = NOISE_WEIGHTS.map(|(kind, weight)| match kind {
            NoiseKind::Duplicate | NoiseKind::StaleResend => 0,
            _ => weight,
        });
        let kind = NOISE_WEIGHTS[pick_weighted(&mut self.rng, &weights)].0;
        match self.noise_of_kind(kind) {
            Some(message) => message,
            None => self.telemetry(),
        }
    }

    fn noise_of_kind(&mut self, kind: NoiseKind) -> Option<GeneratedMessage> {
        match kind {
            NoiseKind::Duplicate => self.duplicate(),
            NoiseKind::StaleResend => self.stale_resend(),
            NoiseKind::Telemetry => Some(self.telemetry()),
            NoiseKind::ConnectionState => Some(self.connection_state()),
            NoiseKind::CorruptLine => Some(self.corrupt_line()),
            _ => Some(self.malformed(kind)),
        }
    }

    fn duplicate(&mut self) -> Option<GeneratedMessage> {
        if self.recent.is_empty() {
            return None;
        }
        let window = self.recent.len().min(RECENT_DUPLICATE_WINDOW);
        let position = self.recent.len() - 1 - self.rng.gen_range(0..window);
        let mut message = self.recent[position].message.clone();
        message.kind = MessageKind::Noise(NoiseKind::Duplicate);
        Some(message)
    }

    fn stale_resend(&mut self) -> Option<GeneratedMessage> {
        let older = self.recent.len().saturating_sub(RECENT_DUPLICATE_WINDOW);
        if older == 0 {
            return None;
        }
        for _ in 0..8 {
            let position = self.rng.gen_range(0..older);
            if !self.recent[position].is_update {
                continue;
            }
            let mut message = self.recent[position].message.clone();
            let (_, enqueued) = self.next_times();
            let enqueued_text = format_time(enqueued);
            set_property(
                &mut message.system_properties,
                "enqueuedTime",
                enqueued_text.clone(),
            );
            message.enqueued_time_utc = enqueued_text;
            message.kind = MessageKind::Noise(NoiseKind::StaleResend);
            return Some(message);
        }
        None
    }

    /// A device id for noise: one of the fleet's when there is a fleet, else an unknown one.
    fn noise_device_id(&mut self) -> String {
        if self.fleet.is_empty() {
            format!("unregistered-{:04}", self.rng.gen_range(0..1000))
        } else {
            let d = self.rng.gen_range(0..self.fleet.len());
            self.device_id(d)
        }
    }

    fn random_hex(&mut self, digits: usize) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        (0..digits)
            .map(|_| char::from(HEX[self.rng.gen_range(0..16)]))
            .collect()
    }

    pub(super) fn telemetry(&mut self) -> GeneratedMessage {
        let (_, enqueued) = self.next_times();
        let enqueued_text = format_time(enqueued);
        let device_id = self.noise_device_id();
        let from_security_agent = self.rng.gen_ratio(1, 5);
        let binary = !from_security_agent && self.rng.gen_ratio(1, 5);
        let mut properties = Vec::new();
        if !from_security_agent && self.rng.gen_ratio(1, 3) {
            properties.push(pair("alertLevel", "normal"));
        }
        let message_id = format!(
            "{}-{}-{}-{}-{}",
            self.random_hex(8),
            self.random_hex(4),
            self.random_hex(4),
            self.random_hex(4),
            self.random_hex(12)
        );
        let mut system_properties = vec![
            pair("messageId", message_id),
            pair("connectionDeviceId", device_id.as_str()),
        ];
        if from_security_agent {
            system_properties.push(pair("connectionModuleId", SECURITY_AGENT_MODULE));
        }
        system_properties.push(pair(
            "connectionAuthMethod",
            r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#,
        ));
        system_properties.push(pair(
            "connectionDeviceGenerationId",
            format!(
                "{:018}",
                self.rng
                    .gen_range(100_000_000_000_000_000u64..1_000_000_000_000_000_000)
            ),
        ));
        system_properties.push(pair("enqueuedTime", enqueued_text.as_str()));
        let body = if binary {
            // A device that sends bytes without a content type: storage keeps them as base64.
            let length = self.rng.gen_range(8..48);
            GeneratedBody::Bytes((0..length).map(|_| self.rng.gen::<u8>()).collect())
        } else {
            system_properties.push(pair("contentType", "application/json"));
            system_properties.push(pair("contentEncoding", "utf-8"));
            let mut json = JsonWriter::new();
            json.begin_object();
            if from_security_agent {
                json.key("AgentVersion");
                json.string("3.13.1");
                json.key("AgentId");
                json.string(&self.random_hex(32));
                json.key("MessageSchemaVersion");
                json.string("1.0");
                json.key("Events");
                json.begin_array();
                json.end_array();
            } else {
                json.key("temperature");
                json.raw(format!("{:.2}", self.rng.gen_range(-10.0..45.0f64)).as_bytes());
                json.key("humidity");
                json.unsigned(self.rng.gen_range(10..95));
                json.key("batteryPercent");
                json.unsigned(self.rng.gen_range(0..=100));
            }
            json.end_object();
            GeneratedBody::Json(json.finish())
        };
        system_properties.push(pair("iothub-message-source", "Telemetry"));
        GeneratedMessage {
            enqueued_time_utc: enqueued_text,
            properties,
            system_properties,
            body,
            kind: MessageKind::Noise(NoiseKind::Telemetry),
        }
    }

    fn connection_state(&mut self) -> GeneratedMessage {
        let (op_time, enqueued) = self.next_times();
        let enqueued_text = format_time(enqueued);
        let device_id = self.noise_device_id();
        let connected = self.rng.gen_ratio(1, 2);
        self.connection_sequence += 1;
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("sequenceNumber");
        json.string(&format!("{:064X}", self.connection_sequence));
        json.end_object();
        let properties = vec![
            pair("hubName", self.hub.as_str()),
            pair("deviceId", device_id.as_str()),
            pair("operationTimestamp", format_time(op_time)),
            pair("iothub-message-schema", "deviceConnectionStateNotification"),
            pair(
                "opType",
                if connected {
                    "deviceConnected"
                } else {
                    "deviceDisconnected"
                },
            ),
        ];
        let system_properties = vec![
            pair("correlationId", self.correlation_id()),
            pair("connectionDeviceId", device_id.as_str()),
            pair("enqueuedTime", enqueued_text.as_str()),
            pair("contentType", "application/json"),
            pair("contentEncoding", "utf-8"),
            pair("iothub-message-source", "deviceConnectionStateEvents"),
        ];
        GeneratedMessage {
            enqueued_time_utc: enqueued_text,
            properties,
            system_properties,
            body: GeneratedBody::Json(json.finish()),
            kind: MessageKind::Noise(NoiseKind::ConnectionState),
        }
    }

    /// A twin notification with exactly one defect: the one `kind` names. Everything else
    /// about it is well-formed, so the consumer's first check that fails is that one.
    pub(super) fn malformed(&mut self, kind: NoiseKind) -> GeneratedMessage {
        let (op_time, enqueued) = self.next_times();
        let device_id = self.noise_device_id();
        let module_id = self.rng.gen_ratio(1, 3).then_some(MICRO_AGENT_MODULE);
        let version = self.rng.gen_range(3..500u64);
        let reported_version = self.rng.gen_range(2..300u64);
        let report = |json: &mut JsonWriter, version_json: Option<&str>| {
            json.begin_object();
            if let Some(version_json) = version_json {
                json.key("version");
                json.raw(version_json.as_bytes());
            }
            json.key("properties");
            json.begin_object();
            json.key("reported");
            json.begin_object();
            json.key("latest_state");
            json.string("success");
            json.key("$metadata");
            json.begin_object();
            json.stamp(op_time, None);
            json.end_object();
            json.key("$version");
            json.unsigned(reported_version);
            json.end_object();
            json.end_object();
            json.end_object();
        };
        let version_text = version.to_string();
        let mut json = JsonWriter::new();
        let mut body = None;
        match kind {
            NoiseKind::BadBody => match self.rng.gen_range(0..5) {
                0 => {
                    json.begin_array();
                    report(&mut json, Some(&version_text));
                    json.end_array();
                }
                1 => json.unsigned(version),
                2 => {
                    json.begin_object();
                    json.key("version");
                    json.unsigned(version);
                    json.key("tags");
                    json.null();
                    json.end_object();
                }
                3 => {
                    json.begin_object();
                    json.key("version");
                    json.unsigned(version);
                    json.key("properties");
                    json.begin_object();
                    json.key("desired");
                    json.begin_array();
                    json.string("Baseline_Disabled");
                    json.end_array();
                    json.end_object();
                    json.end_object();
                }
                _ => {
                    // Nested 70 levels deep, past the consumer's limit of 64.
                    json.begin_object();
                    json.key("version");
                    json.unsigned(version);
                    json.key("tags");
                    for _ in 0..69 {
                        json.begin_object();
                        json.key("nested");
                    }
                    json.string("deep");
                    for _ in 0..69 {
                        json.end_object();
                    }
                    json.end_object();
                }
            },
            NoiseKind::BadVersion => {
                let version_json = match self.rng.gen_range(0..5) {
                    0 => None,
                    1 => Some(format!("\"{version}\"")),
                    2 => Some(format!("{version}.5")),
                    3 => Some("1e3".to_owned()),
                    _ => Some("null".to_owned()),
                };
                report(&mut json, version_json.as_deref());
            }
            NoiseKind::NonJsonBytes => {
                let length = self.rng.gen_range(16..64);
                let mut bytes: Vec<u8> = match self.rng.gen_range(0..3) {
                    // Invalid UTF-8 from the first byte.
                    0 => vec![0xff, 0xfe],
                    // A gzip header: a compressed body with the wrong content encoding.
                    1 => vec![0x1f, 0x8b, 0x08, 0x00],
                    _ => b"version=7;reported=".to_vec(),
                };
                bytes.extend((0..length).map(|_| self.rng.gen::<u8>()));
                body = Some(GeneratedBody::Bytes(bytes));
            }
            NoiseKind::BodyTooLarge => {
                json.begin_object();
                json.key("version");
                json.unsigned(version);
                json.key("properties");
                json.begin_object();
                json.key("reported");
                json.begin_object();
                json.key("diagnosticsDump");
                let dump: String = (0..OVERSIZED_DUMP_LENGTH)
                    .map(|position| char::from(b'A' + (position % 26) as u8))
                    .collect();
                json.string(&dump);
                json.key("$version");
                json.unsigned(reported_version);
                json.end_object();
                json.end_object();
                json.end_object();
            }
            _ => report(&mut json, Some(&version_text)),
        }
        let body = body.unwrap_or_else(|| GeneratedBody::Json(json.finish()));
        let mut message = self.notification(
            &device_id,
            module_id,
            Source::TwinChange,
            "updateTwin",
            op_time,
            enqueued,
            body,
            MessageKind::Noise(kind),
        );
        match kind {
            NoiseKind::MissingDeviceId => {
                if self.rng.gen_ratio(1, 2) {
                    remove_property(&mut message.properties, "deviceId");
                    remove_property(&mut message.system_properties, "connectionDeviceId");
                } else {
                    set_property(&mut message.properties, "deviceId", String::new());
                    set_property(
                        &mut message.system_properties,
                        "connectionDeviceId",
                        String::new(),
                    );
                }
            }
            NoiseKind::BadOpType => match self.rng.gen_range(0..4) {
                0 => set_property(&mut message.properties, "opType", "patchTwin".to_owned()),
                1 => remove_property(&mut message.properties, "opType"),
                2 => set_property(
                    &mut message.properties,
                    "opType",
                    "createDeviceIdentity".to_owned(),
                ),
                _ => {
                    // A twin-change operation from the lifecycle source.
                    set_property(
                        &mut message.properties,
                        "iothub-message-schema",
                        Source::Lifecycle.schema().to_owned(),
                    );
                    set_property(
                        &mut message.system_properties,
                        "iothub-message-source",
                        Source::Lifecycle.message_source().to_owned(),
                    );
                }
            },
            NoiseKind::BadOperationTimestamp => {
                let good = format_time(op_time);
                let bad = match self.rng.gen_range(0..6) {
                    0 => good.replacen('T', " ", 1),
                    1 => good.replacen('Z', "1Z", 1),
                    2 => good.replacen('T', "t", 1),
                    3 => format!("{}24{}", &good[..11], &good[13..]),
                    4 => op_time.unix_millis().to_string(),
                    _ => "yesterday".to_owned(),
                };
                set_property(&mut message.properties, "operationTimestamp", bad);
            }
            _ => {}
        }
        message
    }

    fn corrupt_line(&mut self) -> GeneratedMessage {
        let (op_time, enqueued) = self.next_times();
        let enqueued_text = format_time(enqueued);
        let raw = if self.rng.gen_ratio(3, 4) {
            // A record torn off mid-write.
            let device_id = self.noise_device_id();
            let mut raw = Vec::new();
            raw.extend_from_slice(b"{\"EnqueuedTimeUtc\":");
            push_json_string(&mut raw, &enqueued_text);
            raw.extend_from_slice(b",\"Properties\":{\"hubName\":");
            push_json_string(&mut raw, &self.hub);
            raw.extend_from_slice(b",\"deviceId\":");
            push_json_string(&mut raw, &device_id);
            raw.extend_from_slice(b",\"operationTimestamp\":\"");
            push_time(&mut raw, op_time);
            let keep = self.rng.gen_range(1..raw.len());
            raw.truncate(keep);
            raw
        } else {
            // Garbage: bytes from a block that was never written.
            // It starts with a NUL byte, so it can never happen to be JSON.
            let length = self.rng.gen_range(8..64);
            let mut garbage = vec![0u8];
            garbage.extend((0..length).map(|_| match self.rng.gen::<u8>() {
                b'\n' | b'\r' => 0,
                byte => byte,
            }));
            garbage
        };
        GeneratedMessage {
            enqueued_time_utc: enqueued_text,
            properties: Vec::new(),
            system_properties: Vec::new(),
            body: GeneratedBody::Corrupt(raw),
            kind: MessageKind::Noise(NoiseKind::CorruptLine),
        }
    }
}
