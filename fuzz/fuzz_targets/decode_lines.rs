//! Decoding: each input is storage-route JSON lines (system and application properties, the
//! body inline or base64), taken through the path the engine takes: parse the line, read the
//! message's properties, classify, parse and check the body, apply the event to a snapshot,
//! then evaluate the baseline policy on every twin and export it. Every time parser is reached:
//! `operationTimestamp` (strict) and the IoT Hub enqueued time through decoding, and the Event
//! Hubs enqueued time (`EnqueuedTimeUtc`) as the engine reads it when a sink is configured.
//! Any panic is a defect: bad input must end as an ignore or a dead letter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinwatch::decode::{decode_body, decode_header, Body, BodyParser, Message, Prop};
use twinwatch::policy::{Policy, TwinView};
use twinwatch::source::storage_json::StorageJsonMessage;
use twinwatch::twin::{apply, export_value, MemoryTwins, Slot};

/// IoT Hub's largest message: bigger bodies are dead letters before parsing.
const MAX_BODY: usize = 256 * 1024;

/// Compiled once: compiling the baseline's regexes per input would be most of the time.
static BASELINE: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let policy = BASELINE.get_or_init(Policy::baseline);
    let mut twins = MemoryTwins::default();
    let mut body_parser = BodyParser::default();
    let mut buffers = simd_json::Buffers::with_max_depth(4096, usize::MAX >> 8);
    for line in data.split(|&b| b == b'\n') {
        let mut bytes = line.to_vec();
        bytes.resize(line.len() + simd_json::INPUT_PADDING, 0);
        let mut tape = simd_json::Tape::null().reset();
        if simd_json::fill_tape_padded(&mut bytes, line.len(), &mut buffers, &mut tape).is_err() {
            continue;
        }
        let Some(message) = StorageJsonMessage::new(&tape.0, line.len()) else {
            continue;
        };
        // What the engine reads for an alert's `enqueuedtime` when a sink is configured, and
        // the enqueued time decoding falls back to, whether or not decoding gets that far.
        let _ = message.eventhubs_enqueued_time().and_then(Prop::time);
        let _ = message
            .system_property("iothub-enqueuedtime", "enqueuedTime")
            .and_then(Prop::time);
        let Ok(header) = decode_header(&message, MAX_BODY) else {
            continue;
        };
        let parsed;
        let body = match header.body {
            Body::Tape(nodes) => nodes,
            Body::Absent => &[],
            other => {
                parsed = body_parser.parse(other, None);
                parsed.as_ref().map_or(&[][..], |tape| &tape.0[..])
            }
        };
        if let Ok(event) = decode_body(&header, body) {
            let Ok(_) = apply(&event, &mut twins);
        }
    }
    let mut failing = Vec::new();
    for (key, doc) in &twins.docs {
        let Some(Slot::Live { version, .. }) = twins.slots.get(key) else {
            continue;
        };
        let view = TwinView {
            hub_name: &key.hub,
            device_id: &key.device_id,
            module_id: &key.module_id,
            version: *version,
            doc,
            modules: &[],
        };
        failing.clear();
        policy.evaluate(&view, &mut failing);
        let _ = export_value(key.as_key(), *version, doc).to_string();
    }
});
