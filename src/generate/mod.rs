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
//! malformed notifications for every dead-letter reason of `SEMANTICS.md` §1, plus the odd
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

pub mod avro;
pub mod documents;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Write};

use base64::Engine as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

    /// The dead-letter reason the consumer must give this message (`SEMANTICS.md` §1), or
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
    // NaN fails both comparisons and ends up as 0: no noise.
    let noise = if opts.noise >= 1.0 {
        1.0
    } else if opts.noise > 0.0 {
        opts.noise
    } else {
        0.0
    };
    Messages {
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
        hub: opts.hub.clone(),
        device_count: opts.devices,
        remaining: opts.events,
        noise,
        clock: START_TICKS,
        fleet: Vec::new(),
        fleet_step: 0,
        pending: BinaryHeap::new(),
        pending_sequence: 0,
        recent: VecDeque::with_capacity(RECENT_CAPACITY),
        noise_cycle: 0,
        connection_sequence: 0,
    }
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

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// A point in time in 100 ns ticks since the Unix epoch: the resolution of IoT Hub's 7-digit
/// fractions. Tick 0 stands for "never set", written as IoT Hub writes it.
type Ticks = u64;

const TICKS_PER_SECOND: u64 = 10_000_000;
const TICKS_PER_MILLISECOND: u64 = 10_000;
/// 2026-01-01T00:00:00Z.
const START_TICKS: Ticks = 1_767_225_600 * TICKS_PER_SECOND;
const NEVER: Ticks = 0;
const NEVER_TEXT: &str = "0001-01-01T00:00:00Z";
/// Gaps between consecutive operations. The smallest gap is longer than the longest enqueue
/// delay, so enqueued times increase through the stream too.
const MIN_GAP: Ticks = 5 * TICKS_PER_MILLISECOND;
const MAX_GAP: Ticks = 1000 * TICKS_PER_MILLISECOND;
const MIN_ENQUEUE_DELAY: Ticks = TICKS_PER_MILLISECOND / 2;
const MAX_ENQUEUE_DELAY: Ticks = 4 * TICKS_PER_MILLISECOND + TICKS_PER_MILLISECOND / 2;

/// Appends `ticks` as `YYYY-MM-DDTHH:MM:SS.fffffffZ`.
fn push_time(out: &mut Vec<u8>, ticks: Ticks) {
    if ticks == NEVER {
        out.extend_from_slice(NEVER_TEXT.as_bytes());
        return;
    }
    let seconds = ticks / TICKS_PER_SECOND;
    let fraction = ticks % TICKS_PER_SECOND;
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let second_of_day = seconds % 86_400;
    push_padded(out, year, 4);
    out.push(b'-');
    push_padded(out, month, 2);
    out.push(b'-');
    push_padded(out, day, 2);
    out.push(b'T');
    push_padded(out, second_of_day / 3600, 2);
    out.push(b':');
    push_padded(out, second_of_day / 60 % 60, 2);
    out.push(b':');
    push_padded(out, second_of_day % 60, 2);
    out.push(b'.');
    push_padded(out, fraction, 7);
    out.push(b'Z');
}

fn format_time(ticks: Ticks) -> String {
    let mut out = Vec::with_capacity(28);
    push_time(&mut out, ticks);
    String::from_utf8(out).unwrap_or_default()
}

/// Year, month and day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// restricted to days after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Appends `value` in decimal, left-padded with zeros to at least `width` digits.
fn push_padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut length = 0;
    let mut rest = value;
    loop {
        digits[length] = b'0' + (rest % 10) as u8;
        length += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for _ in length..width {
        out.push(b'0');
    }
    out.extend(digits[..length].iter().rev());
}

// ---------------------------------------------------------------------------------------------
// JSON writing
// ---------------------------------------------------------------------------------------------

/// Appends `text` as a JSON string literal.
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x00..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

/// A minimal streaming JSON writer: it writes members in the order given, which is what makes
/// bodies deterministic and lets them be built without an intermediate document.
struct JsonWriter {
    out: Vec<u8>,
    /// No member or element has been written yet in the innermost open object or array.
    first: bool,
    /// A key was just written, so the next value needs no separator.
    after_key: bool,
}

impl JsonWriter {
    fn new() -> Self {
        JsonWriter {
            out: Vec::with_capacity(1024),
            first: true,
            after_key: false,
        }
    }

    fn finish(self) -> Vec<u8> {
        self.out
    }

    fn separate(&mut self) {
        if self.after_key {
            self.after_key = false;
        } else if !self.first {
            self.out.push(b',');
        }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        push_json_string(&mut self.out, key);
        self.out.push(b':');
        self.after_key = true;
    }

    fn begin_object(&mut self) {
        self.separate();
        self.out.push(b'{');
        self.first = true;
    }

    fn end_object(&mut self) {
        self.out.push(b'}');
        self.first = false;
    }

    fn begin_array(&mut self) {
        self.separate();
        self.out.push(b'[');
        self.first = true;
    }

    fn end_array(&mut self) {
        self.out.push(b']');
        self.first = false;
    }

    fn string(&mut self, text: &str) {
        self.separate();
        push_json_string(&mut self.out, text);
        self.first = false;
    }

    fn unsigned(&mut self, value: u64) {
        self.separate();
        push_padded(&mut self.out, value, 1);
        self.first = false;
    }

    fn integer(&mut self, value: i64) {
        self.separate();
        if value < 0 {
            self.out.push(b'-');
        }
        push_padded(&mut self.out, value.unsigned_abs(), 1);
        self.first = false;
    }

    fn boolean(&mut self, value: bool) {
        self.separate();
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
        self.first = false;
    }

    fn null(&mut self) {
        self.separate();
        self.out.extend_from_slice(b"null");
        self.first = false;
    }

    /// Writes JSON text that the caller vouches for (a number such as `7.5`, an object
    /// written by another writer).
    fn raw(&mut self, json: &[u8]) {
        self.separate();
        self.out.extend_from_slice(json);
        self.first = false;
    }

    fn time(&mut self, ticks: Ticks) {
        self.separate();
        self.out.push(b'"');
        push_time(&mut self.out, ticks);
        self.out.push(b'"');
        self.first = false;
    }

    fn setting(&mut self, value: SettingValue) {
        match value {
            SettingValue::Text(text) => self.string(text),
            SettingValue::Integer(number) => self.integer(number),
            SettingValue::Boolean(flag) => self.boolean(flag),
        }
    }

    /// `"$lastUpdated": t` and, for desired metadata, `"$lastUpdatedVersion": v`.
    fn stamp(&mut self, at: Ticks, version: Option<u32>) {
        self.key("$lastUpdated");
        self.time(at);
        if let Some(version) = version {
            self.key("$lastUpdatedVersion");
            self.unsigned(u64::from(version));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings of the twins: what the back end may write and how the agents take it
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SettingValue {
    Text(&'static str),
    Integer(i64),
    Boolean(bool),
}

/// How an agent takes a desired value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Valid and what a sensible policy wants.
    Recommended,
    /// Valid, so the agent applies it, but a policy should flag it (not a multiple of 4 KiB,
    /// a cache smaller than a message, a disabled collector, ...).
    NonCompliant,
    /// Invalid for the agent (wrong type, out of range, bad duration, unknown enum value): it
    /// keeps its current value, so reported differs from desired.
    Rejected,
    /// Valid but written back in canonical form: the candidate at this index.
    Rewritten(u8),
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    value: SettingValue,
    verdict: Verdict,
}

const fn candidate(value: SettingValue, verdict: Verdict) -> Candidate {
    Candidate { value, verdict }
}

/// One desired setting: its key and the values the back end picks from.
struct Setting {
    name: &'static str,
    /// Index of the agent's default in `candidates`.
    default: u8,
    candidates: &'static [Candidate],
}

const fn setting(name: &'static str, default: u8, candidates: &'static [Candidate]) -> Setting {
    Setting {
        name,
        default,
        candidates,
    }
}

use SettingValue::{Boolean, Integer, Text};
use Verdict::{NonCompliant, Recommended, Rejected, Rewritten};

const HIGH_PRIORITY_FREQUENCY: &[Candidate] = &[
    candidate(Text("PT7M"), Recommended),
    candidate(Text("PT5M"), Recommended),
    candidate(Text("PT10M"), Recommended),
    candidate(Text("PT15M"), Recommended),
    // Longer than the default low-priority interval: a conflict.
    candidate(Text("PT6H"), NonCompliant),
    candidate(Text("PT420S"), Rewritten(0)),
    // Valid ISO 8601, but beyond the C agent's 49.7-day limit.
    candidate(Text("P60D"), Rejected),
    candidate(Text("7 minutes"), Rejected),
    candidate(Text("PT"), Rejected),
    candidate(Integer(420), Rejected),
];

const LOW_PRIORITY_FREQUENCY: &[Candidate] = &[
    candidate(Text("PT5H"), Recommended),
    candidate(Text("PT2H"), Recommended),
    candidate(Text("PT12H"), Recommended),
    candidate(Text("PT1H"), Recommended),
    // Shorter than the default high-priority interval: a conflict.
    candidate(Text("PT5M"), NonCompliant),
    candidate(Text("PT300M"), Rewritten(0)),
    candidate(Text("5 hours"), Rejected),
    candidate(Text("PT-5H"), Rejected),
    candidate(Integer(18_000), Rejected),
];

const SNAPSHOT_FREQUENCY: &[Candidate] = &[
    candidate(Text("PT13H"), Recommended),
    candidate(Text("PT6H"), Recommended),
    candidate(Text("P1D"), Recommended),
    candidate(Text("PT1M"), NonCompliant),
    candidate(Text("P90D"), Rejected),
    candidate(Text("13h"), Rejected),
    candidate(Text(""), Rejected),
];

const LOCAL_CACHE_SIZE: &[Candidate] = &[
    candidate(Integer(2_560_000), Recommended),
    candidate(Integer(5_120_000), Recommended),
    candidate(Integer(10_485_760), Recommended),
    candidate(Integer(1_048_576), Recommended),
    // Smaller than the default message size: a conflict.
    candidate(Integer(65_536), NonCompliant),
    candidate(Integer(131_072), NonCompliant),
    // Below the schema's minimum of 8192.
    candidate(Integer(4096), Rejected),
    candidate(Text("2560000"), Rejected),
    candidate(Integer(-1), Rejected),
];

const MESSAGE_SIZE: &[Candidate] = &[
    candidate(Integer(204_800), Recommended),
    candidate(Integer(262_144), Recommended),
    candidate(Integer(131_072), Recommended),
    candidate(Integer(65_536), Recommended),
    // Not multiples of 4096: the agent applies them but calls them not optimal.
    candidate(Integer(200_000), NonCompliant),
    candidate(Integer(100_000), NonCompliant),
    candidate(Integer(250_000), NonCompliant),
    // Outside 8192 ..= 262144.
    candidate(Integer(300_000), Rejected),
    candidate(Integer(4096), Rejected),
    candidate(Text("204800"), Rejected),
];

const EVENT_PRIORITY: &[Candidate] = &[
    candidate(Text("High"), Recommended),
    candidate(Text("Low"), Recommended),
    candidate(Text("Off"), NonCompliant),
    // The C agent compares priorities case-insensitively.
    candidate(Text("high"), Rewritten(0)),
    candidate(Text("low"), Rewritten(1)),
    candidate(Text("Medium"), Rejected),
    candidate(Text("Critical"), Rejected),
    candidate(Integer(1), Rejected),
    candidate(Text(""), Rejected),
];
const PRIORITY_HIGH: u8 = 0;
const PRIORITY_LOW: u8 = 1;

const AGGREGATION_ENABLED: &[Candidate] = &[
    candidate(Boolean(true), Recommended),
    candidate(Boolean(false), NonCompliant),
    candidate(Text("yes"), Rejected),
    candidate(Integer(1), Rejected),
];

const AGGREGATION_INTERVAL: &[Candidate] = &[
    candidate(Text("PT1H"), Recommended),
    candidate(Text("PT30M"), Recommended),
    candidate(Text("PT2H"), Recommended),
    candidate(Text("PT5S"), NonCompliant),
    candidate(Text("1 hour"), Rejected),
    candidate(Text("P"), Rejected),
];

/// The `azureiotsecurity` agent's configuration keys, in the order agents report them.
const SECURITY_AGENT_SETTINGS: &[Setting] = &[
    setting("highPriorityMessageFrequency", 0, HIGH_PRIORITY_FREQUENCY),
    setting("lowPriorityMessageFrequency", 0, LOW_PRIORITY_FREQUENCY),
    setting("snapshotFrequency", 0, SNAPSHOT_FREQUENCY),
    setting("maxLocalCacheSizeInBytes", 0, LOCAL_CACHE_SIZE),
    setting("maxMessageSizeInBytes", 0, MESSAGE_SIZE),
    // The schema and the agents' code default Diagnostic to Low; the docs say Off.
    setting("eventPriorityDiagnostic", PRIORITY_LOW, EVENT_PRIORITY),
    setting(
        "eventPriorityConfigurationError",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityDroppedEventsStatistics",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityMessageStatistics",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityConnectedHardware",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting("eventPriorityListeningPorts", PRIORITY_HIGH, EVENT_PRIORITY),
    setting("eventPriorityProcessCreate", PRIORITY_LOW, EVENT_PRIORITY),
    setting(
        "eventPriorityProcessTerminate",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPrioritySystemInformation",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting("eventPriorityLocalUsers", PRIORITY_HIGH, EVENT_PRIORITY),
    setting("eventPriorityLogin", PRIORITY_HIGH, EVENT_PRIORITY),
    setting(
        "eventPriorityConnectionCreate",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityFirewallConfiguration",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting("eventPriorityOSBaseline", PRIORITY_LOW, EVENT_PRIORITY),
    setting("aggregationEnabledProcessCreate", 0, AGGREGATION_ENABLED),
    setting("aggregationIntervalProcessCreate", 0, AGGREGATION_INTERVAL),
    setting("aggregationEnabledConnectionCreate", 0, AGGREGATION_ENABLED),
    setting(
        "aggregationIntervalConnectionCreate",
        0,
        AGGREGATION_INTERVAL,
    ),
    setting("aggregationEnabledProcessTerminate", 0, AGGREGATION_ENABLED),
    setting(
        "aggregationIntervalProcessTerminate",
        0,
        AGGREGATION_INTERVAL,
    ),
];
const SECURITY_AGENT_SETTING_COUNT: usize = SECURITY_AGENT_SETTINGS.len();

const PRIORITY_INTERVALS: &[Candidate] = &[
    candidate(Text("30,120,1440"), Recommended),
    candidate(Text("60,120,480"), Recommended),
    candidate(Text("15,60,240"), Recommended),
    candidate(Text("30,60,120"), Recommended),
    // High longer than low: accepted, but backwards.
    candidate(Text("1440,120,30"), NonCompliant),
    // Malformed: all three are required, comma-separated minutes.
    candidate(Text("30,120"), Rejected),
    candidate(Text("30;120;1440"), Rejected),
    candidate(Text("fast"), Rejected),
    candidate(Integer(30), Rejected),
];

const COLLECTOR_DISABLED: &[Candidate] = &[
    candidate(Boolean(false), Recommended),
    candidate(Boolean(true), NonCompliant),
    candidate(Text("no"), Rejected),
    candidate(Text("false"), Rejected),
];

const MESSAGE_FREQUENCY: &[Candidate] = &[
    candidate(Text("Low"), Recommended),
    candidate(Text("Medium"), Recommended),
    candidate(Text("High"), Recommended),
    candidate(Text("Hourly"), Rejected),
    candidate(Integer(2), Rejected),
];
const FREQUENCY_LOW: u8 = 0;
const FREQUENCY_MEDIUM: u8 = 1;

const BASELINE_GROUPS_DISABLED: &[Candidate] = &[
    candidate(Text(""), Recommended),
    candidate(
        Text("Time Synchronization, Network Parameters Host"),
        NonCompliant,
    ),
    candidate(Integer(5), Rejected),
];

const BASELINE_CHECKS_DISABLED: &[Candidate] = &[
    candidate(Text(""), Recommended),
    candidate(Text("3.3.5,2.2.1.1"), NonCompliant),
    candidate(Boolean(true), Rejected),
];

const USE_PAM: &[Candidate] = &[
    candidate(Boolean(false), Recommended),
    candidate(Boolean(true), Recommended),
    candidate(Text("pam"), Rejected),
];

const MESSAGE_TIMEOUT_MINUTES: &[Candidate] = &[
    candidate(Integer(2880), Recommended),
    candidate(Integer(1440), Recommended),
    candidate(Integer(4320), Recommended),
    candidate(Integer(60), NonCompliant),
    candidate(Integer(0), Rejected),
    candidate(Integer(-5), Rejected),
    candidate(Text("2d"), Rejected),
];

const NETWORK_DEVICES: &[Candidate] = &[
    candidate(Text("eth0"), Recommended),
    candidate(Text("eth0,wlan0"), Recommended),
    candidate(Text("wlan0"), Recommended),
    candidate(Text(""), NonCompliant),
];

const CACHE_SIZE: &[Candidate] = &[
    candidate(Integer(256), Recommended),
    candidate(Integer(512), Recommended),
    candidate(Integer(1024), Recommended),
    candidate(Integer(16), NonCompliant),
    candidate(Integer(0), Rejected),
    candidate(Integer(-1), Rejected),
];

const PROCESS_MODE: &[Candidate] = &[
    candidate(Integer(1), Recommended),
    candidate(Integer(2), Recommended),
    candidate(Integer(3), Recommended),
    candidate(Integer(7), Rejected),
    candidate(Text("auto"), Rejected),
];

const POLLING_INTERVAL_MICROSECONDS: &[Candidate] = &[
    candidate(Integer(100_000), Recommended),
    candidate(Integer(50_000), Recommended),
    candidate(Integer(500_000), Recommended),
    candidate(Integer(0), Rejected),
];

/// The `DefenderIotMicroAgent` desired keys.
const MICRO_AGENT_SETTINGS: &[Setting] = &[
    setting("CollectorsCore_PriorityIntervals", 0, PRIORITY_INTERVALS),
    setting("Baseline_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Baseline_MessageFrequency",
        FREQUENCY_LOW,
        MESSAGE_FREQUENCY,
    ),
    setting("Baseline_GroupsDisabled", 0, BASELINE_GROUPS_DISABLED),
    setting("Baseline_ChecksDisabled", 0, BASELINE_CHECKS_DISABLED),
    setting("SystemInformation_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "SystemInformation_MessageFrequency",
        FREQUENCY_LOW,
        MESSAGE_FREQUENCY,
    ),
    setting("SBoM_Disabled", 0, COLLECTOR_DISABLED),
    setting("SBoM_MessageFrequency", FREQUENCY_LOW, MESSAGE_FREQUENCY),
    setting("Heartbeat_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Heartbeat_MessageFrequency",
        FREQUENCY_LOW,
        MESSAGE_FREQUENCY,
    ),
    setting("Login_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Login_MessageFrequency",
        FREQUENCY_MEDIUM,
        MESSAGE_FREQUENCY,
    ),
    setting("Login_UsePAM", 0, USE_PAM),
    setting("IothubModule_MessageTimeout", 0, MESSAGE_TIMEOUT_MINUTES),
    setting("NetworkActivity_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "NetworkActivity_MessageFrequency",
        FREQUENCY_MEDIUM,
        MESSAGE_FREQUENCY,
    ),
    setting("NetworkActivity_Devices", 0, NETWORK_DEVICES),
    setting("NetworkActivity_CacheSize", 0, CACHE_SIZE),
    setting("Process_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Process_MessageFrequency",
        FREQUENCY_MEDIUM,
        MESSAGE_FREQUENCY,
    ),
    setting("Process_Mode", 0, PROCESS_MODE),
    setting("Process_PollingInterval", 0, POLLING_INTERVAL_MICROSECONDS),
    setting("Process_CacheSize", 0, CACHE_SIZE),
    setting("FileSystem_Disabled", 0, COLLECTOR_DISABLED),
];
// The micro agent's invalid fields are kept as a bit set.
const _: () = assert!(MICRO_AGENT_SETTINGS.len() <= 32);

const TELEMETRY_INTERVAL_SECONDS: &[Candidate] = &[
    candidate(Integer(60), Recommended),
    candidate(Integer(30), Recommended),
    candidate(Integer(300), Recommended),
    candidate(Integer(900), Recommended),
    candidate(Integer(5), NonCompliant),
    candidate(Integer(0), Rejected),
    candidate(Text("60s"), Rejected),
];

const FIRMWARE_VERSION: &[Candidate] = &[
    candidate(Text("2.4.1"), Recommended),
    candidate(Text("2.5.0"), Recommended),
    candidate(Text("2.5.1"), Recommended),
    // An old, vulnerable release.
    candidate(Text("2.3.0"), NonCompliant),
    // A release that does not exist: the device keeps what it runs.
    candidate(Text("9.9.9"), Rejected),
];
/// Firmware the devices may run: every candidate before the rejected one.
const INSTALLABLE_FIRMWARE_COUNT: u8 = 4;

const LOG_LEVEL: &[Candidate] = &[
    candidate(Text("info"), Recommended),
    candidate(Text("warning"), Recommended),
    candidate(Text("error"), Recommended),
    candidate(Text("debug"), NonCompliant),
    candidate(Text("verbose"), Rejected),
    candidate(Integer(3), Rejected),
];

/// A device twin's desired keys (flat), the same keys the device reports back.
const DEVICE_SETTINGS: &[Setting] = &[
    setting("telemetryIntervalSeconds", 0, TELEMETRY_INTERVAL_SECONDS),
    setting("firmwareVersion", 0, FIRMWARE_VERSION),
    setting("logLevel", 0, LOG_LEVEL),
];
const DEVICE_SETTING_TELEMETRY: u8 = 0;
const DEVICE_SETTING_FIRMWARE: u8 = 1;
const DEVICE_SETTING_LOG_LEVEL: u8 = 2;

/// The value an agent runs with after seeing desired `candidate` while running `current`.
fn effective_candidate(candidates: &[Candidate], candidate: u8, current: u8) -> u8 {
    match candidates.get(usize::from(candidate)).map(|c| c.verdict) {
        Some(Recommended) | Some(NonCompliant) => candidate,
        Some(Rewritten(canonical)) => canonical,
        Some(Rejected) | None => current,
    }
}

fn candidate_value(setting: &Setting, candidate: u8) -> SettingValue {
    setting
        .candidates
        .get(usize::from(candidate))
        .or_else(|| setting.candidates.first())
        .map_or(Boolean(false), |c| c.value)
}

fn is_rejected(setting: &Setting, candidate: u8) -> bool {
    setting
        .candidates
        .get(usize::from(candidate))
        .is_some_and(|c| c.verdict == Rejected)
}

/// Picks a value for `setting`: a recommended one, or when `misconfigure` is set one that a
/// policy should flag or the agent should reject.
fn pick_candidate(rng: &mut ChaCha8Rng, setting: &Setting, misconfigure: bool) -> u8 {
    let wanted = |c: &Candidate| (c.verdict == Recommended) != misconfigure;
    let pool = setting.candidates.iter().filter(|c| wanted(c)).count();
    if pool == 0 {
        return setting.default;
    }
    let chosen = rng.gen_range(0..pool);
    setting
        .candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| wanted(c))
        .nth(chosen)
        .map_or(setting.default, |(index, _)| index as u8)
}

// ---------------------------------------------------------------------------------------------
// Fleet names
// ---------------------------------------------------------------------------------------------

const SECURITY_AGENT_MODULE: &str = "azureiotsecurity";
const MICRO_AGENT_MODULE: &str = "DefenderIotMicroAgent";
const SECURITY_AGENT_OBJECT: &str = "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration";
/// The preview name, whose settings are flat values rather than `{"value": x}`.
const LEGACY_SECURITY_AGENT_OBJECT: &str = "azureiot*com^securityAgentConfiguration^1*0*0";

/// Device-id prefixes; the last one marks IoT Edge devices.
const DEVICE_PREFIXES: [&str; 5] = ["gw", "sensor", "cam", "meter", "edge"];
const EDGE_PREFIX: u8 = 4;
const ENVIRONMENTS: [&str; 3] = ["prod", "staging", "dev"];
const SITES: [&str; 16] = [
    "amsterdam-1",
    "berlin-2",
    "chicago-1",
    "dallas-3",
    "dublin-1",
    "frankfurt-2",
    "houston-1",
    "lyon-1",
    "madrid-2",
    "milan-1",
    "osaka-1",
    "oslo-1",
    "seattle-2",
    "singapore-1",
    "sydney-1",
    "toronto-1",
];
const TIERS: [&str; 3] = ["gold", "silver", "bronze"];
const OWNERS: [&str; 4] = ["ops-emea", "ops-americas", "field-service", "research"];
const REGIONS: [&str; 6] = [
    "westeurope",
    "northeurope",
    "eastus",
    "southcentralus",
    "japaneast",
    "australiaeast",
];
const RINGS: [&str; 3] = ["canary", "early", "broad"];
const NETWORKS: [&str; 3] = ["ethernet", "wifi", "cellular"];

/// Weighted pick of an index into `weights`.
fn pick_weighted(rng: &mut ChaCha8Rng, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    if total == 0 {
        return 0;
    }
    let mut roll = rng.gen_range(0..total);
    for (index, &weight) in weights.iter().enumerate() {
        if roll < weight {
            return index;
        }
        roll -= weight;
    }
    weights.len() - 1
}

fn pick_environment(rng: &mut ChaCha8Rng) -> u8 {
    pick_weighted(rng, &[70, 20, 10]) as u8
}

fn etag(version: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(version.to_be_bytes())
}

// ---------------------------------------------------------------------------------------------
// The fleet model: a compact state per twin
// ---------------------------------------------------------------------------------------------

/// One desired key as set by the back end.
#[derive(Debug, Clone, Copy)]
struct DesiredEntry {
    setting: u8,
    candidate: u8,
    updated_version: u32,
    updated_at: Ticks,
}

/// How a twin's settings sit in its desired and reported sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Keys directly under the section (device twins, the micro agent).
    Flat,
    /// Under the security agent's object, each value wrapped `{"value": x}`.
    SecurityAgentObject,
    /// Under the preview object name, values flat.
    LegacySecurityAgentObject,
}

#[derive(Debug, Clone, Default)]
struct DesiredSection {
    version: u32,
    updated_at: Ticks,
    updated_version: u32,
    /// Whether the security agent's configuration object exists (unused for flat layouts).
    object_present: bool,
    object_updated_at: Ticks,
    object_updated_version: u32,
    /// Sorted by setting index, at most one entry per setting.
    entries: Vec<DesiredEntry>,
}

impl DesiredSection {
    fn fresh() -> Self {
        DesiredSection {
            version: 1,
            ..DesiredSection::default()
        }
    }

    fn candidate_of(&self, setting: u8) -> Option<u8> {
        self.entries
            .binary_search_by_key(&setting, |entry| entry.setting)
            .ok()
            .map(|position| self.entries[position].candidate)
    }

    fn set(&mut self, setting: u8, candidate: u8, version: u32, at: Ticks) {
        let entry = DesiredEntry {
            setting,
            candidate,
            updated_version: version,
            updated_at: at,
        };
        match self
            .entries
            .binary_search_by_key(&setting, |entry| entry.setting)
        {
            Ok(position) => self.entries[position] = entry,
            Err(position) => self.entries.insert(position, entry),
        }
    }

    fn remove(&mut self, setting: u8) {
        if let Ok(position) = self
            .entries
            .binary_search_by_key(&setting, |entry| entry.setting)
        {
            self.entries.remove(position);
        }
    }
}

/// What every twin has.
#[derive(Debug, Clone, Default)]
struct TwinCore {
    live: bool,
    version: u64,
    desired: DesiredSection,
    reported_version: u32,
    reported_at: Ticks,
}

impl TwinCore {
    /// A twin as a create operation leaves it: version 2, empty sections at `$version` 1,
    /// as in the documented module-create notification.
    fn created() -> Self {
        TwinCore {
            live: true,
            version: 2,
            desired: DesiredSection::fresh(),
            reported_version: 1,
            reported_at: NEVER,
        }
    }

    /// Advances the top-level version for one change, and returns how far a section's
    /// `$version` moves with it: usually 1, now and then more, as when IoT Hub coalesces
    /// notifications.
    fn bump(&mut self, rng: &mut ChaCha8Rng) -> u32 {
        let extra: u32 = if rng.gen_ratio(3, 100) {
            rng.gen_range(1..=2)
        } else {
            0
        };
        self.version = self.version.saturating_add(1 + u64::from(extra));
        1 + extra
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct DeviceTags {
    environment: u8,
    site: u8,
    tier: u8,
    /// Index + 1 into [`OWNERS`]; 0: no owner tag.
    owner: u8,
    /// Index + 1 into [`REGIONS`]; 0: no region in `location`.
    region: u8,
    /// Building number; 0: no building in `location`. No region and no building: no
    /// `location` tag.
    building: u8,
}

#[derive(Debug, Clone, Copy, Default)]
struct ModuleTags {
    /// Index + 1 into [`ENVIRONMENTS`] (copied from the device); 0: none.
    environment: u8,
    /// Index + 1 into [`RINGS`]; 0: none.
    ring: u8,
}

impl ModuleTags {
    fn is_empty(&self) -> bool {
        self.environment == 0 && self.ring == 0
    }
}

const REPORTED_FIRMWARE: u8 = 1;
const REPORTED_TELEMETRY: u8 = 2;
const REPORTED_LOG_LEVEL: u8 = 4;
const REPORTED_CONNECTIVITY: u8 = 8;
const REPORTED_ALL: u8 = 15;

/// What a device reports on its own twin.
#[derive(Debug, Clone, Copy, Default)]
struct DeviceReported {
    /// `REPORTED_*` bits of the keys present.
    present: u8,
    /// Candidate indices into [`DEVICE_SETTINGS`].
    firmware: u8,
    telemetry: u8,
    log_level: u8,
    network: u8,
    signal_dbm: i8,
    /// When each key was last written, by bit position.
    updated_at: [Ticks; 4],
}

#[derive(Debug, Clone)]
struct SecurityAgentTwin {
    core: TwinCore,
    tags: ModuleTags,
    legacy_object: bool,
    has_reported: bool,
    /// The configuration the agent runs with: a candidate index per setting.
    effective: [u8; SECURITY_AGENT_SETTING_COUNT],
}

#[derive(Debug, Clone, Default)]
struct MicroAgentTwin {
    core: TwinCore,
    tags: ModuleTags,
    has_reported: bool,
    failed: bool,
    /// Bit per setting index: fields the agent reported invalid.
    invalid_fields: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ModuleSlot {
    SecurityAgent,
    MicroAgent,
}

impl ModuleSlot {
    fn module_id(self) -> &'static str {
        match self {
            ModuleSlot::SecurityAgent => SECURITY_AGENT_MODULE,
            ModuleSlot::MicroAgent => MICRO_AGENT_MODULE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TwinSlot {
    Device,
    Module(ModuleSlot),
}

#[derive(Debug, Clone)]
struct Device {
    prefix: u8,
    /// Counts re-creations, so tasks scheduled for an earlier identity are dropped.
    incarnation: u32,
    /// Deleted for good: only picked again when nothing else can be.
    retired: bool,
    /// Which security modules this device gets (again) when it is created.
    plans_security_agent: bool,
    plans_micro_agent: bool,
    core: TwinCore,
    tags: DeviceTags,
    reported: DeviceReported,
    security_agent: SecurityAgentTwin,
    micro_agent: MicroAgentTwin,
}

impl Device {
    fn core(&self, slot: TwinSlot) -> &TwinCore {
        match slot {
            TwinSlot::Device => &self.core,
            TwinSlot::Module(ModuleSlot::SecurityAgent) => &self.security_agent.core,
            TwinSlot::Module(ModuleSlot::MicroAgent) => &self.micro_agent.core,
        }
    }

    fn core_mut(&mut self, slot: TwinSlot) -> &mut TwinCore {
        match slot {
            TwinSlot::Device => &mut self.core,
            TwinSlot::Module(ModuleSlot::SecurityAgent) => &mut self.security_agent.core,
            TwinSlot::Module(ModuleSlot::MicroAgent) => &mut self.micro_agent.core,
        }
    }

    fn module_live(&self, slot: ModuleSlot) -> bool {
        self.core(TwinSlot::Module(slot)).live
    }

    fn layout(&self, slot: TwinSlot) -> Layout {
        match slot {
            TwinSlot::Module(ModuleSlot::SecurityAgent) if self.security_agent.legacy_object => {
                Layout::LegacySecurityAgentObject
            }
            TwinSlot::Module(ModuleSlot::SecurityAgent) => Layout::SecurityAgentObject,
            _ => Layout::Flat,
        }
    }
}

fn settings_of(slot: TwinSlot) -> &'static [Setting] {
    match slot {
        TwinSlot::Device => DEVICE_SETTINGS,
        TwinSlot::Module(ModuleSlot::SecurityAgent) => SECURITY_AGENT_SETTINGS,
        TwinSlot::Module(ModuleSlot::MicroAgent) => MICRO_AGENT_SETTINGS,
    }
}

fn default_effective() -> [u8; SECURITY_AGENT_SETTING_COUNT] {
    let mut effective = [0u8; SECURITY_AGENT_SETTING_COUNT];
    for (slot, setting) in effective.iter_mut().zip(SECURITY_AGENT_SETTINGS) {
        *slot = setting.default;
    }
    effective
}

fn random_device_tags(rng: &mut ChaCha8Rng) -> DeviceTags {
    let with_location = rng.gen_ratio(6, 10);
    DeviceTags {
        environment: pick_environment(rng),
        site: rng.gen_range(0..SITES.len() as u8),
        tier: pick_weighted(rng, &[20, 50, 30]) as u8,
        owner: if rng.gen_ratio(4, 10) {
            rng.gen_range(1..=OWNERS.len() as u8)
        } else {
            0
        },
        region: if with_location {
            rng.gen_range(1..=REGIONS.len() as u8)
        } else {
            0
        },
        building: if with_location {
            rng.gen_range(1..=40)
        } else {
            0
        },
    }
}

fn random_module_tags(rng: &mut ChaCha8Rng, device_environment: u8) -> ModuleTags {
    ModuleTags {
        environment: if rng.gen_ratio(3, 10) {
            device_environment + 1
        } else {
            0
        },
        ring: if rng.gen_ratio(2, 10) {
            rng.gen_range(1..=RINGS.len() as u8)
        } else {
            0
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Body writers
// ---------------------------------------------------------------------------------------------

fn write_device_tags(json: &mut JsonWriter, tags: &DeviceTags) {
    json.begin_object();
    json.key("env");
    json.string(ENVIRONMENTS[usize::from(tags.environment) % ENVIRONMENTS.len()]);
    json.key("site");
    json.string(SITES[usize::from(tags.site) % SITES.len()]);
    json.key("tier");
    json.string(TIERS[usize::from(tags.tier) % TIERS.len()]);
    if tags.owner > 0 {
        json.key("owner");
        json.string(OWNERS[usize::from(tags.owner - 1) % OWNERS.len()]);
    }
    if tags.region > 0 || tags.building > 0 {
        json.key("location");
        write_location(json, tags.region, tags.building);
    }
    json.end_object();
}

fn write_location(json: &mut JsonWriter, region: u8, building: u8) {
    json.begin_object();
    if region > 0 {
        json.key("region");
        json.string(REGIONS[usize::from(region - 1) % REGIONS.len()]);
    }
    if building > 0 {
        json.key("building");
        json.string(&building_name(building));
    }
    json.end_object();
}

fn building_name(building: u8) -> String {
    format!("b{building:02}")
}

fn write_module_tags(json: &mut JsonWriter, tags: &ModuleTags) {
    json.begin_object();
    if tags.environment > 0 {
        json.key("env");
        json.string(ENVIRONMENTS[usize::from(tags.environment - 1) % ENVIRONMENTS.len()]);
    }
    if tags.ring > 0 {
        json.key("ring");
        json.string(RINGS[usize::from(tags.ring - 1) % RINGS.len()]);
    }
    json.end_object();
}

/// The whole desired section, as in a replace, create or delete body.
fn write_desired_section(
    json: &mut JsonWriter,
    layout: Layout,
    slot: TwinSlot,
    section: &DesiredSection,
) {
    let settings = settings_of(slot);
    json.begin_object();
    match layout {
        Layout::Flat => {
            for entry in &section.entries {
                let setting = &settings[usize::from(entry.setting)];
                json.key(setting.name);
                json.setting(candidate_value(setting, entry.candidate));
            }
        }
        Layout::SecurityAgentObject | Layout::LegacySecurityAgentObject => {
            if section.object_present {
                json.key(object_name(layout));
                json.begin_object();
                for entry in &section.entries {
                    let setting = &settings[usize::from(entry.setting)];
                    json.key(setting.name);
                    write_wrapped(json, layout, candidate_value(setting, entry.candidate));
                }
                json.end_object();
            }
        }
    }
    json.key("$metadata");
    json.begin_object();
    if section.updated_at == NEVER {
        json.stamp(NEVER, None);
    } else {
        json.stamp(section.updated_at, Some(section.updated_version));
    }
    let entry_stamps = |json: &mut JsonWriter| {
        for entry in &section.entries {
            json.key(settings[usize::from(entry.setting)].name);
            write_leaf_metadata(json, layout, entry.updated_at, Some(entry.updated_version));
        }
    };
    match layout {
        Layout::Flat => entry_stamps(json),
        Layout::SecurityAgentObject | Layout::LegacySecurityAgentObject => {
            if section.object_present {
                json.key(object_name(layout));
                json.begin_object();
                json.stamp(
                    section.object_updated_at,
                    Some(section.object_updated_version),
                );
                entry_stamps(json);
                json.end_object();
            }
        }
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(section.version));
    json.end_object();
}

fn object_name(layout: Layout) -> &'static str {
    match layout {
        Layout::LegacySecurityAgentObject => LEGACY_SECURITY_AGENT_OBJECT,
        _ => SECURITY_AGENT_OBJECT,
    }
}

/// A setting's value: `{"value": x}` under the security agent's object, `x` elsewhere.
fn write_wrapped(json: &mut JsonWriter, layout: Layout, value: SettingValue) {
    if layout == Layout::SecurityAgentObject {
        json.begin_object();
        json.key("value");
        json.setting(value);
        json.end_object();
    } else {
        json.setting(value);
    }
}

/// The metadata of one setting: a stamp, plus one for the inner `value` when wrapped.
fn write_leaf_metadata(json: &mut JsonWriter, layout: Layout, at: Ticks, version: Option<u32>) {
    json.begin_object();
    json.stamp(at, version);
    if layout == Layout::SecurityAgentObject {
        json.key("value");
        json.begin_object();
        json.stamp(at, version);
        json.end_object();
    }
    json.end_object();
}

/// A desired patch as the back end sent it: the changed keys (a `None` value is a `null`
/// deletion), or the whole security-agent object deleted.
struct DesiredPatch {
    changes: Vec<(u8, Option<u8>)>,
    object_deleted: bool,
    version: u32,
    at: Ticks,
}

fn write_desired_patch(
    json: &mut JsonWriter,
    layout: Layout,
    slot: TwinSlot,
    patch: &DesiredPatch,
) {
    let settings = settings_of(slot);
    let write_changes = |json: &mut JsonWriter| {
        for &(index, change) in &patch.changes {
            let setting = &settings[usize::from(index)];
            json.key(setting.name);
            match change {
                Some(candidate) => write_wrapped(json, layout, candidate_value(setting, candidate)),
                None => json.null(),
            }
        }
    };
    let write_stamps = |json: &mut JsonWriter| {
        // How IoT Hub's metadata shows a deleted key is not documented; deleted keys get none.
        for &(index, change) in &patch.changes {
            if change.is_some() {
                json.key(settings[usize::from(index)].name);
                write_leaf_metadata(json, layout, patch.at, Some(patch.version));
            }
        }
    };
    json.begin_object();
    if layout == Layout::Flat {
        write_changes(json);
    } else {
        json.key(object_name(layout));
        if patch.object_deleted {
            json.null();
        } else {
            json.begin_object();
            write_changes(json);
            json.end_object();
        }
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(patch.at, Some(patch.version));
    if layout == Layout::Flat {
        write_stamps(json);
    } else if !patch.object_deleted {
        json.key(object_name(layout));
        json.begin_object();
        json.stamp(patch.at, Some(patch.version));
        write_stamps(json);
        json.end_object();
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(patch.version));
    json.end_object();
}

/// The device's reported section with the keys in `keys` (`REPORTED_*` bits).
fn write_device_reported(json: &mut JsonWriter, device: &Device, keys: u8) {
    let reported = &device.reported;
    let keys = keys & reported.present;
    let names = [
        "firmwareVersion",
        "telemetryIntervalSeconds",
        "logLevel",
        "connectivity",
    ];
    json.begin_object();
    for (bit, name) in names.iter().enumerate() {
        if keys & (1 << bit) == 0 {
            continue;
        }
        json.key(name);
        match 1u8 << bit {
            REPORTED_FIRMWARE => json.setting(candidate_value(
                &DEVICE_SETTINGS[usize::from(DEVICE_SETTING_FIRMWARE)],
                reported.firmware,
            )),
            REPORTED_TELEMETRY => json.setting(candidate_value(
                &DEVICE_SETTINGS[usize::from(DEVICE_SETTING_TELEMETRY)],
                reported.telemetry,
            )),
            REPORTED_LOG_LEVEL => json.setting(candidate_value(
                &DEVICE_SETTINGS[usize::from(DEVICE_SETTING_LOG_LEVEL)],
                reported.log_level,
            )),
            _ => {
                json.begin_object();
                json.key("type");
                json.string(NETWORKS[usize::from(reported.network) % NETWORKS.len()]);
                json.key("signalStrength");
                json.integer(i64::from(reported.signal_dbm));
                json.end_object();
            }
        }
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(device.core.reported_at, None);
    for (bit, name) in names.iter().enumerate() {
        if keys & (1 << bit) == 0 {
            continue;
        }
        let at = reported.updated_at[bit];
        json.key(name);
        json.begin_object();
        json.stamp(at, None);
        if 1u8 << bit == REPORTED_CONNECTIVITY {
            for leaf in ["type", "signalStrength"] {
                json.key(leaf);
                json.begin_object();
                json.stamp(at, None);
                json.end_object();
            }
        }
        json.end_object();
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(device.core.reported_version));
    json.end_object();
}

/// The security agent's reported section: its whole effective configuration.
fn write_security_agent_reported(json: &mut JsonWriter, twin: &SecurityAgentTwin) {
    let layout = if twin.legacy_object {
        Layout::LegacySecurityAgentObject
    } else {
        Layout::SecurityAgentObject
    };
    let at = twin.core.reported_at;
    json.begin_object();
    if twin.has_reported {
        json.key(object_name(layout));
        json.begin_object();
        for (setting, &candidate) in SECURITY_AGENT_SETTINGS.iter().zip(&twin.effective) {
            json.key(setting.name);
            write_wrapped(json, layout, candidate_value(setting, candidate));
        }
        json.end_object();
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(at, None);
    if twin.has_reported {
        json.key(object_name(layout));
        json.begin_object();
        json.stamp(at, None);
        for setting in SECURITY_AGENT_SETTINGS {
            json.key(setting.name);
            write_leaf_metadata(json, layout, at, None);
        }
        json.end_object();
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(twin.core.reported_version));
    json.end_object();
}

/// The micro agent's reported section: `latest_state` and `latest_invalid_fields`.
fn write_micro_agent_reported(json: &mut JsonWriter, twin: &MicroAgentTwin) {
    let at = twin.core.reported_at;
    json.begin_object();
    if twin.has_reported {
        json.key("latest_state");
        json.string(if twin.failed { "failed" } else { "success" });
        json.key("latest_invalid_fields");
        json.begin_array();
        for (index, setting) in MICRO_AGENT_SETTINGS.iter().enumerate() {
            if twin.invalid_fields & (1 << index) != 0 {
                json.string(setting.name);
            }
        }
        json.end_array();
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(at, None);
    if twin.has_reported {
        for key in ["latest_state", "latest_invalid_fields"] {
            json.key(key);
            json.begin_object();
            json.stamp(at, None);
            json.end_object();
        }
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(twin.core.reported_version));
    json.end_object();
}

fn write_reported_section(json: &mut JsonWriter, device: &Device, slot: TwinSlot) {
    match slot {
        TwinSlot::Device => write_device_reported(json, device, REPORTED_ALL),
        TwinSlot::Module(ModuleSlot::SecurityAgent) => {
            write_security_agent_reported(json, &device.security_agent)
        }
        TwinSlot::Module(ModuleSlot::MicroAgent) => {
            write_micro_agent_reported(json, &device.micro_agent)
        }
    }
}

/// The whole twin: the body of lifecycle and `replaceTwin` notifications. Lifecycle bodies of
/// device twins also carry identity fields; replace bodies do not (as in the documented
/// example; whether the service adds them is not known).
fn full_twin_body(device: &Device, device_id: &str, slot: TwinSlot, lifecycle: bool) -> Vec<u8> {
    let core = device.core(slot);
    let mut json = JsonWriter::new();
    json.begin_object();
    json.key("deviceId");
    json.string(device_id);
    if let TwinSlot::Module(module) = slot {
        json.key("moduleId");
        json.string(module.module_id());
    }
    json.key("etag");
    json.string(&etag(core.version));
    json.key("version");
    json.unsigned(core.version);
    if lifecycle && slot == TwinSlot::Device {
        json.key("status");
        json.string("enabled");
        json.key("authenticationType");
        json.string("sas");
        json.key("capabilities");
        json.begin_object();
        json.key("iotEdge");
        json.boolean(device.prefix == EDGE_PREFIX);
        json.end_object();
        if device.prefix == EDGE_PREFIX {
            json.key("deviceScope");
            json.string(&format!(
                "ms-azure-iot-edge://{device_id}-{}",
                device.incarnation
            ));
        }
    }
    match slot {
        TwinSlot::Device => {
            json.key("tags");
            write_device_tags(&mut json, &device.tags);
        }
        TwinSlot::Module(module) => {
            let tags = match module {
                ModuleSlot::SecurityAgent => &device.security_agent.tags,
                ModuleSlot::MicroAgent => &device.micro_agent.tags,
            };
            if !tags.is_empty() {
                json.key("tags");
                write_module_tags(&mut json, tags);
            }
        }
    }
    json.key("properties");
    json.begin_object();
    json.key("desired");
    write_desired_section(&mut json, device.layout(slot), slot, &core.desired);
    json.key("reported");
    write_reported_section(&mut json, device, slot);
    json.end_object();
    json.end_object();
    json.finish()
}

// ---------------------------------------------------------------------------------------------
// The stream
// ---------------------------------------------------------------------------------------------

/// Follow-up work that a fleet operation schedules: the agent answering a desired patch, the
/// modules of a new device, a re-creation after a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    CreateModule(ModuleSlot),
    InitialConfiguration(ModuleSlot),
    AgentReport(ModuleSlot),
    DeviceReport,
    DeleteModule(ModuleSlot),
    DeleteDevice,
    RecreateDevice,
}

/// A task due at a fleet step; ordered by due step, then by scheduling order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    due: u64,
    sequence: u64,
    device: usize,
    incarnation: u32,
    task: Task,
}

#[derive(Debug, Clone, Copy)]
enum DeviceAction {
    AgentReport,
    ModuleDesiredPatch,
    DeviceReport,
    DeviceDesiredPatch,
    DeviceTags,
    ModuleTags,
    DeviceTagsAndDesired,
    ReplaceDeviceTags,
    ReplaceDesired,
    DeleteModule,
    AddModule,
    DeleteDevice,
}

/// How often each operation happens to a live device, relatively.
const DEVICE_ACTIONS: [(DeviceAction, u32); 12] = [
    (DeviceAction::AgentReport, 240),
    (DeviceAction::ModuleDesiredPatch, 160),
    (DeviceAction::DeviceReport, 120),
    (DeviceAction::DeviceDesiredPatch, 40),
    (DeviceAction::DeviceTags, 80),
    (DeviceAction::ModuleTags, 20),
    (DeviceAction::DeviceTagsAndDesired, 15),
    (DeviceAction::ReplaceDeviceTags, 15),
    (DeviceAction::ReplaceDesired, 20),
    (DeviceAction::DeleteModule, 10),
    (DeviceAction::AddModule, 6),
    (DeviceAction::DeleteDevice, 3),
];

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

/// Fleet messages kept for duplicates and stale re-sends.
const RECENT_CAPACITY: usize = 512;
/// Duplicates copy one of this many most recent kept messages; stale re-sends one older.
const RECENT_DUPLICATE_WINDOW: usize = 16;
/// Share of steps that onboard a new device while some are still to come.
const ONBOARD_PERCENT: u32 = 45;
/// The body of a too-large message: more than IoT Hub's 262144-byte maximum.
const OVERSIZED_DUMP_LENGTH: usize = 270_000;

/// A fleet message kept for noise, and whether it is an `updateTwin`.
struct RecentMessage {
    message: GeneratedMessage,
    is_update: bool,
}

/// The message stream of a fleet (see the module docs). Built by [`messages`].
pub struct Messages {
    rng: ChaCha8Rng,
    hub: String,
    device_count: u64,
    remaining: u64,
    noise: f64,
    /// The operation time of the last message.
    clock: Ticks,
    /// Devices onboarded so far, by index.
    fleet: Vec<Device>,
    /// Fleet messages generated so far: the time base of scheduled tasks.
    fleet_step: u64,
    pending: BinaryHeap<Reverse<Pending>>,
    pending_sequence: u64,
    recent: VecDeque<RecentMessage>,
    /// Position in the first round through every noise kind.
    noise_cycle: usize,
    connection_sequence: u64,
}

impl Iterator for Messages {
    type Item = GeneratedMessage;

    fn next(&mut self) -> Option<GeneratedMessage> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let noise = self.noise > 0.0 && self.rng.gen::<f64>() < self.noise;
        if noise || self.device_count == 0 {
            return Some(self.noise_message());
        }
        let message = self.fleet_message();
        if self.noise > 0.0 && self.rng.gen_ratio(1, 4) {
            // Keeping a sample is enough for noise, and saves cloning every message.
            if self.recent.len() == RECENT_CAPACITY {
                self.recent.pop_front();
            }
            let is_update = message
                .properties
                .iter()
                .any(|(key, value)| key == "opType" && value == "updateTwin");
            self.recent.push_back(RecentMessage {
                message: message.clone(),
                is_update,
            });
        }
        Some(message)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        (remaining, usize::try_from(self.remaining).ok())
    }
}

/// Where a notification comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    TwinChange,
    Lifecycle,
}

impl Source {
    fn schema(self) -> &'static str {
        match self {
            Source::TwinChange => "twinChangeNotification",
            Source::Lifecycle => "deviceLifecycleNotification",
        }
    }

    fn message_source(self) -> &'static str {
        match self {
            Source::TwinChange => "twinChangeEvents",
            Source::Lifecycle => "deviceLifecycleEvents",
        }
    }
}

fn pair(key: &str, value: impl Into<String>) -> (String, String) {
    (key.to_owned(), value.into())
}

fn set_property(properties: &mut Vec<(String, String)>, key: &str, value: String) {
    match properties.iter_mut().find(|(name, _)| name == key) {
        Some(entry) => entry.1 = value,
        None => properties.push((key.to_owned(), value)),
    }
}

fn remove_property(properties: &mut Vec<(String, String)>, key: &str) {
    properties.retain(|(name, _)| name != key);
}

impl Messages {
    // ----- time and envelopes -----

    /// The next operation time and its enqueued time.
    fn next_times(&mut self) -> (Ticks, Ticks) {
        let gap = self.rng.gen_range(MIN_GAP..=MAX_GAP);
        self.clock = self.clock.saturating_add(gap);
        let delay = self.rng.gen_range(MIN_ENQUEUE_DELAY..=MAX_ENQUEUE_DELAY);
        (self.clock, self.clock.saturating_add(delay))
    }

    fn correlation_id(&mut self) -> String {
        format!("{:011x}", self.rng.gen::<u64>() >> 20)
    }

    fn device_id(&self, device: usize) -> String {
        let prefix = self
            .fleet
            .get(device)
            .map_or(0, |device| usize::from(device.prefix));
        format!(
            "{}-{device:06}",
            DEVICE_PREFIXES[prefix % DEVICE_PREFIXES.len()]
        )
    }

    /// The properties of a twin-change or lifecycle notification.
    #[allow(clippy::too_many_arguments)]
    fn notification(
        &mut self,
        device_id: &str,
        module_id: Option<&str>,
        source: Source,
        op_type: &str,
        op_time: Ticks,
        enqueued: Ticks,
        body: GeneratedBody,
        kind: MessageKind,
    ) -> GeneratedMessage {
        let enqueued_text = format_time(enqueued);
        let mut properties = Vec::with_capacity(6);
        properties.push(pair("hubName", self.hub.as_str()));
        properties.push(pair("deviceId", device_id));
        if let Some(module_id) = module_id {
            properties.push(pair("moduleId", module_id));
        }
        properties.push(pair("operationTimestamp", format_time(op_time)));
        properties.push(pair("iothub-message-schema", source.schema()));
        properties.push(pair("opType", op_type));
        let mut system_properties = Vec::with_capacity(7);
        system_properties.push(pair("correlationId", self.correlation_id()));
        system_properties.push(pair("connectionDeviceId", device_id));
        if let Some(module_id) = module_id {
            system_properties.push(pair("connectionModuleId", module_id));
        }
        system_properties.push(pair("enqueuedTime", enqueued_text.as_str()));
        system_properties.push(pair("contentType", "application/json"));
        system_properties.push(pair("contentEncoding", "utf-8"));
        system_properties.push(pair("iothub-message-source", source.message_source()));
        GeneratedMessage {
            enqueued_time_utc: enqueued_text,
            properties,
            system_properties,
            body,
            kind,
        }
    }

    /// A fleet notification about twin `slot` of device `device`.
    fn fleet_notification(
        &mut self,
        device: usize,
        slot: TwinSlot,
        source: Source,
        op_type: &str,
        times: (Ticks, Ticks),
        body: Vec<u8>,
    ) -> GeneratedMessage {
        let device_id = self.device_id(device);
        let module_id = match slot {
            TwinSlot::Device => None,
            TwinSlot::Module(module) => Some(module.module_id()),
        };
        let kind = match source {
            Source::TwinChange => MessageKind::TwinChange,
            Source::Lifecycle => MessageKind::Lifecycle,
        };
        self.notification(
            &device_id,
            module_id,
            source,
            op_type,
            times.0,
            times.1,
            GeneratedBody::Json(body),
            kind,
        )
    }

    fn schedule(&mut self, device: usize, delay: u64, task: Task) {
        let incarnation = self
            .fleet
            .get(device)
            .map_or(0, |device| device.incarnation);
        self.pending_sequence += 1;
        self.pending.push(Reverse(Pending {
            due: self.fleet_step.saturating_add(delay),
            sequence: self.pending_sequence,
            device,
            incarnation,
            task,
        }));
    }

    // ----- the fleet -----

    /// The next fleet message. Only called when the fleet has at least one device, so that
    /// a random operation can always be found.
    fn fleet_message(&mut self) -> GeneratedMessage {
        let message = match self.run_due_task() {
            Some(message) => message,
            None => self.random_operation(),
        };
        self.fleet_step += 1;
        message
    }

    fn run_due_task(&mut self) -> Option<GeneratedMessage> {
        while let Some(Reverse(pending)) = self.pending.peek().copied() {
            if pending.due > self.fleet_step {
                return None;
            }
            self.pending.pop();
            if let Some(message) = self.run_task(pending) {
                return Some(message);
            }
        }
        None
    }

    /// Runs a scheduled task if it still makes sense: the device may have been deleted or
    /// re-created, a module deleted or created, since it was scheduled.
    fn run_task(&mut self, pending: Pending) -> Option<GeneratedMessage> {
        let device = self.fleet.get(pending.device)?;
        if pending.incarnation != device.incarnation {
            return None;
        }
        let device_live = device.core.live;
        let module_live = [
            device.module_live(ModuleSlot::SecurityAgent),
            device.module_live(ModuleSlot::MicroAgent),
        ];
        let is_live = |module: ModuleSlot| match module {
            ModuleSlot::SecurityAgent => module_live[0],
            ModuleSlot::MicroAgent => module_live[1],
        };
        let d = pending.device;
        if let Task::RecreateDevice = pending.task {
            return (!device_live).then(|| self.create_device(d));
        }
        if !device_live {
            return None;
        }
        match pending.task {
            Task::CreateModule(module) => (!is_live(module)).then(|| self.create_module(d, module)),
            Task::InitialConfiguration(module) => {
                is_live(module).then(|| self.desired_patch(d, TwinSlot::Module(module), true))
            }
            Task::AgentReport(module) => is_live(module).then(|| self.agent_report(d, module)),
            Task::DeleteModule(module) => is_live(module).then(|| self.delete_module(d, module)),
            Task::DeviceReport => Some(self.device_report(d, true)),
            Task::DeleteDevice => Some(self.delete_device(d)),
            // Handled above, before the device had to be live.
            Task::RecreateDevice => None,
        }
    }

    fn random_operation(&mut self) -> GeneratedMessage {
        let onboarded = self.fleet.len() as u64;
        if onboarded < self.device_count
            && (onboarded == 0 || self.rng.gen_ratio(ONBOARD_PERCENT, 100))
        {
            return self.onboard_device();
        }
        // Retired devices are skipped a few times, then brought back rather than searched
        // for forever: a fleet whose devices are all retired must still produce messages.
        let mut attempts = 0;
        loop {
            let d = self.rng.gen_range(0..self.fleet.len());
            let device = &self.fleet[d];
            if device.core.live {
                return self.operate_on_device(d);
            }
            attempts += 1;
            if !device.retired || attempts >= 8 {
                return self.create_device(d);
            }
        }
    }

    fn onboard_device(&mut self) -> GeneratedMessage {
        let rng = &mut self.rng;
        let prefix = pick_weighted(rng, &[30, 30, 15, 15, 10]) as u8;
        let (plans_security_agent, plans_micro_agent) = match pick_weighted(rng, &[30, 55, 5, 10]) {
            0 => (true, false),
            1 => (false, true),
            2 => (true, true),
            _ => (false, false),
        };
        let firmware = rng.gen_range(0..INSTALLABLE_FIRMWARE_COUNT);
        self.fleet.push(Device {
            prefix,
            incarnation: 0,
            retired: false,
            plans_security_agent,
            plans_micro_agent,
            core: TwinCore::default(),
            tags: DeviceTags::default(),
            reported: DeviceReported {
                firmware,
                ..DeviceReported::default()
            },
            security_agent: SecurityAgentTwin {
                core: TwinCore::default(),
                tags: ModuleTags::default(),
                legacy_object: false,
                has_reported: false,
                effective: default_effective(),
            },
            micro_agent: MicroAgentTwin::default(),
        });
        self.create_device(self.fleet.len() - 1)
    }

    /// Creates (or re-creates) device `d` and schedules its modules and first report.
    fn create_device(&mut self, d: usize) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        if device.core.live {
            // Not reached: callers only create devices that do not exist. Kept total anyway.
            return self.device_report(d, false);
        }
        let recreated = device.core.version > 0;
        if recreated {
            device.incarnation = device.incarnation.wrapping_add(1);
        }
        let old_tags = device.tags;
        device.retired = false;
        device.core = TwinCore::created();
        device.tags = random_device_tags(rng);
        if recreated && rng.gen_ratio(8, 10) {
            // A re-registered device usually goes back where it was.
            device.tags.environment = old_tags.environment;
            device.tags.site = old_tags.site;
        }
        device.reported = DeviceReported {
            firmware: device.reported.firmware,
            ..DeviceReported::default()
        };
        device.security_agent.core.live = false;
        device.micro_agent.core.live = false;
        let plans = [
            (ModuleSlot::SecurityAgent, device.plans_security_agent),
            (ModuleSlot::MicroAgent, device.plans_micro_agent),
        ];
        let body = full_twin_body(device, &device_id, TwinSlot::Device, true);
        for (module, planned) in plans {
            if planned {
                let delay = self.rng.gen_range(1..=6);
                self.schedule(d, delay, Task::CreateModule(module));
            }
        }
        let delay = self.rng.gen_range(2..=30);
        self.schedule(d, delay, Task::DeviceReport);
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::Lifecycle,
            "createDeviceIdentity",
            times,
            body,
        )
    }

    fn create_module(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let tags = random_module_tags(rng, device.tags.environment);
        match module {
            ModuleSlot::SecurityAgent => {
                device.security_agent = SecurityAgentTwin {
                    core: TwinCore::created(),
                    tags,
                    legacy_object: rng.gen_ratio(1, 25),
                    has_reported: false,
                    effective: default_effective(),
                };
            }
            ModuleSlot::MicroAgent => {
                device.micro_agent = MicroAgentTwin {
                    core: TwinCore::created(),
                    tags,
                    ..MicroAgentTwin::default()
                };
            }
        }
        let body = full_twin_body(device, &device_id, TwinSlot::Module(module), true);
        // Most fleets push a configuration to new agents (an IoT Hub configuration or a
        // script); the agent comes online and reports whatever it runs with.
        if self.rng.gen_ratio(3, 4) {
            let delay = self.rng.gen_range(1..=15);
            self.schedule(d, delay, Task::InitialConfiguration(module));
        }
        if self.rng.gen_ratio(9, 10) {
            let delay = self.rng.gen_range(2..=40);
            self.schedule(d, delay, Task::AgentReport(module));
        }
        self.fleet_notification(
            d,
            TwinSlot::Module(module),
            Source::Lifecycle,
            "createDeviceIdentity",
            times,
            body,
        )
    }

    fn operate_on_device(&mut self, d: usize) -> GeneratedMessage {
        let weights = DEVICE_ACTIONS.map(|(_, weight)| weight);
        let action = DEVICE_ACTIONS[pick_weighted(&mut self.rng, &weights)].0;
        let live_module = self.pick_live_module(d);
        match (action, live_module) {
            (DeviceAction::AgentReport, Some(module)) => self.agent_report(d, module),
            (DeviceAction::ModuleDesiredPatch, Some(module)) => {
                self.desired_patch(d, TwinSlot::Module(module), false)
            }
            (DeviceAction::DeviceDesiredPatch, _) => self.desired_patch(d, TwinSlot::Device, false),
            (DeviceAction::DeviceTags, _) => self.device_tags_patch(d, false),
            (DeviceAction::DeviceTagsAndDesired, _) => self.device_tags_patch(d, true),
            (DeviceAction::ModuleTags, Some(module)) => self.module_tags_patch(d, module),
            (DeviceAction::ReplaceDeviceTags, _) => self.replace_device_tags(d),
            (DeviceAction::ReplaceDesired, Some(module)) => {
                self.replace_desired(d, TwinSlot::Module(module))
            }
            (DeviceAction::ReplaceDesired, None) => self.replace_desired(d, TwinSlot::Device),
            (DeviceAction::DeleteModule, Some(module)) => {
                let message = self.delete_module(d, module);
                let device = &mut self.fleet[d];
                if self.rng.gen_ratio(1, 2) {
                    // Taken off for good (an agent migration, say): it is not re-created.
                    match module {
                        ModuleSlot::SecurityAgent => device.plans_security_agent = false,
                        ModuleSlot::MicroAgent => device.plans_micro_agent = false,
                    }
                } else {
                    let delay = self.rng.gen_range(5..=300);
                    self.schedule(d, delay, Task::CreateModule(module));
                }
                message
            }
            (DeviceAction::AddModule, _) => {
                let device = &self.fleet[d];
                let missing = if !device.module_live(ModuleSlot::MicroAgent) {
                    Some(ModuleSlot::MicroAgent)
                } else if !device.module_live(ModuleSlot::SecurityAgent) {
                    Some(ModuleSlot::SecurityAgent)
                } else {
                    None
                };
                match missing {
                    Some(module) => {
                        let device = &mut self.fleet[d];
                        match module {
                            ModuleSlot::SecurityAgent => device.plans_security_agent = true,
                            ModuleSlot::MicroAgent => device.plans_micro_agent = true,
                        }
                        self.create_module(d, module)
                    }
                    None => self.device_tags_patch(d, false),
                }
            }
            (DeviceAction::DeleteDevice, _) => self.begin_device_delete(d),
            // Module operations on a device without modules: it reports instead.
            (DeviceAction::DeviceReport, _)
            | (DeviceAction::AgentReport, None)
            | (DeviceAction::ModuleDesiredPatch, None)
            | (DeviceAction::ModuleTags, None)
            | (DeviceAction::DeleteModule, None) => self.device_report(d, false),
        }
    }

    fn pick_live_module(&mut self, d: usize) -> Option<ModuleSlot> {
        let device = &self.fleet[d];
        match (
            device.module_live(ModuleSlot::SecurityAgent),
            device.module_live(ModuleSlot::MicroAgent),
        ) {
            (true, true) => Some(if self.rng.gen_ratio(1, 2) {
                ModuleSlot::SecurityAgent
            } else {
                ModuleSlot::MicroAgent
            }),
            (true, false) => Some(ModuleSlot::SecurityAgent),
            (false, true) => Some(ModuleSlot::MicroAgent),
            (false, false) => None,
        }
    }

    /// Decides what a back-end desired patch changes, without applying it.
    fn plan_desired_patch(&mut self, d: usize, slot: TwinSlot, initial: bool) -> DesiredPatch {
        let rng = &mut self.rng;
        let device = &self.fleet[d];
        let layout = device.layout(slot);
        let section = &device.core(slot).desired;
        let settings = settings_of(slot);
        let mut patch = DesiredPatch {
            changes: Vec::new(),
            object_deleted: false,
            version: 0,
            at: NEVER,
        };
        if !initial && layout != Layout::Flat && section.object_present && rng.gen_ratio(1, 50) {
            // Removing the whole object sends the agent back to its defaults.
            patch.object_deleted = true;
            return patch;
        }
        if !initial && !section.entries.is_empty() && rng.gen_ratio(15, 100) {
            for _ in 0..rng.gen_range(1..=2) {
                let entry = section.entries[rng.gen_range(0..section.entries.len())];
                patch.changes.push((entry.setting, None));
            }
        }
        let set_count = if initial {
            rng.gen_range(3..=8)
        } else if patch.changes.is_empty() {
            rng.gen_range(1..=4)
        } else {
            rng.gen_range(0..=1)
        };
        let misconfigured = if rng.gen_ratio(12, 100) {
            Some(rng.gen_range(0..set_count.max(1)))
        } else {
            None
        };
        for position in 0..set_count {
            let index = rng.gen_range(0..settings.len());
            let chosen = pick_candidate(rng, &settings[index], misconfigured == Some(position));
            patch.changes.push((index as u8, Some(chosen)));
        }
        patch.changes.sort_by_key(|&(index, _)| index);
        patch.changes.dedup_by_key(|&mut (index, _)| index);
        patch
    }

    /// Applies `patch` to the desired section of twin `slot`: its `$version` moves by `step`,
    /// and the patch learns that version and its time `at` for its metadata.
    fn apply_desired_patch(
        &mut self,
        d: usize,
        slot: TwinSlot,
        patch: &mut DesiredPatch,
        step: u32,
        at: Ticks,
    ) {
        let device = &mut self.fleet[d];
        let layout = device.layout(slot);
        let section = &mut device.core_mut(slot).desired;
        section.version = section.version.saturating_add(step);
        section.updated_at = at;
        section.updated_version = section.version;
        patch.version = section.version;
        patch.at = at;
        if patch.object_deleted {
            section.entries.clear();
            section.object_present = false;
            return;
        }
        for &(index, change) in &patch.changes {
            match change {
                Some(candidate) => section.set(index, candidate, section.version, at),
                None => section.remove(index),
            }
        }
        if layout != Layout::Flat {
            section.object_present = true;
            section.object_updated_at = at;
            section.object_updated_version = section.version;
        }
    }

    /// A back-end desired patch to twin `slot`; the agent (or device) answers later.
    fn desired_patch(&mut self, d: usize, slot: TwinSlot, initial: bool) -> GeneratedMessage {
        let times = self.next_times();
        let mut patch = self.plan_desired_patch(d, slot, initial);
        let step = self.fleet[d].core_mut(slot).bump(&mut self.rng);
        self.apply_desired_patch(d, slot, &mut patch, step, times.0);
        let device = &self.fleet[d];
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(device.core(slot).version);
        json.key("properties");
        json.begin_object();
        json.key("desired");
        write_desired_patch(&mut json, device.layout(slot), slot, &patch);
        json.end_object();
        json.end_object();
        self.schedule_answer(d, slot);
        self.fleet_notification(
            d,
            slot,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// Schedules the agent's (or the device's) report after a desired change; now and then
    /// it is offline and does not answer.
    fn schedule_answer(&mut self, d: usize, slot: TwinSlot) {
        if self.rng.gen_ratio(85, 100) {
            let delay = self.rng.gen_range(1..=25);
            let task = match slot {
                TwinSlot::Device => Task::DeviceReport,
                TwinSlot::Module(module) => Task::AgentReport(module),
            };
            self.schedule(d, delay, task);
        }
    }

    /// The agent reports what it runs with: desired values it accepts, its current ones for
    /// those it rejects, defaults for the rest.
    fn agent_report(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let slot = TwinSlot::Module(module);
        match module {
            ModuleSlot::SecurityAgent => {
                let twin = &mut device.security_agent;
                let object_present = twin.core.desired.object_present;
                for (index, setting) in SECURITY_AGENT_SETTINGS.iter().enumerate() {
                    let desired = if object_present {
                        twin.core.desired.candidate_of(index as u8)
                    } else {
                        None
                    };
                    twin.effective[index] = match desired {
                        Some(candidate) => effective_candidate(
                            setting.candidates,
                            candidate,
                            twin.effective[index],
                        ),
                        None => setting.default,
                    };
                }
                twin.has_reported = true;
                let step = twin.core.bump(rng);
                twin.core.reported_version = twin.core.reported_version.saturating_add(step);
                twin.core.reported_at = times.0;
            }
            ModuleSlot::MicroAgent => {
                let twin = &mut device.micro_agent;
                let mut invalid = 0u32;
                for entry in &twin.core.desired.entries {
                    let setting = &MICRO_AGENT_SETTINGS[usize::from(entry.setting)];
                    if is_rejected(setting, entry.candidate) {
                        invalid |= 1 << entry.setting;
                    }
                }
                twin.invalid_fields = invalid;
                twin.failed = invalid != 0;
                twin.has_reported = true;
                let step = twin.core.bump(rng);
                twin.core.reported_version = twin.core.reported_version.saturating_add(step);
                twin.core.reported_at = times.0;
            }
        }
        let device = &self.fleet[d];
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(device.core(slot).version);
        json.key("properties");
        json.begin_object();
        json.key("reported");
        write_reported_section(&mut json, device, slot);
        json.end_object();
        json.end_object();
        self.fleet_notification(
            d,
            slot,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// The device reports on its own twin: everything the first time, the settings it
    /// applied after a desired change, or its connectivity.
    fn device_report(&mut self, d: usize, answering: bool) -> GeneratedMessage {
        let times = self.next_times();
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let desired = &device.core.desired;
        let reported = &mut device.reported;
        let keys = if reported.present == 0 {
            REPORTED_ALL
        } else if answering {
            REPORTED_FIRMWARE | REPORTED_TELEMETRY | REPORTED_LOG_LEVEL
        } else if rng.gen_ratio(7, 10) {
            REPORTED_CONNECTIVITY
        } else {
            REPORTED_FIRMWARE | REPORTED_CONNECTIVITY
        };
        let apply = |setting: u8, current: u8| match desired.candidate_of(setting) {
            Some(candidate) => effective_candidate(
                DEVICE_SETTINGS[usize::from(setting)].candidates,
                candidate,
                current,
            ),
            None if setting == DEVICE_SETTING_FIRMWARE => current,
            None => DEVICE_SETTINGS[usize::from(setting)].default,
        };
        reported.firmware = apply(DEVICE_SETTING_FIRMWARE, reported.firmware);
        reported.telemetry = apply(DEVICE_SETTING_TELEMETRY, reported.telemetry);
        reported.log_level = apply(DEVICE_SETTING_LOG_LEVEL, reported.log_level);
        if keys & REPORTED_CONNECTIVITY != 0 {
            if reported.present & REPORTED_CONNECTIVITY == 0 || rng.gen_ratio(1, 20) {
                reported.network = rng.gen_range(0..NETWORKS.len() as u8);
            }
            reported.signal_dbm = rng.gen_range(-110..=-40);
        }
        reported.present |= keys;
        for bit in 0..4 {
            if keys & (1 << bit) != 0 {
                reported.updated_at[bit] = times.0;
            }
        }
        let step = device.core.bump(rng);
        device.core.reported_version = device.core.reported_version.saturating_add(step);
        device.core.reported_at = times.0;
        let device = &self.fleet[d];
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(device.core.version);
        json.key("properties");
        json.begin_object();
        json.key("reported");
        write_device_reported(&mut json, device, keys);
        json.end_object();
        json.end_object();
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// A back-end tag patch on the device twin; with `with_desired`, one operation that also
    /// patches desired properties (as in the documented example).
    fn device_tags_patch(&mut self, d: usize, with_desired: bool) -> GeneratedMessage {
        let times = self.next_times();
        let mut desired_patch =
            with_desired.then(|| self.plan_desired_patch(d, TwinSlot::Device, false));
        let tags_patch = self.change_device_tags(d);
        let step = self.fleet[d].core.bump(&mut self.rng);
        if let Some(patch) = desired_patch.as_mut() {
            self.apply_desired_patch(d, TwinSlot::Device, patch, step, times.0);
            self.schedule_answer(d, TwinSlot::Device);
        }
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(self.fleet[d].core.version);
        json.key("tags");
        json.raw(&tags_patch);
        if let Some(patch) = &desired_patch {
            json.key("properties");
            json.begin_object();
            json.key("desired");
            write_desired_patch(&mut json, Layout::Flat, TwinSlot::Device, patch);
            json.end_object();
        }
        json.end_object();
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// Changes one tag of device `d` and returns the tag patch that says so.
    fn change_device_tags(&mut self, d: usize) -> Vec<u8> {
        let rng = &mut self.rng;
        let tags = &mut self.fleet[d].tags;
        let mut json = JsonWriter::new();
        json.begin_object();
        match rng.gen_range(0..5) {
            0 => {
                // A move: new site, new building, the region kept (merge patch).
                tags.site = rng.gen_range(0..SITES.len() as u8);
                tags.building = rng.gen_range(1..=40);
                json.key("site");
                json.string(SITES[usize::from(tags.site)]);
                json.key("location");
                json.begin_object();
                json.key("building");
                json.string(&building_name(tags.building));
                json.end_object();
            }
            1 => {
                tags.environment = pick_environment(rng);
                json.key("env");
                json.string(ENVIRONMENTS[usize::from(tags.environment)]);
            }
            2 => {
                json.key("owner");
                if tags.owner > 0 && rng.gen_ratio(1, 2) {
                    tags.owner = 0;
                    json.null();
                } else {
                    tags.owner = rng.gen_range(1..=OWNERS.len() as u8);
                    json.string(OWNERS[usize::from(tags.owner - 1)]);
                }
            }
            3 => {
                tags.tier = rng.gen_range(0..TIERS.len() as u8);
                json.key("tier");
                json.string(TIERS[usize::from(tags.tier)]);
            }
            _ => {
                json.key("location");
                if tags.region > 0 || tags.building > 0 {
                    tags.region = 0;
                    tags.building = 0;
                    json.null();
                } else {
                    tags.region = rng.gen_range(1..=REGIONS.len() as u8);
                    tags.building = rng.gen_range(1..=40);
                    write_location(&mut json, tags.region, tags.building);
                }
            }
        }
        json.end_object();
        json.finish()
    }

    fn module_tags_patch(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let device_environment = device.tags.environment;
        let (core, tags) = match module {
            ModuleSlot::SecurityAgent => (
                &mut device.security_agent.core,
                &mut device.security_agent.tags,
            ),
            ModuleSlot::MicroAgent => (&mut device.micro_agent.core, &mut device.micro_agent.tags),
        };
        let mut tags_json = JsonWriter::new();
        tags_json.begin_object();
        if rng.gen_ratio(1, 2) {
            // Module twins carry the device's environment so configurations can target them.
            tags.environment = device_environment + 1;
            tags_json.key("env");
            tags_json.string(ENVIRONMENTS[usize::from(device_environment) % ENVIRONMENTS.len()]);
        } else {
            tags_json.key("ring");
            if tags.ring > 0 && rng.gen_ratio(1, 3) {
                tags.ring = 0;
                tags_json.null();
            } else {
                tags.ring = rng.gen_range(1..=RINGS.len() as u8);
                tags_json.string(RINGS[usize::from(tags.ring - 1)]);
            }
        }
        tags_json.end_object();
        core.bump(rng);
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(core.version);
        json.key("tags");
        json.raw(&tags_json.out);
        json.end_object();
        self.fleet_notification(
            d,
            TwinSlot::Module(module),
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// The back end replaces the device's tags wholesale.
    fn replace_device_tags(&mut self, d: usize) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let environment = device.tags.environment;
        device.tags = random_device_tags(rng);
        if rng.gen_ratio(8, 10) {
            device.tags.environment = environment;
        }
        device.core.bump(rng);
        let body = full_twin_body(device, &device_id, TwinSlot::Device, false);
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::TwinChange,
            "replaceTwin",
            times,
            body,
        )
    }

    /// The back end replaces the desired section of twin `slot` wholesale.
    fn replace_desired(&mut self, d: usize, slot: TwinSlot) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let layout = device.layout(slot);
        let settings = settings_of(slot);
        let core = device.core_mut(slot);
        let step = core.bump(rng);
        let version = core.desired.version.saturating_add(step);
        let mut section = DesiredSection {
            version,
            updated_at: times.0,
            updated_version: version,
            ..DesiredSection::default()
        };
        let count = rng.gen_range(0..=settings.len().min(8));
        let misconfigured = rng.gen_ratio(12, 100);
        for position in 0..count {
            let index = rng.gen_range(0..settings.len());
            let chosen = pick_candidate(rng, &settings[index], misconfigured && position == 0);
            section.set(index as u8, chosen, version, times.0);
        }
        if layout != Layout::Flat && !section.entries.is_empty() {
            section.object_present = true;
            section.object_updated_at = times.0;
            section.object_updated_version = version;
        }
        core.desired = section;
        let body = full_twin_body(device, &device_id, slot, false);
        self.schedule_answer(d, slot);
        self.fleet_notification(d, slot, Source::TwinChange, "replaceTwin", times, body)
    }

    fn delete_module(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let device = &self.fleet[d];
        let slot = TwinSlot::Module(module);
        // The body is the twin as it was.
        let body = full_twin_body(device, &device_id, slot, true);
        self.fleet[d].core_mut(slot).live = false;
        self.fleet_notification(
            d,
            slot,
            Source::Lifecycle,
            "deleteDeviceIdentity",
            times,
            body,
        )
    }

    /// Deletes device `d`: sometimes its modules explicitly first (whether IoT Hub sends
    /// those is not known; the consumer removes them with the device either way).
    fn begin_device_delete(&mut self, d: usize) -> GeneratedMessage {
        let device = &self.fleet[d];
        let live_modules: Vec<ModuleSlot> = [ModuleSlot::SecurityAgent, ModuleSlot::MicroAgent]
            .into_iter()
            .filter(|&module| device.module_live(module))
            .collect();
        if live_modules.is_empty() || self.rng.gen_ratio(1, 2) {
            return self.delete_device(d);
        }
        for &module in &live_modules[1..] {
            self.schedule(d, 0, Task::DeleteModule(module));
        }
        self.schedule(d, 0, Task::DeleteDevice);
        self.delete_module(d, live_modules[0])
    }

    fn delete_device(&mut self, d: usize) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let device = &self.fleet[d];
        let body = full_twin_body(device, &device_id, TwinSlot::Device, true);
        let device = &mut self.fleet[d];
        device.core.live = false;
        device.security_agent.core.live = false;
        device.micro_agent.core.live = false;
        if self.rng.gen_ratio(8, 10) {
            let delay = self.rng.gen_range(20..=2000);
            self.schedule(d, delay, Task::RecreateDevice);
        } else {
            self.fleet[d].retired = true;
        }
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::Lifecycle,
            "deleteDeviceIdentity",
            times,
            body,
        )
    }

    // ----- noise -----

    fn noise_message(&mut self) -> GeneratedMessage {
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

    fn telemetry(&mut self) -> GeneratedMessage {
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
    fn malformed(&mut self, kind: NoiseKind) -> GeneratedMessage {
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
                    4 => (op_time / TICKS_PER_MILLISECOND).to_string(),
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::*;

    fn options(devices: u64, events: u64, seed: u64, noise: f64) -> GenerateOptions {
        GenerateOptions {
            devices,
            events,
            seed,
            hub: "contoso-hub".to_owned(),
            noise,
        }
    }

    fn json_lines(opts: &GenerateOptions) -> (Vec<u8>, GenerateStats) {
        let mut out = Vec::new();
        let stats = write_json_lines(opts, &mut out).expect("writing to a vector cannot fail");
        (out, stats)
    }

    fn property<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    fn body_json(message: &GeneratedMessage) -> Value {
        match &message.body {
            GeneratedBody::Json(bytes) => {
                serde_json::from_slice(bytes).expect("fleet bodies are JSON")
            }
            other => panic!("fleet message without a JSON body: {other:?}"),
        }
    }

    /// `(deviceId, moduleId)` of a fleet message.
    fn twin_key(message: &GeneratedMessage) -> (String, String) {
        (
            property(&message.properties, "deviceId")
                .expect("fleet messages name their device")
                .to_owned(),
            property(&message.properties, "moduleId")
                .unwrap_or("")
                .to_owned(),
        )
    }

    /// Whether `time` is `YYYY-MM-DDTHH:MM:SS.fffffffZ` with a valid hour, minute and second:
    /// the form the generator writes for well-formed messages.
    fn is_iot_hub_time(time: &str) -> bool {
        let bytes = time.as_bytes();
        let digits_at = |positions: &[usize]| {
            positions
                .iter()
                .all(|&position| bytes.get(position).is_some_and(u8::is_ascii_digit))
        };
        let number = |from: usize| time.get(from..from + 2).and_then(|text| text.parse().ok());
        bytes.len() == 28
            && digits_at(&[0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
            && digits_at(&[20, 21, 22, 23, 24, 25, 26])
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes[10] == b'T'
            && bytes[13] == b':'
            && bytes[16] == b':'
            && bytes[19] == b'.'
            && bytes[27] == b'Z'
            && number(11).is_some_and(|hour: u32| hour < 24)
            && number(14).is_some_and(|minute: u32| minute < 60)
            && number(17).is_some_and(|second: u32| second < 60)
    }

    /// Nesting depth of a JSON value, counting the outermost object or array as 1.
    fn depth(value: &Value) -> usize {
        match value {
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn same_seed_gives_the_same_bytes_and_another_seed_other_bytes() {
        let first = json_lines(&options(200, 5000, 42, 0.05)).0;
        let again = json_lines(&options(200, 5000, 42, 0.05)).0;
        let other = json_lines(&options(200, 5000, 43, 0.05)).0;
        assert_eq!(first, again);
        assert_ne!(first, other);
    }

    #[test]
    fn writes_exactly_the_requested_number_of_lines_for_any_options() {
        let cases = [
            options(0, 0, 1, 0.0),
            options(0, 50, 1, 0.0),
            options(0, 50, 1, 1.0),
            options(1, 300, 2, 0.0),
            options(5, 1000, 3, 1.0),
            options(100, 1000, 4, f64::NAN),
            options(100, 1000, 5, -3.0),
            options(100, 1000, 6, 7.0),
            options(u64::MAX, 500, 7, 0.5),
            options(3, 5000, 8, 0.2),
        ];
        for opts in cases {
            let (out, stats) = json_lines(&opts);
            let lines = out.iter().filter(|&&byte| byte == b'\n').count() as u64;
            assert_eq!(lines, opts.events, "{opts:?}");
            assert_eq!(stats.messages, opts.events, "{opts:?}");
            assert_eq!(
                stats.lifecycle + stats.twin_changes + stats.noise,
                stats.messages
            );
            assert!(out.is_empty() || out.ends_with(b"\n"));
        }
    }

    #[test]
    fn a_hub_name_that_needs_escaping_stays_on_one_line() {
        let mut opts = options(10, 400, 9, 0.3);
        opts.hub = "odd\n\"hub\"\\".to_owned();
        let (out, _) = json_lines(&opts);
        let lines = out
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty());
        let kinds = messages(&opts).map(|message| message.kind);
        for (line, kind) in lines.zip(kinds) {
            if kind == MessageKind::Noise(NoiseKind::CorruptLine) {
                continue;
            }
            let record: Value = serde_json::from_slice(line).expect("a JSON record");
            if let Some(hub) = record["Properties"].get("hubName") {
                assert_eq!(hub, "odd\n\"hub\"\\");
            }
        }
    }

    #[test]
    fn every_record_but_corrupt_lines_is_a_storage_json_record() {
        let opts = options(300, 20_000, 11, 0.1);
        let (out, _) = json_lines(&opts);
        let lines: Vec<&[u8]> = out.split(|&byte| byte == b'\n').collect();
        let generated: Vec<GeneratedMessage> = messages(&opts).collect();
        assert_eq!(
            lines.len(),
            generated.len() + 1,
            "a final line feed, no more"
        );
        for (line, message) in lines.iter().zip(&generated) {
            let parsed = serde_json::from_slice::<Value>(line);
            if message.kind == MessageKind::Noise(NoiseKind::CorruptLine) {
                assert!(parsed.is_err(), "a corrupt line parsed");
                continue;
            }
            let record = parsed.expect("every other line is JSON");
            let record = record.as_object().expect("a record is an object");
            assert!(record["EnqueuedTimeUtc"].is_string());
            assert_eq!(
                record["EnqueuedTimeUtc"],
                message.enqueued_time_utc.as_str()
            );
            for section in ["Properties", "SystemProperties"] {
                let map = record[section].as_object().expect("a map of properties");
                assert!(
                    map.values().all(Value::is_string),
                    "{section} holds strings"
                );
            }
            assert!(record.contains_key("Body"));
            match &message.body {
                GeneratedBody::Json(_) => assert!(!record["Body"].is_string()),
                GeneratedBody::Bytes(bytes) => {
                    let text = record["Body"].as_str().expect("bytes are a base64 string");
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .expect("valid base64");
                    assert_eq!(&decoded, bytes);
                }
                GeneratedBody::Corrupt(_) => unreachable!("handled above"),
            }
            if matches!(
                message.kind,
                MessageKind::Lifecycle | MessageKind::TwinChange
            ) {
                let properties = &record["Properties"];
                let system = &record["SystemProperties"];
                for key in [
                    "hubName",
                    "deviceId",
                    "operationTimestamp",
                    "iothub-message-schema",
                    "opType",
                ] {
                    assert!(properties[key].is_string(), "missing {key}");
                }
                for key in [
                    "correlationId",
                    "connectionDeviceId",
                    "enqueuedTime",
                    "contentType",
                    "contentEncoding",
                    "iothub-message-source",
                ] {
                    assert!(system[key].is_string(), "missing {key}");
                }
                assert_eq!(properties["deviceId"], system["connectionDeviceId"]);
                assert_eq!(properties.get("moduleId"), system.get("connectionModuleId"));
                assert_eq!(system["enqueuedTime"], record["EnqueuedTimeUtc"]);
                let op_type = properties["opType"].as_str().unwrap_or_default();
                let expected = if message.kind == MessageKind::Lifecycle {
                    ["deviceLifecycleNotification", "deviceLifecycleEvents"]
                } else {
                    ["twinChangeNotification", "twinChangeEvents"]
                };
                assert_eq!(properties["iothub-message-schema"], expected[0]);
                assert_eq!(system["iothub-message-source"], expected[1]);
                let body = record["Body"]
                    .as_object()
                    .expect("fleet bodies are objects");
                assert!(body["version"].is_u64(), "an integer version");
                let whole_twin = op_type != "updateTwin";
                assert_eq!(body.contains_key("deviceId"), whole_twin, "{op_type}");
                assert_eq!(body.contains_key("etag"), whole_twin, "{op_type}");
                assert!(body.contains_key("moduleId") <= whole_twin);
            }
        }
    }

    #[test]
    fn operation_times_start_in_2026_and_increase() {
        let opts = options(100, 5000, 12, 0.1);
        let mut last_enqueued = String::new();
        let mut last_operation = String::new();
        for message in messages(&opts) {
            if matches!(
                message.kind,
                MessageKind::Noise(NoiseKind::Duplicate | NoiseKind::StaleResend)
            ) {
                continue;
            }
            assert!(message.enqueued_time_utc.starts_with("2026-01-"));
            assert!(message.enqueued_time_utc > last_enqueued);
            last_enqueued = message.enqueued_time_utc.clone();
            if let (MessageKind::Lifecycle | MessageKind::TwinChange, Some(time)) = (
                message.kind,
                property(&message.properties, "operationTimestamp"),
            ) {
                assert!(is_iot_hub_time(time), "{time}");
                assert!(time < message.enqueued_time_utc.as_str());
                assert!(time > last_operation.as_str());
                last_operation = time.to_owned();
            }
        }
    }

    #[test]
    fn each_twin_version_strictly_increases_between_creates() {
        let opts = options(150, 30_000, 13, 0.05);
        let mut versions: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut section_versions: BTreeMap<(String, String, &str), u64> = BTreeMap::new();
        for message in messages(&opts) {
            if !matches!(
                message.kind,
                MessageKind::Lifecycle | MessageKind::TwinChange
            ) {
                continue;
            }
            let key = twin_key(&message);
            let body = body_json(&message);
            let version = body["version"].as_u64().expect("an integer version");
            let op_type = property(&message.properties, "opType").unwrap_or_default();
            match op_type {
                "createDeviceIdentity" => {
                    // A new identity starts again, as IoT Hub's do.
                    versions.insert(key.clone(), version);
                    for section in ["desired", "reported"] {
                        section_versions.remove(&(key.0.clone(), key.1.clone(), section));
                    }
                }
                "deleteDeviceIdentity" => {
                    assert_eq!(versions.get(&key), Some(&version), "{key:?}");
                }
                _ => {
                    let last = versions
                        .insert(key.clone(), version)
                        .expect("created first");
                    assert!(version > last, "{key:?}: {version} after {last}");
                    assert!(version <= last + 3, "{key:?}: {version} after {last}");
                }
            }
            for section in ["desired", "reported"] {
                let Some(section_version) = body["properties"][section]["$version"].as_u64() else {
                    continue;
                };
                let section_key = (key.0.clone(), key.1.clone(), section);
                let last = section_versions.insert(section_key, section_version);
                if op_type == "updateTwin" {
                    // A section in an update body is one that changed.
                    assert!(last.is_none_or(|last| section_version > last), "{key:?}");
                } else {
                    assert!(last.is_none_or(|last| section_version >= last), "{key:?}");
                }
            }
        }
    }

    /// Applies the fleet's messages by the rules of SEMANTICS.md §3: none may be stale, since
    /// only noise should be.
    #[test]
    fn no_fleet_message_is_stale_under_the_consumer_rules() {
        struct Stored {
            version: u64,
            created_at: Option<String>,
        }
        let opts = options(120, 40_000, 14, 0.05);
        let mut stored: BTreeMap<(String, String), Stored> = BTreeMap::new();
        let mut tombstones: BTreeMap<(String, String), (u64, String)> = BTreeMap::new();
        let mut deletes = 0;
        let mut recreates = 0;
        for message in messages(&opts) {
            if !matches!(
                message.kind,
                MessageKind::Lifecycle | MessageKind::TwinChange
            ) {
                continue;
            }
            let key = twin_key(&message);
            let body = body_json(&message);
            let version = body["version"].as_u64().expect("an integer version");
            let op_time = property(&message.properties, "operationTimestamp")
                .expect("a time")
                .to_owned();
            match property(&message.properties, "opType").unwrap_or_default() {
                "createDeviceIdentity" => {
                    if let Some(existing) = stored.get(&key) {
                        assert!(version > existing.version, "stale create {key:?}");
                    } else if let Some((_, deleted_at)) = tombstones.get(&key) {
                        assert!(op_time > *deleted_at, "stale re-create {key:?}");
                        recreates += 1;
                    }
                    tombstones.remove(&key);
                    stored.insert(
                        key,
                        Stored {
                            version,
                            created_at: Some(op_time),
                        },
                    );
                }
                "deleteDeviceIdentity" => {
                    let existing = stored.remove(&key).expect("deletes hit a twin");
                    if let Some(created_at) = &existing.created_at {
                        assert!(op_time >= *created_at);
                    }
                    tombstones.insert(key.clone(), (existing.version, op_time.clone()));
                    if key.1.is_empty() {
                        deletes += 1;
                        let modules: Vec<(String, String)> = stored
                            .keys()
                            .filter(|other| other.0 == key.0 && !other.1.is_empty())
                            .cloned()
                            .collect();
                        for module in modules {
                            if let Some(removed) = stored.remove(&module) {
                                tombstones.insert(module, (removed.version, op_time.clone()));
                            }
                        }
                    }
                }
                _ => match stored.get_mut(&key) {
                    Some(existing) => {
                        assert!(version > existing.version, "stale update {key:?}");
                        existing.version = version;
                    }
                    None => panic!("an update of a twin that does not exist: {key:?}"),
                },
            }
        }
        assert!(
            deletes > 0 && recreates > 0,
            "{deletes} deletes, {recreates} re-creates"
        );
    }

    #[test]
    fn every_noise_kind_appears_in_a_moderate_run() {
        let opts = options(300, 20_000, 15, 0.1);
        let mut seen = BTreeSet::new();
        let mut stats = GenerateStats::default();
        for message in messages(&opts) {
            stats.record(message.kind);
            if let MessageKind::Noise(kind) = message.kind {
                seen.insert(kind);
            }
        }
        let all: BTreeSet<NoiseKind> = NoiseKind::ALL.into_iter().collect();
        assert_eq!(seen, all);
        // About a tenth is noise.
        assert!(stats.noise > 1500 && stats.noise < 2500, "{stats:?}");
    }

    #[test]
    fn malformed_noise_carries_the_defect_it_is_named_for() {
        let opts = options(50, 20_000, 16, 0.3);
        for message in messages(&opts) {
            let MessageKind::Noise(kind) = message.kind else {
                continue;
            };
            let body = match &message.body {
                GeneratedBody::Json(bytes) => serde_json::from_slice::<Value>(bytes).ok(),
                _ => None,
            };
            let device_id = property(&message.properties, "deviceId")
                .or(property(&message.system_properties, "connectionDeviceId"))
                .unwrap_or("");
            match kind {
                NoiseKind::MissingDeviceId => assert!(device_id.is_empty()),
                NoiseKind::BadOpType => {
                    let op_type = property(&message.properties, "opType");
                    let source = property(&message.system_properties, "iothub-message-source");
                    assert!(
                        !matches!(
                            (source, op_type),
                            (Some("twinChangeEvents"), Some("updateTwin" | "replaceTwin"))
                        ),
                        "{op_type:?} from {source:?}"
                    );
                }
                NoiseKind::BadOperationTimestamp => {
                    let time =
                        property(&message.properties, "operationTimestamp").expect("a timestamp");
                    assert!(!time.is_empty(), "an empty one would count as absent");
                    assert!(!is_iot_hub_time(time), "{time}");
                }
                NoiseKind::BadBody => {
                    let body = body.expect("JSON");
                    let bad_section = body.get("tags").is_some_and(|tags| !tags.is_object())
                        || body["properties"]
                            .get("desired")
                            .is_some_and(|desired| !desired.is_object());
                    assert!(
                        !body.is_object() || bad_section || depth(&body) > 64,
                        "{body}"
                    );
                }
                NoiseKind::BadVersion => {
                    let body = body.expect("JSON");
                    assert!(!body["version"].is_u64() && !body["version"].is_i64());
                }
                NoiseKind::NonJsonBytes => match &message.body {
                    GeneratedBody::Bytes(bytes) => {
                        assert!(serde_json::from_slice::<Value>(bytes).is_err())
                    }
                    other => panic!("{other:?}"),
                },
                NoiseKind::BodyTooLarge => {
                    assert!(body.expect("JSON").is_object());
                    let mut line = Vec::new();
                    encode_json_line(&message, &mut line);
                    assert!(line.len() > 262_144);
                }
                NoiseKind::CorruptLine => match &message.body {
                    GeneratedBody::Corrupt(bytes) => {
                        assert!(!bytes.contains(&b'\n') && !bytes.contains(&b'\r'));
                    }
                    other => panic!("{other:?}"),
                },
                NoiseKind::Telemetry => assert_eq!(
                    property(&message.system_properties, "iothub-message-source"),
                    Some("Telemetry")
                ),
                NoiseKind::ConnectionState => {
                    let body = body.expect("JSON");
                    assert_eq!(body["sequenceNumber"].as_str().map(str::len), Some(64));
                }
                NoiseKind::Duplicate | NoiseKind::StaleResend => {
                    assert!(
                        property(&message.properties, "opType").is_some(),
                        "copies of fleet messages"
                    );
                }
            }
        }
    }

    /// The stream holds what the compliance rules are about: rejected and non-compliant
    /// settings, `null` deletions, replaces, deletes, both agents and the legacy object.
    #[test]
    fn the_fleet_mix_covers_the_interesting_cases() {
        let opts = options(400, 60_000, 17, 0.0);
        let mut text = String::new();
        let mut op_types = BTreeSet::new();
        let mut module_ids = BTreeSet::new();
        for message in messages(&opts) {
            if let GeneratedBody::Json(bytes) = &message.body {
                text.push_str(&String::from_utf8_lossy(bytes));
                text.push('\n');
            }
            op_types.insert(
                property(&message.properties, "opType")
                    .unwrap_or("")
                    .to_owned(),
            );
            module_ids.insert(
                property(&message.properties, "moduleId")
                    .unwrap_or("")
                    .to_owned(),
            );
        }
        for op_type in [
            "createDeviceIdentity",
            "deleteDeviceIdentity",
            "updateTwin",
            "replaceTwin",
        ] {
            assert!(op_types.contains(op_type), "{op_type}");
        }
        for module_id in ["", SECURITY_AGENT_MODULE, MICRO_AGENT_MODULE] {
            assert!(module_ids.contains(module_id), "{module_id:?}");
        }
        for needle in [
            SECURITY_AGENT_OBJECT,
            LEGACY_SECURITY_AGENT_OBJECT,
            "\"latest_state\":\"failed\"",
            "\"latest_state\":\"success\"",
            "\"Baseline_Disabled\":true",
            "\"CollectorsCore_PriorityIntervals\":\"30,120\"",
            "\"maxMessageSizeInBytes\":{\"value\":200000}",
            "\"eventPriorityLogin\":{\"value\":\"Medium\"}",
            "\"highPriorityMessageFrequency\":{\"value\":\"7 minutes\"}",
            "\"maxLocalCacheSizeInBytes\":{\"value\":65536}",
            ":null",
            "\"$lastUpdatedVersion\"",
            "\"iotEdge\":true",
        ] {
            assert!(text.contains(needle), "no {needle} in the stream");
        }
    }

    #[test]
    fn an_agent_keeps_its_value_when_it_rejects_a_setting() {
        let setting = &SECURITY_AGENT_SETTINGS[0];
        let rejected = setting
            .candidates
            .iter()
            .position(|c| c.verdict == Rejected)
            .expect("a rejected candidate") as u8;
        assert_eq!(effective_candidate(setting.candidates, rejected, 2), 2);
        assert_eq!(effective_candidate(setting.candidates, 1, 2), 1);
        assert_eq!(
            effective_candidate(setting.candidates, 5, 2),
            0,
            "PT420S is PT7M"
        );
    }

    #[test]
    fn times_are_written_as_iot_hub_writes_them() {
        assert_eq!(format_time(START_TICKS), "2026-01-01T00:00:00.0000000Z");
        assert_eq!(format_time(NEVER), "0001-01-01T00:00:00Z");
        let leap_day = START_TICKS + (31 + 28 + 365 * 2) * 86_400 * TICKS_PER_SECOND;
        assert_eq!(format_time(leap_day + 1), "2028-02-29T00:00:00.0000001Z");
        assert_eq!(etag(7), "AAAAAAAAAAc=");
    }
}
