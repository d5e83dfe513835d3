use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde_json::Value;

use super::fleet::{
    etag, LEGACY_SECURITY_AGENT_OBJECT, MICRO_AGENT_MODULE, SECURITY_AGENT_MODULE,
    SECURITY_AGENT_OBJECT,
};
use super::json::{format_time, push_time, NEVER};
use super::settings::{effective_candidate, Verdict, SECURITY_AGENT_SETTINGS};
use super::stream::START_UNIX_MILLIS;
use super::*;
use crate::time::Ticks;

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
        GeneratedBody::Json(bytes) => serde_json::from_slice(bytes).expect("fleet bodies are JSON"),
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

/// Applies the fleet's messages by the apply rules (`docs/semantics.md`): none may be stale, since
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
        .position(|c| c.verdict == Verdict::Rejected)
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
    let start = Ticks::from_unix_millis(START_UNIX_MILLIS);
    assert_eq!(format_time(start), "2026-01-01T00:00:00.0000000Z");
    assert_eq!(format_time(NEVER), "0001-01-01T00:00:00Z");
    let leap_day = Ticks(start.0 + (31 + 28 + 365 * 2) * 86_400 * 10_000_000);
    assert_eq!(
        format_time(Ticks(leap_day.0 + 1)),
        "2028-02-29T00:00:00.0000001Z"
    );
    let mut pushed = b"at ".to_vec();
    push_time(&mut pushed, leap_day);
    assert_eq!(pushed, b"at 2028-02-29T00:00:00.0000000Z");
    assert_eq!(etag(7), "AAAAAAAAAAc=");
}
