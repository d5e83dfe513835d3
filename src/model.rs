//! The vocabulary every stage shares: twin keys, events, operations, dead-letter reasons,
//! source positions, and the violations the core computes and the store keeps (with their
//! severity).

use std::fmt;

use simd_json::Node;

use crate::time::Ticks;

/// A twin's identity: `(hub, deviceId, moduleId)`, case-sensitive; `module_id == ""` is the
/// device twin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TwinKey<'a> {
    pub hub: &'a str,
    pub device_id: &'a str,
    pub module_id: &'a str,
}

impl<'a> TwinKey<'a> {
    pub fn is_device_twin(&self) -> bool {
        self.module_id.is_empty()
    }

    /// The device twin of the same hub and device.
    pub fn device_twin(&self) -> TwinKey<'a> {
        TwinKey {
            module_id: "",
            ..*self
        }
    }

    pub fn to_owned_key(&self) -> OwnedTwinKey {
        OwnedTwinKey {
            hub: self.hub.into(),
            device_id: self.device_id.into(),
            module_id: self.module_id.into(),
        }
    }
}

impl fmt::Display for TwinKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_device_twin() {
            write!(f, "{}/{}", self.hub, self.device_id)
        } else {
            write!(
                f,
                "{}/{}/modules/{}",
                self.hub, self.device_id, self.module_id
            )
        }
    }
}

/// A [`TwinKey`] that owns its strings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnedTwinKey {
    pub hub: Box<str>,
    pub device_id: Box<str>,
    pub module_id: Box<str>,
}

impl OwnedTwinKey {
    pub fn as_key(&self) -> TwinKey<'_> {
        TwinKey {
            hub: &self.hub,
            device_id: &self.device_id,
            module_id: &self.module_id,
        }
    }
}

/// What the snapshot knows of a key without reading its document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The twin exists.
    Live {
        version: i64,
        created_at: Option<Ticks>,
        /// The opTime of the last event or document that changed it (`docs/semantics.md` §7's
        /// "last change"; the seed pass's as-of time for a document); the epoch for a twin
        /// stored before this was recorded.
        last_change: Ticks,
    },
    /// The twin was deleted: its tombstone.
    Dead { version: i64, deleted_at: Ticks },
}

/// What a twin event does (`docs/semantics.md` §1, `opType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    UpdateTwin,
    ReplaceTwin,
    /// `createDeviceIdentity` or `createModuleIdentity`: the module id alone says which twin.
    CreateIdentity,
    /// `deleteDeviceIdentity` or `deleteModuleIdentity`.
    DeleteIdentity,
}

/// One decoded twin-change or lifecycle notification, borrowing from the message it came from.
#[derive(Debug)]
pub struct TwinEvent<'a> {
    pub key: TwinKey<'a>,
    pub op: Op,
    pub op_time: Ticks,
    /// The body's top-level `version` (0 for a lifecycle body without one).
    pub version: i64,
    /// The body, an object, as simd-json tape nodes.
    pub body: &'a [Node<'a>],
}

/// A twin document of a seed pass (`docs/semantics.md` §7), decoded: its key (the pass's hub) and
/// version, and the document as tape nodes (an object).
#[derive(Debug)]
pub struct TwinDocument<'a> {
    pub key: TwinKey<'a>,
    pub version: i64,
    pub body: &'a [Node<'a>],
}

/// Why a message was dead-lettered. The names are part of the contract (`docs/semantics.md` §1),
/// except `bad_record`: a record that is not a message at all (a line that is not JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeadLetterReason {
    BodyTooLarge,
    MissingDeviceId,
    BadOpType,
    BadOperationTimestamp,
    BadBody,
    BadVersion,
    BadRecord,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 7] = [
        DeadLetterReason::BodyTooLarge,
        DeadLetterReason::MissingDeviceId,
        DeadLetterReason::BadOpType,
        DeadLetterReason::BadOperationTimestamp,
        DeadLetterReason::BadBody,
        DeadLetterReason::BadVersion,
        DeadLetterReason::BadRecord,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::BodyTooLarge => "body_too_large",
            DeadLetterReason::MissingDeviceId => "missing_device_id",
            DeadLetterReason::BadOpType => "bad_op_type",
            DeadLetterReason::BadOperationTimestamp => "bad_operation_timestamp",
            DeadLetterReason::BadBody => "bad_body",
            DeadLetterReason::BadVersion => "bad_version",
            DeadLetterReason::BadRecord => "bad_record",
        }
    }

    pub fn parse(s: &str) -> Option<DeadLetterReason> {
        DeadLetterReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message came from: the unit of checkpoints, dead-letter keys and alert ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SourceId {
    /// A captured file, by its canonical path.
    File(String),
    /// An Event Hub partition.
    Partition(String),
}

impl SourceId {
    /// A stable text form: `file:<path>` or `partition:<id>`.
    pub fn to_text(&self) -> String {
        match self {
            SourceId::File(path) => format!("file:{path}"),
            SourceId::Partition(id) => format!("partition:{id}"),
        }
    }

    pub fn from_text(s: &str) -> Option<SourceId> {
        if let Some(path) = s.strip_prefix("file:") {
            Some(SourceId::File(path.to_owned()))
        } else {
            s.strip_prefix("partition:")
                .map(|id| SourceId::Partition(id.to_owned()))
        }
    }
}

/// How much a failing rule matters (a policy rule's `severity`; ordered, least first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// The severity named exactly as [`Severity::as_str`] writes it.
    pub fn parse(name: &str) -> Option<Severity> {
        Some(match name {
            "info" => Severity::Info,
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule failing on a twin, as kept in memory and stored: what its `opened` alert said.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    pub rule_id: Box<str>,
    pub severity: Severity,
    pub title: Box<str>,
    /// The opTime of the event that opened it.
    pub since: Ticks,
    /// The twin's version after that event.
    pub twin_version: i64,
    /// Set while the rule's `for` has not yet run out (`docs/semantics.md` §9): the violation is
    /// pending, and no alert said anything of it yet.
    pub pending: Option<Pending>,
}

/// What a pending violation needs to open: when, and under which id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// `since` plus the rule's `for`.
    pub deadline: Ticks,
    /// The id its `opened` alert will carry: derived from the event that made it pending and
    /// the rule, so it is the same however and whenever the deadline is reached.
    pub alert_id: Box<str>,
}
