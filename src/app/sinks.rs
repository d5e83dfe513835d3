//! Building the alert sinks a command line asks for.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::Failure;
use crate::alert::{AlertmanagerSink, FileSink, Sink, StdoutSink, WebhookSink};
use crate::cli::SinkArgs;
use crate::compliance::{cloud_event, AlertKind, Transition};
use crate::store::Store;

fn check_url(flag: &str, url: &str) -> Result<(), Failure> {
    if url.starts_with("http://") {
        Ok(())
    } else if url.starts_with("https://") {
        Err(Failure::usage(anyhow::anyhow!(
            "{flag}: https is not supported by this build (run a TLS-terminating proxy on loopback)"
        )))
    } else {
        Err(Failure::usage(anyhow::anyhow!(
            "{flag} must be an http:// URL"
        )))
    }
}

/// The sinks of `args`; the Alertmanager sink is seeded with the violations open in `store`,
/// so that a restart keeps them firing there.
pub fn build(args: &SinkArgs, store: &Arc<Store>) -> Result<Vec<Box<dyn Sink>>, Failure> {
    let timeout = Duration::from_secs(args.sink_timeout_secs);
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(path) = &args.alerts_file {
        let sink = FileSink::open(path)
            .with_context(|| format!("opening {}", path.display()))
            .map_err(Failure::runtime)?;
        sinks.push(Box::new(sink));
    }
    if args.alerts_stdout {
        sinks.push(Box::new(StdoutSink));
    }
    if let Some(url) = &args.webhook_url {
        check_url("--webhook-url", url)?;
        sinks.push(Box::new(WebhookSink::new(
            url.clone(),
            args.webhook_token.clone(),
            timeout,
        )));
    }
    if let Some(url) = &args.alertmanager_url {
        check_url("--alertmanager-url", url)?;
        let mut sink = AlertmanagerSink::new(
            url.trim_end_matches('/').to_owned(),
            Duration::from_secs(args.alertmanager_repost_secs),
            timeout,
        );
        sink.seed_open(&open_alerts(store).map_err(Failure::runtime)?);
        sinks.push(Box::new(sink));
    }
    Ok(sinks)
}

/// An `opened` CloudEvent for every stored violation (ids say they are a restart's re-send).
pub(super) fn open_alerts(store: &Store) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for item in store.violations()? {
        let (key, rule_id, value) = item?;
        let violation = crate::compliance::decode_violation(&rule_id, &value)
            .with_context(|| format!("corrupt violation {} {rule_id}", key.as_key()))?;
        let transition = Transition {
            kind: AlertKind::Opened,
            rule_id: violation.rule_id.clone(),
            severity: violation.severity,
            title: violation.title.clone(),
            reason: None,
            twin_version: None,
        };
        let id = format!("open:{}:{rule_id}", key.as_key());
        out.push(cloud_event(
            &id,
            key.as_key(),
            &transition,
            violation.since,
            violation.twin_version,
            None,
        ));
    }
    Ok(out)
}
