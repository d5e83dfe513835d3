//! Faults a service meets in production, injected around the real binary: here, the data
//! directory's disk filling up.

use std::time::{Duration, Instant};

use crate::service::{
    committed, config_file, consumed, eventhub_config, free_port, metric, metric_plain, readyz,
    sigterm_and_wait, spawn_run, wait_consumed, wait_readyz, Hub, Receiver, SmallDisk,
};
use crate::support::{assert_export_is_replays, generate_fleet, path};

#[test]
fn a_full_disk_pauses_consuming_and_it_resumes_once_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 23, 0.03);
    let hub = Hub::start(&file);
    let disk = SmallDisk::mount(&dir.path().join("small"), 64);
    let port = free_port();
    let (data, config) = disk.service_config(
        dir.path(),
        port,
        "min_free_disk_mib = 16\nshutdown_deadline_secs = 5\n[batching]\nmax_messages = 200\n",
    );

    // Fill the disk to 8 MiB free, below the 16 the service keeps.
    let filler = disk.fill_to(8 << 20);
    let mut service = spawn_run(&hub, &["run", "--config", path(&config)]);

    // Paused: not ready, saying why; nothing committed; consuming stops short.
    let problem = wait_readyz(
        port,
        Duration::from_secs(60),
        "the full disk",
        |status, body| status == 503 && body.contains("disk is full"),
    );
    assert!(problem.contains("consuming is paused"), "{problem}");
    std::thread::sleep(Duration::from_secs(2));
    let before = consumed(port).expect("metrics");
    std::thread::sleep(Duration::from_secs(2));
    let after = consumed(port).expect("metrics");
    assert_eq!(before, after, "it went on consuming with a full disk");
    assert!(
        after < hub.published,
        "it consumed everything with a full disk"
    );
    assert_eq!(committed(port), 0.0, "it committed with a full disk");

    // Space freed: it goes on by itself and catches up.
    std::fs::remove_file(&filler).expect("free the space");
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed(port) < hub.published as f64 {
        assert!(
            Instant::now() < deadline,
            "did not catch up after space was freed: {} of {} committed",
            committed(port),
            hub.published
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = readyz(port).expect("readyz");
    assert_eq!(status, 200, "{body}");
    sigterm_and_wait(&mut service);

    // Nothing lost, nothing applied twice: the snapshot of a replay of the same events.
    assert_export_is_replays(dir.path(), &file, &data, "after the full disk");
}

/// A consumer with a higher owner level (epoch) steals a partition mid-stream: the service
/// counts the displacement, keeps retrying while the other holds it, takes it back when the
/// other leaves, and ends with every event applied once and the snapshot of a replay.
#[test]
fn a_partition_stolen_by_a_higher_owner_level_comes_back_with_no_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 24, 0.03);
    let hub = Hub::publishing("iothub-ehub-stolen", &file, 800.0);
    let total = hub.published;
    let config =
        |name: &str, port: u16, extra: &str| eventhub_config(dir.path(), name, port, extra);
    let port = free_port();
    let ours = config("ours", port, "owner_level = 1");
    let mut service = spawn_run(&hub, &["run", "--config", path(&ours)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumed(port).unwrap_or(0) < 500 {
        assert!(
            Instant::now() < deadline,
            "the service did not start consuming"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The thief: owner level 2 on partition 0.
    let thief_port = free_port();
    let thief = config("thief", thief_port, "owner_level = 2\npartitions = [\"0\"]");
    let mut thief = spawn_run(&hub, &["run", "--config", path(&thief)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(
        port,
        "twinwatch_receiver_displaced_total",
        "partition=\"0\"",
    )
    .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the displacement was not counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // While the thief holds it, partition 0 is not ours, and the service says so.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        metric(port, "twinwatch_partition_connected", "partition=\"0\""),
        Some(0.0)
    );
    let held = consumed(thief_port).expect("the thief's metrics");
    assert!(held > 0, "the thief consumed nothing");
    sigterm_and_wait(&mut thief);

    // The partition comes back: every event counted exactly once, no gap.
    wait_consumed(port, total, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(consumed(port), Some(total), "an event was applied twice");
    sigterm_and_wait(&mut service);
    let ours = dir.path().join("ours");
    assert_export_is_replays(dir.path(), &file, &ours, "after the theft");
}

/// The webhook is down while the service consumes: alerts wait in the outbox (visible in the
/// metrics, delivery failures counted), and once it is up every alert arrives.
#[test]
fn a_webhook_outage_delays_alerts_and_loses_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 25, 0.03);
    let hub = Hub::start(&file);
    let webhook_port = free_port();
    let port = free_port();
    let alerts = dir.path().join("alerts.jsonl");
    let config = config_file(
        &dir.path().join("twinwatch.toml"),
        &dir.path().join("data"),
        port,
        &format!(
            "[alerts]\nfile = {:?}\nwebhook_url = \"http://127.0.0.1:{webhook_port}/alerts\"\nsink_timeout_secs = 2\n",
            path(&alerts)
        ),
    );
    let mut service = spawn_run(&hub, &["run", "--config", path(&config)]);
    wait_consumed(port, hub.published, Duration::from_secs(120));
    // Down: the alerts wait, and the metrics say so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending = metric_plain(port, "twinwatch_outbox_pending_alerts").unwrap_or(0.0);
        let failures =
            metric(port, "twinwatch_sink_failures_total", "sink=\"webhook\"").unwrap_or(0.0);
        if pending > 0.0 && failures >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outage does not show: pending {pending}, failures {failures}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Up again: everything pending is delivered.
    let receiver = Receiver::start(webhook_port);
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric_plain(port, "twinwatch_outbox_pending_alerts") != Some(0.0) {
        assert!(Instant::now() < deadline, "the outbox did not drain");
        std::thread::sleep(Duration::from_millis(200));
    }
    sigterm_and_wait(&mut service);
    let (in_file, _) = crate::support::alerts_by_id(&std::fs::read(&alerts).expect("alerts"));
    let in_file: std::collections::BTreeSet<String> = in_file.into_keys().collect();
    assert!(in_file.len() >= 100, "only {} alerts", in_file.len());
    assert_eq!(
        receiver.ids(),
        in_file,
        "the webhook did not get every alert after the outage"
    );
}
