//! The generator's JSON writer: members in the order given, straight into bytes.
//!
//! Bodies are written field by field as the fleet model is walked, so that they come out in
//! IoT Hub's member order and byte for byte the same from run to run, with no document built
//! in between (`serde_json::Value` would sort the keys and allocate a tree per body). Numbers
//! come from `itoa`, instants from [`crate::time::Ticks`]; only the structure and the string
//! escapes (every control byte as `\u00XX`, the bytes the generator has always written) are
//! written here.

use std::io::Write as _;

use crate::time::Ticks;

/// Tick 0 stands for "never set" in the fleet model ...
pub(super) const NEVER: Ticks = Ticks(0);
/// ... and is written as IoT Hub writes a time that was never set (.NET's `DateTime.MinValue`,
/// with no fraction).
const NEVER_TEXT: &str = "0001-01-01T00:00:00Z";

/// Appends `ticks` as IoT Hub writes times, `YYYY-MM-DDTHH:MM:SS.fffffffZ`, or [`NEVER`] as
/// `0001-01-01T00:00:00Z`.
pub(super) fn push_time(out: &mut Vec<u8>, ticks: Ticks) {
    if ticks == NEVER {
        out.extend_from_slice(NEVER_TEXT.as_bytes());
    } else {
        // Writing into a vector cannot fail.
        let _ = write!(out, "{ticks}");
    }
}

/// `ticks` as [`push_time`] writes it.
pub(super) fn format_time(ticks: Ticks) -> String {
    if ticks == NEVER {
        NEVER_TEXT.to_owned()
    } else {
        ticks.to_string()
    }
}

/// Appends `text` as a JSON string literal.
pub(super) fn push_json_string(out: &mut Vec<u8>, text: &str) {
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
pub(super) struct JsonWriter {
    out: Vec<u8>,
    /// No member or element has been written yet in the innermost open object or array.
    first: bool,
    /// A key was just written, so the next value needs no separator.
    after_key: bool,
}

impl JsonWriter {
    pub(super) fn new() -> Self {
        JsonWriter {
            out: Vec::with_capacity(1024),
            first: true,
            after_key: false,
        }
    }

    pub(super) fn finish(self) -> Vec<u8> {
        self.out
    }

    fn separate(&mut self) {
        if self.after_key {
            self.after_key = false;
        } else if !self.first {
            self.out.push(b',');
        }
    }

    pub(super) fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        push_json_string(&mut self.out, key);
        self.out.push(b':');
        self.after_key = true;
    }

    pub(super) fn begin_object(&mut self) {
        self.separate();
        self.out.push(b'{');
        self.first = true;
    }

    pub(super) fn end_object(&mut self) {
        self.out.push(b'}');
        self.first = false;
    }

    pub(super) fn begin_array(&mut self) {
        self.separate();
        self.out.push(b'[');
        self.first = true;
    }

    pub(super) fn end_array(&mut self) {
        self.out.push(b']');
        self.first = false;
    }

    pub(super) fn string(&mut self, text: &str) {
        self.separate();
        push_json_string(&mut self.out, text);
        self.first = false;
    }

    pub(super) fn unsigned(&mut self, value: u64) {
        self.separate();
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self.first = false;
    }

    pub(super) fn integer(&mut self, value: i64) {
        self.separate();
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self.first = false;
    }

    pub(super) fn boolean(&mut self, value: bool) {
        self.separate();
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
        self.first = false;
    }

    pub(super) fn null(&mut self) {
        self.separate();
        self.out.extend_from_slice(b"null");
        self.first = false;
    }

    /// Writes JSON text that the caller vouches for (a number such as `7.5`, an object
    /// written by another writer).
    pub(super) fn raw(&mut self, json: &[u8]) {
        self.separate();
        self.out.extend_from_slice(json);
        self.first = false;
    }

    pub(super) fn time(&mut self, ticks: Ticks) {
        self.separate();
        self.out.push(b'"');
        push_time(&mut self.out, ticks);
        self.out.push(b'"');
        self.first = false;
    }

    /// `"$lastUpdated": t` and, for desired metadata, `"$lastUpdatedVersion": v`.
    pub(super) fn stamp(&mut self, at: Ticks, version: Option<u32>) {
        self.key("$lastUpdated");
        self.time(at);
        if let Some(version) = version {
            self.key("$lastUpdatedVersion");
            self.unsigned(u64::from(version));
        }
    }
}
