//! The hub's twin query as a source of twin documents (`docs/semantics.md` §7): both queries
//! read page by page ([`read_queries`], for `twinwatch seed` and the service alike), and the
//! service's seed thread ([`SeedThread`]): its schedule, the pages it hands the apply thread
//! (`pipeline::live_seed` applies them), and `/readyz`'s view of its passes ([`SeedStatus`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::iothub::{IotHubError, QueryClient, QueryError, QueryEvent, QueryOptions};
use crate::time::Ticks;

/// The twin queries of a pass, in order: device twins, then module twins.
pub const QUERIES: [&str; 2] = ["SELECT * FROM devices", "SELECT * FROM devices.modules"];

/// Why reading the queries stopped before their last page.
pub enum ReadStop<E> {
    /// The page handler refused a page.
    Page { query: &'static str, error: E },
    /// The hub failed beyond the client's retries (or the client was cancelled).
    Hub {
        query: &'static str,
        error: IotHubError,
    },
}

/// Reads both twin queries to their last page, in order: `on_page` takes each page (a JSON
/// array of documents, exactly as received), `on_event` hears of each page read and each
/// throttling wait; a retry is logged here.
pub fn read_queries<E>(
    client: &QueryClient,
    on_page: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    on_event: &mut dyn FnMut(&'static str, &QueryEvent),
) -> Result<(), ReadStop<E>> {
    for query in QUERIES {
        let mut on_query_event = |event: QueryEvent| {
            if let QueryEvent::Retrying { cause, wait, .. } = &event {
                tracing::warn!(cause = %cause, wait_ms = wait.as_millis() as u64, "retrying a page of the twin query");
            }
            on_event(query, &event);
        };
        match client.run_query(query, on_page, &mut on_query_event) {
            Ok(stats) => tracing::info!(
                query,
                pages = stats.pages,
                throttled = stats.throttled,
                retries = stats.retries,
                "twin query read"
            ),
            Err(QueryError::Page(error)) => return Err(ReadStop::Page { query, error }),
            Err(QueryError::Hub(error)) => return Err(ReadStop::Hub { query, error }),
        }
    }
    Ok(())
}

// The service's seed passes (`twinwatch run` with a `[seed]` section). A seed thread runs the
// blocking twin query and hands each page, as received, to the apply thread, which applies
// it between two chunks of events with the same engine and batches: ingestion never waits
// for the hub, only for one page's documents. The apply thread owns the pass (begin, pages,
// end); the seed thread owns the schedule.

/// Pages buffered between the seed thread and the apply thread.
pub const SEED_PAGES: usize = 2;
/// The first wait before a pass that did not complete is tried again (doubled each time).
const RETRY_FIRST: Duration = Duration::from_secs(60);
/// The longest wait before a pass that did not complete is tried again.
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// How often a wait looks at the stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// What the seed thread hands the apply thread, in order.
pub enum SeedInput {
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
pub struct ReadProblem {
    pub reason: String,
    /// An error that needs a fix (credentials, TLS, a bad answer) rather than time.
    pub failed: bool,
}

/// How a pass ended (`twinwatch_seed_passes_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassOutcome {
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
    pub fn as_str(self) -> &'static str {
        match self {
            PassOutcome::Complete => "complete",
            PassOutcome::Incomplete => "incomplete",
            PassOutcome::Failed => "failed",
        }
    }
}

/// What the apply thread found at start: whether a pass runs at once, and as of when.
pub struct SeedPlan {
    /// Run a pass at once: a pass left open by the last run goes on, or the snapshot holds
    /// no twin of the hub (`on_empty`).
    pub start_now: bool,
    /// The as-of time of that first pass when it is fixed (the open pass's, or `[seed]
    /// as_of`); else the moment it begins.
    pub as_of: Option<Ticks>,
    /// The as-of time of the hub's last complete pass, for the reconcile schedule.
    pub seeded_as_of: Option<Ticks>,
}

/// The service's seed passes as `/readyz` reports them.
#[derive(Default)]
pub struct SeedStatus {
    state: std::sync::Mutex<SeedState>,
}

#[derive(Default)]
pub struct SeedState {
    pub hub: String,
    /// The pass under way: its as-of time and documents read so far.
    pub running: Option<(Ticks, u64)>,
    /// Its touched twins left to evaluate, once its documents are all in.
    pub to_evaluate: Option<usize>,
    pub throttled: u64,
    /// The last pass that ended: outcome, as-of time, documents, removed, why not complete.
    pub last: Option<(PassOutcome, Ticks, u64, u64, Option<String>)>,
    pub last_complete: Option<Ticks>,
}

impl SeedStatus {
    pub fn new(hub: &str) -> SeedStatus {
        SeedStatus {
            state: std::sync::Mutex::new(SeedState {
                hub: hub.to_owned(),
                ..SeedState::default()
            }),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut SeedState)) {
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
pub struct SeedThread {
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
    pub fn run(self) {
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
        let mut on_page = |page: &[u8]| send(SeedInput::Page(page.to_vec()));
        let mut on_event = |_: &'static str, event: &QueryEvent| {
            if let QueryEvent::Throttled { wait, .. } = event {
                self.metrics.throttled.inc();
                self.metrics.throttled_seconds.inc_by(wait.as_secs_f64());
                self.status.update(|s| s.throttled += 1);
            }
        };
        match read_queries(client, &mut on_page, &mut on_event) {
            Ok(()) => Ok(None),
            Err(ReadStop::Page { error: Gone, .. }) => Err(Gone),
            Err(ReadStop::Hub {
                error: IotHubError::Cancelled { .. },
                ..
            }) => Err(Gone),
            Err(ReadStop::Hub { query, error }) => Ok(Some(ReadProblem {
                reason: format!("{query}: {error}"),
                failed: !error.is_retryable(),
            })),
        }
    }
}
