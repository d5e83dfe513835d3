//! Events that expired from the hub's retention before the service read them (issue 23): the
//! service, down while the emulator's retention dropped events of a partition, resumes past a
//! jump in sequence numbers; the gap is counted, and recorded where `twinwatch deadletters`
//! shows it (reason `expired`, the partition and the sequence range), committed with the
//! checkpoint that moves past it, once.

use std::time::Duration;

use serde_json::Value;
use twinwatch::app::emulator::events_of_file;

use crate::service::{
    free_port, metric, sigterm_and_wait, spawn_service, wait_consumed, Hub, Running,
};
use crate::support::{generate_fleet, ok, path};

#[test]
fn events_expired_while_the_service_was_down_are_dead_letters_of_their_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = generate_fleet(dir.path(), 100, 800, 41, 0.0);
    let hub = Hub::start(&first);
    // The service reads everything there is, and stops.
    let Running {
        mut child,
        data,
        alerts,
        ..
    } = Running::consume(&hub, dir.path(), &[], Duration::from_secs(120));
    child.stop();

    // While it is down, more arrives, and partition 2's retention drops the first 25 of them.
    let emulator = hub.emulator.as_ref().expect("running");
    let partition = 2;
    let before = emulator
        .partition_snapshot(partition)
        .expect("partition")
        .last_enqueued_sequence_number;
    assert!(
        before >= 0,
        "the first fleet left partition {partition} empty"
    );
    let later_dir = dir.path().join("later");
    std::fs::create_dir_all(&later_dir).expect("dir");
    let later = generate_fleet(&later_dir, 100, 800, 42, 0.0);
    let events = events_of_file(&later).expect("events");
    let more = events.len() as u64;
    for event in events {
        emulator.publish(event);
    }
    let after = emulator
        .partition_snapshot(partition)
        .expect("partition")
        .last_enqueued_sequence_number;
    assert!(
        after - before > 25,
        "too few new events on partition {partition}"
    );
    let first_lost = (before + 1) as u64;
    let last_lost = first_lost + 24;
    emulator.expire_before(partition, last_lost + 1);
    assert_eq!(
        emulator
            .partition_snapshot(partition)
            .expect("partition")
            .begin_sequence_number,
        (last_lost + 1) as i64
    );

    // It resumes past the gap: everything else is read, the gap counted.
    let port = free_port();
    let mut child = spawn_service(&hub, &data, &alerts, port);
    wait_consumed(port, more - 25, Duration::from_secs(120));
    assert_eq!(
        metric(port, "twinwatch_events_expired_total", "partition=\"2\""),
        Some(25.0)
    );
    assert_eq!(
        metric(port, "twinwatch_events_expired_total", ""),
        Some(25.0),
        "only partition 2 lost events"
    );
    sigterm_and_wait(&mut child);

    let expired = expired_letters(&data);
    assert_eq!(
        expired,
        vec![serde_json::json!({
            "partition": "2",
            "sequenceNumber": first_lost,
            "reason": "expired",
            "raw": format!(
                "{{\"events\":25,\"firstSequenceNumber\":{first_lost},\"lastSequenceNumber\":{last_lost}}}"
            ),
        })]
    );

    // Run again: the checkpoint is past the gap, so it is not found (or recorded) again.
    let port = free_port();
    let mut child = spawn_service(&hub, &data, &alerts, port);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        metric(port, "twinwatch_events_expired_total", ""),
        Some(0.0)
    );
    sigterm_and_wait(&mut child);
    assert_eq!(expired_letters(&data).len(), 1);
}

/// The dead letters of reason `expired`, as `twinwatch deadletters` prints them.
fn expired_letters(data: &std::path::Path) -> Vec<Value> {
    let out = ok(&["deadletters", "--data-dir", path(data)]).stdout;
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|l| l["reason"] == "expired")
        .collect()
}
