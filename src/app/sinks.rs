//! Building the alert sinks a configuration (or a command line) asks for, and listing the
//! alert dead letters.

use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use super::Failure;
use crate::alert::{
    spawn_delivery, AlertmanagerSink, Delivery, FileSink, HttpOptions, Sink, StdoutSink,
    WebhookMode, WebhookOptions, WebhookSink,
};
use crate::cli::SinkArgs;
use crate::compliance::{cloud_event, AlertKind, Transition};
use crate::config::AlertsConfig;
use crate::store::{Store, StoreOptions};
use crate::telemetry::DeliveryMetrics;

/// Creates the data directory when it is missing and opens its store for writing.
pub fn open_store(dir: &Path) -> Result<Arc<Store>, Failure> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating {}", dir.display()))
        .map_err(Failure::runtime)?;
    let store = Store::open(dir, &StoreOptions::default())
        .with_context(|| format!("opening {}", dir.display()))
        .map_err(Failure::runtime)?;
    Ok(Arc::new(store))
}

/// Starts delivering the outbox to `sinks` (`None` when there is none: alerts are then not
/// queued at all). It starts before anything is applied: alerts an interrupted run left in
/// the outbox go out at once.
pub fn start_delivery(
    store: &Arc<Store>,
    sinks: Vec<Box<dyn Sink>>,
    observed: Option<DeliveryMetrics>,
) -> Result<Option<Delivery>, Failure> {
    if sinks.is_empty() {
        return Ok(None);
    }
    spawn_delivery(store.clone(), sinks, observed)
        .map(Some)
        .map_err(Failure::runtime)
}

/// The sink settings of a command's flags (`replay`, `seed`), validated by the code that
/// validates the configuration file's `[alerts]` ([`SinkArgs::alerts_config`]); a problem is
/// a usage error naming the flag. [`build_sinks`] builds them.
pub fn alerts_of_flags(args: &SinkArgs) -> Result<AlertsConfig, Failure> {
    args.alerts_config()
        .map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))
}

/// The sinks of validated settings, wherever they were written (the service's `[alerts]`, a
/// command's flags): the one place a sink is built. The Alertmanager sink is seeded with the
/// violations open in `store`, so that a restart keeps them firing there.
pub fn build_sinks(
    alerts: &AlertsConfig,
    store: &Arc<Store>,
) -> Result<Vec<Box<dyn Sink>>, Failure> {
    let mut out: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(path) = &alerts.file {
        out.push(Box::new(
            FileSink::open(path)
                .with_context(|| format!("opening {}", path.display()))
                .map_err(Failure::runtime)?,
        ));
    }
    if alerts.stdout {
        out.push(Box::new(StdoutSink));
    }
    let http = HttpOptions {
        timeout: alerts.sink_timeout,
        ca_file: alerts.ca_file.clone(),
        connections: 1,
    };
    if alerts.webhook_url.is_some() || alerts.alertmanager_url.is_some() {
        // An unreadable CA file is a usage error now, not a failure at every delivery.
        crate::alert::poster::tls_config(alerts.ca_file.as_deref())
            .map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?;
    }
    if let Some(url) = &alerts.webhook_url {
        let token = alerts.webhook_token.as_ref().map(|t| t.expose().to_owned());
        let mut options = WebhookOptions::new(url.clone(), token, http.clone());
        options.mode = if alerts.webhook_structured {
            WebhookMode::Structured
        } else {
            WebhookMode::Batched
        };
        options.max_batch_alerts = alerts.webhook_batch_max_alerts;
        options.max_batch_bytes = alerts.webhook_batch_max_bytes;
        options.in_flight = alerts.webhook_in_flight;
        out.push(Box::new(WebhookSink::new(options)));
    }
    if let Some(url) = &alerts.alertmanager_url {
        let mut sink = AlertmanagerSink::new(url.clone(), alerts.alertmanager_repost, http);
        sink.seed_open(&open_alerts(store).map_err(Failure::runtime)?);
        out.push(Box::new(sink));
    }
    Ok(out)
}

/// An `opened` CloudEvent for every stored violation (ids say they are a restart's re-send).
pub(super) fn open_alerts(store: &Store) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for item in store.violations()? {
        let crate::store::StoredViolation { key, violation } = item?;
        let transition = Transition {
            kind: AlertKind::Opened,
            rule_id: violation.rule_id.clone(),
            severity: violation.severity,
            title: violation.title.clone(),
            reason: None,
            twin_version: None,
        };
        let id = format!("open:{}:{}", key.as_key(), violation.rule_id);
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

/// `twinwatch deadletters --alerts`: every alert a sink refused for good, one JSON object a
/// line (`sink`, `seq`, `alertId`, `status`, `kind`, `message`, `deadLetteredAtMs`, `alert`),
/// in outbox order.
pub fn alert_dead_letters(data_dir: &Path) -> Result<ExitCode, Failure> {
    let store = super::output::open(data_dir)?;
    let mut out = BufWriter::new(io::stdout().lock());
    let letters = store.alert_dead_letters().map_err(Failure::runtime)?;
    let result = (|| -> io::Result<()> {
        for record in letters {
            let record = record.map_err(io::Error::other)?;
            out.write_all(&record)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    })();
    super::output::finish_output(result)
}
