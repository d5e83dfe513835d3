//! IoT Hub's storage-route JSON encoding: one object per line,
//! `{"EnqueuedTimeUtc", "Properties", "SystemProperties", "Body"}` (reference §7.2).
//!
//! A line is parsed once into a simd-json tape; [`StorageJsonMessage`] is the [`Message`] view
//! over it, and an embedded JSON `Body` is handed to decoding as a slice of the same tape.

use simd_json::{Node, StaticNode};

use crate::decode::{Body, Message, Prop};
use crate::value::{object_has_duplicate_key, tape_find, tape_get, tape_is_object};

/// A [`Message`] view over the tape of one storage-route JSON line.
pub struct StorageJsonMessage<'t, 'i> {
    properties: Option<&'t [Node<'i>]>,
    system_properties: Option<&'t [Node<'i>]>,
    enqueued_time_utc: Option<&'t [Node<'i>]>,
    body: Option<&'t [Node<'i>]>,
    line_len: usize,
    body_verdict: Option<bool>,
}

impl<'t, 'i> StorageJsonMessage<'t, 'i> {
    /// The view of a parsed line, `None` when the line is not a JSON object or when it, its
    /// `Properties` or its `SystemProperties` has a key twice (which one would count is the
    /// reader's guess; the body's own objects are checked with the body).
    pub fn new(nodes: &'t [Node<'i>], line_len: usize) -> Option<Self> {
        Self::checked(nodes, line_len, None)
    }

    /// [`StorageJsonMessage::new`] with the verdict of [`StorageJsonMessage::is_unambiguous`]
    /// when the reader already reached it on its own thread.
    pub fn checked(
        nodes: &'t [Node<'i>],
        line_len: usize,
        unambiguous: Option<bool>,
    ) -> Option<Self> {
        if !unambiguous.unwrap_or_else(|| Self::is_unambiguous(nodes)) {
            return None;
        }
        let properties = tape_find(nodes, "Properties").filter(|p| tape_is_object(p));
        let system_properties = tape_find(nodes, "SystemProperties").filter(|p| tape_is_object(p));
        Some(Self {
            properties,
            system_properties,
            enqueued_time_utc: tape_find(nodes, "EnqueuedTimeUtc"),
            body: tape_find(nodes, "Body"),
            line_len,
            body_verdict: None,
        })
    }

    /// Whether the line is a JSON object and neither it, its `Properties` nor its
    /// `SystemProperties` has a key twice.
    pub fn is_unambiguous(nodes: &[Node<'_>]) -> bool {
        if !tape_is_object(nodes) {
            return false;
        }
        let properties = tape_get(nodes, "Properties").filter(|p| tape_is_object(p));
        let system_properties = tape_get(nodes, "SystemProperties").filter(|p| tape_is_object(p));
        let mut keys = Vec::new();
        ![Some(nodes), properties, system_properties]
            .into_iter()
            .flatten()
            .any(|object| object_has_duplicate_key(object, &mut keys))
    }

    /// The body as the reader checked it ([`crate::source::parsed::BodyAt::Envelope`]).
    pub fn with_body_verdict(self, body_verdict: Option<bool>) -> Self {
        Self {
            body_verdict,
            ..self
        }
    }
}

fn prop<'t>(nodes: &'t [Node<'_>]) -> Prop<'t> {
    match nodes.first() {
        Some(Node::String(s)) => Prop::Str(s),
        Some(Node::Static(StaticNode::I64(n))) => Prop::Int(*n),
        Some(Node::Static(StaticNode::U64(n))) => i64::try_from(*n).map_or(Prop::Other, Prop::Int),
        _ => Prop::Other,
    }
}

impl<'t, 'i: 't> Message<'t> for StorageJsonMessage<'t, 'i> {
    fn app_property(&self, name: &str) -> Option<Prop<'t>> {
        self.properties.and_then(|p| tape_find(p, name)).map(prop)
    }

    fn system_property(&self, name: &str, storage_name: &str) -> Option<Prop<'t>> {
        let system = self.system_properties?;
        tape_find(system, storage_name)
            .or_else(|| tape_find(system, name))
            .map(prop)
    }

    fn eventhubs_enqueued_time(&self) -> Option<Prop<'t>> {
        self.enqueued_time_utc.map(prop)
    }

    fn body_size(&self) -> usize {
        self.line_len
    }

    fn body_verdict(&self) -> Option<bool> {
        self.body_verdict
    }

    fn body(&self) -> Body<'t> {
        match self.body {
            None => Body::Absent,
            Some(nodes) => match nodes.first() {
                Some(Node::String(s)) => Body::Base64(s),
                _ => Body::Tape(nodes),
            },
        }
    }
}
