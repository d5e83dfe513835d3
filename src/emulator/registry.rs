//! The hub the emulator serves: its partitions (events in memory, numbered as Event Hubs
//! numbers them) and the receivers reading them, with the service's owner-level (epoch) rules
//! and error conditions (reference `eventhubs-amqp.md` §3.5). No IO: the server asks, this
//! module decides.
//!
//! Receiver rules, per partition and consumer group:
//! - a receiver with owner level (epoch) E when the highest existing epoch is at most E
//!   disconnects every existing receiver with `amqp:link:stolen`;
//! - a receiver with an epoch below an existing one, or without an epoch while an epoch
//!   receiver exists, is refused with `amqp:link:stolen`;
//! - a sixth receiver without an epoch is refused with `amqp:resource-limit-exceeded`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::messaging::Data;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::event::{amqp_message, EmulatedEvent, EventPosition};
use super::selector::{OffsetValue, StartPosition};
use super::DEFAULT_CONSUMER_GROUP;

/// Error conditions the emulator sends, as the service spells them.
pub mod condition {
    /// No such hub, consumer group or node.
    pub const NOT_FOUND: &str = "amqp:not-found";
    /// A partition id or sequence number out of range.
    pub const ARGUMENT_OUT_OF_RANGE: &str = "com.microsoft:argument-out-of-range";
    /// A malformed argument (a selector filter that does not parse).
    pub const ARGUMENT_ERROR: &str = "com.microsoft:argument-error";
    /// A receiver displaced or refused by the epoch rules.
    pub const LINK_STOLEN: &str = "amqp:link:stolen";
    /// Too many receivers without an epoch.
    pub const RESOURCE_LIMIT_EXCEEDED: &str = "amqp:resource-limit-exceeded";
    /// A link the emulator does not serve (a producer).
    pub const NOT_IMPLEMENTED: &str = "amqp:not-implemented";
    /// The emulator is shutting down.
    pub const CONNECTION_FORCED: &str = "amqp:connection:forced";
    /// A transient fault (fault injection).
    pub const SERVER_BUSY: &str = "com.microsoft:server-busy";
    /// A link detached by the service (fault injection).
    pub const DETACH_FORCED: &str = "amqp:link:detach-forced";
}

/// The most receivers without an epoch on one partition of one consumer group.
pub const MAX_NON_EPOCH_RECEIVERS: usize = 5;

/// An AMQP error to close a link with: a condition (see [`condition`]) and a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFault {
    /// The condition symbol.
    pub condition: String,
    /// The description, worded as the service words it.
    pub description: String,
}

impl LinkFault {
    /// A fault with `condition` and `description`.
    pub fn new(condition: &str, description: impl Into<String>) -> LinkFault {
        LinkFault {
            condition: condition.to_string(),
            description: description.into(),
        }
    }
}

/// The stable placement: FNV-1a (32-bit) of the key's UTF-8 bytes, modulo `partitions`.
/// An empty key goes to partition 0 like any other (its hash is the FNV offset basis).
pub fn partition_for_key(partition_key: &str, partitions: u32) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let hash = partition_key
        .as_bytes()
        .iter()
        .fold(OFFSET_BASIS, |hash, &byte| {
            (hash ^ u32::from(byte)).wrapping_mul(PRIME)
        });
    hash % partitions.max(1)
}

/// What a `$management` READ of a partition answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSnapshot {
    /// The partition id.
    pub partition: u32,
    /// The first sequence number held (0: nothing expires here).
    pub begin_sequence_number: i64,
    /// The last sequence number, -1 when empty.
    pub last_enqueued_sequence_number: i64,
    /// The last offset, `"-1"` when empty.
    pub last_enqueued_offset: String,
    /// The last enqueued time in ms since the Unix epoch, 0 when empty.
    pub last_enqueued_time_ms: i64,
    /// Whether the partition holds no event.
    pub is_empty: bool,
}

/// One hub: its name, partitions and consumer groups.
pub(crate) struct Hub {
    name: String,
    created_at_ms: i64,
    partitions: Vec<Partition>,
    /// Lower-cased extra consumer groups; empty means any name is accepted.
    consumer_groups: Vec<String>,
    next_reader_id: AtomicU64,
    /// Fault injection: refuse every `$cbs` token (as the service refuses a wrong key).
    refuse_tokens: std::sync::atomic::AtomicBool,
    /// Fault injection: receivers' detaches are left unanswered (see
    /// `Emulator::ignore_detaches`).
    ignore_detaches: std::sync::atomic::AtomicBool,
    /// Cancelled to drop every open connection (fault injection); replaced by a fresh token
    /// so that connections made afterwards live on.
    connections: Mutex<CancellationToken>,
}

/// A stored event and where it sits.
///
/// The AMQP message is built once, when the event is appended, ready to send (settled): every
/// receiver that reads the event sends it by reference, instead of building (or cloning) the
/// annotations, the properties and the body again for each delivery (the emulator shares the
/// machine with the service it feeds, so its time is taken from the service's in the live
/// benchmark).
#[derive(Clone)]
pub(crate) struct StoredEvent {
    pub(crate) position: EventPosition,
    pub(crate) sendable: Arc<Sendable<Data>>,
    /// The event as appended, kept for the tests that compare it with what receivers got.
    #[cfg(test)]
    pub(crate) event: Arc<EmulatedEvent>,
}

pub(crate) struct Partition {
    id: u32,
    log: RwLock<Log>,
    /// The number of events, bumped after each append, so readers wake up.
    appended: watch::Sender<usize>,
    readers: Mutex<Vec<ActiveReader>>,
}

#[derive(Default)]
struct Log {
    events: Vec<StoredEvent>,
    next_offset: u64,
    last_enqueued_time_ms: i64,
    /// The first sequence number retained: events before it have expired (fault injection,
    /// [`Partition::expire_before`]); they stay in `events` so that indexes remain sequence
    /// numbers, but no receiver starts before it.
    begin: usize,
}

struct ActiveReader {
    id: u64,
    /// Lower-cased.
    consumer_group: String,
    epoch: Option<i64>,
    name: String,
    stop: Option<oneshot::Sender<LinkFault>>,
}

/// A receiver's registration; dropping it unregisters the receiver.
pub(crate) struct ReaderLease {
    hub: Arc<Hub>,
    partition: u32,
    id: u64,
    /// Fires when the receiver must close with this fault (displaced by a higher epoch, or a
    /// fault injected).
    pub(crate) stop: oneshot::Receiver<LinkFault>,
}

impl ReaderLease {
    /// The partition the receiver reads.
    pub(crate) fn partition(&self) -> u32 {
        self.partition
    }
}

impl Drop for ReaderLease {
    fn drop(&mut self) {
        if let Some(partition) = self.hub.partition(self.partition) {
            lock(&partition.readers).retain(|reader| reader.id != self.id);
        }
    }
}

impl Hub {
    pub(crate) fn new(name: String, partitions: u32, consumer_groups: Vec<String>) -> Hub {
        Hub {
            name,
            created_at_ms: now_ms(),
            partitions: (0..partitions).map(Partition::new).collect(),
            consumer_groups: consumer_groups
                .iter()
                .map(|group| group.to_ascii_lowercase())
                .collect(),
            next_reader_id: AtomicU64::new(1),
            refuse_tokens: std::sync::atomic::AtomicBool::new(false),
            ignore_detaches: std::sync::atomic::AtomicBool::new(false),
            connections: Mutex::new(CancellationToken::new()),
        }
    }

    pub(crate) fn set_refuse_tokens(&self, refuse: bool) {
        self.refuse_tokens
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// The token that cuts the connections open now (see [`Hub::drop_connections`]).
    pub(crate) fn connection_cut(&self) -> CancellationToken {
        lock(&self.connections).clone()
    }

    /// Cuts every connection open now; returns how many readers they carried.
    pub(crate) fn drop_connections(&self) -> usize {
        let readers = self
            .partitions
            .iter()
            .map(|partition| lock(&partition.readers).len())
            .sum();
        std::mem::take(&mut *lock(&self.connections)).cancel();
        readers
    }

    pub(crate) fn set_ignore_detaches(&self, ignore: bool) {
        self.ignore_detaches
            .store(ignore, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn ignores_detaches(&self) -> bool {
        self.ignore_detaches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn refuses_tokens(&self) -> bool {
        self.refuse_tokens.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn created_at_ms(&self) -> i64 {
        self.created_at_ms
    }

    pub(crate) fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    pub(crate) fn partition(&self, id: u32) -> Option<&Partition> {
        self.partitions.get(id as usize)
    }

    /// Whether `name` is this hub's (case-insensitive, as the service compares).
    pub(crate) fn is_named(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    pub(crate) fn has_consumer_group(&self, group: &str) -> bool {
        self.consumer_groups.is_empty()
            || group.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP)
            || self
                .consumer_groups
                .iter()
                .any(|known| known.eq_ignore_ascii_case(group))
    }

    /// The partition for a partition id as a client writes it, or the service's error.
    pub(crate) fn partition_by_id(&self, id: &str) -> Result<&Partition, LinkFault> {
        id.parse::<u32>()
            .ok()
            .and_then(|index| self.partition(index))
            .ok_or_else(|| {
                LinkFault::new(
                    condition::ARGUMENT_OUT_OF_RANGE,
                    format!(
                        "The specified partition is invalid for an EventHub partition sender or \
                         receiver. It should be between 0 and {}.",
                        self.partition_count().saturating_sub(1)
                    ),
                )
            })
    }

    pub(crate) fn publish(&self, event: EmulatedEvent) {
        let index = partition_for_key(&event.partition_key, self.partition_count());
        if let Some(partition) = self.partition(index) {
            partition.append(event);
        }
    }

    /// Registers a receiver on `partition` of `consumer_group`, applying the epoch rules.
    pub(crate) fn register_reader(
        self: &Arc<Self>,
        partition: u32,
        consumer_group: &str,
        epoch: Option<i64>,
        name: &str,
    ) -> Result<ReaderLease, LinkFault> {
        let Some(target) = self.partition(partition) else {
            return Err(LinkFault::new(
                condition::ARGUMENT_OUT_OF_RANGE,
                "no such partition",
            ));
        };
        let group = consumer_group.to_ascii_lowercase();
        let mut readers = lock(&target.readers);
        let highest = readers
            .iter()
            .filter(|reader| reader.consumer_group == group)
            .filter_map(|reader| reader.epoch.map(|epoch| (epoch, reader.name.clone())))
            .max_by_key(|(epoch, _)| *epoch);
        match (epoch, highest) {
            (Some(new), Some((existing, existing_name))) if new < existing => {
                return Err(LinkFault::new(
                    condition::LINK_STOLEN,
                    format!(
                        "Receiver '{existing_name}' with a higher epoch '{existing}' already \
                         exists. A new receiver with epoch '{new}' cannot be created. Make sure \
                         you are creating receiver with increasing epoch value to ensure \
                         connectivity, or ensure all old epoch receivers are closed or \
                         disconnected."
                    ),
                ));
            }
            (Some(new), _) => {
                // Every receiver of this group gives way to the new owner.
                let mut kept = Vec::with_capacity(readers.len());
                for mut reader in readers.drain(..) {
                    if reader.consumer_group != group {
                        kept.push(reader);
                        continue;
                    }
                    let fault = LinkFault::new(
                        condition::LINK_STOLEN,
                        format!(
                            "New receiver '{name}' with higher epoch of '{new}' is created hence \
                             current receiver '{}' with epoch '{}' is getting disconnected. If \
                             you are recreating the receiver, make sure a higher epoch is used.",
                            reader.name,
                            reader.epoch.map_or("<none>".to_string(), |e| e.to_string()),
                        ),
                    );
                    if let Some(stop) = reader.stop.take() {
                        let _ = stop.send(fault);
                    }
                }
                *readers = kept;
            }
            (None, Some((existing, existing_name))) => {
                return Err(LinkFault::new(
                    condition::LINK_STOLEN,
                    format!(
                        "Receiver '{existing_name}' with epoch '{existing}' already exists. A \
                         receiver without an epoch cannot be created while an epoch receiver is \
                         connected."
                    ),
                ));
            }
            (None, None) => {
                let non_epoch = readers
                    .iter()
                    .filter(|reader| reader.consumer_group == group)
                    .count();
                if non_epoch >= MAX_NON_EPOCH_RECEIVERS {
                    return Err(LinkFault::new(
                        condition::RESOURCE_LIMIT_EXCEEDED,
                        format!(
                            "Exceeded the maximum number of allowed receivers per partition in \
                             a consumer group which is {MAX_NON_EPOCH_RECEIVERS}. \
                             Partition: {partition}, consumer group: {consumer_group}."
                        ),
                    ));
                }
            }
        }
        let id = self.next_reader_id.fetch_add(1, Ordering::Relaxed);
        let (stop_sender, stop) = oneshot::channel();
        readers.push(ActiveReader {
            id,
            consumer_group: group,
            epoch,
            name: name.to_string(),
            stop: Some(stop_sender),
        });
        Ok(ReaderLease {
            hub: Arc::clone(self),
            partition,
            id,
            stop,
        })
    }

    /// Closes every receiver of `partition` (every partition when `None`) with `fault`.
    /// Returns how many were told.
    pub(crate) fn detach_readers(&self, partition: Option<u32>, fault: &LinkFault) -> usize {
        let mut told = 0;
        for target in &self.partitions {
            if partition.is_some_and(|wanted| wanted != target.id) {
                continue;
            }
            for reader in lock(&target.readers).iter_mut() {
                if let Some(stop) = reader.stop.take() {
                    if stop.send(fault.clone()).is_ok() {
                        told += 1;
                    }
                }
            }
        }
        told
    }
}

impl Partition {
    fn new(id: u32) -> Partition {
        Partition {
            id,
            log: RwLock::new(Log::default()),
            appended: watch::Sender::new(0),
            readers: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    fn append(&self, event: EmulatedEvent) {
        let length = {
            let mut log = self.log.write().unwrap_or_else(PoisonError::into_inner);
            let enqueued_time_ms = event
                .enqueued_time_ms
                .unwrap_or_else(now_ms)
                .max(log.last_enqueued_time_ms);
            let position = EventPosition {
                sequence_number: log.events.len() as i64,
                offset: log.next_offset,
                enqueued_time_ms,
            };
            log.next_offset += event.stored_size();
            log.last_enqueued_time_ms = enqueued_time_ms;
            log.events.push(StoredEvent {
                position,
                sendable: Arc::new(
                    Sendable::builder()
                        .message(amqp_message(&event, position))
                        .settled(true)
                        .build(),
                ),
                #[cfg(test)]
                event: Arc::new(event),
            });
            log.events.len()
        };
        self.appended.send_replace(length);
    }

    /// Expires every event before sequence number `sequence_number` (at most the next one to
    /// be appended), as the service's retention does: receivers opening before it start at it.
    pub(crate) fn expire_before(&self, sequence_number: usize) {
        let mut log = self.log.write().unwrap_or_else(PoisonError::into_inner);
        log.begin = log.begin.max(sequence_number.min(log.events.len()));
    }

    /// Up to `max` events from index (= sequence number) `from`.
    pub(crate) fn read(&self, from: usize, max: usize) -> Vec<StoredEvent> {
        let log = self.log.read().unwrap_or_else(PoisonError::into_inner);
        let end = log.events.len().min(from.saturating_add(max));
        log.events.get(from..end).unwrap_or_default().to_vec()
    }

    /// A receiver that waits for events appended after it subscribed.
    pub(crate) fn subscribe(&self) -> watch::Receiver<usize> {
        self.appended.subscribe()
    }

    pub(crate) fn snapshot(&self) -> PartitionSnapshot {
        let log = self.log.read().unwrap_or_else(PoisonError::into_inner);
        match log.events.last() {
            Some(last) => PartitionSnapshot {
                partition: self.id,
                begin_sequence_number: log.begin as i64,
                last_enqueued_sequence_number: last.position.sequence_number,
                last_enqueued_offset: last.position.offset.to_string(),
                last_enqueued_time_ms: last.position.enqueued_time_ms,
                is_empty: false,
            },
            None => PartitionSnapshot {
                partition: self.id,
                begin_sequence_number: 0,
                last_enqueued_sequence_number: -1,
                last_enqueued_offset: "-1".to_string(),
                last_enqueued_time_ms: 0,
                is_empty: true,
            },
        }
    }

    /// The index (= sequence number) of the first event a receiver starting at `start`
    /// gets, or the service's error for a position past the end.
    pub(crate) fn start_index(&self, start: StartPosition) -> Result<usize, LinkFault> {
        let log = self.log.read().unwrap_or_else(PoisonError::into_inner);
        let events = &log.events;
        let length = events.len();
        let out_of_range = |what: &str, value: String| {
            LinkFault::new(
                condition::ARGUMENT_OUT_OF_RANGE,
                format!(
                    "The supplied {what} '{value}' is invalid. The last {what} in the system is \
                     '{}'.",
                    match events.last() {
                        Some(last) if what == "offset" => last.position.offset.to_string(),
                        Some(last) => last.position.sequence_number.to_string(),
                        None => "-1".to_string(),
                    }
                ),
            )
        };
        // What expired is not served: a position before the first retained event starts there.
        let index = match start {
            StartPosition::Offset {
                offset: OffsetValue::Earliest,
                ..
            } => Ok(0),
            StartPosition::Offset {
                offset: OffsetValue::Latest,
                ..
            } => Ok(length),
            StartPosition::Offset {
                offset: OffsetValue::At(offset),
                inclusive,
            } => {
                if offset > log.next_offset {
                    return Err(out_of_range("offset", offset.to_string()));
                }
                let index = events.partition_point(|stored| stored.position.offset < offset);
                let at_offset = events
                    .get(index)
                    .is_some_and(|stored| stored.position.offset == offset);
                Ok(if at_offset && !inclusive {
                    index + 1
                } else {
                    index
                })
            }
            StartPosition::SequenceNumber { value, inclusive } => {
                let first = if inclusive {
                    value
                } else {
                    value.saturating_add(1)
                };
                if first > length as i64 {
                    return Err(out_of_range("sequence number", value.to_string()));
                }
                Ok(first.max(0) as usize)
            }
            StartPosition::EnqueuedTime { ms, inclusive } => Ok(events.partition_point(|stored| {
                if inclusive {
                    stored.position.enqueued_time_ms < ms
                } else {
                    stored.position.enqueued_time_ms <= ms
                }
            })),
        }?;
        Ok(index.max(log.begin))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn now_ms() -> i64 {
    crate::time::Ticks::now().unix_millis()
}
