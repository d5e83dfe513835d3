//! `twinwatch seed`: a seed pass (`docs/semantics.md` §7) from files of twin documents or from the
//! hub's twin query API, then reconciling and evaluation, into a data directory.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::Failure;
use crate::cli::SeedArgs;
use crate::iothub::{ConnectionString, QueryClient, QueryEvent, QueryOptions};
use crate::pipeline::{Engine, PassEnd, SeedCounters, SeedPass};
use crate::source::documents::{spawn_document_reader, DocumentEvent, DocumentReader};
use crate::source::hub::{read_queries, ReadStop};
use crate::store::Store;
use crate::time::{Ticks, TICKS_PER_SECOND};

/// Where a pass reads its documents.
enum Input {
    Files {
        hub: String,
        files: Vec<PathBuf>,
    },
    /// The hub's twin query API.
    Hub {
        hub: String,
        client: Box<QueryClient>,
    },
}

impl Input {
    fn hub(&self) -> &str {
        match self {
            Input::Files { hub, .. } | Input::Hub { hub, .. } => hub,
        }
    }
}

/// What a pass did, for the summary.
struct PassReport {
    hub: String,
    as_of: Ticks,
    counters: SeedCounters,
    /// Why the pass is incomplete, if it is.
    incomplete: Option<String>,
    reconciled: bool,
    elapsed: Duration,
}

impl PassReport {
    fn summary_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let dead = super::output::dead_letters_by_reason(&c.dead_lettered);
        json!({
            "hub": self.hub,
            "asOf": self.as_of.to_string(),
            "complete": self.incomplete.is_none(),
            "incompleteReason": self.incomplete,
            "reconciled": self.reconciled,
            "documents": c.documents,
            "applied": c.applied,
            "stale": c.stale,
            "dead_lettered": dead,
            "removed": c.removed,
            "evaluated": c.evaluated,
            "alerts": {"opened": c.alerts_opened, "resolved": c.alerts_resolved},
        })
    }

    fn one_line(&self) -> String {
        let c = &self.counters;
        format!(
            "seed pass of {} as of {} {} in {:.2} s: {} documents, {} applied, {} stale, {} dead-lettered, {} removed; alerts {} opened, {} resolved{}",
            self.hub,
            self.as_of,
            if self.incomplete.is_none() { "complete" } else { "INCOMPLETE" },
            self.elapsed.as_secs_f64(),
            c.documents,
            c.applied,
            c.stale,
            c.n_dead_lettered(),
            c.removed,
            c.alerts_opened,
            c.alerts_resolved,
            match &self.incomplete {
                Some(reason) => format!(" (nothing removed: {reason})"),
                None => String::new(),
            }
        )
    }
}

fn input(args: &SeedArgs) -> Result<(Input, Ticks), Failure> {
    let usage = |message: &str| Failure::usage(anyhow::anyhow!("{message}"));
    if args.files.is_empty() {
        if args.hub.is_some() {
            return Err(usage(
                "--hub names the hub of files; from the hub, its name comes from the connection string",
            ));
        }
        // The service's `[seed]` table fills what the environment and the flags leave out.
        let configured = match &args.config {
            Some(path) => {
                crate::config::RawConfig::from_file(path)
                    .map_err(Failure::usage)?
                    .seed
            }
            None => crate::config::RawSeed::default(),
        };
        let text = args
            .iothub_connection_string
            .as_ref()
            .map(|s| s.expose().to_owned())
            .or(configured.connection_string)
            .filter(|text| !text.trim().is_empty())
            .ok_or_else(|| {
                usage("give twin-document files (with --hub and --as-of), or the hub's connection string in TWINWATCH_IOTHUB_CONNECTION_STRING or the [seed] table of --config")
            })?;
        let connection = ConnectionString::parse(&text).map_err(Failure::usage)?;
        let options = QueryOptions {
            endpoint: args.iothub_endpoint.clone().or(configured.endpoint),
            page_size: args.page_size,
            ca_file: args.iothub_ca_file.clone().or(configured.ca_file),
            ..QueryOptions::default()
        };
        let client = QueryClient::new(&connection, options).map_err(Failure::usage)?;
        let as_of = match &args.as_of {
            Some(text) => parse_as_of(text)?,
            None => Ticks::now(),
        };
        return Ok((
            Input::Hub {
                hub: connection.hub_name().to_owned(),
                client: Box::new(client),
            },
            as_of,
        ));
    }
    if args.iothub_endpoint.is_some() || args.config.is_some() {
        return Err(usage(
            "--iothub-endpoint and --config read the hub: they do not go with files",
        ));
    }
    let hub = args
        .hub
        .clone()
        .filter(|hub| !hub.is_empty())
        .ok_or_else(|| {
            usage("--hub NAME is required with files: documents do not name their hub")
        })?;
    let as_of = args.as_of.as_deref().ok_or_else(|| {
        usage("--as-of TIME is required with files: when were the documents read?")
    })?;
    let as_of = parse_as_of(as_of)?;
    Ok((
        Input::Files {
            hub,
            files: args.files.clone(),
        },
        as_of,
    ))
}

fn parse_as_of(text: &str) -> Result<Ticks, Failure> {
    Ticks::parse_strict(text).ok_or_else(|| {
        Failure::usage(anyhow::anyhow!(
            "--as-of {text:?} is not a time like 2026-12-01T00:00:00Z"
        ))
    })
}

pub fn run(args: SeedArgs) -> Result<ExitCode, Failure> {
    let (input, as_of) = input(&args)?;
    let policy = Arc::new(super::load_policy(&args.policies)?);
    // The flags are checked before anything is created.
    let alerts = super::sinks::alerts_of_flags(&args.sinks)?;
    let store = super::sinks::open_store(&args.data_dir)?;
    let sinks = super::sinks::build_sinks(&alerts, &store)?;
    let delivery = super::sinks::start_delivery(&store, sinks, None)?;
    let queue_alerts = delivery.is_some();
    let mut options = args.tuning.engine_options(policy, queue_alerts);
    options.continue_seed = Some((input.hub().to_owned(), as_of));
    let grace_seconds = i64::try_from(args.grace).unwrap_or(i64::MAX);
    let reconcile_grace =
        (!args.no_reconcile).then(|| Ticks(grace_seconds.saturating_mul(TICKS_PER_SECOND)));
    let report = seed(store, options, input, as_of, reconcile_grace).map_err(Failure::runtime)?;
    if let Some(delivery) = delivery {
        super::replay::drain(delivery)?;
    }
    println!("{}", report.one_line());
    if let Some(path) = &args.summary {
        super::replay::write_summary(path, &report.summary_json())?;
    }
    Ok(match report.incomplete {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(super::EXIT_FAILURE),
    })
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} {spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show(bar: &ProgressBar, pass: &SeedPass, what: &str) {
    let c = pass.counters();
    bar.set_message(format!(
        "{what}: {} documents ({} applied, {} stale, {} dead-lettered)",
        c.documents,
        c.applied,
        c.stale,
        c.n_dead_lettered()
    ));
}

/// Runs one pass into `store`.
fn seed(
    store: Arc<Store>,
    options: crate::pipeline::EngineOptions,
    input: Input,
    as_of: Ticks,
    reconcile_grace: Option<Ticks>,
) -> anyhow::Result<PassReport> {
    let started = Instant::now();
    let mut engine = Engine::new(store, options)?;
    let bar = progress_bar();
    let (hub, pass, incomplete) = match input {
        Input::Files { hub, files } => {
            let mut pass = engine.begin_seed(&hub, as_of)?;
            let incomplete = read_files(&mut engine, &mut pass, &files, &bar)?;
            (hub, pass, incomplete)
        }
        Input::Hub { hub, client } => {
            let mut pass = engine.begin_seed(&hub, as_of)?;
            let incomplete = read_hub(&mut engine, &mut pass, &client, &bar)?;
            (hub, pass, incomplete)
        }
    };
    if let Some(reason) = &incomplete {
        tracing::error!(hub = %hub, reason = %reason, "the seed pass is incomplete: nothing is removed");
    }
    bar.set_message("evaluating the twins the pass changed");
    let counters = engine.end_seed(
        pass,
        PassEnd {
            complete: incomplete.is_none(),
            reconcile_grace,
        },
    )?;
    engine.finish()?;
    bar.finish_and_clear();
    Ok(PassReport {
        hub,
        as_of,
        counters,
        reconciled: incomplete.is_none() && reconcile_grace.is_some(),
        incomplete,
        elapsed: started.elapsed(),
    })
}

/// Why a page could not be applied.
#[derive(Debug, thiserror::Error)]
enum PageError {
    #[error("the page is not a JSON array of documents: {0}")]
    Documents(#[from] crate::source::documents::DocumentsError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
}

/// Reads both twin queries, page by page, into the pass; returns why the pass is incomplete,
/// if it is. A wrong key, a page that fails beyond its retries or a malformed page makes it
/// incomplete; a failure of the snapshot itself is an error.
fn read_hub(
    engine: &mut Engine,
    pass: &mut SeedPass,
    client: &QueryClient,
    bar: &ProgressBar,
) -> anyhow::Result<Option<String>> {
    let mut throttled = 0u64;
    let mut on_page = |page: &[u8]| -> Result<(), PageError> {
        let mut reader = DocumentReader::new(page);
        while let Some(document) = reader.next_document()? {
            engine.ingest_document(pass, document)?;
        }
        Ok(())
    };
    let mut on_event = |query: &'static str, event: &QueryEvent| match event {
        QueryEvent::PageRead { page, .. } => {
            bar.set_message(format!("{query}: page {}", page + 1));
        }
        QueryEvent::Throttled { wait, .. } => {
            throttled += 1;
            bar.set_message(format!(
                "{query}: throttled by the hub, waiting {:.1} s ({throttled} waits so far)",
                wait.as_secs_f64()
            ));
        }
        QueryEvent::Retrying { .. } => {}
    };
    match read_queries(client, &mut on_page, &mut on_event) {
        Ok(()) => Ok(None),
        Err(ReadStop::Page {
            error: PageError::Pipeline(e),
            ..
        }) => Err(e.into()),
        Err(ReadStop::Page { query, error }) => Ok(Some(format!("{query}: {error}"))),
        Err(ReadStop::Hub { query, error }) => Ok(Some(format!("{query}: {error}"))),
    }
}

/// Reads every file's documents into the pass; returns why the pass is incomplete, if it is.
/// A reader thread reads, splits and parses the files ([`spawn_document_reader`]) while this
/// thread applies: the documents come in the files' order, each once, and a file that cannot
/// be read whole ends the pass after the documents before the fault.
fn read_files(
    engine: &mut Engine,
    pass: &mut SeedPass,
    files: &[PathBuf],
    bar: &ProgressBar,
) -> anyhow::Result<Option<String>> {
    let feed = spawn_document_reader(files.to_vec())?;
    loop {
        let block = match feed.next() {
            Some(DocumentEvent::Block(block)) => block,
            Some(DocumentEvent::End) => return Ok(None),
            Some(DocumentEvent::Failed { file, error }) => {
                let path = files.get(file).map(|p| p.display().to_string());
                return Ok(Some(format!("{}: {error}", path.unwrap_or_default())));
            }
            None => return Ok(Some("the document reader stopped unexpectedly".to_owned())),
        };
        for i in 0..block.len() {
            let (raw, nodes, well_formed) = block.document(i);
            engine.ingest_parsed_document(pass, nodes, well_formed, raw)?;
            if pass.counters().documents.is_multiple_of(4096) {
                if let Some(path) = files.get(block.file) {
                    show(bar, pass, &path.display().to_string());
                }
            }
        }
        feed.recycle(block);
    }
}
