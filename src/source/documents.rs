//! Twin documents as IoT Hub's twin query returns them (`docs/semantics.md` §7), split out of a
//! stream without parsing: either one JSON array (as `az iot hub query` prints it, and as each
//! page of the REST query is) or one document per line (or any whitespace between documents).
//!
//! The splitter only finds where each top-level value starts and ends (tracking strings and
//! nesting), so a malformed document is still one document: the pipeline parses it and
//! dead-letters it. What cannot be split (the stream ends inside a value, a value longer than
//! the limit, bytes between values that are no separator) ends the stream with an error: the
//! pass is then incomplete.
//!
//! A seed pass from files reads through [`spawn_document_reader`]: a thread that splits and
//! parses blocks of documents ahead of the apply thread (as replay's reader does for lines),
//! and splits documents one per line at their newlines when its parse confirms each line is
//! one object, which makes the same documents as the scan (see `Blocks::lines`).

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use crossbeam_channel::{Receiver, Sender};
use simd_json::Node;

use super::parsed::{BodyAt, LineParser, ParsedLines};

/// The longest document accepted: far above any twin (IoT Hub caps a twin's tags and each
/// property section at 8 KB to 32 KB), and a bound on memory.
pub const MAX_DOCUMENT_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DocumentsError {
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("the input ends inside document {index} (byte {offset})")]
    Truncated { index: u64, offset: u64 },
    #[error("document {index} (byte {offset}) is longer than {MAX_DOCUMENT_BYTES} bytes")]
    TooLong { index: u64, offset: u64 },
    #[error("unexpected {found:?} at byte {offset}: expected a document, `,` or `]`")]
    Unexpected { found: char, offset: u64 },
}

impl DocumentsError {
    pub fn kind(&self) -> &'static str {
        match self {
            DocumentsError::Io(_) => "io",
            DocumentsError::Truncated { .. } => "truncated",
            DocumentsError::TooLong { .. } => "too_long",
            DocumentsError::Unexpected { .. } => "unexpected",
        }
    }
}

/// Where the splitter stands between values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Nothing read yet: `[` starts an array, anything else a stream of documents.
    Start,
    /// Documents separated by white space.
    Lines,
    /// Inside the top-level array, expecting a document or `]`.
    ArrayValue,
    /// Inside the top-level array, after a document: `,` or `]`.
    ArraySeparator,
    /// After the top-level array's `]`: only white space may follow.
    Done,
}

/// Splits documents out of a reader; see the module docs.
pub struct DocumentReader<R> {
    reader: R,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes consumed before `buf[start]`.
    consumed: u64,
    eof: bool,
    mode: Mode,
    index: u64,
}

impl<R: Read> DocumentReader<R> {
    pub fn new(reader: R) -> DocumentReader<R> {
        DocumentReader {
            reader,
            buf: vec![0; 1 << 20],
            start: 0,
            end: 0,
            consumed: 0,
            eof: false,
            mode: Mode::Start,
            index: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.consumed
    }

    /// Reads more input after what is unconsumed; false at the end of the input.
    fn fill(&mut self) -> Result<bool, DocumentsError> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).min(MAX_DOCUMENT_BYTES + 1);
            if grown == self.buf.len() {
                return Err(DocumentsError::TooLong {
                    index: self.index,
                    offset: self.consumed,
                });
            }
            self.buf.resize(grown, 0);
        }
        loop {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.consumed += n as u64;
    }

    /// The next byte that is not white space, filling as needed; `None` at the end.
    fn peek_significant(&mut self) -> Result<Option<u8>, DocumentsError> {
        loop {
            while self.start < self.end {
                let b = self.buf[self.start];
                if b.is_ascii_whitespace() {
                    self.consume(1);
                } else {
                    return Ok(Some(b));
                }
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Whole lines ahead, when the input is documents one per line (not an array): the
    /// unconsumed bytes from the next document to the end of the last line in the buffer
    /// (reading more first when less than half a buffer is left), without consuming them.
    /// `None` in an array, at the end, or when no whole line is in the buffer: then split
    /// with [`DocumentReader::next_document`].
    pub fn peek_lines(&mut self) -> Result<Option<&[u8]>, DocumentsError> {
        let Some(first) = self.peek_significant()? else {
            return Ok(None);
        };
        if self.mode == Mode::Start && first != b'[' {
            self.mode = Mode::Lines;
        }
        if self.mode != Mode::Lines {
            return Ok(None);
        }
        if 2 * (self.end - self.start) < self.buf.len() {
            self.fill()?;
        }
        let lines = &self.buf[self.start..self.end];
        Ok(memchr::memrchr(b'\n', lines).map(|i| &lines[..=i]))
    }

    /// Consumes `len` bytes that [`DocumentReader::peek_lines`] returned, which held
    /// `documents` documents.
    pub fn consume_lines(&mut self, len: usize, documents: u64) {
        self.consume(len.min(self.end - self.start));
        self.index += documents;
    }

    /// The next document's raw bytes, or `None` at the end of the input.
    pub fn next_document(&mut self) -> Result<Option<&[u8]>, DocumentsError> {
        loop {
            let Some(b) = self.peek_significant()? else {
                return match self.mode {
                    Mode::ArrayValue | Mode::ArraySeparator => Err(DocumentsError::Truncated {
                        index: self.index,
                        offset: self.consumed,
                    }),
                    _ => Ok(None),
                };
            };
            match (self.mode, b) {
                (Mode::Start, b'[') => {
                    self.consume(1);
                    self.mode = Mode::ArrayValue;
                }
                (Mode::Start, _) => self.mode = Mode::Lines,
                (Mode::ArrayValue, b']') if self.index == 0 => {
                    self.consume(1);
                    self.mode = Mode::Done;
                }
                (Mode::ArraySeparator, b',') => {
                    self.consume(1);
                    self.mode = Mode::ArrayValue;
                }
                (Mode::ArraySeparator, b']') => {
                    self.consume(1);
                    self.mode = Mode::Done;
                }
                (Mode::Lines | Mode::ArrayValue, _) => {
                    let len = self.value_len()?;
                    let at = self.start;
                    self.consume(len);
                    self.index += 1;
                    if self.mode == Mode::ArrayValue {
                        self.mode = Mode::ArraySeparator;
                    }
                    return Ok(Some(&self.buf[at..at + len]));
                }
                (_, found) => {
                    return Err(DocumentsError::Unexpected {
                        found: char::from(found),
                        offset: self.consumed,
                    })
                }
            }
        }
    }

    /// The length of the value starting at `buf[start]`, filling until it is whole.
    fn value_len(&mut self) -> Result<usize, DocumentsError> {
        let mut scan = Scan::default();
        let mut from = 0;
        loop {
            if let Some(len) = scan.feed(&self.buf[self.start + from..self.end], from) {
                return Ok(len);
            }
            from = self.end - self.start;
            if !self.fill()? {
                // A scalar ends with the input; anything open is cut short.
                return if scan.depth == 0 && !scan.in_string && from > 0 {
                    Ok(from)
                } else {
                    Err(DocumentsError::Truncated {
                        index: self.index,
                        offset: self.consumed,
                    })
                };
            }
        }
    }
}

/// The documents of a block handed from the reader thread to the apply thread: about this
/// many bytes (a document longer than it is a block of its own).
const BLOCK_BYTES: usize = 1 << 20;

/// Blocks read ahead of the apply thread: with [`BLOCK_BYTES`], a few MiB (and their tapes).
const BLOCKS_AHEAD: usize = 4;

/// The capacity of every buffer of the reader: a block's documents (parsed in place)
/// fit unless the last one is longer than a block. All buffers alike, so that any recycled
/// one serves: a buffer that grows is a fresh allocation of fresh (page-faulting) memory.
const BUFFER_BYTES: usize = 2 * BLOCK_BYTES + simd_json::INPUT_PADDING;

/// Whole documents of one file, split and parsed on the reader thread.
pub struct DocumentBlock {
    /// The file's index in the list given to [`spawn_document_reader`].
    pub file: usize,
    /// Each document's `(start, end)` in the bytes read.
    spans: Vec<(u32, u32)>,
    /// The documents parsed in place (each one's bytes as read stay available for dead
    /// letters: [`ParsedLines::raw`]), with each one's
    /// [`crate::decode::body_is_well_formed`] checked.
    parsed: ParsedLines,
}

impl DocumentBlock {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Document `i`: its bytes as read, its tape (`None` when it is not JSON) and whether it
    /// is a well-formed body (`None`: not checked).
    pub fn document(&self, i: usize) -> (&[u8], Option<&[Node<'_>]>, Option<bool>) {
        let raw = self
            .spans
            .get(i)
            .map(|&span| self.parsed.raw(i, span))
            .unwrap_or_default();
        (raw, self.parsed.line_nodes(i), self.parsed.verdict(i).body)
    }

    /// The block's buffer, for the reader to reuse.
    fn into_buffer(self) -> Vec<u8> {
        self.parsed.into_buffer()
    }
}

/// What the reader thread sends, in the order of the files.
pub enum DocumentEvent {
    Block(DocumentBlock),
    /// File `file` could not be opened, read or split (`error` says why, without the path):
    /// the documents before the fault were all sent, and nothing follows.
    Failed {
        file: usize,
        error: String,
    },
    /// Every file was read to its end.
    End,
}

/// The reader thread of [`spawn_document_reader`].
pub struct DocumentFeed {
    events: Receiver<DocumentEvent>,
    recycle: Sender<Vec<u8>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl DocumentFeed {
    /// The next event; `None` when the reader thread is gone without saying why (it panicked),
    /// which the caller must take as an incomplete read, never as the end.
    pub fn next(&self) -> Option<DocumentEvent> {
        self.events.recv().ok()
    }

    /// Hands a block's buffer back to the reader: a fresh block per read cost page faults.
    pub fn recycle(&self, block: DocumentBlock) {
        let _ = self.recycle.try_send(block.into_buffer());
    }
}

impl Drop for DocumentFeed {
    /// Stops the reader (its next send fails once the receiver is gone) and waits for it.
    fn drop(&mut self) {
        let (_, dead) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.events, dead));
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Starts a thread that reads `files` in turn, splits their documents (see the module docs)
/// and parses them, and sends them in blocks; the apply thread then only applies. It stops
/// at the first file that cannot be read whole (after sending what that file held before
/// the fault), at the end, or when the feed is dropped.
pub fn spawn_document_reader(files: Vec<PathBuf>) -> std::io::Result<DocumentFeed> {
    let (tx, events) = crossbeam_channel::bounded(BLOCKS_AHEAD);
    // Room for every buffer there can be (two per block: sent, applied, being built), so
    // that none is dropped and allocated again.
    let (recycle, recycled) = crossbeam_channel::bounded(4 * BLOCKS_AHEAD);
    let handle = std::thread::Builder::new()
        .name("twinwatch-documents".into())
        .spawn(move || {
            let mut parser = LineParser::default();
            for (file, path) in files.iter().enumerate() {
                match read_documents(file, path, &tx, &recycled, &mut parser) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(error) => {
                        let _ = tx.send(DocumentEvent::Failed { file, error });
                        return;
                    }
                }
            }
            let _ = tx.send(DocumentEvent::End);
        })?;
    Ok(DocumentFeed {
        events,
        recycle,
        handle: Some(handle),
    })
}

/// The documents of one file on their way into blocks.
struct Blocks<'a> {
    file: usize,
    tx: &'a Sender<DocumentEvent>,
    recycled: &'a Receiver<Vec<u8>>,
    parser: &'a mut LineParser,
    /// Buffers of lines that did not split as lines, for the next blocks.
    spare: Vec<Vec<u8>>,
    /// The documents of the next block, and their `(start, end)` in `data`.
    data: Vec<u8>,
    spans: Vec<(u32, u32)>,
}

impl Blocks<'_> {
    fn buffer(&mut self) -> Vec<u8> {
        let mut buffer = self
            .spare
            .pop()
            .or_else(|| self.recycled.try_recv().ok())
            .unwrap_or_default();
        buffer.clear();
        buffer.reserve(BUFFER_BYTES);
        buffer
    }

    /// Parses `data`'s `spans`, in place, into a block.
    fn parse(&mut self, data: Vec<u8>, spans: Vec<(u32, u32)>) -> DocumentBlock {
        let parsed = self.parser.parse_in_place(data, &spans, BodyAt::Line);
        DocumentBlock {
            file: self.file,
            spans,
            parsed,
        }
    }

    /// Sends the documents so far, if any; false when the receiver is gone.
    fn flush(&mut self) -> bool {
        if self.spans.is_empty() {
            return true;
        }
        let next = self.buffer();
        let data = std::mem::replace(&mut self.data, next);
        let spans = std::mem::take(&mut self.spans);
        let block = self.parse(data, spans);
        self.tx.send(DocumentEvent::Block(block)).is_ok()
    }

    /// One document split by the scan; false when the receiver is gone.
    fn push(&mut self, document: &[u8]) -> bool {
        // Both ends fit: a block holds less than BLOCK_BYTES before its last document, and
        // a document is at most MAX_DOCUMENT_BYTES + 1.
        let start = self.data.len() as u32;
        self.data.extend_from_slice(document);
        self.spans.push((start, self.data.len() as u32));
        self.data.len() < BLOCK_BYTES || self.flush()
    }

    /// Whole lines (see [`DocumentReader::peek_lines`]) as a block of their own, when each
    /// line that is not blank is one JSON object: `Some(n)`, their `n` documents sent (after
    /// any split before them), `None` when the receiver is gone too. `None` with nothing
    /// sent, and `Some(0)`, are for the caller to split the lines by scanning instead.
    ///
    /// A line that simd-json parses as one object, from its `{` to its `}`, is exactly the
    /// document the scan would split there: its strings and escapes are JSON's, so its
    /// brackets match as the scan counts them, and only white space (the line's end) follows
    /// it. Anything else (a document over several lines, two on a line, a malformed one, a
    /// scalar) is split by the scan, and the parse of these lines is thrown away. The scan
    /// finds documents byte by byte; a newline is found by `memrchr` and checked by the
    /// parse the apply thread needs anyway.
    fn lines(&mut self, lines: &[u8]) -> Option<u64> {
        let mut spans = Vec::new();
        let mut at = 0;
        while at < lines.len() {
            let end = memchr::memchr(b'\n', &lines[at..]).map_or(lines.len(), |i| at + i);
            let (mut first, mut last) = (at, end);
            while first < last && lines[first].is_ascii_whitespace() {
                first += 1;
            }
            while last > first && lines[last - 1].is_ascii_whitespace() {
                last -= 1;
            }
            if first < last {
                if lines[first] != b'{' || lines[last - 1] != b'}' {
                    return Some(0);
                }
                spans.push((first as u32, last as u32));
            }
            at = end + 1;
        }
        if spans.is_empty() {
            return Some(0);
        }
        let mut data = self.buffer();
        data.extend_from_slice(lines);
        let block = self.parse(data, spans);
        if (0..block.len()).any(|i| block.parsed.line_nodes(i).is_none()) {
            self.spare.push(block.into_buffer());
            return Some(0);
        }
        let n = block.len() as u64;
        if !self.flush() || self.tx.send(DocumentEvent::Block(block)).is_err() {
            return None;
        }
        Some(n)
    }
}

/// Sends the documents of one file in blocks: `Ok(false)` when the receiver is gone,
/// `Err(reason)` when the file cannot be read whole (what came before the fault is sent).
fn read_documents(
    file: usize,
    path: &std::path::Path,
    tx: &Sender<DocumentEvent>,
    recycled: &Receiver<Vec<u8>>,
    parser: &mut LineParser,
) -> Result<bool, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut reader = DocumentReader::new(f);
    let mut blocks = Blocks {
        file,
        tx,
        recycled,
        parser,
        spare: Vec::new(),
        data: Vec::new(),
        spans: Vec::new(),
    };
    blocks.data = blocks.buffer();
    // The fault after the documents before it.
    let fail = |blocks: &mut Blocks<'_>, e: DocumentsError| {
        if blocks.flush() {
            Err(e.to_string())
        } else {
            Ok(false)
        }
    };
    loop {
        // Lines first: documents one per line split at their newlines.
        let mut scan_to = None;
        match reader.peek_lines() {
            Err(e) => return fail(&mut blocks, e),
            Ok(Some(lines)) => {
                let len = lines.len();
                match blocks.lines(lines) {
                    None => return Ok(false),
                    Some(0) => scan_to = Some(reader.offset() + len as u64),
                    Some(n) => {
                        reader.consume_lines(len, n);
                        continue;
                    }
                }
            }
            Ok(None) => {}
        }
        // Then the scan: one document, or those of the lines that did not split as lines.
        loop {
            match reader.next_document() {
                Ok(Some(document)) => {
                    if !blocks.push(document) {
                        return Ok(false);
                    }
                }
                Ok(None) => return Ok(blocks.flush()),
                Err(e) => return fail(&mut blocks, e),
            }
            if scan_to.is_none_or(|to| reader.offset() >= to) {
                break;
            }
        }
    }
}

/// The scanning state of one value: nesting depth and whether inside a string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Scan {
    depth: usize,
    in_string: bool,
    escaped: bool,
    started: bool,
}

/// `0x01` in every byte of a word.
const ONES: u64 = u64::from_le_bytes([0x01; 8]);
/// `0x80` in every byte of a word.
const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);

/// The eight bytes at `at` as a little-endian word (`bytes` holds them).
fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A mask whose lowest set bit is the high bit of the first byte of `w` equal to `b` (bits
/// above it may be set falsely, never below: the borrow only runs upwards).
fn bytes_equal(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Where the first byte of `bytes[i..]` is that a string's scan stops at (`"` or `\`), or
/// `bytes.len()`: eight bytes at a time.
fn string_stop(bytes: &[u8], mut i: usize) -> usize {
    while i + 8 <= bytes.len() {
        let w = word(bytes, i);
        let found = bytes_equal(w, b'"') | bytes_equal(w, b'\\');
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\\' {
        i += 1;
    }
    i
}

/// Where the first structural byte (`"`, `{`, `}`, `[`, `]`) of `bytes[i..]` is, or
/// `bytes.len()`: eight bytes at a time (`[` and `]` are `{` and `}` without bit 5).
fn structural_stop(bytes: &[u8], mut i: usize) -> usize {
    const BIT5: u64 = u64::from_le_bytes([0x20; 8]);
    while i + 8 <= bytes.len() {
        let w = word(bytes, i);
        let folded = w | BIT5;
        let found = bytes_equal(w, b'"') | bytes_equal(folded, b'{') | bytes_equal(folded, b'}');
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && !matches!(bytes[i], b'"' | b'{' | b'}' | b'[' | b']') {
        i += 1;
    }
    i
}

impl Scan {
    /// Scans `bytes` (the value's bytes from `offset` on); returns the value's whole length
    /// once its end is found.
    ///
    /// Most of a document is inside strings (keys, ids, times) or between the structural
    /// bytes of its containers: both are skipped eight bytes at a time, and only the bytes
    /// that change the state are looked at one by one. The first splitter looked at every
    /// byte one by one and was a tenth of the seed pass's main thread.
    fn feed(&mut self, bytes: &[u8], offset: usize) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                i = string_stop(bytes, i);
                if i == bytes.len() {
                    return None;
                }
                if bytes[i] == b'\\' {
                    self.escaped = true;
                } else {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(offset + i + 1);
                    }
                }
                i += 1;
                continue;
            }
            if self.depth > 0 {
                // Inside a container, outside strings: only strings and nesting matter.
                i = structural_stop(bytes, i);
                if i == bytes.len() {
                    return None;
                }
            }
            let at = offset + i;
            match bytes[i] {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' if self.depth > 0 => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(at + 1);
                    }
                }
                // A scalar (or a stray closer) ends at a separator.
                b',' | b']' | b'}' if self.depth == 0 && self.started => return Some(at),
                b if b.is_ascii_whitespace() && self.depth == 0 && self.started => return Some(at),
                _ => {}
            }
            self.started = true;
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Result<Vec<String>, DocumentsError> {
        // A tiny buffer: documents straddle refills.
        split_with(text.as_bytes(), 4).1
    }

    /// The documents split out of `bytes` with a first buffer of `buffer` bytes, and how the
    /// input ended (the documents before an error are kept).
    fn split_with(
        bytes: &[u8],
        buffer: usize,
    ) -> (Vec<String>, Result<Vec<String>, DocumentsError>) {
        let mut reader = DocumentReader::new(bytes);
        reader.buf = vec![0; buffer];
        let mut out = Vec::new();
        loop {
            match reader.next_document() {
                Ok(Some(doc)) => out.push(String::from_utf8_lossy(doc).into_owned()),
                Ok(None) => return (out.clone(), Ok(out)),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    #[test]
    fn documents_split_as_the_data_files_say() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/documents/splitting.json"
        );
        let data: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
        let cases = data["cases"].as_array().expect("cases");
        assert!(cases.len() >= 20);
        for case in cases {
            let what = case["description"].as_str().expect("description");
            let input = case["input"].as_str().expect("input");
            let expected: Vec<String> = case["documents"]
                .as_array()
                .expect("documents")
                .iter()
                .map(|d| d.as_str().expect("a document").to_owned())
                .collect();
            for buffer in [1, 2, 3, 4, 7, 64, 1 << 20] {
                let (documents, end) = split_with(input.as_bytes(), buffer);
                assert_eq!(documents, expected, "{what} (buffer {buffer})");
                match case["error"].as_str() {
                    None => assert!(end.is_ok(), "{what} (buffer {buffer}): {end:?}"),
                    Some(kind) => assert_eq!(
                        end.as_ref().map_err(DocumentsError::kind).err(),
                        Some(kind),
                        "{what} (buffer {buffer})"
                    ),
                }
            }
        }
    }

    /// The splitter before it skipped runs of bytes: one byte at a time.
    fn reference_feed(scan: &mut Scan, bytes: &[u8], offset: usize) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            let at = offset + i;
            if scan.in_string {
                if scan.escaped {
                    scan.escaped = false;
                } else if b == b'\\' {
                    scan.escaped = true;
                } else if b == b'"' {
                    scan.in_string = false;
                    if scan.depth == 0 {
                        return Some(at + 1);
                    }
                }
                continue;
            }
            match b {
                b'"' => scan.in_string = true,
                b'{' | b'[' => scan.depth += 1,
                b'}' | b']' if scan.depth > 0 => {
                    scan.depth -= 1;
                    if scan.depth == 0 {
                        return Some(at + 1);
                    }
                }
                b',' | b']' | b'}' if scan.depth == 0 && scan.started => return Some(at),
                b if b.is_ascii_whitespace() && scan.depth == 0 && scan.started => return Some(at),
                _ => {}
            }
            scan.started = true;
        }
        None
    }

    /// On random input cut into random pieces, the run-skipping scan finds the same ends and
    /// leaves the same state after every piece as the byte-at-a-time one.
    #[test]
    fn the_fast_scan_is_the_byte_at_a_time_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        // Mostly filler, so that runs of eight bytes and more occur; bytes that differ from
        // the structural ones in one bit only (`|` `;` and non-ASCII ones) test the masks.
        let alphabet = b"{}[]\"\\,: \n\tax1aaaaaaaaxxxxxxxx\xdb\xfb\xa2\xdd|;";
        let mut ends = 0;
        for _ in 0..200_000 {
            let len = rng.gen_range(0..96);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let (mut fast, mut slow) = (Scan::default(), Scan::default());
            let mut from = 0;
            while from < bytes.len() {
                let to = rng.gen_range(from + 1..=bytes.len());
                let a = fast.feed(&bytes[from..to], from);
                let b = reference_feed(&mut slow, &bytes[from..to], from);
                assert_eq!(
                    a,
                    b,
                    "{:?} in pieces up to {to}",
                    String::from_utf8_lossy(&bytes)
                );
                if a.is_some() {
                    ends += 1;
                    break;
                }
                assert_eq!(
                    fast,
                    slow,
                    "{:?} up to {to}",
                    String::from_utf8_lossy(&bytes)
                );
                from = to;
            }
        }
        assert!(ends > 50_000, "the inputs exercise ends: {ends}");
    }

    #[test]
    fn a_document_longer_than_the_bound_is_an_error() {
        let body = |len: usize| {
            let mut doc = b"{\"a\":\"".to_vec();
            doc.resize(len - 2, b'x');
            doc.extend_from_slice(b"\"}");
            doc
        };
        let mut input = body(MAX_DOCUMENT_BYTES);
        input.extend_from_slice(b"\n{\"b\":1}\n");
        let (documents, end) = split_with(&input, 4);
        let lengths: Vec<usize> = documents.iter().map(String::len).collect();
        assert_eq!(lengths, [MAX_DOCUMENT_BYTES, 7]);
        assert!(end.is_ok());
        // The buffer holds MAX_DOCUMENT_BYTES + 1 bytes at most: a value is split once its
        // end is in it, so the bound is one byte more than the constant says.
        let mut input = b"{\"b\":1}\n".to_vec();
        input.extend_from_slice(&body(MAX_DOCUMENT_BYTES + 2));
        let (documents, end) = split_with(&input, 1 << 20);
        let lengths: Vec<usize> = documents.iter().map(String::len).collect();
        assert_eq!(lengths, [7]);
        let error = end.expect_err("too long");
        assert_eq!(error.kind(), "too_long");
        assert!(error.to_string().contains("document 1 (byte 8)"), "{error}");
    }

    /// A document as the reader sent it: its file, its bytes as read, whether it parsed, and
    /// whether it is a well-formed body.
    type ReadDocument = (usize, String, bool, Option<bool>);

    /// Every event of a reader over `files`, as (file, document as read, parsed, well
    /// formed) for each document, then how it ended.
    fn read_all(files: &[PathBuf]) -> (Vec<ReadDocument>, String) {
        let feed = spawn_document_reader(files.to_vec()).expect("spawn");
        let mut documents = Vec::new();
        loop {
            match feed.next() {
                Some(DocumentEvent::Block(block)) => {
                    assert!(!block.is_empty());
                    for i in 0..block.len() {
                        let (raw, nodes, well_formed) = block.document(i);
                        let raw = String::from_utf8_lossy(raw).into_owned();
                        documents.push((block.file, raw, nodes.is_some(), well_formed));
                    }
                    feed.recycle(block);
                }
                Some(DocumentEvent::End) => {
                    assert!(feed.next().is_none(), "nothing follows the end");
                    return (documents, "end".to_owned());
                }
                Some(DocumentEvent::Failed { file, error }) => {
                    assert!(feed.next().is_none(), "nothing follows a failure");
                    return (documents, format!("file {file}: {error}"));
                }
                None => return (documents, "gone".to_owned()),
            }
        }
    }

    /// Many documents (several blocks), each with an escaped string that the parser unescapes
    /// in its copy: the documents as read stay as read.
    fn many_documents(n: usize) -> (String, Vec<String>) {
        let documents: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"deviceId":"d{i}","version":{i},"tags":{{"s":"\"q\" [{i}]"}}}}"#))
            .collect();
        (documents.join("\n"), documents)
    }

    #[test]
    fn the_reader_thread_sends_every_document_once_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (lines, mut expected) = many_documents(50_000);
        let first = dir.path().join("lines.json");
        std::fs::write(&first, &lines).expect("write");
        let second = dir.path().join("array.json");
        std::fs::write(
            &second,
            "[{\"deviceId\":\"x\",\"version\":1}, [1], {\"bad\" 1}]",
        )
        .expect("write");
        let (documents, end) = read_all(&[first, second]);
        assert_eq!(end, "end");
        assert!(lines.len() > 2 * BLOCK_BYTES, "several blocks");
        expected
            .extend(["{\"deviceId\":\"x\",\"version\":1}", "[1]", "{\"bad\" 1}"].map(String::from));
        let raws: Vec<&str> = documents.iter().map(|d| d.1.as_str()).collect();
        assert!(raws == expected, "every document once, in order, as read");
        let files: Vec<usize> = documents.iter().map(|d| d.0).collect();
        assert_eq!(files, [vec![0; 50_000], vec![1; 3]].concat());
        // Parsed and checked on the reader: objects are well formed, `[1]` is JSON but not a
        // body, the malformed one is not JSON.
        assert!(documents[..50_001].iter().all(|d| d.2 && d.3 == Some(true)));
        assert_eq!(
            (documents[50_001].2, documents[50_001].3),
            (true, Some(false))
        );
        assert_eq!((documents[50_002].2, documents[50_002].3), (false, None));
    }

    /// The reader splits lines at their newlines where it can: whatever the input, it sends
    /// the documents the scan splits, and fails where and as the scan does.
    fn assert_reader_splits_as_the_scan(dir: &std::path::Path, input: &[u8], what: &str) {
        let file = dir.join("input.json");
        std::fs::write(&file, input).expect("write");
        let (documents, end) = read_all(&[file]);
        let raws: Vec<String> = documents.into_iter().map(|d| d.1).collect();
        let (expected, scanned) = split_with(input, 1 << 20);
        assert!(raws == expected, "{what}: the documents differ");
        match scanned {
            Ok(_) => assert_eq!(end, "end", "{what}"),
            Err(e) => assert_eq!(end, format!("file 0: {e}"), "{what}"),
        }
    }

    #[test]
    fn the_reader_thread_splits_as_the_data_files_say() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/documents/splitting.json"
        );
        let data: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
        for case in data["cases"].as_array().expect("cases") {
            let what = case["description"].as_str().expect("description");
            let input = case["input"].as_str().expect("input");
            assert_reader_splits_as_the_scan(dir.path(), input.as_bytes(), what);
        }
    }

    /// Files of several blocks of lines, each a mix of what splits at newlines and what does
    /// not (documents over several lines, two on a line, malformed ones, scalars, arrays,
    /// blank and CRLF lines), cut at random places: the reader sends what the scan splits.
    #[test]
    fn the_reader_thread_splits_random_lines_as_the_scan() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for round in 0..12 {
            let mut text = Vec::new();
            let mut i = 0;
            while text.len() < 3 << 20 {
                i += 1;
                let line = match rng.gen_range(0..100) {
                    0 => format!("{{\"deviceId\":\"p{i}\",\n  \"version\": {i}\n}}\n"),
                    1 => format!("{{\"a\":{i}}} {{\"b\":\"}}{{\"}}\n"),
                    2 => format!("{{\"deviceId\":\"m{i}\" \"version\":1}}\n"),
                    3 => format!("\"s{i}\" {i} null\n"),
                    4 => format!("[{{\"deviceId\":\"a{i}\"}}]\n"),
                    5 => "\n \r\n".to_owned(),
                    6 => "{\"x\":\"\\\\\"}\r\n".to_owned(),
                    // Unclosed: the rest of the file is one document, cut short.
                    7 if round >= 10 => format!("{{\"open\":{i}\n"),
                    _ => format!(
                        "{{\"deviceId\":\"d{i}\",\"version\":{i},\"tags\":{{\"s\":\"\\\"[{i}]\"}}}}\n"
                    ),
                };
                text.extend_from_slice(line.as_bytes());
            }
            // Rounds alternate: the whole text, or the text cut at a random byte.
            if round % 2 == 1 {
                text.truncate(rng.gen_range(0..text.len()));
            }
            assert_reader_splits_as_the_scan(dir.path(), &text, &format!("round {round}"));
        }
    }

    #[test]
    fn the_reader_thread_stops_at_a_file_it_cannot_read_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (lines, expected) = many_documents(5_000);
        let good = dir.path().join("good.json");
        std::fs::write(&good, &lines).expect("write");
        let missing = dir.path().join("missing.json");
        let cut = dir.path().join("cut.json");
        std::fs::write(&cut, format!("{lines}\n{{\"deviceId\":\"d9\",\"vers")).expect("write");
        let long = dir.path().join("long.json");
        let mut text = b"{\"deviceId\":\"l\",\"version\":1}\n{\"a\":\"".to_vec();
        text.resize(text.len() + MAX_DOCUMENT_BYTES, b'x');
        std::fs::write(&long, text).expect("write");

        // A file that is not there: the files before it are read, none after.
        let (documents, end) = read_all(&[good.clone(), missing, good.clone()]);
        assert_eq!(documents.len(), 5_000);
        assert!(end.starts_with("file 1: No such file"), "{end}");

        // A file that ends inside a document: every document before it, once.
        let (documents, end) = read_all(&[cut, good.clone()]);
        let raws: Vec<&str> = documents.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(raws, expected);
        assert!(
            end.starts_with("file 0: the input ends inside document 5000"),
            "{end}"
        );

        // A document longer than the bound.
        let (documents, end) = read_all(&[long, good]);
        assert_eq!(documents.len(), 1);
        assert!(end.contains("document 1 (byte 29) is longer than"), "{end}");
    }

    #[test]
    fn dropping_the_feed_stops_the_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (lines, _) = many_documents(50_000);
        let file = dir.path().join("lines.json");
        std::fs::write(&file, &lines).expect("write");
        let feed = spawn_document_reader(vec![file; 4]).expect("spawn");
        assert!(matches!(feed.next(), Some(DocumentEvent::Block(_))));
        // Joins the reader, which is blocked on a full channel: it must see the receiver go.
        drop(feed);
    }

    #[test]
    fn arrays_and_lines_split_alike() {
        let docs = vec![
            r#"{"deviceId":"a","x":"}\"]"}"#.to_string(),
            r#"{"deviceId":"b","y":[1,{"z":2}]}"#.to_string(),
        ];
        assert_eq!(split(&format!("[{}, {}]", docs[0], docs[1])).unwrap(), docs);
        assert_eq!(
            split(&format!(" [\n{},\n{}\n]\n", docs[0], docs[1])).unwrap(),
            docs
        );
        assert_eq!(split(&format!("{}\n{}\n", docs[0], docs[1])).unwrap(), docs);
        assert_eq!(split("[]").unwrap(), Vec::<String>::new());
        assert_eq!(split("").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn scalars_and_malformed_documents_are_documents() {
        assert_eq!(
            split("[1, \"s\", null, {]").unwrap_err().kind(),
            "truncated"
        );
        assert_eq!(
            split("[1, \"s\", null]").unwrap(),
            vec!["1", "\"s\"", "null"]
        );
        assert_eq!(split("{\"a\" 1}\nnull").unwrap(), vec!["{\"a\" 1}", "null"]);
    }

    #[test]
    fn what_cannot_be_split_is_an_error() {
        assert_eq!(split("[{\"a\":1}").unwrap_err().kind(), "truncated");
        assert_eq!(split("{\"a\":1").unwrap_err().kind(), "truncated");
        assert_eq!(
            split("[{\"a\":1} {\"b\":2}]").unwrap_err().kind(),
            "unexpected"
        );
        assert_eq!(split("[{\"a\":1}] x").unwrap_err().kind(), "unexpected");
    }
}
