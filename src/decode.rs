//! Decoding: one message into a twin event, an ignore or a dead letter (`docs/semantics.md` §1).
//!
//! Pure: a [`Message`] is a read-only view of properties and body, whatever the container
//! (AMQP message, Avro record, storage-route JSON line); decoding looks up the few fields it
//! needs and parses the body at most once, into a simd-json tape.

use base64::Engine as _;
use simd_json::{Node, StaticNode};

use crate::model::{DeadLetterReason, Op, TwinDocument, TwinEvent, TwinKey};
use crate::time::Ticks;
use crate::value::{tape_find, tape_is_object, tape_is_well_formed};

/// IoT Hub's maximum message size, the default body limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 262_144;

/// Deeper bodies are dead letters (`bad_body`); the body object itself is level 1.
pub const MAX_BODY_DEPTH: usize = 64;

/// A property value as a container carries it.
#[derive(Clone, Copy, Debug)]
pub enum Prop<'a> {
    Str(&'a str),
    Bytes(&'a [u8]),
    /// An integer; for times, epoch milliseconds.
    Int(i64),
    Time(Ticks),
    /// Any other type (a float, a boolean, a nested value).
    Other,
}

impl<'a> Prop<'a> {
    /// The value as a non-empty string (bytes count when they are UTF-8).
    fn text(self) -> Option<&'a str> {
        match self {
            Prop::Str(s) if !s.is_empty() => Some(s),
            Prop::Bytes(b) if !b.is_empty() => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    fn is_empty(self) -> bool {
        matches!(self, Prop::Str("") | Prop::Bytes([]))
    }

    /// A transport time: an AMQP timestamp, epoch milliseconds, or an ISO 8601 string.
    pub fn time(self) -> Option<Ticks> {
        match self {
            Prop::Time(t) => Some(t),
            Prop::Int(ms) => Some(Ticks::from_unix_millis(ms)),
            Prop::Str(s) => Ticks::parse_lenient(s),
            Prop::Bytes(b) => std::str::from_utf8(b).ok().and_then(Ticks::parse_lenient),
            Prop::Other => None,
        }
    }
}

/// A message body as a container carries it.
#[derive(Clone, Copy, Debug)]
pub enum Body<'a> {
    /// Already parsed (the storage-route JSON encoding embeds the body).
    Tape(&'a [Node<'a>]),
    /// Raw bytes (an AMQP data section, an Avro `Body`).
    Bytes(&'a [u8]),
    /// The body's bytes in base64 (the JSON encoding of a body not declared JSON/UTF-8).
    Base64(&'a str),
    Absent,
}

/// A read-only view of one message.
pub trait Message<'a> {
    /// An application property (`hubName`, `opType`, ...).
    fn app_property(&self, name: &str) -> Option<Prop<'a>>;
    /// A system property: the annotation or AMQP property `name`, or in storage captures the
    /// key `storage_name` of `SystemProperties`.
    fn system_property(&self, name: &str, storage_name: &str) -> Option<Prop<'a>>;
    /// The Event Hubs enqueued time (`x-opt-enqueued-time`, captures' `EnqueuedTimeUtc`).
    fn eventhubs_enqueued_time(&self) -> Option<Prop<'a>>;
    /// The size the body limit applies to: the body's bytes, or the whole line in the JSON
    /// encoding.
    fn body_size(&self) -> usize;
    fn body(&self) -> Body<'a>;

    /// Whether the body's tape ([`Body::Tape`]) passed [`body_is_well_formed`], when the
    /// reader already checked it on its own thread (`None`: decoding checks it).
    fn body_verdict(&self) -> Option<bool> {
        None
    }
}

/// What a message turned out to be.
#[derive(Debug)]
pub enum Decoded<'a> {
    Event(TwinEvent<'a>),
    Ignored,
    DeadLetter(DeadLetterReason),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    TwinChange,
    Lifecycle,
}

fn classify<'a>(msg: &impl Message<'a>) -> Option<SourceKind> {
    if let Some(source) = msg.system_property("iothub-message-source", "iothub-message-source") {
        return match source {
            Prop::Str("twinChangeEvents") => Some(SourceKind::TwinChange),
            Prop::Str("deviceLifecycleEvents" | "moduleLifecycleEvents") => {
                Some(SourceKind::Lifecycle)
            }
            Prop::Bytes(b"twinChangeEvents") => Some(SourceKind::TwinChange),
            Prop::Bytes(b"deviceLifecycleEvents" | b"moduleLifecycleEvents") => {
                Some(SourceKind::Lifecycle)
            }
            _ => None,
        };
    }
    match msg.app_property("iothub-message-schema")?.text()? {
        "twinChangeNotification" => Some(SourceKind::TwinChange),
        "deviceLifecycleNotification" | "moduleLifecycleNotification" => {
            Some(SourceKind::Lifecycle)
        }
        _ => None,
    }
}

fn parse_op(kind: SourceKind, op: Option<Prop<'_>>) -> Option<Op> {
    let op = match op?.text()? {
        "updateTwin" => Op::UpdateTwin,
        "replaceTwin" => Op::ReplaceTwin,
        "createDeviceIdentity" | "createModuleIdentity" => Op::CreateIdentity,
        "deleteDeviceIdentity" | "deleteModuleIdentity" => Op::DeleteIdentity,
        _ => return None,
    };
    let twin_change = matches!(op, Op::UpdateTwin | Op::ReplaceTwin);
    (twin_change == (kind == SourceKind::TwinChange)).then_some(op)
}

/// The header of a twin event: everything but the body, which may need parsing first.
#[derive(Debug)]
pub struct Header<'a> {
    pub key: TwinKey<'a>,
    pub op: Op,
    pub op_time: Ticks,
    pub body: Body<'a>,
    /// [`Message::body_verdict`]: `body`'s tape already checked.
    pub body_verdict: Option<bool>,
}

/// The first decoding step: classification and every header check, in the contract's order
/// (`body_too_large`, `missing_device_id`, `bad_op_type`, `bad_operation_timestamp`).
pub fn decode_header<'a>(
    msg: &impl Message<'a>,
    max_body_bytes: usize,
) -> Result<Header<'a>, Decoded<'a>> {
    let Some(kind) = classify(msg) else {
        return Err(Decoded::Ignored);
    };
    let dead = |reason| Err(Decoded::DeadLetter(reason));
    if msg.body_size() > max_body_bytes {
        return dead(DeadLetterReason::BodyTooLarge);
    }
    let device_id = msg
        .app_property("deviceId")
        .and_then(Prop::text)
        .or_else(|| {
            msg.system_property("iothub-connection-device-id", "connectionDeviceId")
                .and_then(Prop::text)
        });
    let Some(device_id) = device_id else {
        return dead(DeadLetterReason::MissingDeviceId);
    };
    let Some(op) = parse_op(kind, msg.app_property("opType")) else {
        return dead(DeadLetterReason::BadOpType);
    };
    let op_time = match msg.app_property("operationTimestamp") {
        Some(p) if !p.is_empty() => match p {
            Prop::Str(s) => Ticks::parse_strict(s),
            Prop::Bytes(b) => std::str::from_utf8(b).ok().and_then(Ticks::parse_strict),
            _ => None,
        },
        _ => Some(fallback_time(msg)),
    };
    let Some(op_time) = op_time else {
        return dead(DeadLetterReason::BadOperationTimestamp);
    };
    let hub = msg
        .app_property("hubName")
        .and_then(Prop::text)
        .or_else(|| {
            msg.system_property("user-id", "userId")
                .and_then(Prop::text)
        })
        .unwrap_or("");
    let module_id = msg
        .app_property("moduleId")
        .and_then(Prop::text)
        .or_else(|| {
            msg.system_property("iothub-connection-module-id", "connectionModuleId")
                .and_then(Prop::text)
        })
        .unwrap_or("");
    Ok(Header {
        key: TwinKey {
            hub,
            device_id,
            module_id,
        },
        op,
        op_time,
        body: msg.body(),
        body_verdict: msg.body_verdict(),
    })
}

/// Without `operationTimestamp`: the IoT Hub enqueued time, else the Event Hubs one. A message
/// with neither (no real transport omits both) is placed at the Unix epoch.
fn fallback_time<'a>(msg: &impl Message<'a>) -> Ticks {
    msg.system_property("iothub-enqueuedtime", "enqueuedTime")
        .and_then(Prop::time)
        .or_else(|| msg.eventhubs_enqueued_time().and_then(Prop::time))
        .unwrap_or_default()
}

/// Whether a parsed body is an object, nested at most [`MAX_BODY_DEPTH`] deep, with no key
/// twice in any object (else `bad_body`). The costliest check of decoding, and one that
/// needs nothing but the tape: the replay reader runs it as it parses.
pub fn body_is_well_formed(body: &[Node<'_>]) -> bool {
    tape_is_object(body) && tape_is_well_formed(body, MAX_BODY_DEPTH)
}

/// The second step: the parsed body's checks (`bad_body`, `bad_version`).
pub fn decode_body<'a>(
    header: &Header<'a>,
    body: &'a [Node<'a>],
) -> Result<TwinEvent<'a>, DeadLetterReason> {
    // The reader's verdict holds for the header's own tape only (not a body parsed since).
    let verdict = match header.body {
        Body::Tape(nodes) if std::ptr::eq(nodes, body) => header.body_verdict,
        _ => None,
    };
    if !verdict.unwrap_or_else(|| body_is_well_formed(body)) {
        return Err(DeadLetterReason::BadBody);
    }
    if header.op == Op::UpdateTwin {
        let must_be_object = |nodes: Option<&[Node<'_>]>| nodes.is_none_or(tape_is_object);
        let properties = tape_find(body, "properties");
        let sections_ok = must_be_object(tape_find(body, "tags"))
            && must_be_object(properties)
            && properties.is_none_or(|p| {
                must_be_object(tape_find(p, "desired")) && must_be_object(tape_find(p, "reported"))
            });
        if !sections_ok {
            return Err(DeadLetterReason::BadBody);
        }
    }
    let version = match tape_find(body, "version").and_then(|v| v.first()) {
        Some(Node::Static(StaticNode::I64(v))) => *v,
        Some(Node::Static(StaticNode::U64(v))) => {
            i64::try_from(*v).map_err(|_| DeadLetterReason::BadVersion)?
        }
        None if matches!(header.op, Op::CreateIdentity | Op::DeleteIdentity) => 0,
        _ => return Err(DeadLetterReason::BadVersion),
    };
    Ok(TwinEvent {
        key: header.key,
        op: header.op,
        op_time: header.op_time,
        version,
        body,
    })
}

/// Decodes one twin document of a seed pass of `hub` (`docs/semantics.md` §7): `nodes` is the
/// parsed document, `None` when it is not JSON. Checked in the contract's order: not an
/// object or too deep (`bad_body`), `deviceId` (`missing_device_id`), `version`
/// (`bad_version`). A missing, empty or non-string `moduleId` means the device twin.
pub fn decode_document<'a>(
    hub: &'a str,
    nodes: Option<&'a [Node<'a>]>,
) -> Result<TwinDocument<'a>, DeadLetterReason> {
    decode_document_checked(hub, nodes, None)
}

/// [`decode_document`] of a document whose [`body_is_well_formed`] was already checked where
/// it was parsed (`well_formed`; `None`: not checked, check it here), as the seed reader
/// thread does so that the apply thread need not walk the tape again.
pub fn decode_document_checked<'a>(
    hub: &'a str,
    nodes: Option<&'a [Node<'a>]>,
    well_formed: Option<bool>,
) -> Result<TwinDocument<'a>, DeadLetterReason> {
    let Some(body) = nodes else {
        return Err(DeadLetterReason::BadBody);
    };
    if !well_formed.unwrap_or_else(|| body_is_well_formed(body)) {
        return Err(DeadLetterReason::BadBody);
    }
    let device_id = match tape_find(body, "deviceId").and_then(|v| v.first()) {
        Some(Node::String(id)) if !id.is_empty() => *id,
        _ => return Err(DeadLetterReason::MissingDeviceId),
    };
    let module_id = match tape_find(body, "moduleId").and_then(|v| v.first()) {
        Some(Node::String(id)) => *id,
        _ => "",
    };
    let version = match tape_find(body, "version").and_then(|v| v.first()) {
        Some(Node::Static(StaticNode::I64(v))) => *v,
        Some(Node::Static(StaticNode::U64(v))) => {
            i64::try_from(*v).map_err(|_| DeadLetterReason::BadVersion)?
        }
        _ => return Err(DeadLetterReason::BadVersion),
    };
    Ok(TwinDocument {
        key: TwinKey {
            hub,
            device_id,
            module_id,
        },
        version,
        body,
    })
}

/// Reusable buffers for parsing bodies that arrive as bytes.
pub struct BodyParser {
    buffers: simd_json::Buffers,
    bytes: Vec<u8>,
}

impl Default for BodyParser {
    fn default() -> Self {
        Self {
            buffers: simd_json::Buffers::with_max_depth(4096, usize::MAX >> 8),
            bytes: Vec::new(),
        }
    }
}

impl BodyParser {
    /// Parses a body given as bytes or base64 into a tape (`None`: not UTF-8 JSON), reusing
    /// `spare`'s allocation when given (hand the tape back with `Tape::reset` once done). The
    /// tape borrows this parser's buffer until the next call.
    pub fn parse<'s>(
        &'s mut self,
        body: Body<'_>,
        spare: Option<simd_json::Tape<'static>>,
    ) -> Option<simd_json::Tape<'s>> {
        self.bytes.clear();
        match body {
            Body::Bytes(b) => self.bytes.extend_from_slice(b),
            Body::Base64(text) => base64::engine::general_purpose::STANDARD
                .decode_vec(text, &mut self.bytes)
                .ok()?,
            Body::Tape(_) | Body::Absent => return None,
        }
        let len = self.bytes.len();
        self.bytes.resize(len + simd_json::INPUT_PADDING, 0);
        let mut tape = spare.unwrap_or_else(simd_json::Tape::null).reset();
        simd_json::fill_tape_padded(&mut self.bytes, len, &mut self.buffers, &mut tape).ok()?;
        Some(tape)
    }
}
