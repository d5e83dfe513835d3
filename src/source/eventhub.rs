//! The Event Hub source: one receiver per owned partition, on the tokio runtime, with
//! Microsoft's official client (`azure_messaging_eventhubs`). The only module that imports it.
//!
//! Each receiver starts right after its partition's checkpoint (or at the configured start
//! position without one), turns every event into an owned [`LiveEvent`] and sends them to the
//! apply thread over a bounded channel, as many as the client has ready in one message: a
//! slow store slows the receivers, never grows memory.
//! Transient errors reconnect with backoff from the last event sent; a receiver displaced by
//! a higher owner level is logged, counted and retried; a refusal (bad credentials, an entity
//! not found) is retried with a long backoff (a key rotation or a failover ends it) and shown
//! by `/readyz` until the partition is received again. Errors are classified by the client's
//! error kinds and AMQP conditions; only an error that carries none is read as text.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use azure_core_amqp::message::{AmqpAnnotationKey, AmqpMessageBody};
use azure_core_amqp::{AmqpError, AmqpErrorCondition, AmqpErrorKind};
use azure_messaging_eventhubs::error::ErrorKind as EventHubsErrorKind;
use azure_messaging_eventhubs::models::{
    AmqpMessage, AmqpSimpleValue, AmqpValue, ReceivedEventData,
};
use azure_messaging_eventhubs::{
    ConsumerClient, EventHubsError, OpenReceiverOptions, RetryOptions, StartLocation,
    StartPosition as ClientStartPosition,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::avro::{prop_name, OwnedMessage, OwnedProp};
use crate::config::{EventHubConfig, StartPosition};
use crate::time::Ticks;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// After a refusal (unauthorized, not found) the next attempt waits this long at first, then
/// twice as long each time up to [`MAX_REFUSED_BACKOFF`]: long enough not to hammer the hub
/// with bad credentials, short enough that a rotated key is picked up within minutes.
const FIRST_REFUSED_BACKOFF: Duration = Duration::from_secs(5);
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(300);
/// How long closing a receiver or a client may take: a hub that never answers a detach must
/// not hold the receiver's task (and the service's stop) for ever.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const PREFETCH: u32 = 300;
/// At most this many events go to the apply thread in one channel message: whatever the
/// client has ready, so that a busy receiver pays one send (and one wake of the apply
/// thread) per chunk rather than per event.
pub const CHUNK_EVENTS: usize = 256;
/// How often the hub's last enqueued sequence numbers are read (for the lag metric).
const LAG_POLL: Duration = Duration::from_secs(5);

/// One received event, owned, on its way to the apply thread.
pub struct LiveEvent {
    /// Index of the partition in [`SourceHealth::partitions`].
    pub partition: usize,
    pub sequence_number: i64,
    pub offset: Option<String>,
    pub record: OwnedMessage,
    /// The body's bytes (`record.body` is their range: the whole of it).
    pub body: Vec<u8>,
    /// When the receiver got it (enqueue-to-alert latency is measured from the event's own
    /// enqueued time; this is for the time spent inside the process).
    pub received_at: Instant,
}

/// What `/readyz` and the metrics read about the receivers.
pub struct PartitionHealth {
    pub connected: AtomicBool,
    pub reconnects: AtomicU64,
    pub displaced: AtomicU64,
    /// The hub's last enqueued sequence number plus one, as last read (0 for an empty
    /// partition; -1 until read).
    pub hub_next_sequence: AtomicI64,
    /// Why the hub refuses this partition's receiver (unauthorized, not found), while it
    /// does: `/readyz` shows it; cleared once the partition is received again.
    pub refused: Mutex<Option<String>>,
}

impl Default for PartitionHealth {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            displaced: AtomicU64::new(0),
            hub_next_sequence: AtomicI64::new(-1),
            refused: Mutex::new(None),
        }
    }
}

impl PartitionHealth {
    /// Why the hub refuses the partition, if it does (see [`PartitionHealth::refused`]).
    pub fn refused_error(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }

    fn set_refused(&self, error: Option<String>) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused = error;
        }
    }
}

pub struct SourceHealth {
    /// Owned partitions, by id, in the order of [`LiveEvent::partition`].
    pub partitions: Vec<(String, Arc<PartitionHealth>)>,
}

impl SourceHealth {
    pub fn all_connected(&self) -> bool {
        self.partitions
            .iter()
            .all(|(_, h)| h.connected.load(Ordering::Relaxed))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventHubError {
    #[error("connecting to the Event Hub {entity} at {host}: {detail}")]
    Connect {
        entity: String,
        host: String,
        detail: String,
    },
    #[error("the Event Hub has no partition {0}")]
    UnknownPartition(String),
}

impl EventHubError {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            EventHubError::Connect { .. } => "connect",
            EventHubError::UnknownPartition(_) => "unknown_partition",
        }
    }
}

/// Removes anything that looks like a key from a client error before it is logged.
fn scrub(text: &str) -> String {
    text.split(';')
        .map(|part| {
            let lower = part.to_ascii_lowercase();
            if lower.contains("sharedaccesskey=")
                || lower.contains("sharedaccesssignature=")
                || lower.contains("sig=")
            {
                "<redacted>"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn connect_error(config: &EventHubConfig, e: &dyn std::fmt::Display) -> EventHubError {
    EventHubError::Connect {
        entity: config.entity.clone(),
        host: config.host.clone(),
        detail: scrub(&e.to_string()),
    }
}

/// Opens a client (one AMQP connection) for `config`.
async fn open_client(config: &EventHubConfig) -> Result<ConsumerClient, EventHubError> {
    // The client's own retries stay short (its default keeps trying for 60 s): the service
    // has its own reconnect loop with backoff, and /readyz should tell soon why it cannot
    // connect (refused credentials, say).
    let mut retry = RetryOptions::default();
    if let (Ok(total), Ok(max_delay)) = (
        Duration::from_secs(10).try_into(),
        Duration::from_secs(5).try_into(),
    ) {
        retry.max_total_elapsed = total;
        retry.max_delay = max_delay;
        retry.max_retries = 3;
    }
    let mut builder = ConsumerClient::builder()
        .with_consumer_group(config.consumer_group.clone())
        .with_retry_options(retry);
    if let Some(endpoint) = &config.custom_endpoint {
        builder = builder.with_custom_endpoint(endpoint.clone());
    }
    builder
        .open_with_connection_string(config.connection_string.expose(), Some(&config.entity))
        .await
        .map_err(|e| connect_error(config, &e))
}

/// Checks the hub and resolves the owned partitions (ids, in the hub's order).
pub async fn connect(config: &EventHubConfig) -> Result<Vec<String>, EventHubError> {
    let client = open_client(config).await?;
    let properties = client
        .get_eventhub_properties()
        .await
        .map_err(|e| connect_error(config, &e))?;
    let ids = config
        .partitions
        .select(&properties.partition_ids)
        .map_err(EventHubError::UnknownPartition)?;
    let _ = client.close().await;
    Ok(ids)
}

/// How a receiver error is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorClass {
    /// The hub refuses the receiver (unauthorized, not found): retried with a long backoff
    /// and shown by `/readyz`, since only the operator (a new key) or the hub (a failover
    /// ending) can end it.
    Refused,
    Displaced,
    Transient,
}

/// An error the client raised, with its class: read from the client's error kinds and the
/// AMQP conditions in its source chain, or from its text when it carries neither.
struct ReceiverError {
    text: String,
    class: ErrorClass,
}

impl ReceiverError {
    fn of(error: &EventHubsError) -> ReceiverError {
        let text = scrub(&error.to_string());
        let class = classify_kind(error).unwrap_or_else(|| classify(&text));
        ReceiverError { text, class }
    }

    fn message(text: &str) -> ReceiverError {
        ReceiverError {
            text: text.to_owned(),
            class: ErrorClass::Transient,
        }
    }
}

/// The class of an AMQP condition the hub sent, if it settles it.
fn classify_condition(condition: &AmqpErrorCondition) -> Option<ErrorClass> {
    match condition {
        AmqpErrorCondition::UnauthorizedAccess
        | AmqpErrorCondition::NotFound
        | AmqpErrorCondition::EntityDisabledError => Some(ErrorClass::Refused),
        AmqpErrorCondition::LinkStolen => Some(ErrorClass::Displaced),
        _ => None,
    }
}

/// How deep an error's source chain is followed (a chain that loops must not loop us).
const MAX_ERROR_CHAIN: usize = 16;

/// The class the client's error kinds give, walking the source chain: the hub's condition
/// may arrive at the top, inside an AMQP error, or wrapped by `azure_core`.
fn classify_kind(error: &EventHubsError) -> Option<ErrorClass> {
    if matches!(error.kind, EventHubsErrorKind::ConsumerDisconnected(_)) {
        return Some(ErrorClass::Displaced);
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    for _ in 0..MAX_ERROR_CHAIN {
        let current = cause?;
        if let Some(amqp) = current.downcast_ref::<AmqpError>() {
            if let AmqpErrorKind::AmqpDescribedError(described) = amqp.kind() {
                if let Some(class) = classify_condition(&described.condition) {
                    return Some(class);
                }
            }
        }
        if let Some(eventhubs) = current.downcast_ref::<EventHubsError>() {
            if matches!(eventhubs.kind, EventHubsErrorKind::ConsumerDisconnected(_)) {
                return Some(ErrorClass::Displaced);
            }
        }
        cause = current.source();
    }
    None
}

/// The class of an error known by its text only (the client's kinds did not settle it).
fn classify(text: &str) -> ErrorClass {
    let lower = text.to_ascii_lowercase();
    if lower.contains("unauthorized") || lower.contains("not-found") || lower.contains("notfound") {
        ErrorClass::Refused
    } else if lower.contains("stolen")
        || lower.contains("epoch")
        || lower.contains("owner level")
        || lower.contains("consumerdisconnected")
    {
        ErrorClass::Displaced
    } else {
        ErrorClass::Transient
    }
}

/// Where one partition's receiver starts.
#[derive(Clone, Debug)]
pub struct PartitionStart {
    pub index: usize,
    pub id: String,
    /// The first sequence number to read (the checkpoint's next), or `None` without one.
    pub next_sequence_number: Option<i64>,
}

/// Starts one receiver task per partition on `tracker`. Each partition has a client (an AMQP
/// connection) of its own: a connection-level recovery for one partition then never stalls
/// the others' receive streams.
pub fn spawn_receivers(
    config: &EventHubConfig,
    starts: Vec<PartitionStart>,
    health: Arc<SourceHealth>,
    tx: mpsc::Sender<Vec<LiveEvent>>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    {
        let config = config.clone();
        let health = health.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move { poll_last_enqueued(config, health, cancel).await });
    }
    for start in starts {
        let config = config.clone();
        let health = health.clone();
        let tx = tx.clone();
        let cancel = cancel.clone();
        let owner_level = config.owner_level;
        let default_start = config.start_position;
        tracker.spawn(async move {
            receive_partition(
                config,
                start,
                owner_level,
                default_start,
                health,
                tx,
                cancel,
            )
            .await;
        });
    }
}

/// Reads every owned partition's last enqueued sequence number every [`LAG_POLL`], on a
/// connection of its own, until cancelled; errors are retried at the next poll.
async fn poll_last_enqueued(
    config: EventHubConfig,
    health: Arc<SourceHealth>,
    cancel: CancellationToken,
) {
    let mut client: Option<ConsumerClient> = None;
    loop {
        if client.is_none() {
            client = tokio::select! {
                _ = cancel.cancelled() => return,
                opened = open_client(&config) => opened.ok(),
            };
        }
        if let Some(active) = &client {
            for (id, partition) in &health.partitions {
                let read = tokio::select! {
                    _ = cancel.cancelled() => break,
                    read = active.get_partition_properties(id) => read,
                };
                match read {
                    Ok(properties) => {
                        let next = if properties.is_empty {
                            0
                        } else {
                            properties.last_enqueued_sequence_number + 1
                        };
                        partition.hub_next_sequence.store(next, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(partition = %id, error = %scrub(&e.to_string()), "cannot read the partition's properties");
                        if let Some(old) = client.take() {
                            let _ = tokio::time::timeout(Duration::from_secs(5), old.close()).await;
                        }
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(LAG_POLL) => {}
        }
    }
    if let Some(client) = client {
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
    }
}

async fn receive_partition(
    config: EventHubConfig,
    start: PartitionStart,
    owner_level: Option<i64>,
    default_start: StartPosition,
    health: Arc<SourceHealth>,
    tx: mpsc::Sender<Vec<LiveEvent>>,
    cancel: CancellationToken,
) {
    let partition_health = health.partitions[start.index].1.clone();
    let mut next = start.next_sequence_number;
    let mut backoff = FIRST_BACKOFF;
    let mut refused_backoff = FIRST_REFUSED_BACKOFF;
    let mut client: Option<ConsumerClient> = None;
    // With `start_position = "latest"` and no checkpoint: the position "latest" stood for
    // when the receiver first opened (after the hub's last sequence number then), so that a
    // reopen before the first event resumes there instead of skipping what arrived between.
    let mut opened_latest_at: Option<(StartLocation, bool)> = None;
    while !cancel.is_cancelled() {
        if client.is_none() {
            let connected = tokio::select! {
                _ = cancel.cancelled() => return,
                connected = open_client(&config) => connected,
            };
            match connected {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(partition = %start.id, error = %e, "cannot connect; retrying");
                    partition_health.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(active) = client.as_ref() else {
            continue;
        };
        let (location, inclusive) = match (next, default_start, &opened_latest_at) {
            (Some(seq), _, _) => (StartLocation::SequenceNumber(seq), true),
            (None, StartPosition::Earliest, _) => (StartLocation::Earliest, true),
            (None, StartPosition::Latest, Some((location, inclusive))) => {
                (location.clone(), *inclusive)
            }
            (None, StartPosition::Latest, None) => {
                let read = tokio::select! {
                    _ = cancel.cancelled() => return,
                    read = active.get_partition_properties(&start.id) => read,
                };
                match read {
                    // Nothing retained: everything that arrives from now on is "latest".
                    Ok(p) if p.is_empty || p.last_enqueued_sequence_number < 0 => {
                        (StartLocation::Earliest, true)
                    }
                    Ok(p) => (
                        StartLocation::SequenceNumber(p.last_enqueued_sequence_number),
                        false,
                    ),
                    Err(e) => {
                        let error = ReceiverError::of(&e);
                        tracing::warn!(partition = %start.id, error = %error.text, "cannot read where the partition ends; retrying");
                        if let Some(old) = client.take() {
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, old.close()).await;
                        }
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
        };
        if next.is_none() && default_start == StartPosition::Latest {
            opened_latest_at = Some((location.clone(), inclusive));
        }
        let options = OpenReceiverOptions {
            owner_level,
            prefetch: Some(PREFETCH),
            start_position: Some(ClientStartPosition {
                location,
                inclusive,
            }),
            receive_timeout: None,
        };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            opened = active.open_receiver_on_partition(start.id.clone(), Some(options)) => opened,
        };
        let failure = match outcome {
            Err(e) => ReceiverError::of(&e),
            Ok(receiver) => {
                partition_health.connected.store(true, Ordering::Relaxed);
                partition_health.set_refused(None);
                refused_backoff = FIRST_REFUSED_BACKOFF;
                tracing::info!(partition = %start.id, from = ?next, "receiving");
                let mut failure = None;
                {
                    let stream = receiver.stream_events().ready_chunks(CHUNK_EVENTS);
                    futures::pin_mut!(stream);
                    while failure.is_none() {
                        let items = tokio::select! {
                            _ = cancel.cancelled() => break,
                            items = stream.next() => items,
                        };
                        let Some(items) = items else {
                            failure = Some(ReceiverError::message("the receive stream ended"));
                            break;
                        };
                        let (chunk, failed) = to_chunk(&start, items);
                        if let Some(last) = chunk.last() {
                            next = Some(last.sequence_number + 1);
                        }
                        failure = failed;
                        if chunk.is_empty() {
                            continue;
                        }
                        backoff = FIRST_BACKOFF;
                        if tx.send(chunk).await.is_err() {
                            // The apply thread is gone: the service is stopping.
                            partition_health.connected.store(false, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                partition_health.connected.store(false, Ordering::Relaxed);
                // A hub that never answers the detach must not hold the stop (or the
                // reconnect) beyond CLOSE_TIMEOUT.
                if tokio::time::timeout(CLOSE_TIMEOUT, receiver.close())
                    .await
                    .is_err()
                {
                    tracing::warn!(partition = %start.id, "the hub did not answer the receiver's detach in time");
                }
                match failure {
                    None => return,
                    Some(failure) => failure,
                }
            }
        };
        let wait = match failure.class {
            ErrorClass::Refused => {
                tracing::error!(partition = %start.id, error = %failure.text, retry_in = ?refused_backoff, "the hub refuses this partition's receiver; retrying");
                partition_health.set_refused(Some(failure.text));
                let wait = refused_backoff;
                refused_backoff = (refused_backoff * 2).min(MAX_REFUSED_BACKOFF);
                wait
            }
            ErrorClass::Displaced => {
                partition_health.displaced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition = %start.id, error = %failure.text, "another consumer took the partition (higher owner level); retrying");
                backoff
            }
            ErrorClass::Transient => {
                tracing::warn!(partition = %start.id, error = %failure.text, "receiver failed; reconnecting");
                backoff
            }
        };
        partition_health.reconnects.fetch_add(1, Ordering::Relaxed);
        // A fresh connection for the next attempt: whatever state the old one is in.
        if let Some(old) = client.take() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, old.close()).await;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    if let Some(old) = client.take() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, old.close()).await;
    }
}

fn simple_prop(value: &AmqpSimpleValue) -> Option<OwnedProp> {
    Some(match value {
        AmqpSimpleValue::String(s) => OwnedProp::Str(s.clone()),
        AmqpSimpleValue::Binary(b) => OwnedProp::Bytes(b.clone()),
        AmqpSimpleValue::Long(n) => OwnedProp::Long(*n),
        AmqpSimpleValue::Int(n) => OwnedProp::Long((*n).into()),
        AmqpSimpleValue::ULong(n) => OwnedProp::Long(i64::try_from(*n).ok()?),
        AmqpSimpleValue::UInt(n) => OwnedProp::Long((*n).into()),
        AmqpSimpleValue::Double(f) => OwnedProp::Double(*f),
        AmqpSimpleValue::Boolean(b) => OwnedProp::Str(b.to_string()),
        AmqpSimpleValue::TimeStamp(t) => OwnedProp::Time(ticks(t.0?)),
        _ => return None,
    })
}

fn value_prop(value: &AmqpValue) -> Option<OwnedProp> {
    Some(match value {
        AmqpValue::String(s) => OwnedProp::Str(s.clone()),
        AmqpValue::Symbol(s) => OwnedProp::Str(s.0.clone()),
        AmqpValue::Binary(b) => OwnedProp::Bytes(b.clone()),
        AmqpValue::Long(n) => OwnedProp::Long(*n),
        AmqpValue::Int(n) => OwnedProp::Long((*n).into()),
        AmqpValue::ULong(n) => OwnedProp::Long(i64::try_from(*n).ok()?),
        AmqpValue::UInt(n) => OwnedProp::Long((*n).into()),
        AmqpValue::Double(f) => OwnedProp::Double(*f),
        AmqpValue::TimeStamp(t) => OwnedProp::Time(ticks(t.0?)),
        _ => return None,
    })
}

fn ticks(time: std::time::SystemTime) -> Ticks {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => Ticks((d.as_nanos() / 100) as i64),
        Err(e) => Ticks(-((e.duration().as_nanos() / 100) as i64)),
    }
}

/// What the receive loop needs of an event's message annotations, read in one pass.
struct Annotations {
    sequence_number: Option<i64>,
    offset: Option<String>,
    enqueued_time: Option<OwnedProp>,
    /// Every other symbol-keyed annotation that is a property value, as the client's
    /// `system_properties()` gives them (without its map: this is the per-event path).
    system_properties: Vec<(super::avro::PropName, OwnedProp)>,
}

fn read_annotations(message: &AmqpMessage) -> Annotations {
    let mut read = Annotations {
        sequence_number: None,
        offset: None,
        enqueued_time: None,
        system_properties: Vec::new(),
    };
    let Some(annotations) = &message.message_annotations else {
        return read;
    };
    for (key, value) in annotations.0.iter() {
        let AmqpAnnotationKey::Symbol(symbol) = key else {
            continue;
        };
        match (symbol.0.as_str(), value) {
            ("x-opt-sequence-number", AmqpValue::Long(n)) => read.sequence_number = Some(*n),
            ("x-opt-offset", AmqpValue::String(offset)) => read.offset = Some(offset.clone()),
            ("x-opt-enqueued-time", AmqpValue::TimeStamp(t)) => {
                read.enqueued_time = t.0.map(|t| OwnedProp::Time(ticks(t)));
            }
            ("x-opt-sequence-number" | "x-opt-offset" | "x-opt-enqueued-time", _)
            | ("x-opt-partition-key", _) => {}
            (name, value) => {
                if let Some(value) = value_prop(value) {
                    read.system_properties.push((prop_name(name), value));
                }
            }
        }
    }
    read
}

/// The events the client had ready, as the apply thread takes them, and the error that ended
/// them, if one did: the events before an error are kept (the receiver reopens right after
/// the last of them), those after it are not there (the client's stream ends at an error).
fn to_chunk(
    start: &PartitionStart,
    items: Vec<azure_messaging_eventhubs::Result<ReceivedEventData>>,
) -> (Vec<LiveEvent>, Option<ReceiverError>) {
    let mut chunk = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Ok(event) => match to_live(start.index, &event) {
                Some(live) => chunk.push(live),
                None => {
                    tracing::warn!(partition = %start.id, "an event without a sequence number was skipped")
                }
            },
            Err(e) => return (chunk, Some(ReceiverError::of(&e))),
        }
    }
    (chunk, None)
}

/// The event as the apply thread takes it, read straight from the AMQP message: the client's
/// `event_data()` and `system_properties()` would first copy the body and both property
/// maps into maps of their own.
fn to_live(partition: usize, event: &ReceivedEventData) -> Option<LiveEvent> {
    let message = event.raw_amqp_message();
    let annotations = read_annotations(message);
    let sequence_number = annotations.sequence_number?;
    let mut record = OwnedMessage::default();
    if let Some(properties) = &message.application_properties {
        record.properties = properties
            .0
            .iter()
            .filter_map(|(k, v)| Some((prop_name(k), simple_prop(v)?)))
            .collect();
    }
    record.system_properties = annotations.system_properties;
    if let Some(user_id) = message.properties.as_ref().and_then(|p| p.user_id.as_ref()) {
        record
            .system_properties
            .push((prop_name("user-id"), OwnedProp::Bytes(user_id.clone())));
    }
    record.enqueued_time = annotations.enqueued_time;
    record.index_names();
    // An event's body is one data section (a message with several has none, as the client
    // reads it).
    let body = match &message.body {
        AmqpMessageBody::Binary(sections) if sections.len() == 1 => Some(sections[0].clone()),
        _ => None,
    };
    record.body = body.as_ref().map(|b| (0, b.len() as u32));
    Some(LiveEvent {
        partition,
        sequence_number,
        offset: annotations.offset,
        record,
        body: body.unwrap_or_default(),
        received_at: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_reach_a_log_line() {
        let text =
            "failed: Endpoint=sb://x;SharedAccessKeyName=k;SharedAccessKey=TOPSECRET;EntityPath=e";
        assert!(!scrub(text).contains("TOPSECRET"));
        assert!(scrub(text).contains("EntityPath=e"));
    }

    /// Issue 23: the class comes from the client's kinds and the hub's AMQP condition, not
    /// from the words of the message.
    #[test]
    fn errors_are_classified_by_the_clients_kinds() {
        let described = |condition| {
            AmqpError::from(AmqpErrorKind::AmqpDescribedError(
                azure_core_amqp::AmqpDescribedError::new(
                    condition,
                    Some("no words to match".to_owned()),
                    Default::default(),
                ),
            ))
        };
        for (condition, class) in [
            (
                AmqpErrorCondition::UnauthorizedAccess,
                Some(ErrorClass::Refused),
            ),
            (AmqpErrorCondition::NotFound, Some(ErrorClass::Refused)),
            (AmqpErrorCondition::LinkStolen, Some(ErrorClass::Displaced)),
            (AmqpErrorCondition::ServerBusyError, None),
        ] {
            let top = EventHubsError::from(described(condition.clone()));
            assert_eq!(classify_kind(&top), class, "{condition:?}");
            // Deeper in the chain, as a detach by the hub carries it.
            let nested = EventHubsError::from(AmqpError::from(
                AmqpErrorKind::LinkDetachedByRemote(Box::new(described(condition.clone()))),
            ));
            assert_eq!(classify_kind(&nested), class, "{condition:?} nested");
        }
        let disconnected = EventHubsError::from(EventHubsErrorKind::ConsumerDisconnected(None));
        assert_eq!(classify_kind(&disconnected), Some(ErrorClass::Displaced));
        // An error with no kind to go by falls back to its text.
        let busy = EventHubsError::from(described(AmqpErrorCondition::ServerBusyError));
        assert_eq!(ReceiverError::of(&busy).class, ErrorClass::Transient);
    }

    #[test]
    fn errors_are_classified() {
        assert!(matches!(
            classify("amqp:unauthorized-access: bad token"),
            ErrorClass::Refused
        ));
        assert!(matches!(
            classify("amqp:link:stolen: a receiver with a higher epoch"),
            ErrorClass::Displaced
        ));
        assert!(matches!(
            classify("com.microsoft:server-busy"),
            ErrorClass::Transient
        ));
    }
}
