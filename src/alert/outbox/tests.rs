use std::sync::Mutex;

use super::*;
use crate::store::StoreOptions;

/// A sink that keeps what it was given; refuses for good the alerts containing `refuse`
/// (in runs of more than one, the whole run, as a receiver validating a batch does), and
/// fails (retryably) while `down` is set.
#[derive(Clone, Default)]
struct Collect {
    name: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
    calls: Arc<AtomicU64>,
    refuse: Option<&'static str>,
    down: Arc<AtomicBool>,
}

impl Collect {
    fn named(name: &'static str) -> Collect {
        Collect {
            name,
            ..Collect::default()
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Sink for Collect {
    fn name(&self) -> &'static str {
        self.name
    }

    fn deliver(&mut self, alerts: &[&[u8]]) -> Result<(), Failed> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(SinkError::Http {
                sink: self.name.into(),
                status: 503,
                detail: "down".into(),
                retry_after: None,
            }
            .into());
        }
        let texts: Vec<String> = alerts
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(refuse) = self.refuse {
            if texts.iter().any(|t| t.contains(refuse)) {
                return Err(SinkError::Http {
                    sink: self.name.into(),
                    status: 422,
                    detail: format!("no {refuse} here"),
                    retry_after: None,
                }
                .into());
            }
        }
        self.seen.lock().expect("lock").extend(texts);
        Ok(())
    }
}

/// A sink whose periodic work always fails, as the Alertmanager sink's re-post does while
/// Alertmanager is down.
struct FailingTicks;

impl Sink for FailingTicks {
    fn name(&self) -> &'static str {
        "failing-ticks"
    }

    fn deliver(&mut self, _alerts: &[&[u8]]) -> Result<(), Failed> {
        Ok(())
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        Err(SinkError::Http {
            sink: "failing-ticks".into(),
            status: 0,
            detail: "connection refused".into(),
            retry_after: None,
        })
    }
}

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("store"));
    (dir, store)
}

fn put(store: &Store, seq: u64, text: &str) {
    let mut batch = Batch::default();
    store
        .put_outbox(&mut batch, seq, text.as_bytes())
        .expect("put");
    store.put_outbox_next(&mut batch, seq + 1).expect("mark");
    store.write(&mut batch).expect("write");
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn outbox_seqs(store: &Store) -> Vec<u64> {
    store
        .outbox_entries(0, 100_000)
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect()
}

/// Regression: a failed re-post was only logged, so an Alertmanager outage with no new
/// alerts left `twinwatch_sink_failures_total` at 0.
#[test]
fn failed_housekeeping_counts_as_a_sink_failure() {
    let (_dir, store) = store();
    let metrics = crate::telemetry::Metrics::new().expect("metrics");
    let failures = metrics
        .delivery
        .failures
        .with_label_values(&["failing-ticks"]);
    let delivery = spawn_delivery(
        store,
        vec![Box::new(FailingTicks)],
        Some(metrics.delivery.clone()),
    )
    .expect("spawn");
    wait_until("failed ticks are counted", || failures.get() >= 2);
    delivery
        .drain_and_stop(Duration::from_secs(10))
        .expect("stop");
}

/// Regression: after delivery drained what an interrupted run left (sequence numbers
/// 500..503), the engine, finding the outbox empty, numbered new alerts from 0 again while
/// delivery read on from 503: they were stranded. Numbers are now never reused: the store
/// keeps a high-water mark, and delivery reads on from its position.
#[test]
fn delivery_finds_alerts_renumbered_from_zero_after_draining_a_restart_backlog() {
    let (_dir, store) = store();
    for seq in 500..503 {
        put(&store, seq, &format!("old-{seq}"));
    }
    let sink = Collect::named("collect");
    let delivery =
        spawn_delivery(store.clone(), vec![Box::new(sink.clone())], None).expect("spawn");
    wait_until("the backlog is drained", || outbox_seqs(&store).is_empty());
    // What the engine numbers next with the outbox empty: after the high-water mark.
    let first = store.next_outbox_seq().expect("seq");
    assert_eq!(first, 503, "sequence numbers must not be reused");
    for (i, seq) in (first..first + 3).enumerate() {
        put(&store, seq, &format!("new-{i}"));
    }
    delivery.wake();
    let report = delivery
        .drain_and_stop(Duration::from_secs(10))
        .expect("stop");
    assert_eq!(
        sink.seen(),
        ["old-500", "old-501", "old-502", "new-0", "new-1", "new-2"]
    );
    assert_eq!((report.delivered, report.left_in_outbox), (6, 0));
}

/// A sink that is down holds back nobody: the other sink gets every alert while it is down;
/// the entries stay in the outbox until both are past them; the one that was down gets them
/// all once back, and its backoff (capped) lets it find out within seconds.
#[test]
fn each_sink_moves_on_its_own() {
    let (_dir, store) = store();
    let fast = Collect::named("fast");
    let slow = Collect::named("slow");
    slow.down.store(true, Ordering::SeqCst);
    let metrics = crate::telemetry::Metrics::new().expect("metrics");
    let delivery = spawn_delivery(
        store.clone(),
        vec![Box::new(fast.clone()), Box::new(slow.clone())],
        Some(metrics.delivery.clone()),
    )
    .expect("spawn");
    for seq in 0..100 {
        put(&store, seq, &format!("a-{seq}"));
    }
    delivery.wake();
    wait_until("the healthy sink has every alert", || {
        fast.seen().len() == 100
    });
    assert!(slow.seen().is_empty());
    assert_eq!(
        outbox_seqs(&store).len(),
        100,
        "kept for the sink that is down"
    );
    assert_eq!(store.sink_cursor("fast").expect("cursor"), Some(100));
    assert_eq!(metrics.delivery.outbox_pending.get(), 100);
    // Long enough for the backoff to reach its cap.
    std::thread::sleep(Duration::from_secs(3));
    let calls_before = slow.calls.load(Ordering::SeqCst);
    slow.down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    wait_until("the sink that was down catches up", || {
        slow.seen().len() == 100
    });
    assert!(
        back.elapsed() < MAX_BACKOFF + Duration::from_secs(1),
        "took {:?}",
        back.elapsed()
    );
    // Full jitter from 100 ms doubling to the 5 s cap: a handful of attempts in 3 s.
    assert!((4..=20).contains(&calls_before), "{calls_before} attempts");
    wait_until("the outbox is emptied", || outbox_seqs(&store).is_empty());
    let report = delivery
        .drain_and_stop(Duration::from_secs(10))
        .expect("stop");
    assert_eq!(fast.seen(), slow.seen());
    assert_eq!(report.delivered, 100);
    assert!(report.retries >= 4);
    assert_eq!(metrics.delivery.outbox_pending.get(), 0);
}

/// A sink that refuses some alerts for good: a refused run is split until exactly those are
/// found; they become alert dead letters (with the receiver's message and the alert); every
/// other alert is delivered, in order, and the other sink gets everything.
#[test]
fn refused_alerts_are_narrowed_down_and_set_aside() {
    let (_dir, store) = store();
    let mut picky = Collect::named("picky");
    picky.refuse = Some("bad");
    let other = Collect::named("other");
    let metrics = crate::telemetry::Metrics::new().expect("metrics");
    let mut expected = Vec::new();
    let mut all = Vec::new();
    for seq in 0..1000u64 {
        let text = if seq % 250 == 17 {
            format!("{{\"id\":\"bad-{seq}\"}}")
        } else {
            let text = format!("{{\"id\":\"ok-{seq}\"}}");
            expected.push(text.clone());
            text
        };
        all.push(text.clone());
        put(&store, seq, &text);
    }
    let delivery = spawn_delivery(
        store.clone(),
        vec![Box::new(picky.clone()), Box::new(other.clone())],
        Some(metrics.delivery.clone()),
    )
    .expect("spawn");
    wait_until("the outbox is emptied", || outbox_seqs(&store).is_empty());
    let report = delivery
        .drain_and_stop(Duration::from_secs(10))
        .expect("stop");
    assert_eq!(picky.seen(), expected);
    assert_eq!(other.seen(), all);
    assert_eq!(report.dead_lettered, 4);
    assert_eq!(report.retries, 0, "a refusal is not retried");
    // Each refused alert costs about two attempts per halving of the run (a binary search),
    // not one attempt per alert.
    let calls = picky.calls.load(Ordering::SeqCst);
    assert!(calls <= 4 * 2 * 11, "{calls} attempts");
    assert_eq!(
        metrics
            .delivery
            .dead_letters
            .with_label_values(&["picky"])
            .get(),
        4
    );
    let letters: Vec<serde_json::Value> = store
        .alert_dead_letters()
        .expect("read")
        .map(|r| serde_json::from_slice(&r.expect("read")).expect("JSON"))
        .collect();
    let ids: Vec<&str> = letters
        .iter()
        .map(|l| l["alertId"].as_str().expect("an id"))
        .collect();
    assert_eq!(ids, ["bad-17", "bad-267", "bad-517", "bad-767"]);
    for letter in &letters {
        assert_eq!(letter["sink"], "picky");
        assert_eq!(letter["status"], 422);
        assert_eq!(letter["kind"], "refused");
        assert_eq!(letter["message"], "no bad here");
        assert_eq!(letter["alert"]["id"], letter["alertId"]);
    }
}

/// The cursors are committed: after a stop, a restarted delivery sends a sink only what it
/// had not accepted (at-least-once per sink without sending everything again).
#[test]
fn cursors_survive_a_restart() {
    let (_dir, store) = store();
    for seq in 0..50 {
        put(&store, seq, &format!("a-{seq}"));
    }
    let first = Collect::named("first");
    let second = Collect::named("second");
    second.down.store(true, Ordering::SeqCst);
    let delivery = spawn_delivery(
        store.clone(),
        vec![Box::new(first.clone()), Box::new(second.clone())],
        None,
    )
    .expect("spawn");
    wait_until("the first sink has everything", || first.seen().len() == 50);
    let report = delivery
        .drain_and_stop(Duration::from_millis(300))
        .expect("stop");
    assert_eq!(report.left_in_outbox, 50);

    let first_again = Collect::named("first");
    let second_again = Collect::named("second");
    let delivery = spawn_delivery(
        store.clone(),
        vec![
            Box::new(first_again.clone()),
            Box::new(second_again.clone()),
        ],
        None,
    )
    .expect("spawn");
    let report = delivery
        .drain_and_stop(Duration::from_secs(10))
        .expect("stop");
    assert!(first_again.seen().is_empty(), "{:?}", first_again.seen());
    assert_eq!(second_again.seen(), first.seen());
    assert_eq!((report.delivered, report.left_in_outbox), (50, 0));
}

/// The oldest-age gauge follows the commit time of the oldest alert some sink has not
/// accepted: it does not restart when the head moves, and is 0 once all is delivered.
#[test]
fn the_oldest_age_is_the_commit_time_of_the_oldest_waiting_alert() {
    let (_dir, store) = store();
    let down = Collect::named("down");
    down.down.store(true, Ordering::SeqCst);
    let metrics = crate::telemetry::Metrics::new().expect("metrics");
    let committed = unix_ms();
    put(&store, 0, "a-0");
    std::thread::sleep(Duration::from_millis(50));
    let delivery = spawn_delivery(
        store.clone(),
        vec![Box::new(down.clone())],
        Some(metrics.delivery.clone()),
    )
    .expect("spawn");
    let since = &metrics.delivery.head_waiting_since_ms;
    wait_until("the gauge is set", || since.load(Ordering::Relaxed) != 0);
    let at = since.load(Ordering::Relaxed);
    assert!(
        at >= committed && at < committed + 50,
        "{at} vs {committed}"
    );
    down.down.store(false, Ordering::SeqCst);
    wait_until("delivered", || down.seen().len() == 1);
    wait_until("the gauge is cleared", || {
        since.load(Ordering::Relaxed) == 0
    });
    delivery
        .drain_and_stop(Duration::from_secs(10))
        .expect("stop");
}

/// A sink thread that panics makes delivery report its failure (for `/readyz` and the exit
/// status) instead of going unnoticed.
#[test]
fn a_dead_delivery_thread_is_reported() {
    struct Panics;
    impl Sink for Panics {
        fn name(&self) -> &'static str {
            "panics"
        }
        fn deliver(&mut self, _alerts: &[&[u8]]) -> Result<(), Failed> {
            panic!("a bug in a sink");
        }
    }
    let (_dir, store) = store();
    put(&store, 0, "a-0");
    let delivery = spawn_delivery(store, vec![Box::new(Panics)], None).expect("spawn");
    let health = delivery.health();
    wait_until("the failure is reported", || health.failure().is_some());
    assert!(health.failure().expect("failed").contains("panicked"));
    assert!(delivery.drain_and_stop(Duration::from_secs(5)).is_err());
}

/// A reopen request reaches the sink on its own thread.
#[test]
fn reopen_reaches_every_sink() {
    struct Counts(Arc<AtomicU64>);
    impl Sink for Counts {
        fn name(&self) -> &'static str {
            "counts"
        }
        fn deliver(&mut self, _alerts: &[&[u8]]) -> Result<(), Failed> {
            Ok(())
        }
        fn reopen(&mut self) -> Result<(), SinkError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let (_dir, store) = store();
    let reopened = Arc::new(AtomicU64::new(0));
    let delivery =
        spawn_delivery(store, vec![Box::new(Counts(reopened.clone()))], None).expect("spawn");
    let reopener = delivery.reopener();
    reopener.reopen();
    wait_until("reopened once", || reopened.load(Ordering::SeqCst) == 1);
    reopener.reopen();
    wait_until("reopened twice", || reopened.load(Ordering::SeqCst) == 2);
    delivery
        .drain_and_stop(Duration::from_secs(5))
        .expect("stop");
}

/// Drains a backlog of `n` alerts into a webhook receiver that takes `delay` per request
/// (default webhook settings: batches of 500, 4 requests in flight); returns alerts a second.
fn drain_rate(n: u64, delay: Duration) -> f64 {
    use crate::alert::testserver::{answer, event, TestServer, DEVICE_TWIN, HIGH_RULE};
    use crate::alert::{HttpOptions, WebhookOptions, WebhookSink};
    let (_dir, store) = store();
    let time = "2026-01-02T03:04:05.0000000Z";
    let mut batch = Batch::default();
    for seq in 0..n {
        let alert = event(
            &format!("bench#{seq}"),
            true,
            &DEVICE_TWIN,
            &HIGH_RULE,
            time,
            1,
        );
        store.put_outbox(&mut batch, seq, &alert).expect("put");
        if seq % 1000 == 999 {
            store.write(&mut batch).expect("write");
        }
    }
    store.put_outbox_next(&mut batch, n).expect("mark");
    store.write(&mut batch).expect("write");
    let server = TestServer::scripted(Arc::new(|_, _| answer(200)), delay, None);
    let sink = WebhookSink::new(WebhookOptions::new(
        server.url("/bench"),
        None,
        HttpOptions::new(Duration::from_secs(10)),
    ));
    let started = Instant::now();
    let delivery = spawn_delivery(store.clone(), vec![Box::new(sink)], None).expect("spawn");
    let report = delivery
        .drain_and_stop(Duration::from_secs(120))
        .expect("drained");
    let elapsed = started.elapsed();
    assert_eq!((report.delivered, report.left_in_outbox), (n, 0));
    let received: usize = server
        .received()
        .iter()
        .map(|r| {
            crate::compliance::wire::CloudEvent::parse_body(&r.body)
                .expect("CloudEvents")
                .len()
        })
        .sum();
    assert_eq!(received as u64, n);
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "drained {n} alerts into a receiver taking {delay:?} a request in {elapsed:?}: {rate:.0} alerts/s"
    );
    rate
}

/// The delivery target of issue 22: a backlog drains at 5,000 alerts/s or more into a
/// receiver that takes 20 ms per request, and at 20,000/s or more into a local one. Its
/// figures are in BENCHMARKS.md (run with `-- --nocapture` to see them).
#[test]
fn a_backlog_drains_at_the_target_rates() {
    let slow = drain_rate(50_000, Duration::from_millis(20));
    assert!(slow >= 5_000.0, "{slow:.0} alerts/s into a 20 ms receiver");
    let local = drain_rate(200_000, Duration::ZERO);
    assert!(
        local >= 20_000.0,
        "{local:.0} alerts/s into a local receiver"
    );
}
