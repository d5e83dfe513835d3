//! Where alerts go. A sink takes a run of CloudEvents (each one JSON object, no newline) and
//! either accepts all of them or fails; the delivery thread retries a failed run.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink}: {source}")]
    Io {
        sink: String,
        #[source]
        source: io::Error,
    },
    /// An HTTP receiver did not accept: `status` 0 when no response came (connect error,
    /// timeout).
    #[error("{sink}: HTTP {status}: {detail}")]
    Http {
        sink: String,
        status: u16,
        detail: String,
    },
}

impl SinkError {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io { .. } => "io",
            SinkError::Http { status: 0, .. } => "unreachable",
            SinkError::Http { .. } => "http_status",
        }
    }
}

/// A destination for alerts.
pub trait Sink: Send {
    /// A bounded label for logs and metrics (`file`, `stdout`, ...).
    fn name(&self) -> &'static str;
    /// Delivers every alert of `alerts`, in order; `Ok` only when all were accepted.
    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError>;
    /// Called about every 200 ms by the delivery thread, for sinks with periodic work (the
    /// Alertmanager sink re-posts open alerts). An error is logged and retried next tick.
    fn tick(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// The service is stopping: every call from now on must be over by `at` (an HTTP sink
    /// shortens its requests' timeout; a local one has nothing to do).
    fn stop_by(&mut self, _at: std::time::Instant) {}
}

/// CloudEvents JSON lines appended to a file; each run is synced to disk before it counts as
/// accepted. The file is only ever cut to drop a torn last line: a run that was never
/// accepted (a crash or a full disk in the middle of its write), so it is written again.
pub struct FileSink {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl FileSink {
    pub fn open(path: &Path) -> io::Result<FileSink> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let whole = whole_lines_len(&file, len)?;
        if whole < len {
            tracing::warn!(
                file = %path.display(),
                bytes = len - whole,
                "cutting a torn last line from the alert file (a run interrupted mid-write; it is delivered again)"
            );
            file.set_len(whole)?;
        }
        Ok(FileSink {
            path: path.to_path_buf(),
            file,
            buf: Vec::new(),
        })
    }
}

impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError> {
        self.buf.clear();
        for alert in alerts {
            self.buf.extend_from_slice(alert);
            self.buf.push(b'\n');
        }
        let result = self.file.metadata().and_then(|meta| {
            let before = meta.len();
            self.file
                .write_all(&self.buf)
                .and_then(|()| self.file.sync_data())
                .inspect_err(|_| {
                    // A failed write (a full disk) may have left part of the run: cut it, so
                    // that the retry does not append to a torn line.
                    let _ = self.file.set_len(before);
                })
        });
        result.map_err(|source| SinkError::Io {
            sink: self.path.display().to_string(),
            source,
        })
    }
}

/// The length of `file`'s first `len` bytes up to and including their last newline: what is
/// left once a torn last line is cut.
fn whole_lines_len(file: &File, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let mut chunk = [0u8; 8192];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.read_exact_at(part, start)?;
        if let Some(i) = memchr::memrchr(b'\n', part) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// CloudEvents JSON lines on standard output.
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError> {
        let mut out = io::stdout().lock();
        let result = alerts
            .iter()
            .try_for_each(|alert| out.write_all(alert).and_then(|()| out.write_all(b"\n")))
            .and_then(|()| out.flush());
        result.map_err(|source| SinkError::Io {
            sink: "stdout".into(),
            source,
        })
    }
}

/// Alerts as one human-readable line each, for a person watching a terminal (the demo):
/// `OPENED   high     gw-1/modules/azureiotsecurity  rule-id  Title`.
pub struct ConsoleSink;

impl Sink for ConsoleSink {
    fn name(&self) -> &'static str {
        "console"
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError> {
        let mut out = io::stdout().lock();
        let result = alerts.iter().try_for_each(|alert| {
            let line = match serde_json::from_slice::<serde_json::Value>(alert) {
                Ok(event) => {
                    let data = &event["data"];
                    let kind = if event["type"] == "io.twinwatch.violation.opened" {
                        "OPENED"
                    } else if data["reason"] == "deleted" {
                        "DELETED"
                    } else {
                        "RESOLVED"
                    };
                    format!(
                        "{kind:<8} {:<8} {:<44} {:<40} {}",
                        data["severity"].as_str().unwrap_or("?"),
                        event["subject"].as_str().unwrap_or("?"),
                        data["ruleId"].as_str().unwrap_or("?"),
                        data["title"].as_str().unwrap_or("")
                    )
                }
                Err(_) => String::from_utf8_lossy(alert).into_owned(),
            };
            writeln!(out, "{line}")
        });
        result
            .and_then(|()| out.flush())
            .map_err(|source| SinkError::Io {
                sink: "console".into(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by the crash campaign, tests/reliability/crash.rs): a replay killed
    /// while the file sink was writing a run left half a line; the next run appended after it,
    /// and the file had a line that was not JSON. The torn line is now cut at open.
    #[test]
    fn a_torn_last_line_left_by_a_crash_is_cut_before_appending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("alerts.jsonl");
        std::fs::write(&path, b"{\"id\":\"1\"}\n{\"id\":\"2\"}\n{\"id\":").expect("write");
        let mut sink = FileSink::open(&path).expect("open");
        sink.deliver(&[b"{\"id\":\"3\"}"]).expect("deliver");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"{\"id\":\"1\"}\n{\"id\":\"2\"}\n{\"id\":\"3\"}\n"
        );
    }

    #[test]
    fn whole_files_and_files_without_any_newline_are_handled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("alerts.jsonl");
        // Longer than one read chunk, with the only newline far from the end.
        let mut text = b"{\"id\":\"1\"}\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 20_000));
        std::fs::write(&path, &text).expect("write");
        FileSink::open(&path).expect("open");
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"id\":\"1\"}\n");
        // Nothing but a torn line: emptied.
        std::fs::write(&path, b"{\"id\"").expect("write");
        FileSink::open(&path).expect("open");
        assert!(std::fs::read(&path).expect("read").is_empty());
        // Whole lines stay as they are.
        std::fs::write(&path, b"{}\n{}\n").expect("write");
        FileSink::open(&path).expect("open");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}\n{}\n");
    }
}
