//! Column family names and key encodings: the one place that knows how keys are laid out.
//!
//! Twin keys use an order-preserving tuple encoding: each component's bytes with `0x00`
//! escaped as `0x00 0xFF`, then the terminator `0x00 0x01`. Byte order of encoded keys is
//! then the order of `(hub, deviceId, moduleId)` as byte strings (the export order), a device
//! twin (`moduleId = ""`) sorts right before its modules, and `(hub, deviceId)` is a prefix of
//! all of a device's twins.

use crate::model::{OwnedTwinKey, TwinKey};

pub const CF_TWINS: &str = "twins";
pub const CF_TOMBSTONES: &str = "tombstones";
pub const CF_CHECKPOINTS: &str = "checkpoints";
pub const CF_DEAD_LETTERS: &str = "deadletters";
pub const CF_META: &str = "meta";

pub const CF_VIOLATIONS: &str = "violations";
pub const CF_OUTBOX: &str = "outbox";
/// Alerts a sink refused for good (a 4xx other than 408 and 429), set aside so that delivery
/// goes on: keyed by outbox sequence number, then sink name.
pub const CF_ALERT_DEAD_LETTERS: &str = "alert_deadletters";

/// The twins a seed pass applied (or whose module set it changed) and has not yet evaluated:
/// encoded twin key → nothing (`docs/semantics.md` §7: evaluation at the end of the pass,
/// resumable).
pub const CF_SEED_TOUCHED: &str = "seed_touched";

/// Pending violations (`docs/semantics.md` §9): the same keys as [`CF_VIOLATIONS`].
pub const CF_PENDING: &str = "pending";

pub const ALL_CFS: [&str; 10] = [
    CF_TWINS,
    CF_TOMBSTONES,
    CF_CHECKPOINTS,
    CF_DEAD_LETTERS,
    CF_META,
    CF_VIOLATIONS,
    CF_OUTBOX,
    CF_SEED_TOUCHED,
    CF_PENDING,
    CF_ALERT_DEAD_LETTERS,
];

/// Key of the data format marker in [`CF_META`].
pub const META_FORMAT: &[u8] = b"format";

/// Key in [`CF_META`] of the next outbox sequence number: written with every batch that
/// queues alerts, so that numbers are never reused even after the outbox was emptied.
pub const META_OUTBOX_NEXT: &[u8] = b"outbox_next";

/// Key in [`CF_META`] of the fingerprint of the policy the violations were computed with
/// (`docs/semantics.md` §8).
pub const META_POLICY_FINGERPRINT: &[u8] = b"policy_fingerprint";

/// Key in [`CF_META`] of an unfinished re-audit's progress (its policy's fingerprint and the
/// last twin key it covered).
pub const META_REAUDIT_PROGRESS: &[u8] = b"reaudit_progress";

/// Key in [`CF_META`] of the number of re-audits completed so far: part of re-audit alert ids,
/// so that a policy changed back and forth never repeats an id.
pub const META_REAUDITS_DONE: &[u8] = b"reaudits_done";

/// Key in [`CF_META`] of the snapshot's high-water mark: the greatest opTime applied so far.
pub const META_HIGH_WATER: &[u8] = b"high_water";

/// Prefix in [`CF_META`] of each seeded hub's latest complete pass's as-of time
/// (`seeded/<hub>`).
pub const META_SEEDED_PREFIX: &[u8] = b"seeded/";

/// Key in [`CF_META`] of the seed pass whose touched twins ([`CF_SEED_TOUCHED`]) are still to
/// be evaluated: its hub and as-of time.
pub const META_SEED_PASS: &[u8] = b"seed_pass";

/// Prefix of the keys in [`CF_META`] of each sink's delivery cursor (the next outbox sequence
/// number it has not accepted), followed by the sink's name.
pub const META_SINK_CURSOR: &[u8] = b"sink_cursor/";

/// Key in [`CF_META`] of a sink's delivery cursor.
pub fn sink_cursor_key(sink: &str) -> Vec<u8> {
    [META_SINK_CURSOR, sink.as_bytes()].concat()
}

/// Key of an alert dead letter: the outbox sequence number big-endian (delivery order), then
/// the sink's name.
pub fn alert_dead_letter_key(seq: u64, sink: &str) -> Vec<u8> {
    [&seq.to_be_bytes()[..], sink.as_bytes()].concat()
}

fn put_component(out: &mut Vec<u8>, component: &[u8]) {
    // Each 0x00 becomes 0x00 0xFF; the runs between are copied whole (ids rarely hold one).
    if !component.contains(&0) {
        out.extend_from_slice(component);
        out.extend_from_slice(&[0x00, 0x01]);
        return;
    }
    let mut runs = component.split(|&b| b == 0);
    if let Some(first) = runs.next() {
        out.extend_from_slice(first);
    }
    for run in runs {
        out.extend_from_slice(&[0x00, 0xFF]);
        out.extend_from_slice(run);
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// Appends the encoded twin key to `out`.
pub fn encode_twin_key(key: TwinKey<'_>, out: &mut Vec<u8>) {
    put_component(out, key.hub.as_bytes());
    put_component(out, key.device_id.as_bytes());
    put_component(out, key.module_id.as_bytes());
}

pub fn twin_key(key: TwinKey<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.hub.len() + key.device_id.len() + key.module_id.len() + 6);
    encode_twin_key(key, &mut out);
    out
}

/// Splits one component off the front of `bytes`.
fn take_component(bytes: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        match (bytes.get(i)?, bytes.get(i + 1)) {
            (0x00, Some(0x01)) => return Some((out, &bytes[i + 2..])),
            (0x00, Some(0xFF)) => {
                out.push(0);
                i += 2;
            }
            (0x00, _) => return None,
            (&b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
}

/// The length of the `(hub, deviceId)` prefix of an encoded twin key: every twin of that
/// device, and no other, starts with it. `None` when fewer than two components are whole.
pub fn device_prefix_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    for _ in 0..2 {
        loop {
            let zero = at + bytes.get(at..)?.iter().position(|&b| b == 0)?;
            match bytes.get(zero + 1)? {
                0x01 => {
                    at = zero + 2;
                    break;
                }
                0xFF => at = zero + 2,
                _ => return None,
            }
        }
    }
    Some(at)
}

/// Decodes a key written by [`encode_twin_key`].
pub fn decode_twin_key(bytes: &[u8]) -> Option<OwnedTwinKey> {
    let (hub, rest) = take_component(bytes)?;
    let (device_id, rest) = take_component(rest)?;
    let (module_id, rest) = take_component(rest)?;
    if !rest.is_empty() {
        return None;
    }
    Some(OwnedTwinKey {
        hub: String::from_utf8(hub).ok()?.into(),
        device_id: String::from_utf8(device_id).ok()?.into(),
        module_id: String::from_utf8(module_id).ok()?.into(),
    })
}

/// Key of a violation: the twin's key, then the rule id (ids never hold `0x00`), so
/// violations list by twin, then rule id.
pub fn violation_key(twin_key: &[u8], rule_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(twin_key.len() + rule_id.len());
    out.extend_from_slice(twin_key);
    out.extend_from_slice(rule_id.as_bytes());
    out
}

/// Splits a violation key into the twin key and the rule id.
pub fn decode_violation_key(bytes: &[u8]) -> Option<(OwnedTwinKey, String)> {
    let (hub, rest) = take_component(bytes)?;
    let (device_id, rest) = take_component(rest)?;
    let (module_id, rest) = take_component(rest)?;
    Some((
        OwnedTwinKey {
            hub: String::from_utf8(hub).ok()?.into(),
            device_id: String::from_utf8(device_id).ok()?.into(),
            module_id: String::from_utf8(module_id).ok()?.into(),
        },
        String::from_utf8(rest.to_vec()).ok()?,
    ))
}

/// Key of an outbox entry: its sequence number, big-endian (delivery order).
pub fn outbox_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Key of a dead letter: the source's text form, then the record index big-endian, so dead
/// letters list in source and position order.
pub fn dead_letter_key(source: &str, index: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(source.len() + 10);
    put_component(&mut out, source.as_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out
}

pub fn decode_dead_letter_key(bytes: &[u8]) -> Option<(String, u64)> {
    let (source, rest) = take_component(bytes)?;
    let index = u64::from_be_bytes(rest.try_into().ok()?);
    Some((String::from_utf8(source).ok()?, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(hub: &'a str, device_id: &'a str, module_id: &'a str) -> TwinKey<'a> {
        TwinKey {
            hub,
            device_id,
            module_id,
        }
    }

    #[test]
    fn encoding_preserves_tuple_order() {
        let mut keys = vec![
            key("h", "d", ""),
            key("h", "d", "m"),
            key("h", "d\0", ""),
            key("h", "d0", ""),
            key("h", "", "z"),
            key("h\0x", "a", ""),
            key("", "zz", ""),
            key("h", "d", "\0"),
            key("h", "da", "a"),
        ];
        let mut encoded: Vec<Vec<u8>> = keys.iter().map(|k| twin_key(*k)).collect();
        keys.sort();
        encoded.sort();
        let decoded: Vec<OwnedTwinKey> = encoded
            .iter()
            .map(|e| decode_twin_key(e).expect("decodes"))
            .collect();
        let expected: Vec<OwnedTwinKey> = keys.iter().map(|k| k.to_owned_key()).collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn the_device_prefix_is_shared_by_a_device_s_twins_only() {
        let cases = [key("h", "d", ""), key("h\0", "d\0x", "m"), key("", "", "")];
        for k in cases {
            let encoded = twin_key(k);
            let device = twin_key(k.device_twin());
            let n = device_prefix_len(&encoded).expect("a whole key");
            assert_eq!(Some(n), device_prefix_len(&device));
            assert_eq!(encoded[..n], device[..n]);
            // Another device of the same hub whose id extends this one's does not share it.
            let longer = format!("{}x", k.device_id);
            let other = twin_key(key(k.hub, &longer, k.module_id));
            assert!(!other.starts_with(&encoded[..n]));
        }
        assert_eq!(device_prefix_len(b"h\x00\x01d"), None);
        assert_eq!(device_prefix_len(b"h\x00\x02d\x00\x01"), None);
        assert_eq!(device_prefix_len(b""), None);
    }

    #[test]
    fn a_zero_byte_is_escaped_and_components_end_in_zero_one() {
        assert_eq!(
            twin_key(key("a\0b\0", "", "m")),
            b"a\x00\xFFb\x00\xFF\x00\x01\x00\x01m\x00\x01".to_vec()
        );
    }

    #[test]
    fn violation_keys_round_trip() {
        let twin = twin_key(key("h", "d", "m"));
        let k = violation_key(&twin, "asc.rule-1");
        assert_eq!(
            decode_violation_key(&k),
            Some((key("h", "d", "m").to_owned_key(), "asc.rule-1".into()))
        );
    }

    #[test]
    fn dead_letter_keys_round_trip() {
        let k = dead_letter_key("file:/a\0b", 7);
        assert_eq!(decode_dead_letter_key(&k), Some(("file:/a\0b".into(), 7)));
        assert!(dead_letter_key("s", 2) < dead_letter_key("s", 10));
    }
}
