//! The generated fleet's twins as IoT Hub's twin query returns them (`SELECT * FROM devices`
//! and `SELECT * FROM devices.modules`; reference `iothub-query.md`): what a seed pass reads
//! (`docs/semantics.md` §7), and what the emulator's query endpoint serves.
//!
//! The documents are the twins the stream's fleet messages leave after its first N messages,
//! built by applying those messages as IoT Hub applied the operations they report: a create or
//! a `replaceTwin` sets the whole twin, an `updateTwin` merges its `tags`, `properties.desired`
//! and `properties.reported` (`$metadata` and `$version` included) as a JSON merge patch, a
//! delete removes the twin (a device's, its modules too). Noise messages are not operations
//! and are skipped. So `tags`, `properties` and `version` are exactly what replaying the same
//! messages leaves in the snapshot, and a seed as of message N plus the messages from N on
//! describe one fleet. (They are built from the messages, not from the generator's internal
//! state, which may run ahead of what its messages carry.)
//!
//! Each document carries what the query returns: `deviceId`, `moduleId` (module twins),
//! `etag`, `deviceEtag` (module twins), `status`, `statusUpdateTime`, `connectionState`,
//! `lastActivityTime`, `cloudToDeviceMessageCount`, `authenticationType`, `x509Thumbprint`,
//! `modelId`, `version`, `tags`, `properties`; device twins also what their create carried
//! (`capabilities`, `deviceScope` on edge devices). The identity fields are plausible values:
//! `connectionState` is `Connected` and `lastActivityTime` the time of the last reported
//! change once the twin has reported anything.
//!
//! Order: devices in the order the stream first names them, each device twin followed by its
//! module twins in moduleId order. Deleted twins are absent.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::generate::{messages, GenerateOptions, GeneratedBody, MessageKind};

/// `lastActivityTime` and `statusUpdateTime` of a twin that never did anything.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// How the documents are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentsLayout {
    /// One JSON array, one document per line inside it: what `az iot hub query` prints (and
    /// still readable line by line by people).
    Array,
    /// One document per line.
    Lines,
}

/// Counts of what [`write_twin_documents`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DocumentStats {
    /// Messages of the stream the twins were taken after.
    pub as_of_event: u64,
    pub device_twins: u64,
    pub module_twins: u64,
}

/// One twin as its operations left it.
struct TwinState {
    /// The document as compact JSON: a fleet of 400,000 twins as parsed values would take
    /// gigabytes; as bytes it takes what the documents file does.
    document: Vec<u8>,
    /// The operation time of the last change to its reported properties.
    last_reported: Option<String>,
}

#[derive(Default)]
struct DeviceEntry {
    twin: Option<TwinState>,
    modules: BTreeMap<String, TwinState>,
}

/// The fleet's twins as the messages leave them.
#[derive(Default)]
struct Fleet {
    /// Device ids in the order the stream first names them.
    order: Vec<String>,
    devices: HashMap<String, DeviceEntry>,
}

fn property<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
}

/// RFC 7386 merge patch of `patch` into `target`.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

impl Fleet {
    fn apply(
        &mut self,
        device_id: &str,
        module_id: &str,
        op_type: &str,
        op_time: &str,
        body: Value,
    ) {
        if !self.devices.contains_key(device_id) {
            self.order.push(device_id.to_string());
        }
        let entry = self.devices.entry(device_id.to_string()).or_default();
        if module_id.is_empty() {
            if op_type == "deleteDeviceIdentity" {
                entry.modules.clear();
            }
            apply_to(&mut entry.twin, op_type, op_time, body);
        } else {
            let mut slot = entry.modules.remove(module_id);
            apply_to(&mut slot, op_type, op_time, body);
            if let Some(state) = slot {
                entry.modules.insert(module_id.to_string(), state);
            }
        }
    }
}

fn apply_to(slot: &mut Option<TwinState>, op_type: &str, op_time: &str, body: Value) {
    let Value::Object(body) = body else {
        return;
    };
    let reported_changed = body
        .get("properties")
        .and_then(|p| p.get("reported"))
        .is_some();
    match op_type {
        "createDeviceIdentity" | "createModuleIdentity" => {
            *slot = Some(TwinState {
                document: store(body),
                last_reported: None,
            });
        }
        "replaceTwin" => {
            let mut document = slot.as_ref().map(|s| load(&s.document)).unwrap_or_default();
            // The identity fields a replace body lacks are the twin's still.
            for (key, value) in body {
                document.insert(key, value);
            }
            let last_reported = slot.as_ref().and_then(|s| s.last_reported.clone());
            *slot = Some(TwinState {
                document: store(document),
                last_reported,
            });
        }
        "updateTwin" => {
            let Some(state) = slot.as_mut() else {
                return;
            };
            let mut document = load(&state.document);
            if let Some(version) = body.get("version") {
                document.insert("version".into(), version.clone());
            }
            if let Some(tags) = body.get("tags") {
                merge(document.entry("tags").or_insert(Value::Null), tags);
            }
            if let Some(properties) = body.get("properties").and_then(Value::as_object) {
                let target = document
                    .entry("properties")
                    .or_insert_with(|| Value::Object(Map::new()));
                for section in ["desired", "reported"] {
                    if let (Some(patch), Some(target)) =
                        (properties.get(section), target.as_object_mut())
                    {
                        merge(target.entry(section).or_insert(Value::Null), patch);
                    }
                }
            }
            state.document = store(document);
        }
        "deleteDeviceIdentity" | "deleteModuleIdentity" => {
            *slot = None;
            return;
        }
        _ => return,
    }
    if reported_changed {
        if let Some(state) = slot.as_mut() {
            state.last_reported = Some(op_time.to_string());
        }
    }
}

fn store(document: Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(&Value::Object(document)).expect("a JSON value serialises")
}

fn load(document: &[u8]) -> Map<String, Value> {
    // Only `store` writes these bytes: they are a JSON object.
    serde_json::from_slice(document).expect("a stored twin is a JSON object")
}

fn etag(version: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(version.to_be_bytes())
}

/// The query document of a twin: its state plus the fields only the query shows.
fn document(state: &TwinState, device_id: &str, module_id: &str, device_version: u64) -> Vec<u8> {
    let mut document = load(&state.document);
    document.insert("deviceId".into(), device_id.into());
    if module_id.is_empty() {
        document.remove("moduleId");
    } else {
        document.insert("moduleId".into(), module_id.into());
        document.insert("deviceEtag".into(), etag(device_version).into());
    }
    let version = document.get("version").and_then(Value::as_u64).unwrap_or(0);
    document.insert("etag".into(), etag(version).into());
    let mut set = |key: &str, value: Value| {
        document.entry(key.to_string()).or_insert(value);
    };
    set("status", "enabled".into());
    set("statusUpdateTime", NEVER.into());
    let (connection, activity) = match &state.last_reported {
        Some(time) => ("Connected", time.as_str()),
        None => ("Disconnected", NEVER),
    };
    set("connectionState", connection.into());
    set("lastActivityTime", activity.into());
    set("cloudToDeviceMessageCount", 0.into());
    set("authenticationType", "sas".into());
    set(
        "x509Thumbprint",
        serde_json::json!({"primaryThumbprint": null, "secondaryThumbprint": null}),
    );
    set("modelId", "".into());
    set("tags", Value::Object(Map::new()));
    serde_json::to_vec(&Value::Object(document)).expect("a JSON value serialises")
}

/// Calls `each` with every twin the first `as_of_event` messages of `opts`' stream (all of
/// them when `None`) leave, as a query document (compact JSON), and whether it is a module
/// twin. Returns how many messages were taken.
pub fn twin_documents(
    opts: &GenerateOptions,
    as_of_event: Option<u64>,
    mut each: impl FnMut(&[u8], bool),
) -> u64 {
    let take = as_of_event.map_or(opts.events, |n| n.min(opts.events));
    let mut fleet = Fleet::default();
    let mut taken = 0;
    for message in messages(opts).take(usize::try_from(take).unwrap_or(usize::MAX)) {
        taken += 1;
        if matches!(message.kind, MessageKind::Noise(_)) {
            continue;
        }
        let GeneratedBody::Json(body) = &message.body else {
            continue;
        };
        let (Some(device_id), Some(op_type)) = (
            property(&message.properties, "deviceId"),
            property(&message.properties, "opType"),
        ) else {
            continue;
        };
        let module_id = property(&message.properties, "moduleId").unwrap_or("");
        let op_time = property(&message.properties, "operationTimestamp").unwrap_or(NEVER);
        // Fleet bodies are JSON objects; anything else is skipped like a non-operation.
        let Ok(body) = serde_json::from_slice::<Value>(body) else {
            continue;
        };
        fleet.apply(device_id, module_id, op_type, op_time, body);
    }
    for device_id in &fleet.order {
        let Some(entry) = fleet.devices.get(device_id) else {
            continue;
        };
        let Some(twin) = &entry.twin else {
            continue;
        };
        let device_version = load(&twin.document)
            .get("version")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        each(&document(twin, device_id, "", device_version), false);
        for (module_id, module) in &entry.modules {
            each(
                &document(module, device_id, module_id, device_version),
                true,
            );
        }
    }
    taken
}

/// Writes the documents of [`twin_documents`] to `out` in `layout`.
///
/// # Errors
///
/// Any error from `out`.
pub fn write_twin_documents(
    opts: &GenerateOptions,
    as_of_event: Option<u64>,
    layout: DocumentsLayout,
    out: &mut impl Write,
) -> io::Result<DocumentStats> {
    let mut stats = DocumentStats::default();
    let mut result: io::Result<()> = Ok(());
    if layout == DocumentsLayout::Array {
        out.write_all(b"[")?;
    }
    let taken = twin_documents(opts, as_of_event, |document, is_module| {
        if result.is_err() {
            return;
        }
        let first = stats.device_twins + stats.module_twins == 0;
        result = (|| -> io::Result<()> {
            match layout {
                DocumentsLayout::Array if first => out.write_all(b"\n")?,
                DocumentsLayout::Array => out.write_all(b",\n")?,
                DocumentsLayout::Lines => {}
            }
            out.write_all(document)?;
            if layout == DocumentsLayout::Lines {
                out.write_all(b"\n")?;
            }
            Ok(())
        })();
        if is_module {
            stats.module_twins += 1;
        } else {
            stats.device_twins += 1;
        }
    });
    stats.as_of_event = taken;
    result?;
    if layout == DocumentsLayout::Array {
        out.write_all(b"\n]\n")?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(devices: u64, events: u64) -> GenerateOptions {
        GenerateOptions {
            devices,
            events,
            seed: 7,
            hub: "contoso-hub".into(),
            noise: 0.0,
        }
    }

    fn documents(opts: &GenerateOptions, as_of: Option<u64>) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        twin_documents(opts, as_of, |doc, _| {
            out.push(serde_json::from_slice(doc).expect("json"))
        });
        out
    }

    #[test]
    fn documents_carry_what_the_query_returns() {
        let docs = documents(&options(50, 3000), None);
        assert!(docs.len() > 50, "device and module twins: {}", docs.len());
        for doc in &docs {
            for field in [
                "deviceId",
                "etag",
                "status",
                "connectionState",
                "lastActivityTime",
                "version",
                "tags",
            ] {
                assert!(doc.get(field).is_some(), "{field} missing in {doc}");
            }
            for section in ["desired", "reported"] {
                let section = &doc["properties"][section];
                assert!(section.get("$version").is_some(), "{doc}");
                assert!(section.get("$metadata").is_some(), "{doc}");
            }
            if let Some(module) = doc.get("moduleId") {
                assert!(module.as_str().is_some_and(|m| !m.is_empty()));
                assert!(doc.get("deviceEtag").is_some());
            } else {
                assert!(doc.get("capabilities").is_some());
            }
        }
    }

    #[test]
    fn as_of_an_event_is_a_prefix_of_the_stream() {
        let full = options(40, 4000);
        let early = documents(&full, Some(500));
        assert_eq!(early, documents(&options(40, 500), None));
        assert_ne!(early, documents(&full, None));
    }

    #[test]
    fn both_layouts_hold_the_same_documents() {
        let opts = options(20, 800);
        let mut array = Vec::new();
        let stats =
            write_twin_documents(&opts, None, DocumentsLayout::Array, &mut array).expect("array");
        let mut lines = Vec::new();
        write_twin_documents(&opts, None, DocumentsLayout::Lines, &mut lines).expect("lines");
        let from_array: Vec<serde_json::Value> = serde_json::from_slice(&array).expect("array");
        let from_lines: Vec<serde_json::Value> = lines
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("line"))
            .collect();
        assert_eq!(from_array, from_lines);
        assert_eq!(
            from_array.len() as u64,
            stats.device_twins + stats.module_twins
        );
        assert_eq!(stats.as_of_event, 800);
        let mut empty = Vec::new();
        write_twin_documents(&options(0, 10), None, DocumentsLayout::Array, &mut empty)
            .expect("empty");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&empty).expect("json"),
            serde_json::json!([])
        );
    }
}
