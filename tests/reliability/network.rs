//! Network faults: one `twinwatch run` consumes a stream the emulator publishes at a steady
//! rate while a seeded schedule injects, in turn, TCP connections dropped with no AMQP close,
//! links detached by the service (`amqp:link:detach-forced`), `com.microsoft:server-busy`,
//! and a partition stolen by a consumer with a higher owner level (a second `twinwatch run`)
//! that later lets it go; all of it while the service is a slow consumer (`FAILPOINTS` makes
//! its apply thread sleep at every batch, so the receivers' prefetch fills and link credit
//! must hold the emulator back).
//!
//! The one process must count every event exactly once (no gap, no double application) and
//! end with the snapshot of a replay.

use std::process::Child;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::report;
use crate::service::{
    consumed, eventhub_config, free_port, metric, sigterm_and_wait, spawn_run_with, wait_consumed,
    Hub,
};
use crate::support::{assert_export_is_replays, generate_fleet, path};

/// `twinwatch run --config FILE` against `hub`, with `failpoints` armed.
fn spawn(hub: &Hub, config: &std::path::Path, failpoints: &str) -> Child {
    spawn_run_with(
        hub,
        &["run", "--config", path(config)],
        &[("FAILPOINTS", failpoints)],
    )
}

#[test]
fn network_fault_campaign() {
    let scale = report::scale();
    let mut rng = ChaCha8Rng::seed_from_u64(report::seed(20_261_128));
    let dir = tempfile::tempdir().expect("tempdir");
    let faults_wanted = scale.pick(24, 9);
    // About 1.5 s between faults at 2,000 events/s: the stream outlasts the schedule.
    let file = generate_fleet(dir.path(), 2000, faults_wanted * 4000, 36, 0.03);
    let hub = Hub::publishing("iothub-ehub-network", &file, 2000.0);
    let total = hub.published;
    let config =
        |name: &str, port: u16, extra: &str| eventhub_config(dir.path(), name, port, extra);
    let port = free_port();
    let ours = config("ours", port, "owner_level = 1");
    // The slow consumer: 30 ms asleep at every batch handed to the writer.
    let mut service = spawn(&hub, &ours, "apply.before_handoff=sleep(30)");

    let kinds = [
        "dropped-connection",
        "detach-forced",
        "server-busy",
        "stolen",
    ];
    let mut injected = std::collections::BTreeMap::<&str, u64>::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut n = 0;
    while n < faults_wanted {
        assert!(Instant::now() < deadline, "the schedule did not finish");
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        if consumed(port).unwrap_or(0) == 0 {
            continue;
        }
        let kind = kinds[n as usize % kinds.len()];
        let emulator = hub.emulator.as_ref().expect("running");
        let partition = rng.gen_range(0..4u32);
        match kind {
            "dropped-connection" => {
                if emulator.drop_connections() == 0 {
                    continue;
                }
            }
            "detach-forced" | "server-busy" => {
                let condition = if kind == "server-busy" {
                    "com.microsoft:server-busy"
                } else {
                    "amqp:link:detach-forced"
                };
                let target = rng.gen_bool(0.5).then_some(partition);
                if emulator.detach_receivers(target, condition, "injected by the campaign") == 0 {
                    continue;
                }
            }
            _ => {
                // A consumer with a higher owner level takes one partition for a while.
                let displaced = |p: u32| {
                    metric(
                        port,
                        "twinwatch_receiver_displaced_total",
                        &format!("partition=\"{p}\""),
                    )
                    .unwrap_or(0.0)
                };
                let before = displaced(partition);
                let thief_port = free_port();
                let thief = config(
                    &format!("thief-{n}"),
                    thief_port,
                    &format!("owner_level = 2\npartitions = [\"{partition}\"]"),
                );
                let mut thief = spawn(&hub, &thief, "");
                let until = Instant::now() + Duration::from_secs(60);
                while displaced(partition) <= before {
                    assert!(Instant::now() < until, "the displacement was not counted");
                    std::thread::sleep(Duration::from_millis(100));
                }
                std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
                sigterm_and_wait(&mut thief);
            }
        }
        *injected.entry(kind).or_default() += 1;
        n += 1;
    }

    // Caught up: exactly every event, and it stays there.
    wait_consumed(port, total, Duration::from_secs(300));
    std::thread::sleep(Duration::from_secs(3));
    let counted = consumed(port).expect("metrics");
    assert_eq!(counted, total, "an event was counted twice (or lost)");
    sigterm_and_wait(&mut service);

    let ours = dir.path().join("ours");
    assert_export_is_replays(dir.path(), &file, &ours, &format!("after {n} faults"));
    let mut figures = vec![
        ("faults", n),
        ("events", total),
        ("lost", total.saturating_sub(counted)),
        ("doubled", counted.saturating_sub(total)),
        ("slow_consumer_ms_per_batch", 30),
    ];
    for (kind, count) in &injected {
        figures.push((kind, *count));
    }
    report::record("network-faults", &figures);
}
