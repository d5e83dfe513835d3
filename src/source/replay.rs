//! Captured files: finding them, and reading them in order on a reader thread.
//!
//! Paths are taken in the order given; a directory stands for every file under it, sorted by
//! full path as bytes (Capture and routing paths then sort by partition and time). The reader
//! thread reads each file from its checkpointed byte offset in large blocks and hands the
//! apply thread chunks of whole lines with their record indexes, so the apply thread never
//! waits on the disk and never copies a line between threads more than once.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crossbeam_channel::{Receiver, Sender};

use super::avro::{AvroError, AvroFile, OwnedMessage};
use super::avro_fast::FastAvroFile;
use super::parsed::{BodyAt, LineParser, ParsedLines};

/// Bytes read from a file at a time.
const BLOCK_BYTES: usize = 4 << 20;

/// The longest JSON line read as a record. IoT Hub's messages are at most 256 KB (a
/// storage-route line with a base64 body about 350 KB); a longer line is a dead letter
/// `bad_record` at its position, of which only the first [`OVERSIZE_PREFIX_BYTES`] are kept,
/// and the file goes on after it. Without the bound a file with no newline was held in
/// memory whole.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// What a dead letter keeps of a line longer than [`MAX_LINE_BYTES`].
pub const OVERSIZE_PREFIX_BYTES: usize = 64 << 10;

/// Avro object container files start with these four bytes.
pub const AVRO_MAGIC: &[u8; 4] = b"Obj\x01";

/// A file to replay and its name in alert ids: its path relative to the directory it was
/// found in (or its file name, when given directly), so that ids do not depend on where a
/// capture happens to be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayFile {
    pub path: PathBuf,
    pub name: String,
}

/// Expands the command line's paths into the files to replay, in replay order.
pub fn expand_paths(paths: &[PathBuf]) -> io::Result<Vec<ReplayFile>> {
    let mut files = Vec::new();
    for path in paths {
        let metadata = std::fs::metadata(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if metadata.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found)?;
            found.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
            files.extend(found.into_iter().map(|found| {
                ReplayFile {
                    name: found
                        .strip_prefix(path)
                        .unwrap_or(&found)
                        .to_string_lossy()
                        .into_owned(),
                    path: found,
                }
            }));
        } else {
            files.push(ReplayFile {
                name: path
                    .file_name()
                    .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy())
                    .into_owned(),
                path: path.clone(),
            });
        }
    }
    // Two files of one run with the same relative name are told apart by their full paths.
    let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    let clashes: Vec<String> = names
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0].to_owned())
        .collect();
    for file in &mut files {
        if clashes.contains(&file.name) {
            file.name = file.path.to_string_lossy().into_owned();
        }
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let path = entry?.path();
        if std::fs::metadata(&path)?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// A file to read and where to start in it.
#[derive(Clone, Debug)]
pub struct FileStart {
    pub path: PathBuf,
    pub next_record: u64,
    pub byte_offset: u64,
}

/// Whole lines of one file.
pub struct Chunk {
    pub file: usize,
    /// The record index of the first line.
    pub first_record: u64,
    /// The file offset of the chunk's first byte, where `lines` count from.
    pub base_offset: u64,
    /// The bytes read, where the lines were parsed from a copy (Avro bodies, an oversize
    /// line's prefix); empty where they were parsed in place, in `parsed` ([`Chunk::raw`]).
    pub data: Vec<u8>,
    /// The file's bytes this chunk covers (Avro: its bodies' bytes), for progress.
    pub n_bytes: u64,
    /// Each line as `(start, end)` in the bytes read, without its line terminator; blank
    /// lines are not records and are left out.
    pub lines: Vec<(u32, u32)>,
    /// Each line's next-record byte offset (just past its terminator), relative to
    /// `base_offset` (64 bits: a line longer than [`MAX_LINE_BYTES`] is represented by its
    /// prefix, and its end may lie gigabytes further).
    pub line_ends: Vec<u64>,
    /// The lines parsed: in place for JSON lines, else from a copy of `data`.
    pub parsed: ParsedLines,
    /// Avro files: the records, whose bodies are `data`'s `lines` (then `line_ends` is
    /// empty and positions are record indexes only).
    pub records: Vec<OwnedMessage>,
}

impl Chunk {
    /// Line `i` as it was read, for a dead letter.
    pub fn raw(&self, i: usize) -> &[u8] {
        let span = self.lines.get(i).copied().unwrap_or_default();
        if self.data.is_empty() {
            self.parsed.raw(i, span)
        } else {
            self.data
                .get(span.0 as usize..span.1 as usize)
                .unwrap_or_default()
        }
    }
}

/// What the reader thread sends.
pub enum ReadEvent {
    /// Boxed: a chunk is some 300 bytes of vectors, the other events a few words.
    Chunk(Box<Chunk>),
    /// A file is done: all of it was read (`byte_offset`: its length, for JSON lines).
    FileEnd {
        file: usize,
        byte_offset: Option<u64>,
        next_record: u64,
    },
    /// A file could not be read; the rest of its content is skipped.
    FileError { file: usize, error: String },
}

/// The reader thread's channels: chunks come out of `events`; a chunk's `data` sent back on
/// `recycle` is reused, which spares the reader a fresh (page-faulting) block per read.
pub struct Reader {
    pub events: Receiver<ReadEvent>,
    pub recycle: Sender<Vec<u8>>,
    /// Emptied record vectors of Avro chunks, for reuse like `recycle`.
    pub recycle_records: Sender<Vec<OwnedMessage>>,
    pub handle: std::thread::JoinHandle<()>,
}

/// Starts the reader thread over `files`; it stops at the end or when the receiver is gone.
pub fn spawn_reader(files: Vec<FileStart>) -> io::Result<Reader> {
    let (tx, rx) = crossbeam_channel::bounded(CHUNKS_QUEUED);
    // Room for every buffer that can be alive at once (two a chunk: queued, being applied,
    // being read), so that none is dropped when the apply thread hands back several while
    // the reader waits for a core: a dropped buffer is a fresh one later, megabytes of page
    // faults.
    let (recycle, recycled) = crossbeam_channel::bounded(2 * (CHUNKS_QUEUED + 2));
    let (recycle_records, recycled_records) =
        crossbeam_channel::bounded::<Vec<OwnedMessage>>(CHUNKS_QUEUED + 2);
    let handle = std::thread::Builder::new()
        .name("twinwatch-reader".into())
        .spawn(move || {
            let mut parser = LineParser::default();
            for (i, start) in files.iter().enumerate() {
                let keep_going =
                    match read_file(i, start, &tx, &recycled, &recycled_records, &mut parser) {
                        Ok(keep_going) => keep_going,
                        Err(e) => tx
                            .send(ReadEvent::FileError {
                                file: i,
                                error: e.to_string(),
                            })
                            .is_ok(),
                    };
                if !keep_going {
                    return;
                }
            }
        })?;
    Ok(Reader {
        events: rx,
        recycle,
        recycle_records,
        handle,
    })
}

/// Reads one file into chunks; `Ok(false)` when the receiver is gone.
fn read_file(
    file: usize,
    start: &FileStart,
    tx: &Sender<ReadEvent>,
    recycled: &Receiver<Vec<u8>>,
    recycled_records: &Receiver<Vec<OwnedMessage>>,
    parser: &mut LineParser,
) -> io::Result<bool> {
    let mut f = File::open(&start.path)?;
    let len = f.metadata()?.len();
    if start.byte_offset > len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the file is shorter ({len} bytes) than its checkpoint ({} bytes): it was replaced or truncated",
                start.byte_offset
            ),
        ));
    }
    // Avro or JSON lines: the content decides, not the name.
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    if n == 4 && &magic == AVRO_MAGIC {
        f.seek(SeekFrom::Start(0))?;
        return read_avro(file, start, f, tx, recycled, recycled_records, parser);
    }
    f.seek(SeekFrom::Start(start.byte_offset))?;
    let mut next_record = start.next_record;
    let mut base_offset = start.byte_offset;
    // Bytes of an incomplete last line carried into the next block.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let mut data = recycled.try_recv().unwrap_or_default();
        data.clear();
        // With room for the parser's padding: growing a block of megabytes afterwards
        // would copy it into fresh (page-faulting) memory.
        data.reserve(carry.len() + BLOCK_BYTES + simd_json::INPUT_PADDING);
        data.append(&mut carry);
        let before = data.len();
        let n = (&mut f).take(BLOCK_BYTES as u64).read_to_end(&mut data)?;
        let eof = n == 0;
        let complete = if eof {
            data.len()
        } else {
            match memrchr_newline(&data[before..]) {
                Some(i) => before + i + 1,
                None if data.len() > MAX_LINE_BYTES => {
                    // `data` is the start of one line (everything before it was sent) and
                    // already longer than the bound: a dead letter, and the file goes on.
                    let (chunk, eof) =
                        oversize_line(file, next_record, base_offset, data, &mut f, parser)?;
                    base_offset += chunk.line_ends[0];
                    next_record += 1;
                    if tx.send(ReadEvent::Chunk(Box::new(chunk))).is_err() {
                        return Ok(false);
                    }
                    if eof {
                        let end = ReadEvent::FileEnd {
                            file,
                            byte_offset: Some(base_offset),
                            next_record,
                        };
                        return Ok(tx.send(end).is_ok());
                    }
                    continue;
                }
                None => {
                    carry = data;
                    continue;
                }
            }
        };
        carry.extend_from_slice(&data[complete..]);
        data.truncate(complete);
        let (mut lines, line_ends) = split_lines(&data);
        let n_lines = lines.len() as u64;
        let n_data = data.len() as u64;
        if !lines.is_empty() || eof {
            // Whole lines longer than the bound (it is checked above only for a line without
            // its end in memory): kept as their prefix, and not parsed.
            let mut to_parse = lines.clone();
            for (line, parse) in lines.iter_mut().zip(&mut to_parse) {
                if (line.1 - line.0) as usize > MAX_LINE_BYTES {
                    line.1 = line.0 + OVERSIZE_PREFIX_BYTES as u32;
                    *parse = (line.0, line.0);
                }
            }
            let parsed = parser.parse_in_place(data, &to_parse, BodyAt::Envelope);
            let chunk = Chunk {
                file,
                first_record: next_record,
                base_offset,
                data: Vec::new(),
                n_bytes: n_data,
                lines,
                line_ends,
                parsed,
                records: Vec::new(),
            };
            if tx.send(ReadEvent::Chunk(Box::new(chunk))).is_err() {
                return Ok(false);
            }
        }
        next_record += n_lines;
        base_offset += n_data;
        if eof {
            let end = ReadEvent::FileEnd {
                file,
                byte_offset: Some(base_offset),
                next_record,
            };
            return Ok(tx.send(end).is_ok());
        }
    }
}

/// A line longer than [`MAX_LINE_BYTES`] whose first `data.len()` bytes were read: reads and
/// drops the rest of it, up to its newline or the end of the file, and leaves the file right
/// after it. Returns a chunk of the one record (its first [`OVERSIZE_PREFIX_BYTES`], left
/// unparsed: a dead letter `bad_record`) and whether the file ended.
fn oversize_line(
    file: usize,
    record: u64,
    base_offset: u64,
    mut data: Vec<u8>,
    f: &mut File,
    parser: &mut LineParser,
) -> io::Result<(Chunk, bool)> {
    let mut length = data.len() as u64;
    data.truncate(OVERSIZE_PREFIX_BYTES);
    let mut block = Vec::with_capacity(BLOCK_BYTES);
    let eof = loop {
        block.clear();
        let n = (&mut *f).take(BLOCK_BYTES as u64).read_to_end(&mut block)?;
        if n == 0 {
            break true;
        }
        if let Some(i) = memchr::memchr(b'\n', &block) {
            length += i as u64 + 1;
            // Back to just after the line: what follows is read as usual (the caller's
            // carried bytes must hold no newline).
            f.seek(SeekFrom::Current(-((n - i - 1) as i64)))?;
            break false;
        }
        length += n as u64;
    };
    let prefix = data.len() as u32;
    let chunk = Chunk {
        file,
        first_record: record,
        base_offset,
        lines: vec![(0, prefix)],
        line_ends: vec![length],
        // Nothing parsed: the line is not a record.
        parsed: parser.parse(Vec::new(), &[(0, 0)], BodyAt::Nowhere),
        n_bytes: data.len() as u64,
        data,
        records: Vec::new(),
    };
    Ok((chunk, eof))
}

/// An Avro file's records, through whichever reader fits its schema.
enum Records<R: Read> {
    Fast(FastAvroFile<R>),
    Generic(Box<AvroFile<R>>),
}

impl<R: Read> Records<R> {
    /// Decodes the next record into `record`; the direct reader reuses its allocations.
    fn next_record_into(
        &mut self,
        record: &mut OwnedMessage,
        bodies: &mut Vec<u8>,
    ) -> Option<Result<(), AvroError>> {
        match self {
            Records::Fast(reader) => reader.next_record_into(record, bodies),
            Records::Generic(reader) => Some(reader.next_record(bodies)?.map(|r| *record = r)),
        }
    }
}

/// Parses `lines` of a copy of `data` (in a recycled buffer), so that `data` stays as read for
/// dead letters (an Avro record's raw form is rendered from its body there).
fn parse_copy(
    parser: &mut LineParser,
    recycled: &Receiver<Vec<u8>>,
    data: &[u8],
    lines: &[(u32, u32)],
    body_at: BodyAt,
) -> ParsedLines {
    let mut work = recycled.try_recv().unwrap_or_default();
    work.clear();
    // Room for the parser's padding too: growing a block of megabytes afterwards would copy
    // it into fresh (page-faulting) memory.
    work.reserve(data.len() + simd_json::INPUT_PADDING);
    work.extend_from_slice(data);
    parser.parse(work, lines, body_at)
}

/// Chunks read ahead of the apply thread.
const CHUNKS_QUEUED: usize = 4;

/// Records handed over at a time.
const BLOCK_RECORDS: usize = 4096;

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads an Avro container from record `start.next_record` on, in blocks of records whose
/// bodies are parsed like lines.
fn read_avro(
    file: usize,
    start: &FileStart,
    f: File,
    tx: &Sender<ReadEvent>,
    recycled: &Receiver<Vec<u8>>,
    recycled_records: &Receiver<Vec<OwnedMessage>>,
    parser: &mut LineParser,
) -> io::Result<bool> {
    // The two schemas of IoT Hub and Event Hubs Capture have a direct reader; anything else
    // goes through apache-avro.
    let mut avro =
        match FastAvroFile::open(io::BufReader::with_capacity(1 << 20, f)).map_err(invalid)? {
            Some(fast) => Records::Fast(fast),
            None => {
                let f = File::open(&start.path)?;
                Records::Generic(Box::new(
                    AvroFile::open(io::BufReader::with_capacity(1 << 20, f)).map_err(invalid)?,
                ))
            }
        };
    let (mut skipped, mut scratch) = (Vec::new(), OwnedMessage::default());
    for _ in 0..start.next_record {
        skipped.clear();
        match avro.next_record_into(&mut scratch, &mut skipped) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(invalid(e)),
            None => break,
        }
    }
    let mut next_record = start.next_record;
    loop {
        let mut data = recycled.try_recv().unwrap_or_default();
        data.clear();
        // Recycled records come back as they were used: each is decoded into again, keeping
        // its allocations instead of being freed on the apply thread and made anew here.
        let mut records = recycled_records
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BLOCK_RECORDS));
        let mut n = 0;
        let mut error = None;
        let mut eof = false;
        while n < BLOCK_RECORDS && data.len() < BLOCK_BYTES {
            if n == records.len() {
                records.push(OwnedMessage::default());
            }
            match avro.next_record_into(&mut records[n], &mut data) {
                Some(Ok(())) => n += 1,
                Some(Err(e)) => {
                    error = Some(invalid(e));
                    break;
                }
                None => {
                    eof = true;
                    break;
                }
            }
        }
        records.truncate(n);
        let lines: Vec<(u32, u32)> = records.iter().map(|r| r.body.unwrap_or((0, 0))).collect();
        let n = records.len() as u64;
        if !records.is_empty() {
            let parsed = parse_copy(parser, recycled, &data, &lines, BodyAt::Line);
            let chunk = Chunk {
                file,
                first_record: next_record,
                base_offset: 0,
                n_bytes: data.len() as u64,
                data,
                lines,
                line_ends: Vec::new(),
                parsed,
                records,
            };
            if tx.send(ReadEvent::Chunk(Box::new(chunk))).is_err() {
                return Ok(false);
            }
        }
        next_record += n;
        if let Some(error) = error {
            return Err(error);
        }
        if eof {
            let end = ReadEvent::FileEnd {
                file,
                byte_offset: None,
                next_record,
            };
            return Ok(tx.send(end).is_ok());
        }
    }
}

fn memrchr_newline(data: &[u8]) -> Option<usize> {
    memchr::memrchr(b'\n', data)
}

/// Splits whole lines; a line's end drops `\n` and a `\r` before it, and lines of only
/// white space are skipped.
fn split_lines(data: &[u8]) -> (Vec<(u32, u32)>, Vec<u64>) {
    let mut lines = Vec::new();
    let mut ends = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let newline = memchr::memchr(b'\n', &data[start..]);
        let (end, next) = match newline {
            Some(i) => (start + i, start + i + 1),
            None => (data.len(), data.len()),
        };
        let mut content_end = end;
        if content_end > start && data[content_end - 1] == b'\r' {
            content_end -= 1;
        }
        if data[start..content_end]
            .iter()
            .any(|b| !b.is_ascii_whitespace())
        {
            lines.push((start as u32, content_end as u32));
            ends.push(next as u64);
        }
        start = next;
    }
    (lines, ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_skip_blanks_and_carriage_returns() {
        let data = b"a\r\n\n  \nb\nc";
        let (lines, ends) = split_lines(data);
        let texts: Vec<&[u8]> = lines
            .iter()
            .map(|&(s, e)| &data[s as usize..e as usize])
            .collect();
        assert_eq!(texts, vec![&b"a"[..], b"b", b"c"]);
        assert_eq!(ends, vec![3, 9, 10]);
    }

    /// A record as the reader sent it: its index, its bytes, whether it parsed, its end offset.
    type Seen = (u64, Vec<u8>, bool, u64);

    /// Every record the reader sends for `path`, and the file's end (its byte offset and next
    /// record).
    fn read_all(path: &Path) -> (Vec<Seen>, (Option<u64>, u64)) {
        let reader = spawn_reader(vec![FileStart {
            path: path.to_owned(),
            next_record: 0,
            byte_offset: 0,
        }])
        .expect("spawn");
        let (mut seen, mut end) = (Vec::new(), None);
        for event in reader.events {
            match event {
                ReadEvent::Chunk(chunk) => {
                    for i in 0..chunk.lines.len() {
                        seen.push((
                            chunk.first_record + i as u64,
                            chunk.raw(i).to_vec(),
                            chunk.parsed.line_nodes(i).is_some(),
                            chunk.base_offset + chunk.line_ends[i],
                        ));
                    }
                }
                ReadEvent::FileEnd {
                    byte_offset,
                    next_record,
                    ..
                } => end = Some((byte_offset, next_record)),
                ReadEvent::FileError { error, .. } => panic!("{error}"),
            }
        }
        reader.handle.join().expect("reader");
        (seen, end.expect("the file ends"))
    }

    /// Issue 23: a line with no newline was held in memory whole. A line longer than the
    /// bound is one unparsed record of its prefix, at its position, whether its end comes
    /// within the block that passes the bound, much later, or never (the end of the file).
    #[test]
    fn a_line_longer_than_the_bound_is_one_unparsed_record_and_the_file_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, long, newline) in [
            ("just-over", MAX_LINE_BYTES + 10, true),
            ("far-over", MAX_LINE_BYTES + 3 * BLOCK_BYTES + 17, true),
            ("no-newline", MAX_LINE_BYTES + BLOCK_BYTES + 1, false),
            ("at-the-bound", MAX_LINE_BYTES, true),
        ] {
            let path = dir.path().join(name);
            let mut text = b"{\"a\":1}\n".to_vec();
            text.extend(std::iter::repeat_n(b'x', long));
            if newline {
                text.extend_from_slice(b"\n{\"c\":3}\n");
            }
            std::fs::write(&path, &text).expect("write");
            let (seen, end) = read_all(&path);
            assert_eq!(end, (Some(text.len() as u64), seen.len() as u64), "{name}");
            assert_eq!(seen[0], (0, b"{\"a\":1}".to_vec(), true, 8), "{name}");
            let (index, bytes, parsed, end) = &seen[1];
            assert_eq!(*index, 1, "{name}");
            assert!(!parsed, "{name}: the long line parsed");
            assert_eq!(
                *end,
                8 + long as u64 + u64::from(newline),
                "{name}: where the long line ends"
            );
            if long > MAX_LINE_BYTES {
                assert_eq!(bytes.len(), OVERSIZE_PREFIX_BYTES, "{name}");
            } else {
                assert_eq!(bytes.len(), long, "{name}: at the bound the line is whole");
            }
            if newline {
                assert_eq!(seen.len(), 3, "{name}");
                assert_eq!(
                    seen[2],
                    (2, b"{\"c\":3}".to_vec(), true, text.len() as u64),
                    "{name}"
                );
            } else {
                assert_eq!(seen.len(), 2, "{name}");
            }
        }
    }

    /// Lines after a long line are lines, even when another long line follows them in the
    /// same block (the reader once carried them into the next long line).
    #[test]
    fn lines_between_two_long_lines_are_records_of_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("two-long");
        let long = MAX_LINE_BYTES + BLOCK_BYTES;
        let mut text = b"{\"a\":1}\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', long));
        text.extend_from_slice(b"\n{\"b\":2}\n{\"c\":3}\n");
        text.extend(std::iter::repeat_n(b'y', long));
        std::fs::write(&path, &text).expect("write");
        let (seen, end) = read_all(&path);
        let summary: Vec<(u64, bool, u64)> = seen
            .iter()
            .map(|(i, _, parsed, end)| (*i, *parsed, *end))
            .collect();
        let first_end = 8 + long as u64 + 1;
        assert_eq!(
            summary,
            [
                (0, true, 8),
                (1, false, first_end),
                (2, true, first_end + 8),
                (3, true, first_end + 16),
                (4, false, text.len() as u64),
            ]
        );
        assert_eq!(end, (Some(text.len() as u64), 5));
    }

    #[test]
    fn reader_resumes_at_offsets_and_counts_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.json");
        std::fs::write(&path, b"{\"a\":1}\n\n{\"b\":2}\n{\"c\":3}").expect("write");
        let reader = spawn_reader(vec![FileStart {
            path: path.clone(),
            next_record: 1,
            byte_offset: 9,
        }])
        .expect("spawn");
        let mut seen = Vec::new();
        for event in reader.events {
            match event {
                ReadEvent::Chunk(chunk) => {
                    for i in 0..chunk.lines.len() {
                        seen.push((
                            chunk.first_record + i as u64,
                            String::from_utf8_lossy(chunk.raw(i)).into_owned(),
                            chunk.base_offset + chunk.line_ends[i],
                        ));
                    }
                }
                ReadEvent::FileEnd {
                    byte_offset,
                    next_record,
                    ..
                } => {
                    assert_eq!((byte_offset, next_record), (Some(24), 3));
                }
                ReadEvent::FileError { error, .. } => panic!("{error}"),
            }
        }
        reader.handle.join().expect("reader");
        assert_eq!(
            seen,
            vec![
                (1, "{\"b\":2}".to_owned(), 17),
                (2, "{\"c\":3}".to_owned(), 24)
            ]
        );
    }
}
