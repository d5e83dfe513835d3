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
}

impl SinkError {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io { .. } => "io",
        }
    }
}

/// A destination for alerts.
pub trait Sink: Send {
    /// A bounded label for logs and metrics (`file`, `stdout`, ...).
    fn name(&self) -> &'static str;
    /// Delivers every alert of `alerts`, in order; `Ok` only when all were accepted.
    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), SinkError>;
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
