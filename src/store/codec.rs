//! The stored form of every record the store keeps: twins (a binary header and the value
//! codec's document), tombstones, checkpoints, dead letters, outbox entries and violations.
//! Records are encoded and decoded only here; [`super::Store`] reads and writes them.

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::{OwnedTwinKey, Pending, Severity, Violation};
use crate::time::Ticks;
use crate::value::Map;

/// A source's position, committed with the state it produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The index of the next record to read: record index in a file, or the last applied
    /// sequence number plus one in a partition.
    pub next_index: u64,
    /// Files: the byte offset where the next record starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_offset: Option<u64>,
    /// Partitions: the opaque offset of the last applied event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
}

/// A twin as stored.
#[derive(Debug)]
pub struct TwinRecord {
    pub version: i64,
    pub created_at: Option<Ticks>,
    /// The opTime of the last change (the epoch for a twin written before it was recorded).
    pub last_change: Ticks,
    pub doc: Map,
}

/// The header's flags byte: bit 0, `createdAt` is set; bit 1, the last change follows it.
/// Records written before the last change was kept have only bit 0 and a 17-byte header.
const FLAG_CREATED: u8 = 1;
const FLAG_LAST_CHANGE: u8 = 2;

/// Encodes a twin record: version, flags, `createdAt`, the last change, then the document.
pub fn encode_twin(
    version: i64,
    created_at: Option<Ticks>,
    last_change: Ticks,
    doc: &Map,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&version.to_le_bytes());
    let created_flag = if created_at.is_some() {
        FLAG_CREATED
    } else {
        0
    };
    out.push(created_flag | FLAG_LAST_CHANGE);
    out.extend_from_slice(&created_at.unwrap_or_default().0.to_le_bytes());
    out.extend_from_slice(&last_change.0.to_le_bytes());
    doc.encode(out);
}

/// The header of an encoded twin: version, `createdAt`, last change, and where the document
/// starts.
pub(super) fn twin_header(bytes: &[u8]) -> Result<(i64, Option<Ticks>, Ticks, usize), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "twin",
        detail: format!("{} bytes, shorter than its header", bytes.len()),
    };
    let word = |at: usize| -> Result<i64, StoreError> {
        let raw = bytes.get(at..at + 8).ok_or_else(corrupt)?;
        Ok(i64::from_le_bytes(raw.try_into().map_err(|_| corrupt())?))
    };
    let version = word(0)?;
    let flags = *bytes.get(8).ok_or_else(corrupt)?;
    let created = word(9)?;
    let created_at = (flags & FLAG_CREATED != 0).then_some(Ticks(created));
    if flags & FLAG_LAST_CHANGE != 0 {
        Ok((version, created_at, Ticks(word(17)?), 25))
    } else {
        Ok((version, created_at, Ticks(0), 17))
    }
}

pub fn decode_twin(bytes: &[u8]) -> Result<TwinRecord, StoreError> {
    let (version, created_at, last_change, start) = twin_header(bytes)?;
    Ok(TwinRecord {
        version,
        created_at,
        last_change,
        doc: Map::decode(&bytes[start..])?,
    })
}

/// Just the document of an encoded twin.
pub fn decode_twin_doc(bytes: &[u8]) -> Result<Map, StoreError> {
    let (_, _, _, start) = twin_header(bytes)?;
    Ok(Map::decode(&bytes[start..])?)
}

pub(super) fn encode_tombstone(version: i64, deleted_at: Ticks) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&version.to_le_bytes());
    out[8..].copy_from_slice(&deleted_at.0.to_le_bytes());
    out
}

pub(super) fn decode_tombstone(bytes: &[u8]) -> Result<(i64, Ticks), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "tombstone",
        detail: format!("{} bytes, not 16", bytes.len()),
    };
    let raw: [u8; 16] = bytes.try_into().map_err(|_| corrupt())?;
    let version = i64::from_le_bytes(raw[..8].try_into().map_err(|_| corrupt())?);
    let deleted_at = i64::from_le_bytes(raw[8..].try_into().map_err(|_| corrupt())?);
    Ok((version, Ticks(deleted_at)))
}

/// A stored violation, decoded: its twin and the violation (whose `rule_id` is the rule of
/// its key). What [`super::Store::violations`] and its kin yield, so that no caller decodes
/// bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredViolation {
    pub key: OwnedTwinKey,
    pub violation: Violation,
}

/// A twin and its violations, by rule id.
pub type TwinAndViolations = (TwinRecord, Vec<Violation>);

/// Stored form of a [`Violation`] (the values of the `violations` column family, and of
/// `pending` for a pending one, which also records its deadline and alert id): a JSON object
/// with its keys in byte order, the form stored records have always had.
pub(super) fn encode_violation(v: &Violation) -> Vec<u8> {
    /// The fields in the order of their names' bytes (as a `serde_json::Value` object writes
    /// them), written without building a value first.
    #[derive(serde::Serialize)]
    struct Stored<'a> {
        #[serde(rename = "alertId", skip_serializing_if = "Option::is_none")]
        alert_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        deadline: Option<i64>,
        severity: &'a str,
        since: i64,
        title: &'a str,
        #[serde(rename = "twinVersion")]
        twin_version: i64,
    }
    let stored = Stored {
        alert_id: v.pending.as_ref().map(|p| &*p.alert_id),
        deadline: v.pending.as_ref().map(|p| p.deadline.0),
        severity: v.severity.as_str(),
        since: v.since.0,
        title: &v.title,
        twin_version: v.twin_version,
    };
    serde_json::to_vec(&stored).expect("plain fields always serialize")
}

/// Reads a [`encode_violation`] value back (`None`: not one).
pub(super) fn decode_violation(rule_id: &str, bytes: &[u8]) -> Option<Violation> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let pending = match (v.get("deadline"), v.get("alertId")) {
        (Some(deadline), Some(id)) => Some(Pending {
            deadline: Ticks(deadline.as_i64()?),
            alert_id: id.as_str()?.into(),
        }),
        _ => None,
    };
    Some(Violation {
        rule_id: rule_id.into(),
        severity: Severity::parse(v["severity"].as_str()?)?,
        title: v["title"].as_str()?.into(),
        since: Ticks(v["since"].as_i64()?),
        twin_version: v["twinVersion"].as_i64()?,
        pending,
    })
}

/// [`decode_violation`], with a value that does not decode a corrupt record, named by its twin
/// and rule.
pub(super) fn read_violation(
    key: &dyn std::fmt::Display,
    rule_id: &str,
    bytes: &[u8],
) -> Result<Violation, StoreError> {
    decode_violation(rule_id, bytes).ok_or_else(|| StoreError::Corrupt {
        what: "violation",
        detail: format!("{key} {rule_id}"),
    })
}

/// The dead-letter reason of events that expired from a partition's retention before they
/// were read (see [`super::Store::put_expired`]).
pub const EXPIRED_REASON: &str = "expired";

/// A dead letter as stored.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub reason: String,
    /// The raw record: the JSON line, or the message body.
    #[serde(with = "base64_bytes")]
    pub raw: Vec<u8>,
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// The first bytes of an outbox value that carries its commit time: a NUL (no alert, a JSON
/// object, starts with one) and a version. Values without it (written before the time was
/// recorded) are the alert alone.
pub(super) const OUTBOX_HEADER: [u8; 2] = [0x00, 0x01];

/// An outbox entry as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: u64,
    /// When it was committed, Unix milliseconds (`None`: written by an older twinwatch).
    pub committed_ms: Option<u64>,
    /// The alert, a CloudEvent in JSON.
    pub alert: Vec<u8>,
}

impl OutboxEntry {
    pub(super) fn decode(seq: u64, value: &[u8]) -> OutboxEntry {
        match value.strip_prefix(&OUTBOX_HEADER[..]) {
            Some(rest) if rest.len() >= 8 => {
                let (time, alert) = rest.split_at(8);
                let mut raw = [0u8; 8];
                raw.copy_from_slice(time);
                OutboxEntry {
                    seq,
                    committed_ms: Some(u64::from_be_bytes(raw)),
                    alert: alert.to_vec(),
                }
            }
            _ => OutboxEntry {
                seq,
                committed_ms: None,
                alert: value.to_vec(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stored_violations_keep_their_form() {
        // The form records were written in before: a JSON value's object, keys sorted.
        fn as_before(v: &super::Violation) -> Vec<u8> {
            let mut value = serde_json::json!({
                "severity": v.severity.as_str(),
                "title": &*v.title,
                "since": v.since.0,
                "twinVersion": v.twin_version,
            });
            if let Some(pending) = &v.pending {
                value["deadline"] = serde_json::json!(pending.deadline.0);
                value["alertId"] = serde_json::json!(&*pending.alert_id);
            }
            serde_json::to_vec(&value).expect("serializes")
        }
        let mut v = super::Violation {
            rule_id: "r".into(),
            severity: crate::policy::Severity::High,
            title: "A \"quoted\" title \u{e9}\n".into(),
            since: crate::time::Ticks(-5),
            twin_version: i64::MAX,
            pending: None,
        };
        assert_eq!(super::encode_violation(&v), as_before(&v));
        v.pending = Some(super::Pending {
            deadline: crate::time::Ticks(638_000_000_000_000_000),
            alert_id: "data/a#1/r%2F".into(),
        });
        assert_eq!(super::encode_violation(&v), as_before(&v));
        let decoded = super::decode_violation("r", &super::encode_violation(&v)).expect("decodes");
        assert_eq!(decoded, v);
    }

    /// A value that is not a stored violation is a corrupt record naming its twin and rule,
    /// never a panic or a made-up violation.
    #[test]
    fn a_violation_that_does_not_decode_is_corrupt() {
        for bytes in [
            &b""[..],
            b"not json",
            b"[]",
            b"{}",
            br#"{"severity":"dire","since":1,"title":"t","twinVersion":1}"#,
            br#"{"severity":"low","since":"1","title":"t","twinVersion":1}"#,
            br#"{"deadline":"x","alertId":"a","severity":"low","since":1,"title":"t","twinVersion":1}"#,
        ] {
            match super::read_violation(&"hub/dev", "r", bytes) {
                Err(super::StoreError::Corrupt { what, detail }) => {
                    assert_eq!((what, detail.as_str()), ("violation", "hub/dev r"));
                }
                other => panic!("{:?} read as {other:?}", String::from_utf8_lossy(bytes)),
            }
        }
        let good = br#"{"severity":"low","since":1,"title":"t","twinVersion":2}"#;
        let v = super::read_violation(&"hub/dev", "r", good).expect("a violation");
        assert_eq!((&*v.rule_id, v.twin_version, v.pending), ("r", 2, None));
    }
}
