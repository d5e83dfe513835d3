//! The service's quiet clock (`docs/semantics.md` §9, "A quiet feed"), end to end: the real binary
//! consuming the embedded emulator, which publishes a few lifecycle events timed now and then
//! nothing more. With a short `for` and a short `allowed_event_delay_secs`, a device created
//! without its security module opens its alert while the feed is quiet (no event moves the
//! clock past the deadline: the wall clock does), timed at the deadline; a device whose module
//! came within the grace period never alerts.

use std::time::{Duration, Instant};

use serde_json::json;
use twinwatch::time::Ticks;

use crate::service::{metric, Hub, Running};
use crate::support::{alerts_by_id, expand, ok, path, write_lines};

/// The grace period of the test's rule, seconds.
const GRACE_SECS: i64 = 4;
/// The service's allowed event delay, seconds.
const DELAY_SECS: i64 = 1;

#[test]
fn a_quiet_feed_still_opens_a_pending_violation_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "rules:\n  - id: device.security-module-present\n    severity: high\n    for: PT{GRACE_SECS}S\n    check: {{path: /$modules, op: contains_any, value: [azureiotsecurity, DefenderIotMicroAgent]}}\n"
        ),
    )
    .expect("policy");
    ok(&["policy", "check", path(&policy)]);
    let config = dir.path().join("twinwatch.toml");
    std::fs::write(
        &config,
        format!("allowed_event_delay_secs = {DELAY_SECS}\n"),
    )
    .expect("config");

    // Now, to the second: `lonely` is created without its module; `paired` gets its module a
    // second later, well within the grace period. Then the hub publishes nothing more.
    let t0 = Ticks(Ticks::now().0 / 10_000_000 * 10_000_000);
    let at = |secs: i64| Ticks(t0.0 + secs * 10_000_000).to_string();
    let lines = [
        expand(&json!({"op": "createDeviceIdentity", "device": "lonely", "time": at(0)})),
        expand(&json!({"op": "createDeviceIdentity", "device": "paired", "time": at(0)})),
        expand(&json!({
            "op": "createModuleIdentity", "device": "paired", "module": "azureiotsecurity",
            "time": at(1),
        })),
    ];
    let file = dir.path().join("events.json");
    write_lines(&file, &lines);
    let hub = Hub::start(&file);
    assert_eq!(hub.published, 3);

    let mut service = Running::consume(
        &hub,
        dir.path(),
        &[("--config", &config), ("--policy", &policy)],
        Duration::from_secs(60),
    );

    // The alert comes from the wall clock: the deadline t0 + GRACE passes the quiet clock
    // (now - DELAY) at about t0 + GRACE + DELAY.
    let deadline = Instant::now() + Duration::from_secs(30);
    let opened = loop {
        let (by_id, _) = alerts_by_id(&std::fs::read(&service.alerts).unwrap_or_default());
        if let Some(alert) = by_id.into_values().next() {
            break alert;
        }
        assert!(
            Instant::now() < deadline,
            "no alert within 30 s of a quiet feed (pending: {:?})",
            metric(service.port, "twinwatch_pending_violations", "")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let opened_at = Ticks::now();
    assert!(
        opened_at.0 >= t0.0 + (GRACE_SECS + DELAY_SECS) * 10_000_000,
        "opened at {opened_at}, before the quiet clock could reach the deadline"
    );
    assert_eq!(
        opened["type"],
        twinwatch::compliance::wire::OPENED_TYPE,
        "{opened}"
    );
    assert_eq!(
        opened["data"]["ruleId"], "device.security-module-present",
        "{opened}"
    );
    assert!(
        opened["subject"]
            .as_str()
            .is_some_and(|s| s.contains("lonely")),
        "{opened}"
    );
    // Timed at the deadline, not at the wall clock that reached it.
    assert_eq!(opened["time"], at(GRACE_SECS), "{opened}");
    assert_eq!(
        metric(service.port, "twinwatch_pending_violations_total", "opened"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            service.port,
            "twinwatch_pending_violations_total",
            "dropped"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(service.port, "twinwatch_pending_violations", ""),
        Some(0.0)
    );
    service.child.stop();

    // One alert in all: `paired` passed within its grace period; nothing more was consumed.
    let (by_id, n) = alerts_by_id(&std::fs::read(&service.alerts).expect("alerts"));
    assert_eq!((by_id.len(), n), (1, 1), "{by_id:?}");
    let violations =
        String::from_utf8(ok(&["violations", "--data-dir", path(&service.data)]).stdout)
            .expect("utf-8");
    assert_eq!(violations.lines().count(), 1, "{violations}");
    assert!(violations.contains("lonely"), "{violations}");
    assert!(
        ok(&["violations", "--pending", "--data-dir", path(&service.data)])
            .stdout
            .is_empty()
    );
}
