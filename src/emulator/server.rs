//! The AMQP side: connections, sessions and links on fe2o3-amqp's acceptor (reference
//! `eventhubs-amqp.md` §3, §4, §7).
//!
//! Task tree (every task tracked, every one stops on the emulator's cancellation): the accept
//! loop → one task per connection (accepts its sessions) → one task per session (inspects
//! each incoming attach, then accepts or refuses it) → one task per link: a `$cbs` or
//! `$management` request loop, a reply sender, or a partition reader.
//!
//! Replies find their link through a per-session table keyed by the reply link's target
//! address (which clients put in a request's `reply-to`) and by node (`$cbs`,
//! `$management`), for clients that send no `reply-to`.
//!
//! Events go out pre-settled (partition links are attached in settled mode whatever the
//! client asks): a settled delivery needs no disposition, so a client that stops reading and
//! closes never leaves a sender waiting (reference §4, pitfall 1).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fe2o3_amqp::acceptor::error::AcceptorAttachError;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SaslAcceptor, SessionAcceptor, SupportedSenderSettleModes,
};
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::definitions::{self, ErrorCondition, Role, SenderSettleMode};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties, Source, Target,
    TargetArchetype,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use fe2o3_amqp::{Receiver, Sender};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::registry::{condition, Hub, LinkFault, ReaderLease};
use super::selector::{parse_selector, StartPosition, SELECTOR_FILTER_KEY};
use super::wire::{CoalescedWrites, PaddedFrames, Severable};

/// Events taken from a partition per lock.
const READ_BATCH: usize = 256;
/// Replies queued for a reply link.
const REPLY_QUEUE: usize = 16;
/// How long closing a link or a connection may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type DefaultLinkAcceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;
type Reply = Message<AmqpValue<Value>>;
type ReplyRoutes = Arc<Mutex<HashMap<String, mpsc::Sender<Reply>>>>;

/// The accept loop: one task per TCP connection until `cancel`.
pub(super) async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = Arc::new(
        ConnectionAcceptor::builder()
            .container_id("twinwatch-emulator")
            .max_frame_size(65_536u32)
            .sasl_acceptor(AcceptAnySasl)
            .build(),
    );
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tracker.spawn(serve_connection(
                    Arc::clone(&acceptor),
                    stream,
                    peer,
                    Arc::clone(&hub),
                    cancel.clone(),
                    tracker.clone(),
                ));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %error, "emulator accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts every SASL mechanism the Event Hubs clients use, with any credential: clients
/// authorize afterwards through `$cbs`, and the emulator takes any token (as Microsoft's
/// emulator does).
#[derive(Debug, Clone)]
struct AcceptAnySasl;

impl SaslAcceptor for AcceptAnySasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(
            ["MSSBCBS", "ANONYMOUS", "PLAIN", "EXTERNAL"]
                .into_iter()
                .map(Symbol::from)
                .collect::<Vec<_>>(),
        )
    }

    fn on_init(&mut self, _init: SaslInit) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }
}

type Acceptor = ConnectionAcceptor<(), AcceptAnySasl>;

async fn serve_connection(
    acceptor: Arc<Acceptor>,
    stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let opened = tokio::select! {
        _ = cancel.cancelled() => return,
        opened = acceptor.accept(PaddedFrames::new(Severable::new(
            CoalescedWrites::new(stream),
            hub.connection_cut(),
        ))) => opened,
    };
    let mut connection: ListenerConnectionHandle = match opened {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%peer, error = %error, "emulator connection not opened");
            return;
        }
    };
    tracing::debug!(%peer, "emulator connection opened");
    let session_acceptor = SessionAcceptor::new();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => {
                let error = definitions::Error::new(
                    custom_condition(condition::CONNECTION_FORCED),
                    "the emulator is shutting down".to_string(),
                    None,
                );
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close_with_error(error)).await;
                return;
            }
            incoming = connection.next_incoming_session() => incoming,
        };
        let Some(incoming) = incoming else { break };
        match session_acceptor
            .accept_incoming_session(incoming, &mut connection)
            .await
        {
            Ok(session) => {
                tracker.spawn(serve_session(
                    session,
                    Arc::clone(&hub),
                    cancel.clone(),
                    tracker.clone(),
                ));
            }
            Err(error) => {
                tracing::debug!(%peer, error = %error, "emulator session not begun");
                break;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close()).await;
    tracing::debug!(%peer, "emulator connection closed");
}

async fn serve_session(
    mut session: ListenerSessionHandle,
    hub: Arc<Hub>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let link_acceptor = LinkAcceptor::new();
    // Event Hubs does not wait for consumers to settle events (the Python client never
    // does, though it attaches asking for unsettled deliveries): events go out settled, so
    // nothing waits on a disposition and nothing accumulates in an unsettled map.
    let event_link_acceptor = LinkAcceptor::builder()
        .supported_sender_settle_modes(SupportedSenderSettleModes::Settled)
        .fallback_sender_settle_mode(SenderSettleMode::Settled)
        .build();
    let routes: ReplyRoutes = Arc::default();
    loop {
        let attach = tokio::select! {
            _ = cancel.cancelled() => return,
            attach = session.next_incoming_attach() => attach,
        };
        let Some(attach) = attach else { return };
        let link = LinkContext {
            hub: &hub,
            cancel: &cancel,
            tracker: &tracker,
            routes: &routes,
        };
        let accepted = link
            .handle_attach(attach, &link_acceptor, &event_link_acceptor, &mut session)
            .await;
        match accepted {
            Ok(()) => {}
            Err(AcceptorAttachError::IllegalSessionState) => {
                // The session is gone; nothing more will attach to it.
                return;
            }
            Err(error) => {
                // fe2o3-amqp has already answered this one attach; the session goes on.
                tracing::debug!(error = %error, "emulator link not attached");
            }
        }
    }
}

/// What a link's attach is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Cbs,
    Management,
    Partition {
        hub: String,
        consumer_group: String,
        partition: String,
    },
    /// A hub or partition as a send target (producers are not served).
    Entity,
    Unknown,
}

/// Reads a link address: `$cbs`, `[.../]$management`, or
/// `[amqps://HOST[:PORT]/]HUB/ConsumerGroups/CG/Partitions/ID`.
fn parse_address(address: &str) -> Node {
    let path = match address.find("://") {
        Some(scheme_end) => {
            let after_scheme = &address[scheme_end + 3..];
            after_scheme
                .find('/')
                .map_or("", |host_end| &after_scheme[host_end..])
        }
        None => address,
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        [] => Node::Unknown,
        [.., last] if last.eq_ignore_ascii_case("$cbs") => Node::Cbs,
        [.., last] if last.eq_ignore_ascii_case("$management") => Node::Management,
        [hub, groups, consumer_group, partitions, partition]
            if groups.eq_ignore_ascii_case("ConsumerGroups")
                && partitions.eq_ignore_ascii_case("Partitions") =>
        {
            Node::Partition {
                hub: (*hub).to_string(),
                consumer_group: (*consumer_group).to_string(),
                partition: (*partition).to_string(),
            }
        }
        [_] | [_, _, _] => Node::Entity,
        _ => Node::Unknown,
    }
}

struct LinkContext<'a> {
    hub: &'a Arc<Hub>,
    cancel: &'a CancellationToken,
    tracker: &'a TaskTracker,
    routes: &'a ReplyRoutes,
}

impl LinkContext<'_> {
    async fn handle_attach(
        &self,
        attach: Attach,
        link_acceptor: &DefaultLinkAcceptor,
        event_link_acceptor: &DefaultLinkAcceptor,
        session: &mut ListenerSessionHandle,
    ) -> Result<(), AcceptorAttachError> {
        let link_name = attach.name.clone();
        match attach.role {
            // The client sends: requests to `$cbs` or `$management`, or events (not served).
            Role::Sender => {
                let address = match attach.target.as_deref() {
                    Some(TargetArchetype::Target(target)) => target.address.clone(),
                    _ => None,
                };
                let node = address.as_deref().map_or(Node::Unknown, parse_address);
                let endpoint = link_acceptor
                    .accept_incoming_attach(attach, session)
                    .await?;
                let LinkEndpoint::Receiver(receiver) = endpoint else {
                    return Ok(());
                };
                match node {
                    Node::Cbs | Node::Management => {
                        self.tracker.spawn(serve_requests(
                            receiver,
                            node,
                            Arc::clone(self.hub),
                            Arc::clone(self.routes),
                            self.cancel.clone(),
                        ));
                    }
                    _ => {
                        let fault = LinkFault::new(
                            condition::NOT_IMPLEMENTED,
                            format!(
                                "the emulator serves receivers only; cannot send to '{}'",
                                address.unwrap_or_default()
                            ),
                        );
                        self.tracker.spawn(close_receiver(receiver, fault));
                    }
                }
            }
            // The client receives: replies from `$cbs` or `$management`, or events.
            Role::Receiver => {
                let source = attach.source.as_deref();
                let address = source.and_then(|source| source.address.clone());
                let node = address.as_deref().map_or(Node::Unknown, parse_address);
                match node {
                    Node::Cbs | Node::Management => {
                        let reply_address = match attach.target.as_deref() {
                            Some(TargetArchetype::Target(target)) => target.address.clone(),
                            _ => None,
                        };
                        let endpoint = link_acceptor
                            .accept_incoming_attach(attach, session)
                            .await?;
                        let LinkEndpoint::Sender(sender) = endpoint else {
                            return Ok(());
                        };
                        let (queue, replies) = mpsc::channel(REPLY_QUEUE);
                        {
                            let mut routes =
                                self.routes.lock().unwrap_or_else(PoisonError::into_inner);
                            routes.insert(node_key(&node).to_string(), queue.clone());
                            if let Some(reply_address) = reply_address {
                                routes.insert(reply_address, queue);
                            }
                        }
                        self.tracker
                            .spawn(serve_replies(sender, replies, self.cancel.clone()));
                    }
                    Node::Partition {
                        hub,
                        consumer_group,
                        partition,
                    } => {
                        let admitted = self.admit_reader(
                            &hub,
                            &consumer_group,
                            &partition,
                            &attach,
                            &link_name,
                        );
                        let endpoint = event_link_acceptor
                            .accept_incoming_attach(attach, session)
                            .await?;
                        let LinkEndpoint::Sender(sender) = endpoint else {
                            return Ok(());
                        };
                        match admitted {
                            Ok((lease, first)) => {
                                tracing::debug!(
                                    link = %link_name, %partition, first, "emulator receiver attached"
                                );
                                self.tracker.spawn(serve_reader(
                                    sender,
                                    Arc::clone(self.hub),
                                    lease,
                                    first,
                                    self.cancel.clone(),
                                ));
                            }
                            Err(fault) => {
                                tracing::debug!(
                                    link = %link_name, condition = %fault.condition,
                                    description = %fault.description, "emulator receiver refused"
                                );
                                self.tracker.spawn(close_sender(sender, fault));
                            }
                        }
                    }
                    Node::Entity | Node::Unknown => {
                        let endpoint = link_acceptor
                            .accept_incoming_attach(attach, session)
                            .await?;
                        if let LinkEndpoint::Sender(sender) = endpoint {
                            let fault = LinkFault::new(
                                condition::NOT_FOUND,
                                format!(
                                    "The messaging entity '{}' could not be found.",
                                    address.unwrap_or_default()
                                ),
                            );
                            self.tracker.spawn(close_sender(sender, fault));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks a receiver's hub, consumer group, partition, filter and epoch; on success its
    /// registration and the index of its first event.
    fn admit_reader(
        &self,
        hub: &str,
        consumer_group: &str,
        partition: &str,
        attach: &Attach,
        link_name: &str,
    ) -> Result<(ReaderLease, usize), LinkFault> {
        if !self.hub.is_named(hub) {
            return Err(LinkFault::new(
                condition::NOT_FOUND,
                format!(
                    "The messaging entity '{hub}' could not be found. To know more visit \
                     https://aka.ms/sbResourceMgrExceptions."
                ),
            ));
        }
        if !self.hub.has_consumer_group(consumer_group) {
            return Err(LinkFault::new(
                condition::NOT_FOUND,
                format!(
                    "The messaging entity '{hub}/ConsumerGroups/{consumer_group}' could not be \
                     found."
                ),
            ));
        }
        let target = self.hub.partition_by_id(partition)?;
        let start = match selector_of(attach) {
            Some(expression) => parse_selector(&expression)
                .map_err(|error| LinkFault::new(condition::ARGUMENT_ERROR, error.to_string()))?,
            None => StartPosition::EARLIEST,
        };
        let epoch = epoch_of(attach);
        // Register first, then resolve: an `@latest` receiver starts after the events
        // enqueued before it was admitted.
        let lease = self
            .hub
            .register_reader(target.id(), consumer_group, epoch, link_name)?;
        let first = target.start_index(start)?;
        Ok((lease, first))
    }
}

fn node_key(node: &Node) -> &'static str {
    match node {
        Node::Cbs => "$cbs",
        _ => "$management",
    }
}

/// The selector filter expression of a receiver's source, whatever its descriptor.
fn selector_of(attach: &Attach) -> Option<String> {
    let filter = attach.source.as_ref()?.filter.as_ref()?;
    let value = filter
        .iter()
        .find(|(key, _)| key.as_str() == SELECTOR_FILTER_KEY)
        .map(|(_, value)| value)?;
    value_text(value)
}

fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Described(described) => value_text(&described.value),
        Value::String(text) => Some(text.clone()),
        Value::Symbol(symbol) => Some(symbol.as_str().to_string()),
        Value::Binary(bytes) => String::from_utf8(bytes.to_vec()).ok(),
        _ => None,
    }
}

/// The owner level (`com.microsoft:epoch`) a receiver asks for.
fn epoch_of(attach: &Attach) -> Option<i64> {
    let properties = attach.properties.as_ref()?;
    let value = properties
        .iter()
        .find(|(key, _)| key.as_str() == "com.microsoft:epoch")
        .map(|(_, value)| value)?;
    value_i64(value)
}

fn value_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Long(number) => Some(*number),
        Value::Int(number) => Some(i64::from(*number)),
        Value::Short(number) => Some(i64::from(*number)),
        Value::Byte(number) => Some(i64::from(*number)),
        Value::Ulong(number) => i64::try_from(*number).ok(),
        Value::Uint(number) => Some(i64::from(*number)),
        Value::Ushort(number) => Some(i64::from(*number)),
        Value::Ubyte(number) => Some(i64::from(*number)),
        _ => None,
    }
}

fn custom_condition(name: &str) -> ErrorCondition {
    ErrorCondition::Custom(Symbol::from(name))
}

fn amqp_error(fault: &LinkFault) -> definitions::Error {
    definitions::Error::new(
        custom_condition(&fault.condition),
        fault.description.clone(),
        None,
    )
}

async fn close_sender(sender: Sender, fault: LinkFault) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close_with_error(amqp_error(&fault))).await;
}

async fn close_receiver(receiver: Receiver, fault: LinkFault) {
    let _ =
        tokio::time::timeout(CLOSE_TIMEOUT, receiver.close_with_error(amqp_error(&fault))).await;
}

/// Streams a partition to one receiver, from event `first` on, then follows it live.
async fn serve_reader(
    mut sender: Sender,
    hub: Arc<Hub>,
    mut lease: ReaderLease,
    first: usize,
    cancel: CancellationToken,
) {
    let Some(partition) = hub.partition(lease.partition()) else {
        return;
    };
    let mut appended = partition.subscribe();
    let mut next = first;
    loop {
        appended.borrow_and_update();
        let batch = partition.read(next, READ_BATCH);
        if batch.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                stop = &mut lease.stop => {
                    let fault = stop.unwrap_or_else(|_| detach_forced());
                    close_sender(sender, fault).await;
                    return;
                }
                _ = sender.on_detach() => {
                    if hub.ignores_detaches() {
                        // Hold the link, unanswered, until the emulator stops.
                        cancel.cancelled().await;
                        return;
                    }
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
                    return;
                }
                changed = appended.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        for stored in batch {
            tokio::select! {
                _ = cancel.cancelled() => return,
                stop = &mut lease.stop => {
                    let fault = stop.unwrap_or_else(|_| detach_forced());
                    close_sender(sender, fault).await;
                    return;
                }
                sent = sender.send_ref(&stored.sendable) => {
                    if let Err(error) = sent {
                        tracing::debug!(error = %error, "emulator receiver link ended");
                        return;
                    }
                }
            }
            next += 1;
        }
    }
}

fn detach_forced() -> LinkFault {
    LinkFault::new(condition::DETACH_FORCED, "the receiver was detached")
}

/// Sends the replies queued for one reply link until the client detaches it.
async fn serve_replies(
    mut sender: Sender,
    mut replies: mpsc::Receiver<Reply>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sender.on_detach() => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
                return;
            }
            reply = replies.recv() => {
                let Some(reply) = reply else { return };
                let sendable = Sendable::builder().message(reply).settled(true).build();
                if let Err(error) = sender.send(sendable).await {
                    tracing::debug!(error = %error, "emulator reply link ended");
                    return;
                }
            }
        }
    }
}

/// Answers the requests of one `$cbs` or `$management` request link.
async fn serve_requests(
    mut receiver: Receiver,
    node: Node,
    hub: Arc<Hub>,
    routes: ReplyRoutes,
    cancel: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            _ = cancel.cancelled() => return,
            delivery = receiver.recv::<Body<Value>>() => delivery,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(error) => {
                tracing::debug!(error = %error, "emulator request link ended");
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, receiver.close()).await;
                return;
            }
        };
        if let Err(error) = receiver.accept(&delivery).await {
            tracing::debug!(error = %error, "emulator request not accepted");
        }
        let request = delivery.message();
        let reply = match node {
            Node::Cbs => cbs_reply(request, hub.refuses_tokens()),
            _ => management_reply(request, &hub),
        };
        let reply_to = request
            .properties
            .as_ref()
            .and_then(|properties| properties.reply_to.clone());
        let queue = {
            let routes = routes.lock().unwrap_or_else(PoisonError::into_inner);
            reply_to
                .and_then(|address| routes.get(&address).cloned())
                .or_else(|| routes.get(node_key(&node)).cloned())
        };
        match queue {
            Some(queue) => {
                if queue.send(reply).await.is_err() {
                    tracing::debug!("emulator reply link gone");
                }
            }
            None => tracing::debug!("emulator request without a reply link"),
        }
    }
}

fn application_property<'a>(message: &'a Message<Body<Value>>, name: &str) -> Option<&'a str> {
    match message.application_properties.as_ref()?.get(name)? {
        SimpleValue::String(text) => Some(text),
        SimpleValue::Symbol(symbol) => Some(symbol.as_str()),
        _ => None,
    }
}

/// A put-token request: every token is accepted (status 202, which fe2o3-amqp's CBS client
/// requires exactly), unless the test refuses tokens: 401, as the service answers a wrong key.
fn cbs_reply(request: &Message<Body<Value>>, refuse: bool) -> Reply {
    match application_property(request, "operation") {
        Some("put-token") if refuse => reply(
            request,
            401,
            "Unauthorized: the token is not valid for this entity (injected)",
            Value::Null,
        ),
        Some("put-token") => reply(request, 202, "Accepted", Value::Null),
        other => reply(
            request,
            400,
            &format!("unsupported $cbs operation {other:?}"),
            Value::Null,
        ),
    }
}

/// A `$management` READ of the hub or of a partition (reference §3.3).
fn management_reply(request: &Message<Body<Value>>, hub: &Hub) -> Reply {
    let operation = application_property(request, "operation");
    let kind = application_property(request, "type");
    let name = application_property(request, "name").unwrap_or_default();
    if operation != Some("READ") {
        return reply(
            request,
            400,
            &format!("unsupported $management operation {operation:?}"),
            Value::Null,
        );
    }
    if !hub.is_named(name) {
        return reply(
            request,
            404,
            &format!("The messaging entity '{name}' could not be found."),
            Value::Null,
        );
    }
    let entry = |key: &str, value: Value| (Value::String(key.to_string()), value);
    match kind {
        Some("com.microsoft:eventhub") => {
            let partition_ids: Vec<Value> = (0..hub.partition_count())
                .map(|id| Value::String(id.to_string()))
                .collect();
            let body: OrderedMap<Value, Value> = [
                entry("name", Value::String(hub.name().to_string())),
                entry("type", Value::String("com.microsoft:eventhub".to_string())),
                entry(
                    "created_at",
                    Value::Timestamp(Timestamp::from_milliseconds(hub.created_at_ms())),
                ),
                entry("partition_count", Value::Int(hub.partition_count() as i32)),
                entry("partition_ids", Value::Array(Array::from(partition_ids))),
            ]
            .into_iter()
            .collect();
            reply(request, 200, "OK", Value::Map(body))
        }
        Some("com.microsoft:partition") => {
            let id = application_property(request, "partition").unwrap_or_default();
            let partition = match hub.partition_by_id(id) {
                Ok(partition) => partition,
                Err(fault) => return reply(request, 400, &fault.description, Value::Null),
            };
            let snapshot = partition.snapshot();
            let body: OrderedMap<Value, Value> = [
                entry("name", Value::String(hub.name().to_string())),
                entry("type", Value::String("com.microsoft:partition".to_string())),
                entry("partition", Value::String(snapshot.partition.to_string())),
                entry(
                    "begin_sequence_number",
                    Value::Long(snapshot.begin_sequence_number),
                ),
                entry(
                    "last_enqueued_sequence_number",
                    Value::Long(snapshot.last_enqueued_sequence_number),
                ),
                entry(
                    "last_enqueued_offset",
                    Value::String(snapshot.last_enqueued_offset),
                ),
                entry(
                    "last_enqueued_time_utc",
                    Value::Timestamp(Timestamp::from_milliseconds(snapshot.last_enqueued_time_ms)),
                ),
                entry("is_partition_empty", Value::Bool(snapshot.is_empty)),
                entry("last_enqueued_sequence_number_epoch", Value::Long(0)),
            ]
            .into_iter()
            .collect();
            reply(request, 200, "OK", Value::Map(body))
        }
        other => reply(
            request,
            400,
            &format!("unsupported $management type {other:?}"),
            Value::Null,
        ),
    }
}

/// A response: `status-code`, `status-description`, and `correlation-id` = the request's
/// `message-id` (the Python client matches on it).
fn reply(request: &Message<Body<Value>>, status: i32, description: &str, body: Value) -> Reply {
    let correlation_id: Option<MessageId> = request
        .properties
        .as_ref()
        .and_then(|properties| properties.message_id.clone());
    Message::builder()
        .properties(Properties {
            correlation_id,
            ..Properties::default()
        })
        .application_properties(
            ApplicationProperties::builder()
                .insert("status-code", SimpleValue::Int(status))
                .insert(
                    "status-description",
                    SimpleValue::String(description.to_string()),
                )
                .build(),
        )
        .value(body)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_link_addresses() {
        let partition = |hub: &str, cg: &str, id: &str| Node::Partition {
            hub: hub.to_string(),
            consumer_group: cg.to_string(),
            partition: id.to_string(),
        };
        assert_eq!(parse_address("$cbs"), Node::Cbs);
        assert_eq!(parse_address("$management"), Node::Management);
        assert_eq!(
            parse_address("amqps://localhost/hub1/ConsumerGroups/$Default/$management"),
            Node::Management
        );
        assert_eq!(
            parse_address("amqps://127.0.0.1:5672/hub1/ConsumerGroups/$Default/Partitions/3"),
            partition("hub1", "$Default", "3")
        );
        assert_eq!(
            parse_address("hub1/consumergroups/cg/partitions/0"),
            partition("hub1", "cg", "0")
        );
        assert_eq!(parse_address("amqp://localhost/hub1"), Node::Entity);
        assert_eq!(parse_address("hub1/Partitions/0"), Node::Entity);
        assert_eq!(parse_address(""), Node::Unknown);
        assert_eq!(parse_address("a/b/c/d/e/f"), Node::Unknown);
    }
}
