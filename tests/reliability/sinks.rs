//! Sink outages: one `twinwatch run` consumes a stream the emulator publishes at a steady rate
//! and delivers its alerts to a file, a webhook and a real Prometheus Alertmanager, while a
//! seeded schedule takes the sinks down and brings them back: the webhook refusing
//! connections, the webhook answering 503, Alertmanager killed (and restarted empty, as it
//! keeps alerts in memory only), and both at once.
//!
//! Each outage must show in the metrics (alerts pending in the outbox, the sink's failures
//! counted) before it ends. At the end every alert in the file sink has reached the webhook
//! (at least once), the outbox is empty, and Alertmanager's active alerts are exactly the
//! service's open violations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::report;
use crate::service::{
    consumed, free_port, metric, metric_plain, sigterm_and_wait, spawn_run, Hub, Receiver,
};
use crate::support::{alerts_by_id, generate_fleet, ok, path};

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// A real Alertmanager on a fixed port, killed when dropped.
struct Alertmanager {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Alertmanager {
    fn start(dir: &Path, port: u16) -> Alertmanager {
        assert!(
            Path::new(ALERTMANAGER).exists(),
            "{ALERTMANAGER} is missing: apt-get install -y prometheus-alertmanager"
        );
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: discard\nreceivers:\n  - name: discard\n",
        )
        .expect("write the config");
        let log = dir.join("alertmanager.log");
        let child = Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", path(&config)))
            .arg(format!("--storage.path={}", path(&dir.join("am-data"))))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the log"))
            .spawn()
            .expect("start prometheus-alertmanager");
        let mut am = Alertmanager { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = am.child.try_wait() {
                panic!(
                    "alertmanager exited ({status}): {}",
                    std::fs::read_to_string(&am.log).unwrap_or_default()
                );
            }
            let ready = ureq::get(&format!("http://127.0.0.1:{port}/-/ready"))
                .call()
                .is_ok();
            if ready {
                return am;
            }
            assert!(Instant::now() < deadline, "alertmanager not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The active alerts as (device, module, rule), with the hub of each.
    fn active(&self) -> BTreeSet<(String, String, String, String)> {
        let text = ureq::get(&format!(
            "http://127.0.0.1:{}/api/v2/alerts?active=true",
            self.port
        ))
        .call()
        .expect("alertmanager answers")
        .into_body()
        .read_to_string()
        .expect("a body");
        let alerts: Vec<Value> = serde_json::from_str(&text).expect("a JSON array");
        alerts
            .iter()
            .map(|a| {
                let label = |name: &str| a["labels"][name].as_str().unwrap_or("").to_owned();
                (
                    label("hub"),
                    label("device"),
                    label("module"),
                    label("alertname"),
                )
            })
            .collect()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `twinwatch violations` as (hub, device, module, rule).
fn open_violations(data: &Path) -> BTreeSet<(String, String, String, String)> {
    let out = ok(&["violations", "--data-dir", path(data)]).stdout;
    out.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| {
            let v: Value = serde_json::from_slice(line).expect("a violation");
            let field = |name: &str| v[name].as_str().unwrap_or("").to_owned();
            (
                field("hubName"),
                field("deviceId"),
                field("moduleId"),
                field("ruleId"),
            )
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    WebhookRefused,
    Webhook503,
    AlertmanagerKilled,
    Both,
}

impl Outage {
    const ALL: [Outage; 4] = [
        Outage::WebhookRefused,
        Outage::Webhook503,
        Outage::AlertmanagerKilled,
        Outage::Both,
    ];

    fn name(self) -> &'static str {
        match self {
            Outage::WebhookRefused => "webhook_refused",
            Outage::Webhook503 => "webhook_503",
            Outage::AlertmanagerKilled => "alertmanager_killed",
            Outage::Both => "both_down",
        }
    }

    fn hits_webhook(self) -> bool {
        self != Outage::AlertmanagerKilled
    }

    fn hits_alertmanager(self) -> bool {
        matches!(self, Outage::AlertmanagerKilled | Outage::Both)
    }
}

#[test]
fn sink_outage_campaign() {
    let scale = report::scale();
    let mut rng = ChaCha8Rng::seed_from_u64(report::seed(20_261_202));
    let dir = tempfile::tempdir().expect("tempdir");
    let outages_wanted = scale.pick(16, 4);
    // About 8 s of stream per outage at 1,500 events/s: alerts keep coming through the
    // whole schedule, so each outage leaves some pending.
    let rate = 1500.0;
    let file = generate_fleet(dir.path(), 3000, outages_wanted * 12_000, 41, 0.03);
    let hub = Hub::publishing("iothub-ehub-sinks", &file, rate);
    let total = hub.published;

    let (port, webhook_port, am_port) = (free_port(), free_port(), free_port());
    let am_dir = dir.path().join("alertmanager");
    std::fs::create_dir_all(&am_dir).expect("mkdir");
    let mut alertmanager = Some(Alertmanager::start(&am_dir, am_port));
    let mut webhook = Some(Receiver::start(webhook_port));
    let mut received = BTreeSet::new();
    let data = dir.path().join("data");
    let alerts = dir.path().join("alerts.jsonl");
    let config = dir.path().join("twinwatch.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n[alerts]\nfile = {:?}\n\
             webhook_url = \"http://127.0.0.1:{webhook_port}/alerts\"\n\
             alertmanager_url = \"http://127.0.0.1:{am_port}\"\n\
             alertmanager_repost_secs = 2\nsink_timeout_secs = 2\n",
            path(&data),
            path(&alerts)
        ),
    )
    .expect("config");
    let mut service = spawn_run(&hub, &["run", "--config", path(&config)]);

    let failures = |sink: &str| {
        metric(
            port,
            "twinwatch_sink_failures_total",
            &format!("sink=\"{sink}\""),
        )
        .unwrap_or(0.0)
    };
    let mut injected = std::collections::BTreeMap::<&str, u64>::new();
    let mut max_pending = 0.0f64;
    let mut n = 0;
    while n < outages_wanted {
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..1500)));
        if consumed(port).unwrap_or(0) == 0 {
            continue;
        }
        assert!(
            consumed(port).unwrap_or(0) < total,
            "the stream ended before the schedule: make it longer"
        );
        let outage = Outage::ALL[n as usize % Outage::ALL.len()];
        let (webhook_failures, am_failures) = (failures("webhook"), failures("alertmanager"));
        match outage {
            Outage::Webhook503 => webhook.as_ref().expect("up").set_failing(true),
            _ => {
                if outage.hits_webhook() {
                    received.extend(webhook.take().expect("up").stop());
                }
                if outage.hits_alertmanager() {
                    drop(alertmanager.take());
                }
            }
        }
        // The outage shows: alerts wait in the outbox and each sink down counts failures.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pending = metric_plain(port, "twinwatch_outbox_pending_alerts").unwrap_or(0.0);
            max_pending = max_pending.max(pending);
            let shown = pending > 0.0
                && (!outage.hits_webhook() || failures("webhook") >= webhook_failures + 2.0)
                && (!outage.hits_alertmanager() || failures("alertmanager") >= am_failures + 2.0);
            if shown {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "outage {n} ({outage:?}) does not show: pending {pending}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..2500)));
        match outage {
            Outage::Webhook503 => webhook.as_ref().expect("up").set_failing(false),
            _ => {
                if outage.hits_webhook() {
                    webhook = Some(Receiver::start(webhook_port));
                }
                if outage.hits_alertmanager() {
                    alertmanager = Some(Alertmanager::start(&am_dir, am_port));
                }
            }
        }
        *injected.entry(outage.name()).or_default() += 1;
        n += 1;
    }

    // Every event consumed, the outbox drained.
    let deadline = Instant::now() + Duration::from_secs(300);
    while consumed(port).unwrap_or(0) < total
        || metric_plain(port, "twinwatch_outbox_pending_alerts") != Some(0.0)
    {
        assert!(
            Instant::now() < deadline,
            "consumed {:?} of {total}, pending {:?}",
            consumed(port),
            metric_plain(port, "twinwatch_outbox_pending_alerts")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let counted = consumed(port).expect("metrics");
    // Alertmanager, restarted empty along the way, has every open violation back once the
    // sink has re-posted (every 2 s), and nothing else.
    let am = alertmanager.take().expect("up");
    let open = open_violations(&data);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut active = am.active();
    while active != open && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        active = am.active();
    }
    sigterm_and_wait(&mut service);
    received.extend(webhook.take().expect("up").stop());
    assert!(!open.is_empty(), "the fleet ends with no open violation");
    let missing_in_am = open.difference(&active).count() as u64;
    let extra_in_am = active.difference(&open).count() as u64;
    assert_eq!(
        (missing_in_am, extra_in_am),
        (0, 0),
        "Alertmanager's active alerts are not the open violations"
    );

    let (in_file, _) = alerts_by_id(&std::fs::read(&alerts).expect("alerts"));
    let in_file: BTreeSet<String> = in_file.into_keys().collect();
    let missing = in_file.difference(&received).count() as u64;
    assert_eq!(
        missing,
        0,
        "{missing} of {} alerts never reached the webhook",
        in_file.len()
    );
    assert_eq!(counted, total, "an event was counted twice (or lost)");

    let mut figures = vec![
        ("outages", n),
        ("events", total),
        ("lost", total.saturating_sub(counted)),
        ("doubled", counted.saturating_sub(total)),
        ("alerts", in_file.len() as u64),
        ("missing_alerts", missing),
        ("max_pending", max_pending as u64),
        ("alertmanager_open", active.len() as u64),
        ("alertmanager_missing", missing_in_am),
    ];
    for (kind, count) in &injected {
        figures.push((kind, *count));
    }
    report::record("sink-outages", &figures);
}
