//! The service end to end over loopback: `twinwatch run` (the real binary, Microsoft's Rust
//! client) consuming the embedded emulator with 4 partitions ends with the same export and
//! violations as `replay` of the same file, stops cleanly on SIGTERM, and, killed with
//! SIGKILL several times while consuming, ends with the same snapshot and every alert
//! delivered at least once.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::service::{
    consumed, free_port, sigterm_and_wait, spawn_service, wait_consumed, wait_quiet_clock,
    wait_ready, wait_readyz, Hub,
};
use crate::support::{
    assert_every_live_alert_delivered, assert_export_is_replays, generate_fleet, ok, path,
};

#[test]
fn the_service_ends_with_the_snapshot_of_a_replay_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 21, 0.03);
    let hub = Hub::start(&file);
    let data = dir.path().join("live");
    let port = free_port();
    let mut child = spawn_service(&hub, &data, &dir.path().join("alerts.jsonl"), port);
    wait_consumed(port, hub.published, Duration::from_secs(180));
    wait_quiet_clock(port, Duration::from_secs(60));
    sigterm_and_wait(&mut child);

    let live_export = assert_export_is_replays(dir.path(), &file, &data, "of the live run");
    assert!(live_export.len() > 10_000);
    let replayed = dir.path().join("replayed");
    // The replay ends with the clock at its last event: failures of `for` rules younger than
    // their grace period are pending. The live service's clock followed the wall clock once
    // caught up (`docs/semantics.md` §9), long past every deadline: each of them opened, with the
    // same `since` and version, and none is pending.
    let live_violations = violation_lines(&data, false);
    let replay_pending = violation_lines(&replayed, true);
    assert!(
        !replay_pending.is_empty(),
        "the baseline's grace periods left nothing pending"
    );
    let mut expected = violation_lines(&replayed, false);
    expected.extend(replay_pending);
    assert!(!live_violations.is_empty());
    assert!(
        live_violations == expected,
        "the live violations are not the replay's open and pending ones"
    );
    assert!(violation_lines(&data, true).is_empty());
}
#[test]
fn killed_while_consuming_it_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 21, 0.03);
    let hub = Hub::start(&file);

    // The uninterrupted reference run.
    let clean = dir.path().join("clean");
    let clean_alerts = dir.path().join("clean.jsonl");
    let port = free_port();
    let started = Instant::now();
    let mut child = spawn_service(&hub, &clean, &clean_alerts, port);
    wait_consumed(port, hub.published, Duration::from_secs(180));
    let whole = started.elapsed();
    wait_quiet_clock(port, Duration::from_secs(60));
    sigterm_and_wait(&mut child);

    // The same hub (a new consumer starts from the earliest event), killed along the way.
    let killed = dir.path().join("killed");
    let killed_alerts = dir.path().join("killed.jsonl");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let mut kills = 0;
    for _ in 0..3 {
        let port = free_port();
        let mut child = spawn_service(&hub, &killed, &killed_alerts, port);
        let pause = whole
            .mul_f64(rng.gen_range(0.1..0.3))
            .max(Duration::from_millis(300));
        std::thread::sleep(pause);
        if child.try_wait().expect("try_wait").is_none() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            kills += 1;
        }
    }
    assert!(kills >= 2, "only {kills} kills while consuming");
    let port = free_port();
    let mut child = spawn_service(&hub, &killed, &killed_alerts, port);
    // After restarts, this process counts only what it consumed itself: wait until the
    // snapshot's checkpoints reach every partition's end, seen as a quiet counter.
    let mut last = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = consumed(port).unwrap_or(0);
        if now == last && now > 0 {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "the last run did not settle");
    }
    wait_quiet_clock(port, Duration::from_secs(60));
    sigterm_and_wait(&mut child);

    let a = ok(&["export", "--data-dir", path(&clean)]).stdout;
    let b = ok(&["export", "--data-dir", path(&killed)]).stdout;
    assert!(
        a == b,
        "the export after {kills} kills differs from the uninterrupted run's"
    );
    let a = ok(&["violations", "--data-dir", path(&clean)]).stdout;
    let b = ok(&["violations", "--data-dir", path(&killed)]).stdout;
    assert!(a == b, "the violations after {kills} kills differ");
    assert_every_live_alert_delivered(&clean_alerts, &killed_alerts, 100);
}

#[test]
fn dropped_connections_and_links_mid_stream_leave_no_gap_and_no_double_application() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 21, 0.03);
    let hub = Hub::publishing("iothub-ehub-faults", &file, 1500.0);
    let total = hub.published;
    let data = dir.path().join("live");
    let port = free_port();
    let mut child = spawn_service(&hub, &data, &dir.path().join("alerts.jsonl"), port);
    // Along the way, in turn: every TCP connection dropped with no AMQP close, and every
    // receiver detached as the service does when it moves a partition or is busy.
    let conditions = [
        None,
        Some("amqp:link:detach-forced"),
        Some("com.microsoft:server-busy"),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut faults = 0;
    while consumed(port).unwrap_or(0) < total {
        assert!(Instant::now() < deadline, "the service did not catch up");
        std::thread::sleep(Duration::from_millis(700));
        if faults < 6 && consumed(port).unwrap_or(0) > 0 {
            let emulator = hub.emulator.as_ref().expect("running");
            let told = match conditions[faults % conditions.len()] {
                None => emulator.drop_connections(),
                Some(condition) => {
                    emulator.detach_receivers(None, condition, "injected by the test")
                }
            };
            if told > 0 {
                faults += 1;
            }
        }
    }
    // Let any re-delivery arrive: the count must stay exactly at the number published.
    std::thread::sleep(Duration::from_secs(2));
    let n = consumed(port).expect("metrics");
    assert!(faults >= 3, "only {faults} faults were injected");
    // Microsoft's client re-attaches a detached link by itself (its own recovery), so the
    // service's reconnect counter may stay at 0: what matters is that each message counts
    // once and the snapshot has no gap.
    assert_eq!(
        n, total,
        "each message must be counted (applied, stale, ignored or dead-lettered) exactly once"
    );
    sigterm_and_wait(&mut child);

    assert_export_is_replays(
        dir.path(),
        &file,
        &data,
        &format!("after {faults} dropped connections and links"),
    );
}

#[test]
fn refused_credentials_are_reported_and_make_readyz_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 21, 0.03);
    let hub = Hub::start(&file);
    hub.emulator.as_ref().expect("running").refuse_tokens(true);
    let data = dir.path().join("live");
    let port = free_port();
    let mut child = spawn_service(&hub, &data, &dir.path().join("alerts.jsonl"), port);
    // Not the initial "connecting": the client's refusal, in its own words.
    let body = wait_readyz(
        port,
        Duration::from_secs(60),
        "the refused credentials",
        |status, body| {
            status == 503
                && body.contains("not connected")
                && body.to_lowercase().contains("authoriz")
        },
    );
    assert!(
        !body.contains("SAS_KEY_VALUE"),
        "the key leaked into /readyz: {body}"
    );
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the service must keep running"
    );
    assert_eq!(
        consumed(port),
        Some(0),
        "nothing may be applied without authorization"
    );
    // Credentials fixed on the hub's side: the service connects and consumes everything.
    hub.emulator.as_ref().expect("running").refuse_tokens(false);
    wait_consumed(port, hub.published, Duration::from_secs(120));
    // /readyz recovers.
    wait_ready(port, Duration::from_secs(30));
    sigterm_and_wait(&mut child);
}

/// `twinwatch violations [--pending]` as a set of lines, without the pending ones' deadline.
fn violation_lines(data: &std::path::Path, pending: bool) -> std::collections::BTreeSet<String> {
    let mut args = vec!["violations", "--data-dir", path(data)];
    if pending {
        args.push("--pending");
    }
    String::from_utf8(ok(&args).stdout)
        .expect("utf-8")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json");
            if let Some(o) = v.as_object_mut() {
                o.remove("deadline");
            }
            v.to_string()
        })
        .collect()
}
