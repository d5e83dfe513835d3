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

/// CloudEvents JSON lines appended to a file (never truncated); each run is synced to disk
/// before it counts as accepted.
pub struct FileSink {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl FileSink {
    pub fn open(path: &Path) -> io::Result<FileSink> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
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
        let result = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        result.map_err(|source| SinkError::Io {
            sink: self.path.display().to_string(),
            source,
        })
    }
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
