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
use super::parsed::{LineParser, ParsedLines};

/// Bytes read from a file at a time.
const BLOCK_BYTES: usize = 4 << 20;

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
    /// The file offset of `data[0]`.
    pub base_offset: u64,
    pub data: Vec<u8>,
    /// Each line as `(start, end)` in `data`, without its line terminator; blank lines are
    /// not records and are left out.
    pub lines: Vec<(u32, u32)>,
    /// Each line's next-record byte offset (just past its terminator), relative to
    /// `base_offset`.
    pub line_ends: Vec<u32>,
    /// The lines parsed (from a copy: `data` stays as read, for dead letters).
    pub parsed: ParsedLines,
    /// Avro files: the records, whose bodies are `data`'s `lines` (then `line_ends` is
    /// empty and positions are record indexes only).
    pub records: Vec<OwnedMessage>,
}

/// What the reader thread sends.
pub enum ReadEvent {
    Chunk(Chunk),
    /// A file is done: all of it was read (`byte_offset`: its length, for JSON lines).
    FileEnd {
        file: usize,
        byte_offset: Option<u64>,
        next_record: u64,
    },
    /// A file could not be read; the rest of its content is skipped.
    FileError {
        file: usize,
        error: String,
    },
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
    let (tx, rx) = crossbeam_channel::bounded(4);
    let (recycle, recycled) = crossbeam_channel::bounded(8);
    let (recycle_records, recycled_records) = crossbeam_channel::bounded::<Vec<OwnedMessage>>(4);
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
        data.reserve(carry.len() + BLOCK_BYTES);
        data.append(&mut carry);
        let before = data.len();
        let n = (&mut f).take(BLOCK_BYTES as u64).read_to_end(&mut data)?;
        let eof = n == 0;
        let complete = if eof {
            data.len()
        } else {
            match memrchr_newline(&data[before..]) {
                Some(i) => before + i + 1,
                None => {
                    carry = data;
                    continue;
                }
            }
        };
        carry.extend_from_slice(&data[complete..]);
        data.truncate(complete);
        let (lines, line_ends) = split_lines(&data);
        let n_lines = lines.len() as u64;
        let n_data = data.len() as u64;
        if !lines.is_empty() || eof {
            let parsed = parse_copy(parser, recycled, &data, &lines);
            let chunk = Chunk {
                file,
                first_record: next_record,
                base_offset,
                data,
                lines,
                line_ends,
                parsed,
                records: Vec::new(),
            };
            if tx.send(ReadEvent::Chunk(chunk)).is_err() {
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
/// dead letters.
fn parse_copy(
    parser: &mut LineParser,
    recycled: &Receiver<Vec<u8>>,
    data: &[u8],
    lines: &[(u32, u32)],
) -> ParsedLines {
    let mut work = recycled.try_recv().unwrap_or_default();
    work.clear();
    work.extend_from_slice(data);
    parser.parse(work, lines)
}

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
            let parsed = parse_copy(parser, recycled, &data, &lines);
            let chunk = Chunk {
                file,
                first_record: next_record,
                base_offset: 0,
                data,
                lines,
                line_ends: Vec::new(),
                parsed,
                records,
            };
            if tx.send(ReadEvent::Chunk(chunk)).is_err() {
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
fn split_lines(data: &[u8]) -> (Vec<(u32, u32)>, Vec<u32>) {
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
            ends.push(next as u32);
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
                    for (i, &(s, e)) in chunk.lines.iter().enumerate() {
                        seen.push((
                            chunk.first_record + i as u64,
                            String::from_utf8_lossy(&chunk.data[s as usize..e as usize])
                                .into_owned(),
                            chunk.base_offset + u64::from(chunk.line_ends[i]),
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
