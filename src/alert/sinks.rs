//! Where alerts go. A sink takes a run of CloudEvents (each one JSON object, no newline) and
//! accepts them in order; a failure says how many it had accepted first, and whether trying
//! again can help ([`SinkError::is_permanent`]). The delivery thread of each sink retries what
//! can be retried and sets aside as dead letters the alerts a sink refuses for good.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A local write failed (a full disk, a closed pipe): retried.
    #[error("{sink}: {source}")]
    Io {
        sink: String,
        #[source]
        source: io::Error,
    },
    /// An HTTP receiver did not accept: `status` 0 when no response came (connect error,
    /// timeout). Retried when no response came, on 408, 429 and 5xx; any other status is the
    /// receiver refusing these alerts for good.
    #[error("{sink}: HTTP {status}: {detail}")]
    Http {
        sink: String,
        status: u16,
        detail: String,
        /// The receiver's `Retry-After` (429, 503), in seconds form.
        retry_after: Option<Duration>,
    },
    /// The sink cannot send anything as configured (a bearer token that cannot be a header
    /// value): retried, so that the alerts wait for a fixed configuration rather than being
    /// set aside.
    #[error("{sink}: {detail}")]
    Config { sink: String, detail: String },
}

impl SinkError {
    /// A bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io { .. } => "io",
            SinkError::Config { .. } => "config",
            SinkError::Http { status: 0, .. } => "unreachable",
            SinkError::Http { status: 408, .. } => "timeout",
            SinkError::Http { status: 429, .. } => "throttled",
            SinkError::Http { status, .. } if *status >= 500 => "server_error",
            SinkError::Http { status, .. } if (400..500).contains(status) => "refused",
            SinkError::Http { .. } => "http_status",
        }
    }

    /// The receiver refused these alerts for good (a 4xx other than 408 and 429): sending
    /// them again cannot help, so they are set aside as dead letters and delivery goes on.
    pub fn is_permanent(&self) -> bool {
        self.kind() == "refused"
    }

    /// How long the receiver asked to be left alone, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status (0 for none).
    pub fn status(&self) -> u16 {
        match self {
            SinkError::Http { status, .. } => *status,
            _ => 0,
        }
    }
}

/// A run of alerts that a sink did not wholly accept.
#[derive(Debug, thiserror::Error)]
#[error("{error} (after accepting {accepted} of the run)")]
pub struct Failed {
    /// Alerts at the start of the run that the sink accepted before the failure.
    pub accepted: usize,
    #[source]
    pub error: SinkError,
}

impl From<SinkError> for Failed {
    fn from(error: SinkError) -> Failed {
        Failed { accepted: 0, error }
    }
}

/// A destination for alerts.
pub trait Sink: Send {
    /// A bounded label for logs and metrics (`file`, `stdout`, ...); also names the sink's
    /// delivery cursor in the store, so it must stay the same across restarts.
    fn name(&self) -> &'static str;
    /// Delivers the alerts of `alerts`, in order: `Ok` when all were accepted, else how many
    /// were (a prefix) and why the next was not.
    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), Failed>;
    /// Called by the sink's delivery thread between deliveries (at least every 200 ms), for
    /// sinks with periodic work (the Alertmanager sink re-posts open alerts). An error is
    /// logged and counted; the sink decides when to try again.
    fn tick(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Whether periodic work is under way (a re-post in chunks): the delivery thread then
    /// ticks again at once instead of waiting for new alerts.
    fn busy(&self) -> bool {
        false
    }
    /// The service is stopping: every call from now on must be over by `at` (an HTTP sink
    /// shortens its requests' timeout; a local one has nothing to do).
    fn stop_by(&mut self, _at: std::time::Instant) {}
    /// Reopens what the sink writes to (SIGHUP, after log rotation renamed the alert file).
    fn reopen(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// CloudEvents JSON lines appended to a file; each run is synced to disk before it counts as
/// accepted. The file is only ever cut to drop a torn last line: a run that was never
/// accepted (a crash or a full disk in the middle of its write), so it is written again.
///
/// Log rotation renames the file; [`Sink::reopen`] (on SIGHUP) opens the path again, so that
/// alerts go to the new file instead of the renamed one.
pub struct FileSink {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl FileSink {
    pub fn open(path: &Path) -> io::Result<FileSink> {
        Ok(FileSink {
            path: path.to_path_buf(),
            file: open_cut(path)?,
            buf: Vec::new(),
        })
    }

    fn error(&self, source: io::Error) -> SinkError {
        SinkError::Io {
            sink: self.path.display().to_string(),
            source,
        }
    }
}

/// Opens (creating) the alert file for appending, first cutting a torn last line.
fn open_cut(path: &Path) -> io::Result<File> {
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
    Ok(file)
}

impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), Failed> {
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
        result.map_err(|source| self.error(source).into())
    }

    fn reopen(&mut self) -> Result<(), SinkError> {
        // Everything accepted was synced: the old file is complete; a failure keeps it.
        self.file = open_cut(&self.path).map_err(|source| self.error(source))?;
        tracing::info!(file = %self.path.display(), "alert file reopened");
        Ok(())
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

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), Failed> {
        let mut out = io::stdout().lock();
        let result = alerts
            .iter()
            .try_for_each(|alert| out.write_all(alert).and_then(|()| out.write_all(b"\n")))
            .and_then(|()| out.flush());
        result.map_err(|source| {
            SinkError::Io {
                sink: "stdout".into(),
                source,
            }
            .into()
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

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), Failed> {
        use crate::compliance::wire::{AlertChange, CloudEvent};
        let mut out = io::stdout().lock();
        let result = alerts.iter().try_for_each(|alert| {
            let line = match CloudEvent::parse(alert) {
                Ok(event) => {
                    let kind = match event.change() {
                        Some(AlertChange::Opened) => "OPENED",
                        Some(AlertChange::Deleted) => "DELETED",
                        Some(AlertChange::Resolved) | None => "RESOLVED",
                    };
                    format!(
                        "{kind:<8} {:<8} {:<44} {:<40} {}",
                        event.data.severity, event.subject, event.data.rule_id, event.data.title
                    )
                }
                Err(_) => String::from_utf8_lossy(alert).into_owned(),
            };
            writeln!(out, "{line}")
        });
        result.and_then(|()| out.flush()).map_err(|source| {
            SinkError::Io {
                sink: "console".into(),
                source,
            }
            .into()
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

    /// Log rotation renames the file; after a reopen (SIGHUP) alerts go to a new file at the
    /// path, and the renamed one keeps what was written before.
    #[test]
    fn reopen_after_a_rename_writes_to_a_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("alerts.jsonl");
        let rotated = dir.path().join("alerts.jsonl.1");
        let mut sink = FileSink::open(&path).expect("open");
        sink.deliver(&[b"{\"id\":\"1\"}"]).expect("deliver");
        std::fs::rename(&path, &rotated).expect("rotate");
        sink.deliver(&[b"{\"id\":\"2\"}"]).expect("deliver");
        sink.reopen().expect("reopen");
        sink.deliver(&[b"{\"id\":\"3\"}"]).expect("deliver");
        assert_eq!(
            std::fs::read(&rotated).expect("read"),
            b"{\"id\":\"1\"}\n{\"id\":\"2\"}\n"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"id\":\"3\"}\n");
    }

    #[test]
    fn errors_say_whether_a_retry_can_help() {
        let http = |status: u16| SinkError::Http {
            sink: "s".into(),
            status,
            detail: String::new(),
            retry_after: None,
        };
        for status in [0, 408, 429, 500, 502, 503] {
            assert!(!http(status).is_permanent(), "{status}");
        }
        for status in [400, 401, 403, 404, 413, 422] {
            assert!(http(status).is_permanent(), "{status}");
            assert_eq!(http(status).kind(), "refused");
        }
        let io = SinkError::Io {
            sink: "f".into(),
            source: io::Error::other("disk full"),
        };
        assert!(!io.is_permanent());
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
