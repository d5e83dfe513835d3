//! The apply thread's side of the service's seed passes (`twinwatch run` with a `[seed]`
//! section, `docs/semantics.md` §7): the seed thread (`source::hub::SeedThread`) reads the
//! hub's pages; [`ServiceSeed`] applies them between two chunks of events with the same engine
//! and batches, ends the pass and evaluates its touched twins a batch per turn.

use std::sync::Arc;

use super::{Engine, PassEnd, PipelineError, SeedPass};
use crate::source::documents::DocumentReader;
use crate::source::hub::{PassOutcome, SeedInput, SeedPlan, SeedStatus};
use crate::time::{Ticks, TICKS_PER_SECOND};

/// The apply thread's side of the service's seed passes: the pass under way.
pub struct ServiceSeed {
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
    pub fn new(
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
    pub fn continuing(
        &self,
        store: &crate::store::Store,
    ) -> Result<Option<(String, Ticks)>, PipelineError> {
        Ok(SeedPass::stored(store)?.filter(|(hub, _)| hub == self.config.hub()))
    }

    /// What the seed thread runs first, from the opened engine.
    pub fn plan(&self, engine: &Engine, continuing: Option<Ticks>) -> SeedPlan {
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
    pub fn handle(&mut self, engine: &mut Engine, input: SeedInput) -> Result<(), PipelineError> {
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
    pub fn busy(&self) -> bool {
        self.ending.is_some()
    }

    /// Evaluates the next batch of an ending pass's touched twins; after the last, the pass
    /// is over: counted, reported, and the seed thread told.
    pub fn step(&mut self, engine: &mut Engine) -> Result<(), PipelineError> {
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
    pub fn interrupted(&mut self) {
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
