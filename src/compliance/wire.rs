//! The one wire type of an alert: the CloudEvent (JSON, CloudEvents 1.0) that
//! [`super::cloud_event`] renders and every sink, the latency metric and the tests read back.
//! Reading alerts through this type (rather than through `serde_json::Value` lookups in each
//! place) keeps every reader in step with the renderer: a renamed field fails here, in one
//! place, instead of silently reading `null` in another. It lives in the sans-IO core, beside
//! its renderer, so that `alert` (above) and the core share it without an upward arrow.
//!
//! The fields of both structs are declared in the byte order of their JSON names: alerts have
//! always been written as `serde_json::Value` objects, whose keys come out sorted, and a struct
//! serializes in declaration order, so this order keeps every alert byte for byte as it was
//! (`compliance`'s tests compare the two).

use serde::{Deserialize, Serialize};

/// The `type` of an alert that opens a violation.
pub const OPENED_TYPE: &str = "io.twinwatch.violation.opened";
/// The `type` of an alert that resolves one (the rule passes again, or the twin was deleted).
pub const RESOLVED_TYPE: &str = "io.twinwatch.violation.resolved";

/// A twinwatch alert as a CloudEvent. Fields in the byte order of their names (see above).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub data: ViolationData,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// Extension attribute: when the causing event reached the Event Hub (absent for alerts
    /// that no event caused, such as a restart's re-send of the open violations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueuedtime: Option<String>,
    /// Unique per alert; a re-delivery (at-least-once) carries the same id.
    pub id: String,
    /// `/iothub/<hub>`.
    pub source: String,
    pub specversion: String,
    /// `<deviceId>` or `<deviceId>/modules/<moduleId>`.
    pub subject: String,
    /// When the violation opened or resolved (RFC 3339, UTC, seven fraction digits).
    pub time: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// The `data` of an alert. Fields in the byte order of their (camelCase) names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViolationData {
    pub device_id: String,
    pub hub_name: String,
    /// Only for module twins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    /// `deleted` when the twin's deletion resolved the violation, `policy` for a re-audit's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub rule_id: String,
    pub severity: String,
    pub title: String,
    pub twin_version: i64,
}

/// What an alert says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertChange {
    Opened,
    Resolved,
    /// Resolved because the twin was deleted.
    Deleted,
}

impl CloudEvent {
    /// Reads an alert (one JSON object).
    pub fn parse(bytes: &[u8]) -> Result<CloudEvent, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Reads a webhook request body: one alert (structured mode) or a JSON array of them
    /// (batched mode, `application/cloudevents-batch+json`).
    pub fn parse_body(bytes: &[u8]) -> Result<Vec<CloudEvent>, serde_json::Error> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'[') {
            serde_json::from_slice(bytes)
        } else {
            Ok(vec![CloudEvent::parse(bytes)?])
        }
    }

    /// `None` for a type twinwatch does not write.
    pub fn change(&self) -> Option<AlertChange> {
        match self.kind.as_str() {
            OPENED_TYPE => Some(AlertChange::Opened),
            RESOLVED_TYPE if self.data.reason.as_deref() == Some(super::REASON_DELETED) => {
                Some(AlertChange::Deleted)
            }
            RESOLVED_TYPE => Some(AlertChange::Resolved),
            _ => None,
        }
    }
}

/// Just the id of an alert, for callers that need nothing else (dead letters of alerts that
/// are not whole CloudEvents still get theirs).
#[derive(Deserialize)]
pub struct AlertId {
    pub id: String,
}

/// Just the extension attribute the latency metric reads.
#[derive(Deserialize)]
pub struct AlertEnqueued {
    #[serde(default)]
    pub enqueuedtime: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compliance::{cloud_event, AlertKind, Transition};
    use crate::model::TwinKey;
    use crate::policy::Severity;
    use crate::time::Ticks;

    /// The renderer's output reads back through the wire type, field for field, and writes
    /// back to the same JSON.
    #[test]
    fn the_renderers_events_read_back_through_the_wire_type() {
        for (kind, module) in [
            (AlertKind::Opened, ""),
            (AlertKind::Resolved, "azureiotsecurity"),
            (AlertKind::Deleted, ""),
        ] {
            let transition = Transition {
                kind,
                rule_id: "tls-required".into(),
                severity: Severity::High,
                title: "TLS must be required".into(),
                reason: (kind == AlertKind::Deleted).then_some(crate::compliance::REASON_DELETED),
                twin_version: None,
            };
            let key = TwinKey {
                hub: "hub-1",
                device_id: "dev-1",
                module_id: module,
            };
            let bytes = cloud_event(
                "src#1.0",
                key,
                &transition,
                Ticks(638_000_000_000_000_000),
                7,
                Some(Ticks(638_000_000_000_000_001)),
            );
            let event = CloudEvent::parse(&bytes).expect("a CloudEvent");
            assert_eq!(event.id, "src#1.0");
            assert_eq!(event.subject.contains("/modules/"), !module.is_empty());
            assert_eq!(event.data.module_id.is_some(), !module.is_empty());
            assert_eq!(event.data.rule_id, "tls-required");
            assert_eq!(event.data.twin_version, 7);
            assert!(event.enqueuedtime.is_some());
            let expected = match kind {
                AlertKind::Opened => AlertChange::Opened,
                AlertKind::Resolved => AlertChange::Resolved,
                AlertKind::Deleted => AlertChange::Deleted,
            };
            assert_eq!(event.change(), Some(expected));
            let again: serde_json::Value = serde_json::to_value(&event).expect("serializes");
            let original: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            assert_eq!(again, original);
        }
    }

    #[test]
    fn bodies_of_either_mode_read_back() {
        let one = br#"{"specversion":"1.0","id":"a","type":"io.twinwatch.violation.opened","source":"/iothub/h","subject":"d","time":"t","data":{"hubName":"h","deviceId":"d","ruleId":"r","title":"T","severity":"low","twinVersion":1}}"#;
        let batch = [&b" ["[..], one, b",", one, b"]"].concat();
        assert_eq!(CloudEvent::parse_body(one).expect("one").len(), 1);
        assert_eq!(CloudEvent::parse_body(&batch).expect("two").len(), 2);
        assert!(CloudEvent::parse_body(b"[{}]").is_err());
    }
}
