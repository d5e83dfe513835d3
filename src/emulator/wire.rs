//! Full-length performatives on the wire, for clients that read every field by position.
//!
//! AMQP lets an encoder leave out trailing null fields of a described list, and fe2o3-amqp
//! does (an `end` without error goes out as `list0`). Microsoft's Python client
//! (`azure-eventhub`'s pure-Python AMQP stack) indexes performative fields by position
//! (`frame[9]` of an `open`, `frame[13]` of an `attach`, `frame[0][2]` of a `close` error) and
//! expects a `list8`/`list32` after the descriptor, as the service always sends. So every
//! frame the emulator writes passes through [`PaddedFrames`], which re-encodes the
//! performative with each known described list (performatives, SASL frames, `error`,
//! `source`, `target`) padded with nulls to its full field count and its descriptor as a
//! small ulong. Transfer payloads (the messages) are copied unchanged.
//!
//! That holds for a large transfer too: the client takes a transfer's payload as the element
//! after its eleven fields (`frame[11]`), so a 270 KB message sent in one frame (the client
//! announces a max-frame-size of 1 MiB) with fe2o3-amqp's short transfer list fails there
//! with `list index out of range`. A padded frame must still fit the max-frame-size the peer
//! announced in its `open` (fe2o3-amqp cuts a multi-frame transfer's pieces at exactly that
//! size), so [`PaddedFrames`] reads that limit from the peer's `open` as it passes and leaves
//! a frame unpadded only where padding would take it past the limit.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The field count of each described list to pad, by descriptor code.
fn full_field_count(descriptor: u64) -> Option<usize> {
    Some(match descriptor {
        0x10 => 10, // open
        0x11 => 8,  // begin
        0x12 => 14, // attach
        0x13 => 11, // flow
        0x14 => 11, // transfer
        0x15 => 6,  // disposition
        0x16 => 3,  // detach
        0x17 => 1,  // end
        0x18 => 1,  // close
        0x1d => 3,  // error
        0x28 => 11, // source
        0x29 => 7,  // target
        0x40 => 1,  // sasl-mechanisms
        0x41 => 3,  // sasl-init
        0x42 => 1,  // sasl-challenge
        0x43 => 1,  // sasl-response
        0x44 => 2,  // sasl-outcome
        _ => return None,
    })
}

/// Until the peer's `open` has been read, frames this large (or larger) pass unchanged: no
/// Event Hubs client announces a max-frame-size below 64 KiB, so the few bytes padding adds
/// never take a smaller frame past it. (Transfers come only after the `open`.)
const UNPADDED_FRAME_BYTES: usize = 16 * 1024;

/// Incoming bytes [`PeerOpen`] holds at most while looking for the peer's `open` (a protocol
/// header, a SASL exchange and the `open` are far smaller); past it, it stops looking.
const MAX_SNIFFED: usize = 64 * 1024;

const UINT_MAX: &[u8] = &[0x70, 0xff, 0xff, 0xff, 0xff];
const USHORT_MAX: &[u8] = &[0x60, 0xff, 0xff];
const FALSE: &[u8] = &[0x42];

/// Fields the specification gives a default, written out where the encoder left them null
/// (fe2o3-amqp leaves out a field equal to its default; the Python client compares
/// `begin.handle-max` as a number).
fn field_defaults(descriptor: u64) -> &'static [(usize, &'static [u8])] {
    match descriptor {
        0x10 => &[(2, UINT_MAX), (3, USHORT_MAX)],
        0x11 => &[(4, UINT_MAX)],
        // snd-settle-mode mixed, rcv-settle-mode first, incomplete-unsettled false.
        0x12 => &[(3, &[0x50, 0x02]), (4, &[0x50, 0x00]), (9, FALSE)],
        0x13 => &[(8, FALSE), (9, FALSE)],
        0x14 => &[(5, FALSE), (8, FALSE), (9, FALSE), (10, FALSE)],
        0x15 => &[(3, FALSE), (5, FALSE)],
        0x16 => &[(1, FALSE)],
        _ => &[],
    }
}

/// Outgoing bytes held back beyond which writes wait for the socket.
const MAX_HELD: usize = 256 * 1024;

/// A stream whose outgoing AMQP frames get full-length performatives; reads pass through.
#[derive(Debug)]
pub(crate) struct PaddedFrames<S> {
    inner: S,
    /// Bytes written by the AMQP engine, not yet a whole frame.
    incoming: Vec<u8>,
    /// Rewritten bytes not yet accepted by `inner`.
    outgoing: Vec<u8>,
    /// How much of `outgoing` `inner` has accepted.
    written: usize,
    /// The peer's max-frame-size, read from its `open`.
    peer_open: PeerOpen,
}

/// Reads the max-frame-size from the peer's `open` in the bytes the peer sends, then stops.
#[derive(Debug, Default)]
struct PeerOpen {
    /// Bytes read, not yet a whole protocol header or frame.
    pending: Vec<u8>,
    /// Found the `open` (or gave up looking).
    done: bool,
    /// The max-frame-size the peer announced (`u32::MAX` where it left the field null).
    max_frame_size: Option<usize>,
}

impl PeerOpen {
    /// Takes the next bytes the peer sent.
    fn read(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            let rest = &self.pending[start..];
            if rest.len() < 8 {
                break;
            }
            if rest.starts_with(b"AMQP") {
                start += 8;
                continue;
            }
            let size = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if size < 8 {
                self.done = true;
                break;
            }
            if rest.len() < size {
                break;
            }
            // Frame type 0 is AMQP (1 is SASL): the first AMQP frame with a body is the open.
            if rest[5] == 0 && size > usize::from(rest[4]) * 4 {
                self.max_frame_size = open_max_frame_size(&rest[..size]);
                self.done = true;
                break;
            }
            start += size;
        }
        self.pending.drain(..start);
        if self.done || self.pending.len() > MAX_SNIFFED {
            self.done = true;
            self.pending = Vec::new();
        }
    }
}

/// The max-frame-size of an `open` frame (`u32::MAX` when null or left out, its default);
/// `None` when the frame is not an `open` that parses.
fn open_max_frame_size(frame: &[u8]) -> Option<usize> {
    let body = frame.get(usize::from(*frame.get(4)?) * 4..)?;
    if *body.first()? != 0x00 {
        return None;
    }
    let (descriptor, descriptor_length) = read_descriptor(&body[1..])?;
    if descriptor != Some(0x10) {
        return None;
    }
    let mut elements = Vec::new();
    let mut ends = Vec::new();
    copy_list_elements(body.get(1 + descriptor_length..)?, &mut elements, &mut ends)?;
    let field = match (ends.get(1), ends.get(2)) {
        (Some(&start), Some(&end)) => &elements[start..end],
        _ => &[0x40][..],
    };
    let value = match *field {
        [0x40] => u32::MAX,
        [0x43] => 0,
        [0x52, small] => u32::from(small),
        [0x70, a, b, c, d] => u32::from_be_bytes([a, b, c, d]),
        _ => return None,
    };
    usize::try_from(value).ok()
}

impl<S> PaddedFrames<S> {
    pub(crate) fn new(inner: S) -> PaddedFrames<S> {
        PaddedFrames {
            inner,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            written: 0,
            peer_open: PeerOpen::default(),
        }
    }

    /// Moves every whole protocol header and frame from `incoming` to `outgoing`.
    fn rewrite_complete_frames(&mut self) -> io::Result<()> {
        let mut start = 0;
        loop {
            let rest = &self.incoming[start..];
            if rest.len() < 8 {
                break;
            }
            if rest.starts_with(b"AMQP") {
                self.outgoing.extend_from_slice(&rest[..8]);
                start += 8;
                continue;
            }
            let size = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if size < 8 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "outgoing AMQP frame shorter than its header",
                ));
            }
            if rest.len() < size {
                break;
            }
            rewrite_frame(
                &rest[..size],
                self.peer_open.max_frame_size,
                &mut self.outgoing,
            );
            start += size;
        }
        self.incoming.drain(..start);
        Ok(())
    }
}

impl<S: AsyncWrite + Unpin> PaddedFrames<S> {
    /// Writes `outgoing` to `inner` until it is all written or `inner` is not ready.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.outgoing.len() {
            let written =
                match Pin::new(&mut self.inner).poll_write(cx, &self.outgoing[self.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(written)) => written,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => return Poll::Pending,
                };
            self.written += written;
        }
        self.outgoing.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PaddedFrames<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.peer_open.read(&buf.filled()[before..]);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PaddedFrames<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        if this.outgoing.len() - this.written > MAX_HELD {
            // `poll_drain` registered the waker with `inner`.
            return Poll::Pending;
        }
        this.incoming.extend_from_slice(buf);
        this.rewrite_complete_frames()?;
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

/// A stream that fault injection can cut: once `cut` is cancelled every read and write fails
/// with `ConnectionReset`, so the AMQP engine on top ends and drops the socket, and the peer
/// sees the TCP connection close with no AMQP `close`: a connection dropped mid-stream, as a
/// load balancer or a failing gateway drops one.
pub(crate) struct Severable<S> {
    inner: S,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Severable<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Severable")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Severable<S> {
    pub(crate) fn new(inner: S, cut: CancellationToken) -> Severable<S> {
        Severable {
            inner,
            cut: Box::pin(cut.cancelled_owned()),
        }
    }

    /// `Err` once cut; otherwise registers `cx` to be woken by the cut.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection dropped by the emulator (fault injection)",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Severable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Severable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes queued for the writer task beyond which writes wait.
const MAX_QUEUED: usize = 256 * 1024;

/// A TCP stream whose writes are queued for a writer task that sends everything queued since
/// its last send in one call; reads pass through.
///
/// fe2o3-amqp's connection engine flushes after every frame, so on a plain stream each message
/// a receiver gets costs a `sendto` of its own: 300,117 of them for 300,000 events in the live
/// benchmark, where the emulator shares the machine with the service it feeds. Here a flush
/// returns once the bytes are queued, and while the writer is in one `sendto` the engine queues
/// the next frames: under load they go out together, and one frame alone still goes out at once.
/// Dropping the stream (or shutting it down) lets the writer send what was queued and then
/// close the socket; a failed send fails the next write, flush or shutdown.
#[derive(Debug)]
pub(crate) struct CoalescedWrites {
    read: OwnedReadHalf,
    queue: Arc<Mutex<WriteQueue>>,
}

#[derive(Debug, Default)]
struct WriteQueue {
    bytes: Vec<u8>,
    /// Shut down or dropped: the writer sends what is queued, then closes.
    closing: bool,
    /// The writer has ended.
    finished: bool,
    /// Why a send failed (kept as kind and text: `io::Error` is not `Clone`).
    error: Option<(io::ErrorKind, String)>,
    writer: Option<Waker>,
    producer: Option<Waker>,
}

impl WriteQueue {
    fn failure(&self) -> Option<io::Error> {
        self.error
            .as_ref()
            .map(|(kind, text)| io::Error::new(*kind, text.clone()))
    }
}

fn lock(queue: &Mutex<WriteQueue>) -> MutexGuard<'_, WriteQueue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CoalescedWrites {
    /// Spawns the writer task: call it inside a Tokio runtime.
    pub(crate) fn new(stream: TcpStream) -> CoalescedWrites {
        let (read, write) = stream.into_split();
        let queue = Arc::new(Mutex::new(WriteQueue::default()));
        tokio::spawn(send_queued(write, Arc::clone(&queue)));
        CoalescedWrites { read, queue }
    }
}

/// The writer task: sends whatever is queued, in one call, until the stream closes or a send
/// fails.
async fn send_queued(mut write: OwnedWriteHalf, queue: Arc<Mutex<WriteQueue>>) {
    let mut sending = Vec::new();
    let outcome = loop {
        let closing = std::future::poll_fn(|cx| {
            let mut queued = lock(&queue);
            if !queued.bytes.is_empty() {
                std::mem::swap(&mut queued.bytes, &mut sending);
                if let Some(producer) = queued.producer.take() {
                    producer.wake();
                }
                return Poll::Ready(false);
            }
            if queued.closing {
                return Poll::Ready(true);
            }
            queued.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if closing {
            break write.shutdown().await;
        }
        if let Err(error) = write.write_all(&sending).await {
            break Err(error);
        }
        sending.clear();
    };
    let mut queued = lock(&queue);
    queued.finished = true;
    if let Err(error) = outcome {
        queued.error = Some((error.kind(), error.to_string()));
    }
    if let Some(producer) = queued.producer.take() {
        producer.wake();
    }
}

impl Drop for CoalescedWrites {
    fn drop(&mut self) {
        let mut queued = lock(&self.queue);
        queued.closing = true;
        if let Some(writer) = queued.writer.take() {
            writer.wake();
        }
    }
}

impl AsyncRead for CoalescedWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for CoalescedWrites {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut queued = lock(&self.queue);
        if let Some(error) = queued.failure() {
            return Poll::Ready(Err(error));
        }
        if queued.closing || queued.finished {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if queued.bytes.len() >= MAX_QUEUED {
            queued.producer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        queued.bytes.extend_from_slice(buf);
        if let Some(writer) = queued.writer.take() {
            writer.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.queue).failure() {
            Some(error) => Poll::Ready(Err(error)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut queued = lock(&self.queue);
        queued.closing = true;
        if let Some(writer) = queued.writer.take() {
            writer.wake();
        }
        if !queued.finished {
            queued.producer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        match queued.failure() {
            Some(error) => Poll::Ready(Err(error)),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Appends `frame` to `out` with its performative padded; a frame that does not parse, or
/// that padding would take past the peer's `max_frame_size` (`None`: not known yet), is
/// copied as it is.
fn rewrite_frame(frame: &[u8], max_frame_size: Option<usize>, out: &mut Vec<u8>) {
    if max_frame_size.is_none() && frame.len() >= UNPADDED_FRAME_BYTES {
        out.extend_from_slice(frame);
        return;
    }
    let data_offset = usize::from(frame[4]) * 4;
    if data_offset < 8 || data_offset >= frame.len() {
        // Too short for a performative (an empty heartbeat frame): as it is.
        out.extend_from_slice(frame);
        return;
    }
    let body = &frame[data_offset..];
    let mut performative = Vec::with_capacity(body.len() + 32);
    let Some(consumed) = copy_value(body, &mut performative) else {
        out.extend_from_slice(frame);
        return;
    };
    let size = data_offset + performative.len() + (body.len() - consumed);
    let Ok(size32) = u32::try_from(size) else {
        out.extend_from_slice(frame);
        return;
    };
    if max_frame_size.is_some_and(|max| size > max) {
        // A transfer cut at the peer's max-frame-size: padded, it would be past that limit
        // and the peer would drop the session (Microsoft's Rust client did, over and over).
        out.extend_from_slice(frame);
        return;
    }
    out.extend_from_slice(&size32.to_be_bytes());
    out.extend_from_slice(&frame[4..data_offset]);
    out.extend_from_slice(&performative);
    out.extend_from_slice(&body[consumed..]);
}

/// Copies the AMQP value at the start of `input` to `out`, padding the described lists of
/// [`full_field_count`]; returns the input bytes it took, or `None` when it does not parse.
fn copy_value(input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let code = *input.first()?;
    if code == 0x00 {
        let (descriptor, descriptor_length) = read_descriptor(&input[1..])?;
        let value_start = 1 + descriptor_length;
        if let Some(count) = descriptor.and_then(full_field_count) {
            let descriptor = descriptor?;
            let mut elements = Vec::new();
            let mut ends = Vec::new();
            let length = copy_list_elements(&input[value_start..], &mut elements, &mut ends)?;
            let mut fields = Vec::with_capacity(elements.len() + count);
            let mut start = 0;
            let defaults = field_defaults(descriptor);
            for index in 0..count.max(ends.len()) {
                let element = match ends.get(index) {
                    Some(&end) => &elements[start..end],
                    None => &[0x40][..],
                };
                start = ends.get(index).copied().unwrap_or(start);
                match defaults.iter().find(|(field, _)| *field == index) {
                    Some((_, default)) if element == [0x40] => fields.extend_from_slice(default),
                    _ => fields.extend_from_slice(element),
                }
            }
            let field_count = count.max(ends.len());
            out.push(0x00);
            if descriptor <= 0xff {
                out.extend_from_slice(&[0x53, descriptor as u8]);
            } else {
                out.push(0x80);
                out.extend_from_slice(&descriptor.to_be_bytes());
            }
            write_list(&fields, field_count, out);
            return Some(value_start + length);
        }
        out.extend_from_slice(&input[..value_start]);
        let length = copy_value(&input[value_start..], out)?;
        return Some(value_start + length);
    }
    if matches!(code, 0x45 | 0xc0 | 0xd0) {
        // A list outside a padded described type: its elements may hold one (an error).
        let mut elements = Vec::new();
        let mut ends = Vec::new();
        let length = copy_list_elements(input, &mut elements, &mut ends)?;
        write_list(&elements, ends.len(), out);
        return Some(length);
    }
    let length = value_length(input)?;
    out.extend_from_slice(input.get(..length)?);
    Some(length)
}

/// The descriptor's code when it is a ulong, and the descriptor's encoded length.
fn read_descriptor(input: &[u8]) -> Option<(Option<u64>, usize)> {
    match *input.first()? {
        0x53 => Some((Some(u64::from(*input.get(1)?)), 2)),
        0x80 => {
            let bytes: [u8; 8] = input.get(1..9)?.try_into().ok()?;
            Some((Some(u64::from_be_bytes(bytes)), 9))
        }
        0x44 => Some((Some(0), 1)),
        _ => Some((None, value_length(input)?)),
    }
}

/// Copies the elements of the list at the start of `input` (each through [`copy_value`]) to
/// `out`, pushing where each ends in `out` to `ends`; returns the list's encoded length.
fn copy_list_elements(input: &[u8], out: &mut Vec<u8>, ends: &mut Vec<usize>) -> Option<usize> {
    let (header, count, total) = match *input.first()? {
        0x45 => return Some(1),
        0xc0 => {
            let size = usize::from(*input.get(1)?);
            (3, usize::from(*input.get(2)?), 2 + size)
        }
        0xd0 => {
            let size = u32::from_be_bytes(input.get(1..5)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(input.get(5..9)?.try_into().ok()?) as usize;
            (9, count, 5 + size)
        }
        _ => return None,
    };
    let mut position = header;
    for _ in 0..count {
        position += copy_value(input.get(position..total)?, out)?;
        ends.push(out.len());
    }
    (position == total).then_some(total)
}

/// Writes a list of `count` encoded `elements`, as list8 when it fits, else list32.
fn write_list(elements: &[u8], count: usize, out: &mut Vec<u8>) {
    if elements.len() < 255 && count < 256 {
        out.push(0xc0);
        out.push((elements.len() + 1) as u8);
        out.push(count as u8);
    } else {
        out.push(0xd0);
        out.extend_from_slice(&((elements.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(&(count as u32).to_be_bytes());
    }
    out.extend_from_slice(elements);
}

/// The encoded length of the (non-described) value at the start of `input`.
fn value_length(input: &[u8]) -> Option<usize> {
    let code = *input.first()?;
    let fixed = match code {
        0x00 => {
            let descriptor = value_length(&input[1..])?;
            let value = value_length(input.get(1 + descriptor..)?)?;
            return Some(1 + descriptor + value);
        }
        0x40..=0x45 => 0,
        0x50..=0x56 => 1,
        0x60 | 0x61 => 2,
        0x70..=0x74 => 4,
        0x80..=0x84 => 8,
        0x94 | 0x98 => 16,
        0xa0..=0xaf | 0xc0..=0xcf | 0xe0..=0xef => {
            return Some(2 + usize::from(*input.get(1)?));
        }
        0xb0..=0xbf | 0xd0..=0xdf | 0xf0..=0xff => {
            let size = u32::from_be_bytes(input.get(1..5)?.try_into().ok()?) as usize;
            return Some(5 + size);
        }
        _ => return None,
    };
    Some(1 + fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut frame = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[2, 0, 0, 0]);
        frame.extend_from_slice(body);
        frame
    }

    fn rewritten(input: &[u8]) -> Vec<u8> {
        rewritten_for(input, Some(65_536))
    }

    fn rewritten_for(input: &[u8], max_frame_size: Option<usize>) -> Vec<u8> {
        let mut out = Vec::new();
        rewrite_frame(input, max_frame_size, &mut out);
        out
    }

    #[test]
    fn pads_an_empty_end() {
        // end as list0 becomes list8 with one null.
        assert_eq!(
            rewritten(&frame(&[0x00, 0x53, 0x17, 0x45])),
            frame(&[0x00, 0x53, 0x17, 0xc0, 0x02, 0x01, 0x40])
        );
    }

    #[test]
    fn pads_a_close_error_and_keeps_its_fields() {
        // close [error [condition "a:b"]]
        let input = frame(&[
            0x00, 0x53, 0x18, 0xc0, 0x0c, 0x01, // close, one field
            0x00, 0x53, 0x1d, 0xc0, 0x06, 0x01, // error, one field
            0xa3, 0x03, b'a', b':', b'b', // symbol
        ]);
        assert_eq!(
            rewritten(&input),
            frame(&[
                0x00, 0x53, 0x18, 0xc0, 0x0e, 0x01, //
                0x00, 0x53, 0x1d, 0xc0, 0x08, 0x03, //
                0xa3, 0x03, b'a', b':', b'b', 0x40, 0x40,
            ])
        );
    }

    #[test]
    fn keeps_a_transfer_payload_and_ulong_descriptors_become_small() {
        let mut body = vec![
            0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x14, 0xc0, 0x03, 0x02, 0x43, 0x43,
        ];
        let payload = [0x00, 0x53, 0x75, 0xa0, 0x02, b'h', b'i'];
        body.extend_from_slice(&payload);
        let out = rewritten(&frame(&body));
        // handle, delivery-id, 3 nulls, more=false, 2 nulls, resume, aborted, batchable=false.
        let mut expected_body = vec![0x00, 0x53, 0x14, 0xc0, 0x0c, 0x0b, 0x43, 0x43];
        expected_body.extend_from_slice(&[0x40, 0x40, 0x40, 0x42, 0x40, 0x40, 0x42, 0x42, 0x42]);
        expected_body.extend_from_slice(&payload);
        assert_eq!(out, frame(&expected_body));
    }

    /// A transfer of handle, delivery-id, delivery-tag, message-format and `more` (fe2o3-amqp
    /// leaves out the rest) with a payload of `payload` bytes.
    fn short_transfer(payload: usize) -> Vec<u8> {
        let mut body = vec![
            0x00, 0x53, 0x14, 0xc0, 0x08, 0x05, 0x43, 0x43, 0xa0, 0x01, 0x07, 0x43, 0x41,
        ];
        body.resize(body.len() + payload, 0xab);
        frame(&body)
    }

    /// Regression: a 270 KB message went out in frames cut at the client's max-frame-size;
    /// padding their transfer performatives pushed them over it, and Microsoft's Rust client
    /// dropped the session over and over (the partition stalled).
    #[test]
    fn a_frame_cut_at_the_max_frame_size_is_not_padded() {
        let input = short_transfer(65_536 - 21);
        assert_eq!(input.len(), 65_536);
        assert_eq!(rewritten_for(&input, Some(65_536)), input);
        // Before the peer's open is known, large frames pass as they are.
        assert_eq!(rewritten_for(&input, None), input);
    }

    /// Regression: Microsoft's Python client announces a max-frame-size of 1 MiB, so a 270 KB
    /// message arrives in one frame; unpadded, the client looked for its payload at
    /// `frame[11]` and failed with `list index out of range`. Padded, it has all 11 fields.
    #[test]
    fn a_large_frame_within_the_max_frame_size_is_padded() {
        let input = short_transfer(270_000);
        let out = rewritten_for(&input, Some(1024 * 1024));
        let mut expected_body = vec![0x00, 0x53, 0x14, 0xc0, 0x0e, 0x0b];
        expected_body.extend_from_slice(&[0x43, 0x43, 0xa0, 0x01, 0x07, 0x43, 0x41]);
        // more, rcv-settle-mode, state, resume, aborted, batchable.
        expected_body.extend_from_slice(&[0x42, 0x40, 0x40, 0x42, 0x42, 0x42]);
        expected_body.resize(expected_body.len() + 270_000, 0xab);
        assert_eq!(out.len(), input.len() + 6);
        assert!(out == frame(&expected_body), "padded, payload unchanged");
        // One byte short of room: as it is.
        assert_eq!(rewritten_for(&input, Some(input.len() + 5)), input);
    }

    /// An open with the given max-frame-size field (`None`: left out).
    fn open(max_frame_size: Option<&[u8]>) -> Vec<u8> {
        let mut fields = vec![0xa1, 0x01, b'c', 0x40];
        let count = match max_frame_size {
            Some(field) => {
                fields.extend_from_slice(field);
                3
            }
            None => 2,
        };
        let mut body = vec![0x00, 0x53, 0x10, 0xc0, (fields.len() + 1) as u8, count];
        body.extend_from_slice(&fields);
        frame(&body)
    }

    /// The peer's max-frame-size is read after its protocol headers and SASL frames, however
    /// the reads cut the bytes, and looking stops at the open.
    #[test]
    fn reads_the_peers_max_frame_size_from_its_open() {
        let mut bytes = b"AMQP\x03\x01\x00\x00".to_vec();
        let mut sasl_init = frame(&[0x00, 0x53, 0x41, 0xc0, 0x04, 0x01, 0xa3, 0x01, b'x']);
        sasl_init[5] = 1;
        bytes.extend_from_slice(&sasl_init);
        bytes.extend_from_slice(b"AMQP\x00\x01\x00\x00");
        bytes.extend_from_slice(&open(Some(&[0x70, 0x00, 0x10, 0x00, 0x00])));
        bytes.extend_from_slice(&open(Some(&[0x70, 0x00, 0x00, 0x02, 0x00])));
        for cut in [1, 3, 7, 8, 13, bytes.len()] {
            let mut peer = PeerOpen::default();
            for chunk in bytes.chunks(cut) {
                peer.read(chunk);
            }
            assert_eq!(peer.max_frame_size, Some(1024 * 1024), "reads of {cut}");
            assert!(peer.done && peer.pending.is_empty());
        }
        for (field, expected) in [
            (None, u32::MAX as usize),
            (Some(&[0x40][..]), u32::MAX as usize),
            (Some(&[0x52, 0xff][..]), 255),
        ] {
            let mut peer = PeerOpen::default();
            peer.read(&open(field));
            assert_eq!(peer.max_frame_size, Some(expected));
        }
        // Not an open: gives up, size unknown.
        let mut peer = PeerOpen::default();
        peer.read(&frame(&[0x00, 0x53, 0x11, 0x45]));
        assert!(peer.done);
        assert_eq!(peer.max_frame_size, None);
    }

    #[test]
    fn writes_out_defaults_left_null() {
        // begin [remote-channel 1, next-outgoing-id 0, windows 2048] without handle-max.
        let input = frame(&[
            0x00, 0x53, 0x11, 0xc0, 0x0c, 0x04, 0x60, 0x00, 0x01, 0x43, 0x70, 0x00, 0x00, 0x08,
            0x00, 0x52, 0x08,
        ]);
        let mut expected = vec![
            0x00, 0x53, 0x11, 0xc0, 0x14, 0x08, 0x60, 0x00, 0x01, 0x43, 0x70, 0x00, 0x00, 0x08,
            0x00, 0x52, 0x08,
        ];
        expected.extend_from_slice(&[0x70, 0xff, 0xff, 0xff, 0xff, 0x40, 0x40, 0x40]);
        assert_eq!(rewritten(&input), frame(&expected));
    }

    #[test]
    fn leaves_heartbeats_and_unknown_bytes_alone() {
        let heartbeat = [0, 0, 0, 8, 2, 0, 0, 0];
        assert_eq!(rewritten(&heartbeat), heartbeat);
        let garbage = frame(&[0x00, 0x53, 0x10, 0xc0, 0x09, 0x01]);
        assert_eq!(rewritten(&garbage), garbage);
    }

    /// Many small writes, each flushed as the AMQP engine flushes each frame, arrive whole and
    /// in order; dropping the stream sends what was queued and then closes the socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesced_writes_arrive_in_order_and_a_drop_closes_after_them() {
        use tokio::io::AsyncReadExt as _;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.expect("connect");
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.expect("read");
            received
        });
        let (accepted, _) = listener.accept().await.expect("accept");
        let mut stream = CoalescedWrites::new(accepted);
        let mut sent = Vec::new();
        for index in 0..20_000u32 {
            // Past MAX_QUEUED in all, so writes also wait for the writer.
            let chunk = format!("frame {index};").repeat(1 + index as usize % 7);
            stream.write_all(chunk.as_bytes()).await.expect("write");
            stream.flush().await.expect("flush");
            sent.extend_from_slice(chunk.as_bytes());
        }
        assert!(sent.len() > 2 * MAX_QUEUED);
        drop(stream);
        let received = tokio::time::timeout(std::time::Duration::from_secs(30), client)
            .await
            .expect("the socket closes after the queued bytes")
            .expect("client");
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "bytes arrive in order");
    }

    /// A shutdown returns once the queued bytes are sent, and writes after it fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesced_writes_shut_down_after_sending_and_refuse_more() {
        use tokio::io::AsyncReadExt as _;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.expect("connect");
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.expect("read");
            received
        });
        let (accepted, _) = listener.accept().await.expect("accept");
        let mut stream = CoalescedWrites::new(accepted);
        stream
            .write_all(b"AMQP\x00\x01\x00\x00")
            .await
            .expect("write");
        stream.shutdown().await.expect("shutdown");
        assert!(stream.write_all(b"more").await.is_err());
        let received = client.await.expect("client");
        assert_eq!(received, b"AMQP\x00\x01\x00\x00");
    }
}
