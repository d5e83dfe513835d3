//! Deterministic synthetic fleet generator: the notification stream of an IoT Hub fleet.
//!
//! [`messages`] models a fleet of devices, each with a device twin and, for most of them, a
//! security-module twin (`azureiotsecurity`, the legacy ASC for IoT agent, with its settings
//! wrapped `{"value": x}` under `ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration`, a
//! few under the preview object name with flat values; or `DefenderIotMicroAgent`, the micro
//! agent, with flat desired keys and reported `latest_state` / `latest_invalid_fields`; a few
//! devices have both, some neither). It yields the messages IoT Hub would route for that fleet:
//!
//! - lifecycle: devices are onboarded (`createDeviceIdentity` with tags `env`, `site`, `tier`,
//!   sometimes `owner` and `location`), then their modules; modules are deleted and re-created,
//!   devices are deleted now and then (sometimes after explicit module deletes) and usually
//!   re-created, when versions start again from 2 as a new identity's do;
//! - twin changes (`updateTwin`): agents reporting their effective configuration (an invalid
//!   desired value is rejected and the old one kept, so reported differs from desired), back
//!   end desired patches (about one in eight carries a non-compliant or invalid value), `null`
//!   deletions, tag changes, device reports (firmware, telemetry interval, connectivity);
//! - `replaceTwin` of tags or of the desired section, with the whole twin as its body.
//!
//! Every change raises the twin's top-level `version` by one (by two or three now and then, as
//! when IoT Hub coalesces notifications); each properties section keeps its own `$version`
//! and `$metadata` as the service writes them. Update bodies carry only the changed sections
//! plus `version`, never `deviceId` or `moduleId`.
//!
//! With `noise > 0`, that share of the messages is noise instead (see [`NoiseKind`]): exact
//! duplicates, stale re-sends of old updates, telemetry, connection-state events, and
//! malformed notifications for every dead-letter reason (`docs/semantics.md` §1), plus the odd
//! line that is not JSON at all. The first noise messages go through every kind once, so a
//! run with a few dozen noise messages already holds them all. A fleet of zero devices has no
//! twins, so all its messages are noise.
//!
//! The model is separate from the encoding: [`messages`] yields [`GeneratedMessage`]s, and
//! [`write_json_lines`] encodes them in IoT Hub's storage-route JSON encoding; other container
//! writers can reuse the same iterator.
//!
//! Promises: the same options give the same messages, byte for byte (one ChaCha8 stream from
//! the seed, no hash-map iteration, no clock); exactly `events` messages; operation times start
//! at 2026-01-01T00:00:00Z and increase by 5 ms to 1 s per message (duplicates and stale
//! re-sends keep their old operation time); memory holds a compact state per twin, never JSON
//! documents, so it grows with the number of devices onboarded, not with the events; no
//! option values make it panic.
//!
//! The module's files follow its seams: `settings.rs` the agent settings catalogue,
//! `fleet.rs` the fleet model, `body.rs` the body writers, `json.rs` the JSON writer they
//! write with, `stream.rs` the stream and its lifecycle operations, `changes.rs` the twin
//! changes, `noise.rs` the noise; `avro.rs` writes the stream as Capture or storage-route Avro.

pub mod avro;
mod body;
mod changes;
pub mod documents;
mod fleet;
mod json;
mod noise;
mod settings;
mod stream;

use std::io::{self, Write};

use base64::Engine as _;

use json::push_json_string;
pub use stream::Messages;

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Devices in the fleet. They are onboarded in index order while the stream runs, so a
    /// short stream may onboard only some of them.
    pub devices: u64,
    /// Messages (lines) to generate, noise included.
    pub events: u64,
    /// Seed of the random stream: the same options give the same bytes.
    pub seed: u64,
    /// The IoT hub name, written into every `hubName` property.
    pub hub: String,
    /// Share of the messages that are noise, 0 to 1 (outside that range it is clamped; NaN
    /// counts as 0).
    pub noise: f64,
}

/// Counts of what a run generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenerateStats {
    /// All messages (lines): the sum of the three counts below.
    pub messages: u64,
    /// Fleet lifecycle notifications (create and delete of devices and modules).
    pub lifecycle: u64,
    /// Fleet twin-change notifications (`updateTwin` and `replaceTwin`).
    pub twin_changes: u64,
    /// Noise messages of every [`NoiseKind`].
    pub noise: u64,
}

impl GenerateStats {
    /// Counts one message of the given kind.
    pub fn record(&mut self, kind: MessageKind) {
        self.messages += 1;
        match kind {
            MessageKind::Lifecycle => self.lifecycle += 1,
            MessageKind::TwinChange => self.twin_changes += 1,
            MessageKind::Noise(_) => self.noise += 1,
        }
    }
}

/// One generated message, independent of the container it will be written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedMessage {
    /// The Event Hubs enqueued time, ISO 8601 with 7 fraction digits (the same as the
    /// `enqueuedTime` system property when there is one).
    pub enqueued_time_utc: String,
    /// Application properties, in the order IoT Hub lists them.
    pub properties: Vec<(String, String)>,
    /// System properties under their storage-endpoint names (`connectionDeviceId`, ...).
    pub system_properties: Vec<(String, String)>,
    /// The body.
    pub body: GeneratedBody,
    /// What the message is, for statistics and tests; no container writes it.
    pub kind: MessageKind,
}

/// The body of a generated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneratedBody {
    /// UTF-8 JSON text (not necessarily an object: some noise bodies are arrays or numbers).
    Json(Vec<u8>),
    /// Content that is not JSON; the storage JSON encoding writes it as a base64 string.
    Bytes(Vec<u8>),
    /// A record that is not valid in any encoding: a JSON-lines writer writes these bytes
    /// as the whole line. They never contain a line feed or a carriage return.
    Corrupt(Vec<u8>),
}

/// What a generated message stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageKind {
    /// A create or delete of a device or module identity of the fleet.
    Lifecycle,
    /// An `updateTwin` or `replaceTwin` of a twin of the fleet.
    TwinChange,
    /// A message mixed in by the `noise` option.
    Noise(NoiseKind),
}

/// The kinds of noise message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NoiseKind {
    /// An exact copy of a recent fleet message (at-least-once delivery).
    Duplicate,
    /// An older `updateTwin` of the fleet re-sent later, with a new enqueued time; the twin has
    /// moved on since, unless it was deleted and re-created meanwhile.
    StaleResend,
    /// Device-to-cloud telemetry (`iothub-message-source` `Telemetry`), sometimes from the
    /// security agent module, sometimes with a binary body.
    Telemetry,
    /// A `deviceConnectionStateEvents` notification.
    ConnectionState,
    /// A twin notification with no (or an empty) `deviceId` and `connectionDeviceId`.
    MissingDeviceId,
    /// A twin notification whose `opType` is unknown, missing, or of the other source.
    BadOpType,
    /// A twin notification whose `operationTimestamp` is not ISO 8601 as IoT Hub writes it.
    BadOperationTimestamp,
    /// A twin notification whose body is JSON but not an object, has a non-object section,
    /// or nests too deep.
    BadBody,
    /// An `updateTwin` whose `version` is missing or not an integer.
    BadVersion,
    /// A twin notification whose body bytes are not JSON (written as base64 in JSON lines).
    NonJsonBytes,
    /// A valid `updateTwin` whose body is larger than IoT Hub's 256 KiB message maximum.
    BodyTooLarge,
    /// A line that is not JSON at all (a torn or garbled record).
    CorruptLine,
}

impl NoiseKind {
    /// Every kind, in the order the first noise messages go through them.
    pub const ALL: [NoiseKind; 12] = [
        NoiseKind::Telemetry,
        NoiseKind::ConnectionState,
        NoiseKind::MissingDeviceId,
        NoiseKind::BadOpType,
        NoiseKind::BadOperationTimestamp,
        NoiseKind::BadBody,
        NoiseKind::BadVersion,
        NoiseKind::NonJsonBytes,
        NoiseKind::BodyTooLarge,
        NoiseKind::CorruptLine,
        NoiseKind::Duplicate,
        NoiseKind::StaleResend,
    ];

    /// The dead-letter reason the consumer must give this message (`docs/semantics.md` §1), or
    /// `None` when it is not a dead letter: duplicates and stale re-sends are stale (or, after
    /// a re-create, applied again), telemetry and connection-state events are ignored, and a
    /// corrupt line is not a message at all but a fault of the container.
    pub fn dead_letter_reason(self) -> Option<&'static str> {
        match self {
            NoiseKind::Duplicate
            | NoiseKind::StaleResend
            | NoiseKind::Telemetry
            | NoiseKind::ConnectionState
            | NoiseKind::CorruptLine => None,
            NoiseKind::MissingDeviceId => Some("missing_device_id"),
            NoiseKind::BadOpType => Some("bad_op_type"),
            NoiseKind::BadOperationTimestamp => Some("bad_operation_timestamp"),
            NoiseKind::BadBody | NoiseKind::NonJsonBytes => Some("bad_body"),
            NoiseKind::BadVersion => Some("bad_version"),
            NoiseKind::BodyTooLarge => Some("body_too_large"),
        }
    }
}

/// The stream of messages for `opts`: exactly `opts.events` of them.
pub fn messages(opts: &GenerateOptions) -> Messages {
    Messages::new(opts)
}

/// Writes the stream for `opts` in IoT Hub's storage-route JSON encoding, one record per
/// line. Writes exactly `opts.events` lines.
///
/// # Errors
///
/// Any error from `out`; the lines written before it stay written.
pub fn write_json_lines(opts: &GenerateOptions, out: &mut impl Write) -> io::Result<GenerateStats> {
    let mut writer = io::BufWriter::with_capacity(1 << 20, out);
    let mut stats = GenerateStats::default();
    let mut line = Vec::with_capacity(8192);
    for message in messages(opts) {
        line.clear();
        encode_json_line(&message, &mut line);
        writer.write_all(&line)?;
        stats.record(message.kind);
    }
    writer.flush()?;
    Ok(stats)
}

/// Appends `message` to `line` as one storage-route JSON record and a line feed:
/// `{"EnqueuedTimeUtc", "Properties", "SystemProperties", "Body"}`, where a JSON body is
/// embedded, a byte body is a base64 string, and a corrupt record is written raw.
pub fn encode_json_line(message: &GeneratedMessage, line: &mut Vec<u8>) {
    if let GeneratedBody::Corrupt(raw) = &message.body {
        line.extend_from_slice(raw);
        line.push(b'\n');
        return;
    }
    line.extend_from_slice(b"{\"EnqueuedTimeUtc\":");
    push_json_string(line, &message.enqueued_time_utc);
    line.extend_from_slice(b",\"Properties\":");
    push_string_map(line, &message.properties);
    line.extend_from_slice(b",\"SystemProperties\":");
    push_string_map(line, &message.system_properties);
    line.extend_from_slice(b",\"Body\":");
    match &message.body {
        GeneratedBody::Json(json) => line.extend_from_slice(json),
        GeneratedBody::Bytes(bytes) => {
            line.push(b'"');
            let mut encoded = String::with_capacity(bytes.len() * 4 / 3 + 4);
            base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut encoded);
            line.extend_from_slice(encoded.as_bytes());
            line.push(b'"');
        }
        GeneratedBody::Corrupt(_) => {}
    }
    line.extend_from_slice(b"}\n");
}

fn push_string_map(line: &mut Vec<u8>, entries: &[(String, String)]) {
    line.push(b'{');
    for (position, (key, value)) in entries.iter().enumerate() {
        if position > 0 {
            line.push(b',');
        }
        push_json_string(line, key);
        line.push(b':');
        push_json_string(line, value);
    }
    line.push(b'}');
}

#[cfg(test)]
mod tests;
