//! The suite's figures and its scale.
//!
//! Each campaign ends by calling [`record`] with what it did (kills survived, faults
//! injected, inputs tried) and what it found (events lost, applied twice, alerts missing:
//! the assertions before it make these 0). With `TWINWATCH_RELIABILITY_REPORT=FILE` each call
//! appends one line to FILE, `campaign<TAB>key=value key=value ...`, which
//! `scripts/reliability` turns into RELIABILITY.md's table.

use std::io::Write as _;

/// How much each campaign does: `full` (the default, RELIABILITY.md's figures) or `ci` (the
/// bounded form `.ci/run` runs), from `TWINWATCH_RELIABILITY_SCALE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Full,
    Ci,
}

pub fn scale() -> Scale {
    match std::env::var("TWINWATCH_RELIABILITY_SCALE").as_deref() {
        Ok("ci") => Scale::Ci,
        Ok("full") | Err(_) => Scale::Full,
        Ok(other) => panic!("TWINWATCH_RELIABILITY_SCALE must be full or ci, not {other:?}"),
    }
}

impl Scale {
    /// `full` at full scale, `ci` in the bounded form.
    pub fn pick<T>(self, full: T, ci: T) -> T {
        match self {
            Scale::Full => full,
            Scale::Ci => ci,
        }
    }
}

/// The seed of a campaign: `TWINWATCH_RELIABILITY_SEED` when set (to reproduce a run), else
/// `default`. Every campaign prints the seed it used.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("TWINWATCH_RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed {seed} (TWINWATCH_RELIABILITY_SEED={seed} reproduces this run)");
    seed
}

/// Records a campaign's figures: printed, and appended to the report file when one is set.
pub fn record(campaign: &str, figures: &[(&str, u64)]) {
    let line = figures
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("{campaign}: {line}");
    if let Some(file) = std::env::var_os("TWINWATCH_RELIABILITY_REPORT") {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .expect("open the reliability report");
        writeln!(out, "{campaign}\t{line}").expect("write the reliability report");
    }
}
