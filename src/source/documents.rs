//! Twin documents as IoT Hub's twin query returns them (`docs/semantics.md` §7), split out of a
//! stream without parsing: either one JSON array (as `az iot hub query` prints it, and as each
//! page of the REST query is) or one document per line (or any whitespace between documents).
//!
//! The splitter only finds where each top-level value starts and ends (tracking strings and
//! nesting), so a malformed document is still one document: the pipeline parses it and
//! dead-letters it. What cannot be split (the stream ends inside a value, a value longer than
//! the limit, bytes between values that are no separator) ends the stream with an error: the
//! pass is then incomplete.

use std::io::Read;

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

/// The scanning state of one value: nesting depth and whether inside a string.
#[derive(Default)]
struct Scan {
    depth: usize,
    in_string: bool,
    escaped: bool,
    started: bool,
}

impl Scan {
    /// Scans `bytes` (the value's bytes from `offset` on); returns the value's whole length
    /// once its end is found.
    fn feed(&mut self, bytes: &[u8], offset: usize) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            let at = offset + i;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(at + 1);
                    }
                }
                continue;
            }
            match b {
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
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Result<Vec<String>, DocumentsError> {
        // A tiny buffer: documents straddle refills.
        let mut reader = DocumentReader::new(text.as_bytes());
        reader.buf = vec![0; 4];
        let mut out = Vec::new();
        while let Some(doc) = reader.next_document()? {
            out.push(String::from_utf8_lossy(doc).into_owned());
        }
        Ok(out)
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
