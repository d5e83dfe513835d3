//! `twinwatch replay`: captured files through the pipeline into a data directory.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::Failure;
use crate::cli::{ReplayArgs, TuningArgs};
use crate::pipeline::replay::{replay_observed, ReplayProgress, ReplayReport};
use crate::pipeline::EngineOptions;
use crate::source::replay::expand_paths;

impl TuningArgs {
    /// The engine's options from the flags (which clap has checked against the bounds the
    /// configuration file's `[batching]` shares, `crate::config::MAX_*`); their defaults are
    /// `EngineOptions::default()`'s.
    pub fn engine_options(
        &self,
        policy: Arc<crate::policy::Policy>,
        queue_alerts: bool,
    ) -> EngineOptions {
        EngineOptions {
            batch_messages: self.batch_size as usize,
            batch_interval: Duration::from_millis(self.batch_interval_ms),
            max_body_bytes: self.max_body_bytes as usize,
            cache_bytes: (self.cache_mib as usize) << 20,
            policy,
            queue_alerts,
            metrics: None,
            min_free_bytes: None,
            continue_seed: None,
        }
    }
}

/// How long a finished replay waits for its sinks to accept the last alerts; what they have
/// not accepted by then stays in the outbox for the next run.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

impl ReplayReport {
    fn summary_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let dead = super::output::dead_letters_by_reason(&c.dead_lettered);
        json!({
            "messages": c.messages,
            "applied": c.applied,
            "stale": c.stale,
            "ignored": c.ignored,
            "dead_lettered": dead,
            "alerts": {"opened": c.alerts_opened, "resolved": c.alerts_resolved},
            "files": self.n_files,
            "failed_files": self.failed.iter()
                .map(|(path, error)| json!({"path": path.display().to_string(), "error": error}))
                .collect::<Vec<_>>(),
        })
    }

    fn one_line(&self) -> String {
        let c = &self.counters;
        let seconds = self.elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            c.messages as f64 / seconds
        } else {
            0.0
        };
        format!(
            "replayed {} messages from {} files in {seconds:.2} s ({rate:.0}/s): {} applied, {} stale, {} ignored, {} dead-lettered; alerts {} opened, {} resolved{}",
            c.messages,
            self.n_files,
            c.applied,
            c.stale,
            c.ignored,
            c.n_dead_lettered(),
            c.alerts_opened,
            c.alerts_resolved,
            if self.failed.is_empty() {
                String::new()
            } else {
                format!("; {} files unreadable", self.failed.len())
            }
        )
    }
}

/// Gives the sinks up to [`DRAIN_DEADLINE`] to accept the last alerts and stops delivery;
/// what they have not accepted stays in the outbox for the next run.
pub(super) fn drain(delivery: crate::alert::Delivery) -> Result<(), Failure> {
    let delivered = delivery
        .drain_and_stop(DRAIN_DEADLINE)
        .map_err(Failure::runtime)?;
    if delivered.left_in_outbox > 0 {
        tracing::warn!(
            left = delivered.left_in_outbox,
            "some alerts were not accepted by every sink; they stay queued for the next run"
        );
    }
    if delivered.dead_lettered > 0 {
        tracing::warn!(
            dead_lettered = delivered.dead_lettered,
            "some alerts were refused for good by a sink: see `twinwatch deadletters --alerts`"
        );
    }
    Ok(())
}

/// Writes a run's summary as pretty JSON.
pub(super) fn write_summary(
    path: &std::path::Path,
    summary: &serde_json::Value,
) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(summary).map_err(Failure::runtime)?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("writing {}", path.display()))
        .map_err(Failure::runtime)
}

pub fn run(args: ReplayArgs) -> Result<ExitCode, Failure> {
    let policy = Arc::new(super::load_policy(&args.policies)?);
    // The flags are checked before anything is created.
    let alerts = super::sinks::alerts_of_flags(&args.sinks)?;
    let files = expand_paths(&args.paths).map_err(Failure::usage)?;
    let store = super::sinks::open_store(&args.data_dir)?;
    let sinks = super::sinks::build_sinks(&alerts, &store)?;
    let delivery = super::sinks::start_delivery(&store, sinks, None)?;
    let queue_alerts = delivery.is_some();
    let options = args.tuning.engine_options(policy, queue_alerts);
    let bar = ProgressBar::hidden();
    let terminal = std::io::stderr().is_terminal();
    let report = replay_observed(store, &files, options, &mut |progress| match progress {
        ReplayProgress::Start { bytes } if terminal => {
            bar.set_length(bytes);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        ReplayProgress::Start { .. } => {}
        ReplayProgress::Read { bytes, rate, .. } => {
            bar.inc(bytes);
            bar.set_message(format!("{rate:.0} msg/s"));
        }
        ReplayProgress::Done => bar.finish_and_clear(),
    })
    .map_err(Failure::runtime)?;
    if let Some(delivery) = delivery {
        drain(delivery)?;
    }
    for (path, error) in &report.failed {
        tracing::error!(path = %path.display(), error = %error, "file not replayed");
    }
    println!("{}", report.one_line());
    if let Some(path) = &args.summary {
        write_summary(path, &report.summary_json())?;
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}
