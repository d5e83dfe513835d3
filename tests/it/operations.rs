//! Operating the service: a real Prometheus (Debian's `prometheus`) scrapes it and counts what
//! it consumed, `promtool check metrics` passes on its exposition, and a stop by SIGTERM with
//! a sink hanging ends within the configured deadline, after which a restart loses nothing.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::service::{
    consumed, free_port, metrics_text, sigterm_and_wait, spawn_run, spawn_service, wait_consumed,
    wait_quiet_clock, Hub,
};
use crate::support::{assert_every_live_alert_delivered, generate_fleet, ok, path};

/// The samples of one metric (without labels: their sum).
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Waits until every owned partition's lag is known and 0, and the outbox is empty: the
/// service has applied everything the hub holds and delivered every alert.
fn wait_caught_up(port: u16, partitions: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let text = metrics_text(port).unwrap_or_default();
        let lags = text
            .lines()
            .filter(|l| l.starts_with("twinwatch_partition_lag_events{"))
            .count();
        let lag = metric_sum(&text, "twinwatch_partition_lag_events");
        let pending = metric_sum(&text, "twinwatch_outbox_pending_alerts");
        if lags == partitions && lag == Some(0.0) && pending == Some(0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not caught up in {limit:?}: {lags} lags known, lag {lag:?}, pending {pending:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Real Prometheus on loopback, scraping `target` every second.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target: u16) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: twinwatch\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let port = free_port();
        let child = Command::new("prometheus")
            .args([
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
                &format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian package `prometheus`; .ci/run installs it)");
        Prometheus { child, port }
    }

    /// The value of an instant query that yields one sample (None while it yields none).
    fn query(&self, expr: &str) -> Option<f64> {
        let text = ureq::get(&format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query("query", expr)
            .call()
            .ok()?
            .into_body()
            .read_to_string()
            .ok()?;
        let body: Value = serde_json::from_str(&text).ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_service_and_counts_what_it_consumed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 300, 3000, 5, 0.03);
    let hub = Hub::start(&file);
    let port = free_port();
    let mut service = spawn_service(
        &hub,
        &dir.path().join("data"),
        &dir.path().join("alerts.jsonl"),
        port,
    );
    let prometheus = Prometheus::start(dir.path(), port);
    wait_consumed(port, hub.published, Duration::from_secs(180));
    wait_caught_up(port, 4, Duration::from_secs(60));

    // What Prometheus scraped equals what the service consumed: every event of the hub.
    let deadline = Instant::now() + Duration::from_secs(60);
    let published = hub.published as f64;
    loop {
        let scraped = prometheus.query("sum(twinwatch_messages_total)");
        let lag = prometheus.query("sum(twinwatch_partition_lag_events)");
        if scraped == Some(published) && lag == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has {scraped:?} messages (lag {lag:?}), the hub {published}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(prometheus.query("up{job=\"twinwatch\"}"), Some(1.0));
    assert_eq!(prometheus.query("twinwatch_ready"), Some(1.0));
    let applied = prometheus
        .query("twinwatch_messages_total{outcome=\"applied\"}")
        .expect("applied");
    assert!(applied > 0.0 && applied <= published);
    // The snapshot's size as Prometheus sees it is the export's.
    let twins = prometheus.query("twinwatch_twins").expect("twins");

    // The exposition passes Prometheus's own linter, and every documented family is there.
    let text = metrics_text(port).expect("GET /metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for family in [
        "twinwatch_messages_total",
        "twinwatch_dead_letters_total",
        "twinwatch_batches_total",
        "twinwatch_batch_size_messages",
        "twinwatch_apply_duration_seconds",
        "twinwatch_commit_duration_seconds",
        "twinwatch_twins",
        "twinwatch_tombstones",
        "twinwatch_failing_twins",
        "twinwatch_alerts_total",
        "twinwatch_outbox_pending_alerts",
        "twinwatch_outbox_oldest_age_seconds",
        "twinwatch_sink_deliveries_total",
        "twinwatch_sink_retries_total",
        "twinwatch_sink_failures_total",
        "twinwatch_checkpoint_sequence_number",
        "twinwatch_partition_lag_events",
        "twinwatch_partition_connected",
        "twinwatch_receiver_reconnects_total",
        "twinwatch_receiver_displaced_total",
        "twinwatch_event_age_seconds",
        "twinwatch_enqueue_to_alert_seconds",
        "twinwatch_rocksdb_memtable_bytes",
        "twinwatch_rocksdb_pending_compaction_bytes",
        "twinwatch_rocksdb_block_cache_usage_bytes",
        "twinwatch_rocksdb_live_sst_bytes",
        "twinwatch_ready",
        "twinwatch_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} is missing from /metrics"
        );
    }
    // The query API answers a twin exactly as its export line (read beside the running
    // service).
    let exported = ok(&["export", "--data-dir", path(&dir.path().join("data"))]).stdout;
    let exported = String::from_utf8(exported).expect("utf-8");
    let module_line = exported
        .lines()
        .find(|l| l.contains("\"moduleId\""))
        .expect("a module twin");
    for line in [exported.lines().next().expect("a twin"), module_line] {
        let expected: Value = serde_json::from_str(line).expect("json");
        let mut uri = format!(
            "http://127.0.0.1:{port}/v1/twins/{}/{}",
            expected["hubName"].as_str().expect("hub"),
            expected["deviceId"].as_str().expect("device")
        );
        if let Some(module) = expected["moduleId"].as_str() {
            uri.push_str(&format!("/modules/{module}"));
        }
        let answer: Value = serde_json::from_str(
            &ureq::get(&uri)
                .call()
                .expect("GET twin")
                .into_body()
                .read_to_string()
                .expect("body"),
        )
        .expect("json");
        assert_eq!(answer["twin"], expected, "{uri}");
    }
    sigterm_and_wait(&mut service);
    let exported = ok(&["export", "--data-dir", path(&dir.path().join("data"))]).stdout;
    let lines = exported.iter().filter(|&&b| b == b'\n').count() as f64;
    assert_eq!(
        twins, lines,
        "twinwatch_twins is not the export's line count"
    );
    // Each rule's failing twins add up to the violations.
    let violations = ok(&["violations", "--data-dir", path(&dir.path().join("data"))]).stdout;
    let n_violations = violations.iter().filter(|&&b| b == b'\n').count() as f64;
    assert!(n_violations > 0.0);
    assert_eq!(
        metric_sum(&text, "twinwatch_failing_twins"),
        Some(n_violations)
    );
}

/// A service process, killed if the test fails before stopping it.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `twinwatch run --config` with the hub's connection string from the environment.
fn spawn_with_config(hub: &Hub, config: &Path) -> Service {
    Service(spawn_run(hub, &["run", "--config", path(config)]))
}

#[test]
fn sigterm_with_a_hanging_sink_stops_within_the_deadline_and_a_restart_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 22, 0.03);
    let hub = Hub::start(&file);

    // The reference: one uninterrupted run, alerts to a file.
    let clean = dir.path().join("clean");
    let clean_alerts = dir.path().join("clean.jsonl");
    let port = free_port();
    let mut child = spawn_service(&hub, &clean, &clean_alerts, port);
    wait_consumed(port, hub.published, Duration::from_secs(180));
    wait_caught_up(port, 4, Duration::from_secs(60));
    wait_quiet_clock(port, Duration::from_secs(60));
    sigterm_and_wait(&mut child);

    // A webhook that accepts connections and never answers: every delivery to it hangs
    // until the sink's 10 s timeout, longer than the 4 s stop deadline.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hanging_port = hanging.local_addr().expect("addr").port();
    let data = dir.path().join("data");
    let alerts = dir.path().join("alerts.jsonl");
    let port = free_port();
    let deadline_secs = 4;
    let config = dir.path().join("twinwatch.toml");
    let write_config = |webhook: bool| {
        let mut text = format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\nshutdown_deadline_secs = {deadline_secs}\n[alerts]\nfile = {:?}\n",
            path(&data),
            path(&alerts)
        );
        if webhook {
            text.push_str(&format!(
                "webhook_url = \"http://127.0.0.1:{hanging_port}/alerts\"\n"
            ));
        }
        std::fs::write(&config, text).expect("config");
    };
    write_config(true);
    let mut service = spawn_with_config(&hub, &config);
    let child = &mut service.0;
    wait_consumed(port, hub.published / 2, Duration::from_secs(180));
    let told = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exited = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            told.elapsed() < Duration::from_secs(30),
            "no exit 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = told.elapsed();
    assert!(exited.success(), "exit status {exited} on SIGTERM");
    assert!(
        took < Duration::from_secs(deadline_secs) + Duration::from_millis(1500),
        "the stop took {took:?}, the deadline is {deadline_secs} s"
    );
    drop(hanging);

    // The sink fixed (no webhook any more): the restart resumes from the checkpoints and
    // delivers what the outbox kept.
    write_config(false);
    let mut service = spawn_with_config(&hub, &config);
    wait_caught_up(port, 4, Duration::from_secs(180));
    assert!(consumed(port).expect("metrics") < hub.published);
    wait_quiet_clock(port, Duration::from_secs(60));
    sigterm_and_wait(&mut service.0);
    let a = ok(&["export", "--data-dir", path(&clean)]).stdout;
    let b = ok(&["export", "--data-dir", path(&data)]).stdout;
    assert!(
        a == b,
        "the export after the stop differs from the reference"
    );
    let a = ok(&["violations", "--data-dir", path(&clean)]).stdout;
    let b = ok(&["violations", "--data-dir", path(&data)]).stdout;
    assert!(a == b, "the violations after the stop differ");
    assert_every_live_alert_delivered(&clean_alerts, &alerts, 100);
}
