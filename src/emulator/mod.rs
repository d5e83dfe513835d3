//! `twinwatch emulator`: a local Event Hubs endpoint (AMQP 1.0 over plain TCP) for
//! development, tests and benchmarks, serving one hub from memory.
//!
//! It speaks what Microsoft's Event Hubs clients expect of the service (reference
//! `eventhubs-amqp.md` §3): any SASL mechanism (`MSSBCBS`, `ANONYMOUS`, `PLAIN`, `EXTERNAL`,
//! every credential accepted, as Microsoft's emulator does), `$cbs` put-token, `$management`
//! READ of the hub and of a partition, and receivers on
//! `[amqps://HOST/]HUB/ConsumerGroups/CG/Partitions/ID` that start where their selector filter
//! says (offset, sequence number or enqueued time; quoted or not; `>` or `>=`) and then follow
//! the partition live. Each event carries the annotations Event Hubs sets
//! (`x-opt-sequence-number` long, `x-opt-offset` string, `x-opt-enqueued-time` timestamp)
//! besides those its sender (IoT Hub) put on it. Owner levels (epochs) follow the service's
//! rules and the error conditions are the service's (§3.5): see [`registry`]. A receiver
//! without a filter starts at the beginning of its partition. Producers are not served (a
//! client sender to the hub is closed with `amqp:not-implemented`): events come from
//! [`Emulator::publish`].
//!
//! Promises:
//! - placement is stable: an event goes to partition `fnv1a_32(partition_key) mod N`
//!   ([`partition_for_key`]), so one device's events stay in one partition, in order;
//! - sequence numbers count from 0 in each partition; offsets are opaque decimal strings that
//!   increase strictly (a running byte count of the stored events); enqueued times never
//!   decrease within a partition;
//! - [`Emulator::shutdown`] stops every task it started (connections, sessions, links,
//!   publishers) and returns once they have ended, or after a bounded wait.
//!
//! Codemap: [`event`] (what is stored, the IoT Hub mapping, the AMQP message), [`selector`]
//! (filter parsing), [`registry`] (partitions, readers, epoch rules; no IO), `server` (the
//! AMQP side on fe2o3-amqp's acceptor), `wire` (full-length performatives for the Python
//! client).

pub mod event;
pub mod query;
pub mod registry;
pub mod selector;
mod server;
mod wire;

#[cfg(test)]
mod query_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use event::{EmulatedEvent, SystemValue};
pub use registry::{partition_for_key, PartitionSnapshot};

use registry::Hub;

/// The consumer group every hub has.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";

/// How long [`Emulator::shutdown`] waits for its tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the emulator serves and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatorConfig {
    /// The TCP address to listen on (port 0 picks a free port; see [`Emulator::local_addr`]).
    pub listen: SocketAddr,
    /// The Event Hub name (`EntityPath`), matched case-insensitively as the service does.
    pub hub: String,
    /// The number of partitions, ids `"0"` to `"N-1"`; at least 1.
    pub partitions: u32,
    /// Consumer groups besides `$Default`, matched case-insensitively. Empty means any consumer
    /// group name is accepted, so a client configured for a consumer group of a real hub works
    /// here unchanged.
    pub consumer_groups: Vec<String>,
}

impl EmulatorConfig {
    /// A config for `hub` with `partitions` partitions on `listen`, accepting any consumer
    /// group.
    pub fn new(listen: SocketAddr, hub: impl Into<String>, partitions: u32) -> EmulatorConfig {
        EmulatorConfig {
            listen,
            hub: hub.into(),
            partitions,
            consumer_groups: Vec::new(),
        }
    }
}

/// A running emulator: a listener and the tasks serving its connections.
///
/// Dropping it without [`Emulator::shutdown`] cancels the tasks too, but does not wait.
pub struct Emulator {
    hub: Arc<Hub>,
    local_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Emulator {
    /// Binds `config.listen` and serves in the background on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an empty hub name or zero partitions; any error from binding.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        if config.hub.is_empty() {
            return Err(invalid_input("the hub name is empty"));
        }
        if config.partitions == 0 {
            return Err(invalid_input("a hub needs at least one partition"));
        }
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let hub = Arc::new(Hub::new(
            config.hub,
            config.partitions,
            config.consumer_groups,
        ));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(server::serve(
            listener,
            Arc::clone(&hub),
            cancel.clone(),
            tracker.clone(),
        ));
        tracing::info!(address = %local_addr, hub = hub.name(), partitions = hub.partition_count(), "emulator listening");
        Ok(Emulator {
            hub,
            local_addr,
            cancel,
            tracker,
        })
    }

    /// The address the emulator listens on (with the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The connection string to give a client, in the form of Microsoft's emulator:
    /// `Endpoint=sb://HOST:PORT;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;EntityPath=HUB`.
    /// HOST is the listen address, or `localhost` when listening on every interface.
    pub fn connection_string(&self) -> String {
        connection_string_for(self.local_addr, self.hub.name())
    }

    /// The hub name as configured.
    pub fn hub_name(&self) -> &str {
        self.hub.name()
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.hub.partition_count()
    }

    /// Appends `event` to the partition of its partition key, giving it the next sequence
    /// number and offset there and an enqueued time (its own, or now, but never before the
    /// partition's last); readers of that partition see it at once.
    pub fn publish(&self, event: EmulatedEvent) {
        self.hub.publish(event);
    }

    /// The partition [`Emulator::publish`] puts events with this partition key in.
    pub fn partition_of(&self, partition_key: &str) -> u32 {
        partition_for_key(partition_key, self.hub.partition_count())
    }

    /// What a `$management` READ of partition `partition` would answer now, or `None` for a
    /// partition that does not exist.
    pub fn partition_snapshot(&self, partition: u32) -> Option<PartitionSnapshot> {
        self.hub.partition(partition).map(|p| p.snapshot())
    }

    /// Publishes `events` in the background at `events_per_second` (released in small bursts
    /// every 10 ms), until the iterator ends or the emulator shuts down. The iterator runs on
    /// the runtime: it must not block (a generator is fine, a file reader is not).
    pub fn spawn_publisher<I>(&self, events: I, events_per_second: f64)
    where
        I: Iterator<Item = EmulatedEvent> + Send + 'static,
    {
        let hub = Arc::clone(&self.hub);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            publish_at_rate(hub, events, events_per_second, cancel).await;
        });
    }

    /// Fault injection: partition `partition`'s retention drops every event before sequence
    /// number `sequence_number`, as the service does to events older than the retention
    /// period: a receiver that opens before it (a consumer that was down too long) starts at
    /// it, and sees a jump in sequence numbers.
    pub fn expire_before(&self, partition: u32, sequence_number: u64) {
        if let Some(p) = self.hub.partition(partition) {
            p.expire_before(usize::try_from(sequence_number).unwrap_or(usize::MAX));
        }
    }

    /// Fault injection: refuse (or accept again) every token put to `$cbs`, as the service
    /// refuses a wrong key: clients then fail to authorize.
    pub fn refuse_tokens(&self, refuse: bool) {
        self.hub.set_refuse_tokens(refuse);
    }

    /// Fault injection: from now on a receiver's detach is never answered, and its link and
    /// connection are held open (until the emulator shuts down), as a hub that hangs would:
    /// for testing that a client's stop keeps to its deadline.
    pub fn ignore_detaches(&self, ignore: bool) {
        self.hub.set_ignore_detaches(ignore);
    }

    /// Fault injection: closes every receiver of `partition` (of every partition when
    /// `None`) with the AMQP error `condition` and `description`, as the service does when it
    /// moves a partition (`amqp:link:detach-forced`) or is overloaded
    /// (`com.microsoft:server-busy`); see [`registry::condition`]. Clients re-attach as they
    /// would to the service. Returns how many receivers were told.
    pub fn detach_receivers(
        &self,
        partition: Option<u32>,
        condition: &str,
        description: &str,
    ) -> usize {
        self.hub.detach_readers(
            partition,
            &registry::LinkFault::new(condition, description.to_string()),
        )
    }

    /// Fault injection: drops every open TCP connection at once, with no AMQP `close` (as a
    /// failing gateway or load balancer does); connections made afterwards are served as
    /// usual. Returns how many partition receivers the dropped connections carried.
    pub fn drop_connections(&self) -> usize {
        self.hub.drop_connections()
    }

    /// Stops accepting connections, closes every connection, and waits (a few seconds at
    /// most) for all the emulator's tasks to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tracker.len(),
                "emulator tasks still running after the shutdown grace period"
            );
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The emulator's connection string for a listener on `address` serving `hub`.
pub fn connection_string_for(address: SocketAddr, hub: &str) -> String {
    let host = if address.ip().is_unspecified() {
        "localhost".to_string()
    } else if address.is_ipv6() {
        format!("[{}]", address.ip())
    } else {
        address.ip().to_string()
    };
    format!(
        "Endpoint=sb://{host}:{port};SharedAccessKeyName=RootManageSharedAccessKey;\
         SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;EntityPath={hub}",
        port = address.port()
    )
}

async fn publish_at_rate<I>(
    hub: Arc<Hub>,
    mut events: I,
    events_per_second: f64,
    cancel: CancellationToken,
) where
    I: Iterator<Item = EmulatedEvent>,
{
    const TICK: Duration = Duration::from_millis(10);
    let usable_rate = events_per_second.is_finite() && events_per_second > 0.0;
    if !usable_rate {
        return;
    }
    let per_tick = events_per_second * TICK.as_secs_f64();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0_f64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            match events.next() {
                Some(event) => hub.publish(event),
                None => return,
            }
        }
    }
}

fn invalid_input(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_string())
}
