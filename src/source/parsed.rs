//! A block of JSON lines parsed into one simd-json tape, built on the reader thread and read
//! on the apply thread, so parsing overlaps applying.
//!
//! A tape's strings point into the bytes it was parsed from (simd-json unescapes in place), so
//! the tape and its buffer travel together in [`ParsedLines`]; the buffer is never touched
//! again once parsed, and the tape is only lent out for as long as the block is borrowed.

use crossbeam_channel::{Receiver, Sender};
use simd_json::{Buffers, Node, Tape, INPUT_PADDING};

use crate::decode::body_is_well_formed;
use crate::source::storage_json::StorageJsonMessage;
use crate::value::tape_find;

/// Lines of one block, each parsed into a slice of a shared tape.
pub struct ParsedLines {
    // Field order matters: `nodes` borrows from `buffer` and is dropped first.
    nodes: Vec<Node<'static>>,
    /// Per line, its nodes' range, or `None` where the line is not JSON.
    spans: Vec<Option<(u32, u32)>>,
    /// Per line, what the reader checked of it.
    verdicts: Vec<LineVerdict>,
    /// The parsed bytes. Parsing unescapes strings in place, so only a line with no
    /// backslash is left as it was read ([`ParsedLines::raw`]); never written after parsing.
    buffer: Vec<u8>,
    /// Of a block parsed in place ([`LineParser::parse_in_place`]), the lines that held a
    /// backslash, as read: each line's index and where its bytes start in `originals`.
    original_at: Vec<(u32, u32)>,
    originals: Vec<u8>,
    /// Where the emptied tape goes when the block is dropped: back to its parser.
    recycle: Sender<Vec<Node<'static>>>,
}

impl Drop for ParsedLines {
    fn drop(&mut self) {
        // Emptied first, so no node outlives the buffer it points into.
        self.nodes.clear();
        let _ = self.recycle.try_send(std::mem::take(&mut self.nodes));
    }
}

/// Where a line's message body is, for the check made as it is parsed.
#[derive(Clone, Copy, Debug)]
pub enum BodyAt {
    /// A storage-route JSON line: the value of its `Body` key, when not a string (a string
    /// is a base64 body, parsed when decoded).
    Envelope,
    /// The line is the body (the JSON body of an Avro record).
    Line,
    /// Lines that are not messages.
    Nowhere,
}

/// What the reader checked of a line as it parsed it (`None`: not checked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineVerdict {
    /// [`StorageJsonMessage::is_unambiguous`] of the envelope ([`BodyAt::Envelope`]).
    pub unambiguous: Option<bool>,
    /// [`crate::decode::body_is_well_formed`] of its body, where it has one.
    pub body: Option<bool>,
}

impl BodyAt {
    fn verdict(self, nodes: &[Node<'_>]) -> LineVerdict {
        match self {
            BodyAt::Envelope => {
                let unambiguous = StorageJsonMessage::is_unambiguous(nodes);
                // Of an unambiguous envelope, the one `Body`.
                let body = tape_find(nodes, "Body")
                    .filter(|body| unambiguous && !matches!(body.first(), Some(Node::String(_))))
                    .map(body_is_well_formed);
                LineVerdict {
                    unambiguous: Some(unambiguous),
                    body,
                }
            }
            BodyAt::Line => LineVerdict {
                unambiguous: None,
                body: Some(body_is_well_formed(nodes)),
            },
            BodyAt::Nowhere => LineVerdict::default(),
        }
    }
}

/// Scratch space for parsing, reused across blocks.
pub struct LineParser {
    buffers: Buffers,
    tape: Option<Tape<'static>>,
    /// Emptied tapes of dropped blocks: a fresh one of a few MiB per block cost page faults.
    spare_nodes: (Sender<Vec<Node<'static>>>, Receiver<Vec<Node<'static>>>),
}

impl Default for LineParser {
    fn default() -> Self {
        Self {
            // Any depth parses (the tape parser is iterative); decoding bounds bodies later.
            buffers: Buffers::with_max_depth(1 << 16, usize::MAX >> 8),
            tape: Some(Tape::null()),
            // More than the blocks alive at once (those read ahead, the one applied).
            spare_nodes: crossbeam_channel::bounded(16),
        }
    }
}

impl LineParser {
    /// [`LineParser::parse`], keeping the raw bytes of the lines for [`ParsedLines::raw`]:
    /// a line with a backslash is copied first (unescaping rewrites it); any other is left
    /// exactly as it was, since simd-json writes into its input only to unescape a string.
    /// Spares a copy of the whole block for the rare dead letter.
    pub fn parse_in_place(
        &mut self,
        buffer: Vec<u8>,
        lines: &[(u32, u32)],
        body_at: BodyAt,
    ) -> ParsedLines {
        let mut original_at = Vec::new();
        let mut originals = Vec::new();
        for (i, &(start, end)) in lines.iter().enumerate() {
            let Some(line) = buffer.get(start as usize..end as usize) else {
                continue;
            };
            if memchr::memchr(b'\\', line).is_some() {
                original_at.push((i as u32, originals.len() as u32));
                originals.extend_from_slice(line);
            }
        }
        let mut parsed = self.parse(buffer, lines, body_at);
        parsed.original_at = original_at;
        parsed.originals = originals;
        parsed
    }

    /// Parses each `(start, end)` line of `buffer`, in place, and checks each line's body
    /// (`body_at`), so that the apply thread need not.
    pub fn parse(
        &mut self,
        mut buffer: Vec<u8>,
        lines: &[(u32, u32)],
        body_at: BodyAt,
    ) -> ParsedLines {
        let len = buffer.len();
        buffer.resize(len + INPUT_PADDING, 0);
        let mut nodes = self.spare_nodes.1.try_recv().unwrap_or_default();
        debug_assert!(nodes.is_empty());
        nodes.reserve(lines.len() * 48);
        let mut spans = Vec::with_capacity(lines.len());
        let mut verdicts = Vec::with_capacity(lines.len());
        let base = buffer.as_mut_ptr();
        let mut tape = self.tape.take().unwrap_or_else(Tape::null).reset();
        for &(start, end) in lines {
            let (start, end) = (start as usize, end as usize);
            // Checked in every build, not only in debug ones: the slice below is unsafe, and
            // this is a public function. A span outside the buffer is a line that is not
            // JSON, never a read or write out of bounds.
            if start > end || end > len {
                spans.push(None);
                verdicts.push(LineVerdict::default());
                continue;
            }
            // SAFETY: `start..end + INPUT_PADDING` lies inside `buffer` (`end <= len`, and
            // the buffer was padded by INPUT_PADDING). simd-json writes only inside
            // `start..end` (it leaves the padding unchanged), and the strings of earlier lines
            // lie before `start`, so this mutable slice aliases no live shared borrow: it
            // may cover later lines' bytes as padding, which nothing borrows yet.
            let line = unsafe {
                std::slice::from_raw_parts_mut(base.add(start), end - start + INPUT_PADDING)
            };
            match simd_json::fill_tape_padded(line, end - start, &mut self.buffers, &mut tape) {
                Ok(()) => {
                    let from = nodes.len() as u32;
                    // SAFETY: the nodes borrow `buffer`'s heap block, which `ParsedLines`
                    // owns, never moves (a Vec's heap block stays put when the Vec moves)
                    // and never changes again; `line_nodes` lends them out only with the
                    // lifetime of a borrow of the `ParsedLines`.
                    verdicts.push(body_at.verdict(&tape.0));
                    nodes.extend(tape.0.drain(..).map(|node| unsafe {
                        std::mem::transmute::<Node<'_>, Node<'static>>(node)
                    }));
                    spans.push(Some((from, nodes.len() as u32)));
                }
                Err(_) => {
                    tape.0.clear();
                    spans.push(None);
                    verdicts.push(LineVerdict::default());
                }
            }
        }
        self.tape = Some(tape.reset());
        ParsedLines {
            nodes,
            spans,
            verdicts,
            buffer,
            original_at: Vec::new(),
            originals: Vec::new(),
            recycle: self.spare_nodes.0.clone(),
        }
    }
}

impl ParsedLines {
    /// The tape of line `i`, `None` when it is not JSON.
    pub fn line_nodes(&self, i: usize) -> Option<&[Node<'_>]> {
        let (from, to) = (*self.spans.get(i)?)?;
        Some(&self.nodes[from as usize..to as usize])
    }

    /// What the reader checked of line `i` ([`BodyAt`]).
    pub fn verdict(&self, i: usize) -> LineVerdict {
        self.verdicts.get(i).copied().unwrap_or_default()
    }

    /// Line `i`, at `span` of the block, as it was read; of a block parsed with
    /// [`LineParser::parse_in_place`] only.
    pub fn raw(&self, i: usize, span: (u32, u32)) -> &[u8] {
        if let Ok(k) = self
            .original_at
            .binary_search_by_key(&(i as u32), |&(line, _)| line)
        {
            let start = self.original_at[k].1 as usize;
            let end = self
                .original_at
                .get(k + 1)
                .map_or(self.originals.len(), |&(_, next)| next as usize);
            return &self.originals[start..end];
        }
        self.buffer
            .get(span.0 as usize..span.1 as usize)
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The buffer back, for reuse (the tape goes first).
    pub fn into_buffer(mut self) -> Vec<u8> {
        self.nodes.clear();
        std::mem::take(&mut self.buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{from_tape, Value};

    #[test]
    fn lines_parse_in_place_and_survive_a_move() {
        let text = br#"{"a":"x\ny"}
not json
{"b":[1,2,{"c":"\u00e9"}]}"#;
        let lines = [(0u32, 12u32), (13, 21), (22, text.len() as u32)];
        let mut parser = LineParser::default();
        let parsed = parser.parse(text.to_vec(), &lines, BodyAt::Nowhere);
        // Moving the block to another thread moves the Vec, not its heap block.
        let parsed = std::thread::spawn(move || parsed).join().expect("thread");
        assert_eq!(parsed.len(), 3);
        let first = from_tape(parsed.line_nodes(0).expect("json"));
        assert_eq!(
            first.as_object().and_then(|m| m.get("a")),
            Some(&Value::from("x\ny"))
        );
        assert!(parsed.line_nodes(1).is_none());
        let third = from_tape(parsed.line_nodes(2).expect("json"));
        assert_eq!(third.to_string(), r#"{"b":[1,2,{"c":"é"}]}"#);
    }

    /// A block parsed in place gives back every line as it was read, whether its strings
    /// were unescaped (then from a copy) or not (then from the buffer, untouched), and the
    /// same values as a block parsed from a copy.
    #[test]
    fn a_block_parsed_in_place_keeps_its_lines_as_read() {
        let lines_text: [&[u8]; 9] = [
            br#"{"a":"plain","n":-1.5e3,"t":true,"z":null}"#,
            br#"{"a":"x\ny \"q\" \\ \u00e9 \ud83d\ude00","k\tey":1}"#,
            br#"not json \n with a backslash"#,
            br#"{"broken": "x\n", "#,
            br#"{"broken": "plain", "#,
            b"",
            br#"{"b":[1,2,{"c":"d"}],"e":"\/"}"#,
            br#"["top","level"]"#,
            br#"{"last":"no newline after me"}"#,
        ];
        let text = lines_text.join(&b'\n');
        let mut lines = Vec::new();
        let mut start = 0u32;
        for line in lines_text {
            lines.push((start, start + line.len() as u32));
            start += line.len() as u32 + 1;
        }
        let mut parser = LineParser::default();
        let copied = parser.parse(text.clone(), &lines, BodyAt::Line);
        let in_place = parser.parse_in_place(text.clone(), &lines, BodyAt::Line);
        assert_eq!(in_place.len(), lines_text.len());
        for (i, line) in lines_text.iter().enumerate() {
            assert_eq!(in_place.raw(i, lines[i]), *line, "line {i}");
            let value = |p: &ParsedLines| p.line_nodes(i).map(|n| from_tape(n).to_string());
            assert_eq!(value(&in_place), value(&copied), "line {i}");
            assert_eq!(in_place.verdict(i), copied.verdict(i), "line {i}");
        }
        // Unescaped in place: the buffer no longer holds the escaped lines as read.
        assert_ne!(&in_place.buffer[..text.len()], &text[..]);
    }

    /// Spans outside the buffer (or reversed) were guarded by a `debug_assert` only, in front
    /// of an unsafe slice: in a release build they read and wrote out of bounds.
    #[test]
    fn spans_outside_the_buffer_are_lines_that_are_not_json() {
        let text = br#"{"a":1}"#;
        let mut parser = LineParser::default();
        let parsed = parser.parse(
            text.to_vec(),
            &[(0, 7), (0, 8), (5, 3), (7, u32::MAX), (0, 0), (0, 7)],
            BodyAt::Nowhere,
        );
        assert_eq!(parsed.len(), 6);
        let json: Vec<bool> = (0..6).map(|i| parsed.line_nodes(i).is_some()).collect();
        assert_eq!(json, [true, false, false, false, false, true]);
    }
}
