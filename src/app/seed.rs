//! `twinwatch seed`: a seed pass (`docs/semantics.md` §7) from files of twin documents or from the
//! hub's twin query API, then reconciling and evaluation, into a data directory.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::Failure;
use crate::alert::spawn_delivery;
use crate::cli::SeedArgs;
use crate::iothub::{ConnectionString, QueryClient, QueryError, QueryEvent, QueryOptions};
use crate::pipeline::{Engine, PassEnd, SeedCounters, SeedPass};
use crate::source::documents::DocumentReader;
use crate::store::{Store, StoreOptions};
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

/// The twin queries of a pass, in order: device twins, then module twins.
const QUERIES: [&str; 2] = ["SELECT * FROM devices", "SELECT * FROM devices.modules"];

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
        let dead: serde_json::Map<String, serde_json::Value> = c
            .dead_lettered
            .iter()
            .map(|(reason, n)| (reason.as_str().to_owned(), json!(n)))
            .collect();
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
        let text = args.iothub_connection_string.as_ref().map(|s| s.expose()).ok_or_else(|| {
            usage("give twin-document files (with --hub and --as-of), or the hub's connection string in TWINWATCH_IOTHUB_CONNECTION_STRING")
        })?;
        let connection = ConnectionString::parse(text).map_err(Failure::usage)?;
        let options = QueryOptions {
            endpoint: args.iothub_endpoint.clone(),
            page_size: args.page_size,
            ca_file: args.iothub_ca_file.clone(),
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
    if args.iothub_endpoint.is_some() {
        return Err(usage(
            "--iothub-endpoint reads the hub: it does not go with files",
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
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))
        .map_err(Failure::runtime)?;
    let store = Store::open(&args.data_dir, &StoreOptions::default())
        .with_context(|| format!("opening {}", args.data_dir.display()))
        .map_err(Failure::runtime)?;
    let store = Arc::new(store);
    let sinks = super::sinks::build(&args.sinks, &store)?;
    let queue_alerts = !sinks.is_empty();
    let delivery = if queue_alerts {
        Some(spawn_delivery(store.clone(), sinks, None).map_err(Failure::runtime)?)
    } else {
        None
    };
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
    for query in QUERIES {
        let mut on_page = |page: &[u8]| -> Result<(), PageError> {
            let mut reader = DocumentReader::new(page);
            while let Some(document) = reader.next_document()? {
                engine.ingest_document(pass, document)?;
            }
            Ok(())
        };
        let mut on_event = |event: QueryEvent| match event {
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
            QueryEvent::Retrying { cause, wait, .. } => {
                tracing::warn!(cause = %cause, wait_ms = wait.as_millis() as u64, "retrying a page of the twin query");
            }
        };
        match client.run_query(query, &mut on_page, &mut on_event) {
            Ok(stats) => tracing::info!(
                query,
                pages = stats.pages,
                throttled = stats.throttled,
                retries = stats.retries,
                "twin query read"
            ),
            Err(QueryError::Page(PageError::Pipeline(e))) => return Err(e.into()),
            Err(QueryError::Page(e)) => return Ok(Some(format!("{query}: {e}"))),
            Err(QueryError::Hub(e)) => return Ok(Some(format!("{query}: {e}"))),
        }
    }
    Ok(None)
}

/// Reads every file's documents into the pass; returns why the pass is incomplete, if it is.
fn read_files(
    engine: &mut Engine,
    pass: &mut SeedPass,
    files: &[PathBuf],
    bar: &ProgressBar,
) -> anyhow::Result<Option<String>> {
    for path in files {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) => return Ok(Some(format!("{}: {e}", path.display()))),
        };
        let mut reader = DocumentReader::new(file);
        loop {
            match reader.next_document() {
                Ok(Some(document)) => engine.ingest_document(pass, document)?,
                Ok(None) => break,
                Err(e) => return Ok(Some(format!("{}: {e}", path.display()))),
            }
            if pass.counters().documents.is_multiple_of(4096) {
                show(bar, pass, &path.display().to_string());
            }
        }
    }
    Ok(None)
}

// The service's seed passes (`twinwatch run` with a `[seed]` section). A seed thread runs the
// blocking twin query and hands each page, as received, to the apply thread, which applies
// it between two chunks of events with the same engine and batches: ingestion never waits
// for the hub, only for one page's documents. The apply thread owns the pass (begin, pages,
// end); the seed thread owns the schedule.

/// Pages buffered between the seed thread and the apply thread.
pub(super) const SEED_PAGES: usize = 2;
/// The first wait before a pass that did not complete is tried again (doubled each time).
const RETRY_FIRST: Duration = Duration::from_secs(60);
/// The longest wait before a pass that did not complete is tried again.
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// How often a wait looks at the stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// What the seed thread hands the apply thread, in order.
pub(super) enum SeedInput {
    /// A pass of the hub begins, as of this time.
    Begin { as_of: Ticks },
    /// One page of the twin query: a JSON array of documents, exactly as received.
    Page(Vec<u8>),
    /// The reading ended: `problem` is why it did not read every page of both queries
    /// (`None`: it did). The apply thread ends the pass and answers on `done`.
    End {
        problem: Option<ReadProblem>,
        done: std::sync::mpsc::SyncSender<PassOutcome>,
    },
}

/// Why a pass did not read every page.
pub(super) struct ReadProblem {
    reason: String,
    /// An error that needs a fix (credentials, TLS, a bad answer) rather than time.
    failed: bool,
}

/// How a pass ended (`twinwatch_seed_passes_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PassOutcome {
    /// Every page read: reconciled (when asked) and recorded as seeded.
    Complete,
    /// Interrupted (the service stopped), or the hub stayed busy or unreachable beyond the
    /// retries: what was read is applied, nothing is removed.
    Incomplete,
    /// The hub refused the credentials or could not be used: nothing more is read until it
    /// is fixed (tried again later all the same).
    Failed,
}

impl PassOutcome {
    fn as_str(self) -> &'static str {
        match self {
            PassOutcome::Complete => "complete",
            PassOutcome::Incomplete => "incomplete",
            PassOutcome::Failed => "failed",
        }
    }
}

/// What the apply thread found at start: whether a pass runs at once, and as of when.
pub(super) struct SeedPlan {
    /// Run a pass at once: a pass left open by the last run goes on, or the snapshot holds
    /// no twin of the hub (`on_empty`).
    start_now: bool,
    /// The as-of time of that first pass when it is fixed (the open pass's, or `[seed]
    /// as_of`); else the moment it begins.
    as_of: Option<Ticks>,
    /// The as-of time of the hub's last complete pass, for the reconcile schedule.
    seeded_as_of: Option<Ticks>,
}

/// The service's seed passes as `/readyz` reports them.
#[derive(Default)]
pub struct SeedStatus {
    state: std::sync::Mutex<SeedState>,
}

#[derive(Default)]
struct SeedState {
    hub: String,
    /// The pass under way: its as-of time and documents read so far.
    running: Option<(Ticks, u64)>,
    /// Its touched twins left to evaluate, once its documents are all in.
    to_evaluate: Option<usize>,
    throttled: u64,
    /// The last pass that ended: outcome, as-of time, documents, removed, why not complete.
    last: Option<(PassOutcome, Ticks, u64, u64, Option<String>)>,
    last_complete: Option<Ticks>,
}

impl SeedStatus {
    pub(super) fn new(hub: &str) -> SeedStatus {
        SeedStatus {
            state: std::sync::Mutex::new(SeedState {
                hub: hub.to_owned(),
                ..SeedState::default()
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut SeedState)) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state);
    }

    /// `/readyz`'s `seed` details: the pass under way, the last one, the last complete one.
    /// (Readiness never waits for a pass: the snapshot is usable while it runs.)
    pub fn details(&self) -> serde_json::Value {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let running = state.running.map(|(as_of, documents)| {
            json!({
                "asOf": as_of.to_string(),
                "documents": documents,
                "throttled": state.throttled,
                "toEvaluate": state.to_evaluate,
            })
        });
        let last = state
            .last
            .as_ref()
            .map(|(outcome, as_of, documents, removed, reason)| {
                json!({
                    "outcome": outcome.as_str(),
                    "asOf": as_of.to_string(),
                    "documents": documents,
                    "removed": removed,
                    "reason": reason,
                })
            });
        json!({
            "hub": state.hub,
            "running": running,
            "last": last,
            "lastComplete": state.last_complete.map(|t| t.to_string()),
        })
    }
}

/// The seed thread's side: the query client and the schedule.
pub(super) struct SeedThread {
    pub config: crate::config::SeedConfig,
    pub plan: std::sync::mpsc::Receiver<SeedPlan>,
    pub to_apply: tokio::sync::mpsc::Sender<SeedInput>,
    pub status: Arc<SeedStatus>,
    pub metrics: crate::telemetry::SeedMetrics,
    /// Set when the service stops: waits end and the client sends no more requests.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

/// The apply thread's stop or failure: nothing takes pages any more.
struct Gone;

impl SeedThread {
    /// Runs passes as planned until the service stops. Blocking: a thread of its own.
    pub(super) fn run(self) {
        use std::sync::atomic::Ordering;
        let Ok(plan) = self.plan.recv() else {
            return;
        };
        let config = &self.config;
        let options = QueryOptions {
            endpoint: config.endpoint.clone(),
            page_size: config.page_size,
            ca_file: config.ca_file.clone(),
            cancel: Some(self.stop.clone()),
            ..QueryOptions::default()
        };
        let client = match QueryClient::new(&config.connection, options) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(hub = %config.hub(), error = %e, "seed passes cannot run: the twin query client cannot be made");
                self.metrics.passes.with_label_values(&["failed"]).inc();
                self.status.update(|s| {
                    s.last = Some((PassOutcome::Failed, Ticks::now(), 0, 0, Some(e.to_string())))
                });
                return;
            }
        };
        let interval = config.reconcile_every;
        let mut due = if plan.start_now {
            Some(Instant::now())
        } else {
            // The next reconcile: the interval after the last complete pass (at once if that
            // is past), or after this start.
            interval.map(|every| {
                let since = plan
                    .seeded_as_of
                    .map(|t| Ticks::now().0.saturating_sub(t.0).max(0) as u64 / 10)
                    .map(Duration::from_micros);
                Instant::now() + every.saturating_sub(since.unwrap_or_default())
            })
        };
        let mut fixed_as_of = if plan.start_now { plan.as_of } else { None };
        let mut retry = RETRY_FIRST;
        if let Some(t) = plan.seeded_as_of {
            // The schedule, the gauge and /readyz carry on from the last run's complete pass.
            self.status.update(|s| s.last_complete = Some(t));
            self.metrics
                .last_complete
                .set(t.unix_millis() as f64 / 1000.0);
        }
        while let Some(at) = due {
            while Instant::now() < at {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(STOP_POLL.min(at.saturating_duration_since(Instant::now())));
            }
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let as_of = fixed_as_of.take().unwrap_or_else(Ticks::now);
            let began = Instant::now();
            let Ok(outcome) = self.one_pass(&client, as_of) else {
                return;
            };
            due = if outcome == PassOutcome::Complete {
                retry = RETRY_FIRST;
                interval.map(|every| began + every)
            } else {
                let wait = interval.map_or(retry, |every| retry.min(every));
                retry = (retry * 2).min(RETRY_MAX);
                tracing::info!(hub = %config.hub(), retry_in_secs = wait.as_secs(), "the seed pass will be tried again");
                Some(Instant::now() + wait)
            };
        }
        // Nothing more is scheduled (reconciling is off): the thread ends.
    }

    /// One pass: both queries, page by page, to the apply thread; then its outcome.
    fn one_pass(&self, client: &QueryClient, as_of: Ticks) -> Result<PassOutcome, Gone> {
        let send = |input: SeedInput| self.to_apply.blocking_send(input).map_err(|_| Gone);
        self.status.update(|s| s.throttled = 0);
        send(SeedInput::Begin { as_of })?;
        let problem = self.read(client, &send)?;
        let (done, outcome) = std::sync::mpsc::sync_channel(1);
        send(SeedInput::End { problem, done })?;
        outcome.recv().map_err(|_| Gone)
    }

    fn read(
        &self,
        client: &QueryClient,
        send: &dyn Fn(SeedInput) -> Result<(), Gone>,
    ) -> Result<Option<ReadProblem>, Gone> {
        for query in QUERIES {
            let mut on_page = |page: &[u8]| send(SeedInput::Page(page.to_vec()));
            let mut on_event = |event: QueryEvent| match event {
                QueryEvent::PageRead { .. } => {}
                QueryEvent::Throttled { wait, .. } => {
                    self.metrics.throttled.inc();
                    self.metrics.throttled_seconds.inc_by(wait.as_secs_f64());
                    self.status.update(|s| s.throttled += 1);
                }
                QueryEvent::Retrying { cause, wait, .. } => {
                    tracing::warn!(cause = %cause, wait_ms = wait.as_millis() as u64, "retrying a page of the twin query");
                }
            };
            match client.run_query(query, &mut on_page, &mut on_event) {
                Ok(stats) => tracing::info!(
                    query,
                    pages = stats.pages,
                    throttled = stats.throttled,
                    retries = stats.retries,
                    "twin query read"
                ),
                Err(QueryError::Page(Gone)) => return Err(Gone),
                Err(QueryError::Hub(crate::iothub::IotHubError::Cancelled { .. })) => {
                    return Err(Gone)
                }
                Err(QueryError::Hub(e)) => {
                    return Ok(Some(ReadProblem {
                        reason: format!("{query}: {e}"),
                        failed: !e.is_retryable(),
                    }))
                }
            }
        }
        Ok(None)
    }
}

/// The apply thread's side of the service's seed passes: the pass under way.
pub(super) struct ServiceSeed {
    config: crate::config::SeedConfig,
    status: Arc<SeedStatus>,
    metrics: crate::telemetry::SeedMetrics,
    pass: Option<OpenPass>,
    /// The pass whose documents are all in, its touched twins being evaluated.
    ending: Option<Ending>,
}

struct Ending {
    open: OpenPass,
    outcome: PassOutcome,
    reason: Option<String>,
    done: std::sync::mpsc::SyncSender<PassOutcome>,
}

struct OpenPass {
    pass: SeedPass,
    /// A page that was not a JSON array of documents: the pass cannot be complete.
    bad_page: Option<String>,
    /// Documents by outcome already added to the metrics: applied, stale, dead-lettered.
    exported: [u64; 3],
}

impl ServiceSeed {
    pub(super) fn new(
        config: crate::config::SeedConfig,
        status: Arc<SeedStatus>,
        metrics: crate::telemetry::SeedMetrics,
    ) -> ServiceSeed {
        ServiceSeed {
            config,
            status,
            metrics,
            pass: None,
            ending: None,
        }
    }

    /// Before the engine is opened: a pass the data directory holds open for this hub goes
    /// on (same hub and as-of time, so the same alert ids), rather than being evaluated as
    /// an incomplete one. Returns the engine option that says so.
    pub(super) fn continuing(
        &self,
        store: &crate::store::Store,
    ) -> Result<Option<(String, Ticks)>, crate::pipeline::PipelineError> {
        Ok(SeedPass::stored(store)?.filter(|(hub, _)| hub == self.config.hub()))
    }

    /// What the seed thread runs first, from the opened engine.
    pub(super) fn plan(&self, engine: &Engine, continuing: Option<Ticks>) -> SeedPlan {
        let hub = self.config.hub();
        let seeded_as_of = engine.snapshot().seeded.get(hub).copied();
        if let Some(as_of) = continuing {
            tracing::info!(hub, as_of = %as_of, "a seed pass was interrupted: it goes on");
            return SeedPlan {
                start_now: true,
                as_of: Some(as_of),
                seeded_as_of,
            };
        }
        let empty = engine
            .snapshot()
            .directory
            .live_of_hub(hub)
            .next()
            .is_none();
        SeedPlan {
            start_now: self.config.on_empty && empty,
            as_of: self.config.as_of,
            seeded_as_of,
        }
    }

    /// Applies one input of the seed thread.
    pub(super) fn handle(
        &mut self,
        engine: &mut Engine,
        input: SeedInput,
    ) -> Result<(), crate::pipeline::PipelineError> {
        match input {
            SeedInput::Begin { as_of } => {
                tracing::info!(hub = %self.config.hub(), as_of = %as_of, "seed pass begins: reading the hub's twins beside the feed");
                let pass = engine.begin_seed(self.config.hub(), as_of)?;
                self.pass = Some(OpenPass {
                    pass,
                    bad_page: None,
                    exported: [0; 3],
                });
                self.metrics.running.set(1);
                self.status.update(|s| s.running = Some((as_of, 0)));
            }
            SeedInput::Page(page) => {
                let Some(open) = &mut self.pass else {
                    return Ok(());
                };
                if open.bad_page.is_some() {
                    return Ok(());
                }
                let mut reader = DocumentReader::new(&page[..]);
                loop {
                    match reader.next_document() {
                        Ok(Some(document)) => engine.ingest_document(&mut open.pass, document)?,
                        Ok(None) => break,
                        Err(e) => {
                            open.bad_page =
                                Some(format!("a page is not a JSON array of documents: {e}"));
                            break;
                        }
                    }
                }
                export_documents(open, &self.metrics, &self.status);
            }
            SeedInput::End { problem, done } => {
                let Some(mut open) = self.pass.take() else {
                    return Ok(());
                };
                export_documents(&mut open, &self.metrics, &self.status);
                let (reason, failed) = match (&open.bad_page, problem) {
                    (Some(bad), _) => (Some(bad.clone()), false),
                    (None, Some(p)) => (Some(p.reason), p.failed),
                    (None, None) => (None, false),
                };
                let outcome = match (&reason, failed) {
                    (None, _) => PassOutcome::Complete,
                    (Some(_), true) => PassOutcome::Failed,
                    (Some(_), false) => PassOutcome::Incomplete,
                };
                if let Some(reason) = &reason {
                    tracing::error!(hub = %self.config.hub(), reason = %reason, outcome = outcome.as_str(), "the seed pass is not complete: what it read is applied, nothing is removed");
                }
                let grace = i64::try_from(self.config.grace.as_secs())
                    .unwrap_or(i64::MAX)
                    .saturating_mul(TICKS_PER_SECOND);
                engine.begin_end_seed(
                    &mut open.pass,
                    PassEnd {
                        complete: outcome == PassOutcome::Complete,
                        reconcile_grace: self.config.reconcile_every.map(|_| Ticks(grace)),
                    },
                )?;
                self.ending = Some(Ending {
                    open,
                    outcome,
                    reason,
                    done,
                });
                self.step(engine)?;
            }
        }
        Ok(())
    }

    /// Whether an ending pass has twins left to evaluate ([`ServiceSeed::step`]).
    pub(super) fn busy(&self) -> bool {
        self.ending.is_some()
    }

    /// Evaluates the next batch of an ending pass's touched twins; after the last, the pass
    /// is over: counted, reported, and the seed thread told.
    pub(super) fn step(
        &mut self,
        engine: &mut Engine,
    ) -> Result<(), crate::pipeline::PipelineError> {
        let Some(ending) = &mut self.ending else {
            return Ok(());
        };
        let Some(counters) = engine.evaluate_seed_step(&mut ending.open.pass)? else {
            let left = ending.open.pass.ending().unwrap_or(0);
            self.status.update(|s| s.to_evaluate = Some(left));
            return Ok(());
        };
        let Some(Ending {
            open,
            outcome,
            reason,
            done,
        }) = self.ending.take()
        else {
            return Ok(());
        };
        let as_of = open.pass.as_of();
        let m = &self.metrics;
        m.passes.with_label_values(&[outcome.as_str()]).inc();
        m.removed.inc_by(counters.removed);
        m.running.set(0);
        if outcome == PassOutcome::Complete {
            m.last_complete.set(as_of.unix_millis() as f64 / 1000.0);
        }
        tracing::info!(
            hub = %self.config.hub(),
            as_of = %as_of,
            outcome = outcome.as_str(),
            documents = counters.documents,
            applied = counters.applied,
            stale = counters.stale,
            dead_lettered = counters.n_dead_lettered(),
            removed = counters.removed,
            evaluated = counters.evaluated,
            alerts_opened = counters.alerts_opened,
            alerts_resolved = counters.alerts_resolved,
            "seed pass ended"
        );
        self.status.update(|s| {
            s.running = None;
            s.to_evaluate = None;
            if outcome == PassOutcome::Complete {
                s.last_complete = Some(as_of);
            }
            s.last = Some((outcome, as_of, counters.documents, counters.removed, reason));
        });
        let _ = done.send(outcome);
        Ok(())
    }

    /// The service stops with a pass under way: it stays open in the data directory (its
    /// applied twins are durable and await evaluation) and goes on at the next start.
    pub(super) fn interrupted(&mut self) {
        let Some(mut open) = self
            .pass
            .take()
            .or_else(|| self.ending.take().map(|e| e.open))
        else {
            return;
        };
        export_documents(&mut open, &self.metrics, &self.status);
        tracing::warn!(hub = %self.config.hub(), documents = open.pass.counters().documents, "the service stops during a seed pass: nothing is removed; the pass goes on at the next start");
        self.metrics.passes.with_label_values(&["incomplete"]).inc();
        self.metrics.running.set(0);
        let documents = open.pass.counters().documents;
        let as_of = open.pass.as_of();
        self.status.update(|s| {
            s.running = None;
            s.to_evaluate = None;
            s.last = Some((
                PassOutcome::Incomplete,
                as_of,
                documents,
                0,
                Some("the service stopped".into()),
            ));
        });
    }
}

/// Adds the pass's new document counts to the metrics and the status.
fn export_documents(
    open: &mut OpenPass,
    metrics: &crate::telemetry::SeedMetrics,
    status: &SeedStatus,
) {
    let c = open.pass.counters();
    let now = [c.applied, c.stale, c.n_dead_lettered()];
    for (i, outcome) in ["applied", "stale", "dead_lettered"].iter().enumerate() {
        if now[i] > open.exported[i] {
            metrics
                .documents
                .with_label_values(&[outcome])
                .inc_by(now[i] - open.exported[i]);
        }
    }
    open.exported = now;
    let documents = c.documents;
    status.update(|s| {
        if let Some((_, n)) = &mut s.running {
            *n = documents;
        }
    });
}
