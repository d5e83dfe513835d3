//! The generated fleet's twins as IoT Hub's twin query returns them (`SELECT * FROM devices`
//! and `SELECT * FROM devices.modules`; reference `iothub-query.md`): what a seed pass reads
//! (`SEMANTICS.md` §7), and what the emulator's query endpoint serves.
//!
//! The documents are those of the fleet model after a number of messages of the stream, so a
//! seed as of event N and the stream's messages from N on describe the same fleet. Each
//! carries what the query returns: `deviceId`, `moduleId` (module twins), `etag`,
//! `deviceEtag` (module twins), `status`, `statusUpdateTime`, `connectionState`,
//! `lastActivityTime`, `cloudToDeviceMessageCount`, `authenticationType`, `x509Thumbprint`,
//! `modelId`, `version`, `tags`, and `properties.desired` / `properties.reported` with their
//! `$metadata` and `$version` as the stream's bodies carry them; device twins also
//! `capabilities` (and `deviceScope` on edge devices). `tags`, `properties` and `version`
//! are exactly what applying the stream up to that point gives; the identity fields are
//! plausible values, not a model (nothing in the stream says when a device last connected).
//!
//! Order: device by device in onboarding order, each device twin followed by its module twins
//! (`azureiotsecurity`, then `DefenderIotMicroAgent`). Deleted twins are absent.

use std::io::{self, Write};

use crate::generate::{
    etag, format_time, full_twin_body, messages, Device, GenerateOptions, ModuleSlot, TwinSlot,
    NEVER, NEVER_TEXT,
};

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
    /// Messages of the stream the fleet was taken after.
    pub as_of_event: u64,
    pub device_twins: u64,
    pub module_twins: u64,
}

/// Calls `each` with every live twin of the fleet after the first `as_of_event` messages of
/// `opts`' stream (all of them when `None`), as a query document (compact JSON), and whether
/// it is a module twin. Returns how many messages were taken.
pub fn twin_documents(
    opts: &GenerateOptions,
    as_of_event: Option<u64>,
    mut each: impl FnMut(&[u8], bool),
) -> u64 {
    let take = as_of_event.map_or(opts.events, |n| n.min(opts.events));
    let mut stream = messages(opts);
    for _ in 0..take {
        if stream.next().is_none() {
            break;
        }
    }
    for index in 0..stream.fleet.len() {
        let device = &stream.fleet[index];
        if !device.core.live {
            continue;
        }
        let device_id = stream.device_id(index);
        each(&document(device, &device_id, TwinSlot::Device), false);
        for module in [ModuleSlot::SecurityAgent, ModuleSlot::MicroAgent] {
            if device.module_live(module) {
                each(
                    &document(device, &device_id, TwinSlot::Module(module)),
                    true,
                );
            }
        }
    }
    take
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

/// One twin as the query returns it: the whole-twin body the stream's lifecycle and replace
/// notifications carry, plus the identity fields only the query shows.
fn document(device: &Device, device_id: &str, slot: TwinSlot) -> Vec<u8> {
    let body = full_twin_body(device, device_id, slot, slot == TwinSlot::Device);
    // The generator writes valid JSON objects; a failure here is a bug in the generator.
    let mut value: serde_json::Value =
        serde_json::from_slice(&body).expect("the generator writes whole twins as JSON");
    let core = device.core(slot);
    let last_activity = if core.reported_at == NEVER {
        NEVER_TEXT.to_string()
    } else {
        format_time(core.reported_at)
    };
    if let Some(object) = value.as_object_mut() {
        let mut set = |key: &str, v: serde_json::Value| {
            object.entry(key.to_string()).or_insert(v);
        };
        if let TwinSlot::Module(_) = slot {
            set("deviceEtag", etag(u64::from(device.incarnation)).into());
        }
        set("status", "enabled".into());
        set("statusUpdateTime", NEVER_TEXT.into());
        set(
            "connectionState",
            if core.reported_at == NEVER {
                "Disconnected"
            } else {
                "Connected"
            }
            .into(),
        );
        set("lastActivityTime", last_activity.into());
        set("cloudToDeviceMessageCount", 0.into());
        set("authenticationType", "sas".into());
        set(
            "x509Thumbprint",
            serde_json::json!({"primaryThumbprint": null, "secondaryThumbprint": null}),
        );
        set("modelId", "".into());
        set("tags", serde_json::json!({}));
    }
    serde_json::to_vec(&value).expect("a JSON value serialises")
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
