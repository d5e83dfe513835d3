//! The commands of policy changes, seeding and grace periods, through the real binary:
//! `seed` (exit codes, summary, an incomplete pass), `audit` (its counts are what the
//! re-audit then does), `violations --pending`, and the service reloading its policy on
//! SIGHUP (a broken file refused, a changed one re-audited while running).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::service::{metric, metric_plain, readyz, wait_metric, Hub, Running};
use crate::support::{alerts_by_id, baseline_text, generate_fleet, ok, path, run, seed_args};

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

/// The baseline with one rule dropped, one made critical, and one added that every module
/// twin fails.
fn changed_baseline_text() -> String {
    let text = baseline_text()
        .replacen(
            "  - id: device.security-module-present",
            "  - id: device.security-module-present-v2",
            1,
        )
        .replacen("severity: medium", "severity: critical", 1);
    format!(
        "{}\n  - id: module.owner-tagged\n    severity: low\n    target: {{module: \"*\"}}\n    check: {{path: /tags/owner, op: exists}}\n",
        text.trim_end()
    )
}

#[test]
fn seed_exits_0_for_a_complete_pass_1_for_an_incomplete_one_and_2_for_bad_usage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let array = dir.path().join("devices.json");
    write(
        &array,
        r#"[{"deviceId": "d1", "version": 2, "tags": {"a": 1}, "properties": {"desired": {"$metadata": {}, "$version": 1}, "reported": {}}},
            {"deviceId": "d2", "version": 1}, 7]"#,
    );
    let lines = dir.path().join("modules.json");
    write(
        &lines,
        "{\"deviceId\": \"d1\", \"moduleId\": \"azureiotsecurity\", \"version\": 3}\n",
    );
    let summary = dir.path().join("summary.json");
    let output = ok(&seed_args(
        &data,
        "2026-12-01T00:00:00Z",
        &["--summary", path(&summary), path(&array), path(&lines)],
    ));
    let line = String::from_utf8_lossy(&output.stdout);
    assert!(
        line.contains("complete") && line.contains("4 documents"),
        "{line}"
    );
    let summary: Value =
        serde_json::from_slice(&std::fs::read(&summary).expect("summary")).expect("json");
    assert_eq!(summary["complete"], true);
    assert_eq!(summary["applied"], 3);
    assert_eq!(summary["dead_lettered"], json!({"bad_body": 1}));
    let export =
        String::from_utf8(ok(&["export", "--data-dir", path(&data)]).stdout).expect("utf-8");
    assert_eq!(export.lines().count(), 3, "{export}");
    assert!(!export.contains("$metadata") && export.contains("\"$version\":1"));
    // The dead letter is the pass's document 2.
    let letters =
        String::from_utf8(ok(&["deadletters", "--data-dir", path(&data)]).stdout).expect("utf-8");
    assert!(
        letters.contains("seed:hub@2026-12-01T00:00:00.0000000Z")
            && letters.contains("\"index\":2"),
        "{letters}"
    );

    // A file that ends inside a document: what was read is applied, nothing is removed.
    let cut = dir.path().join("cut.json");
    write(
        &cut,
        r#"[{"deviceId": "d1", "version": 5}, {"deviceId": "d9", "vers"#,
    );
    let output = run(&seed_args(
        &data,
        "2026-12-02T00:00:00Z",
        &["--grace", "0", path(&cut)],
    ));
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("INCOMPLETE"));
    let export =
        String::from_utf8(ok(&["export", "--data-dir", path(&data)]).stdout).expect("utf-8");
    assert_eq!(
        export.lines().count(),
        3,
        "an incomplete pass removes nothing"
    );
    assert!(export.contains("\"version\":5"), "what was read is applied");

    // The same with the file whole: d2 and the module are gone (grace 0), d1 and d9 stay.
    let whole = dir.path().join("whole.json");
    write(
        &whole,
        r#"[{"deviceId": "d1", "version": 5}, {"deviceId": "d9", "version": 1}]"#,
    );
    ok(&seed_args(
        &data,
        "2026-12-02T00:00:00Z",
        &["--grace", "0", path(&whole)],
    ));
    let export =
        String::from_utf8(ok(&["export", "--data-dir", path(&data)]).stdout).expect("utf-8");
    let devices: Vec<String> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json")["deviceId"].to_string())
        .collect();
    assert_eq!(devices, ["\"d1\"", "\"d9\""], "{export}");

    for bad in [
        vec![
            "seed",
            "--data-dir",
            path(&data),
            "--as-of",
            "2026-12-01T00:00:00Z",
            path(&whole),
        ],
        vec![
            "seed",
            "--data-dir",
            path(&data),
            "--hub",
            "hub",
            path(&whole),
        ],
        seed_args(&data, "yesterday", &[path(&whole)]),
    ] {
        let output = run(&bad);
        assert_eq!(output.status.code(), Some(2), "{bad:?}: {output:?}");
    }
}

/// Counts a re-audit's alerts by rule: (opened, resolved).
fn policy_alerts_by_rule(alerts: &BTreeMap<String, Value>) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for alert in alerts.values() {
        assert_eq!(alert["data"]["reason"], "policy", "{alert}");
        let entry = out
            .entry(alert["data"]["ruleId"].as_str().expect("rule").to_owned())
            .or_default();
        if alert["type"] == twinwatch::compliance::wire::OPENED_TYPE {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    out
}

#[test]
fn audit_counts_are_what_the_reaudit_then_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 300, 6_000, 7, 0.02);
    let data = dir.path().join("data");
    ok(&["replay", "--data-dir", path(&data), path(&fleet)]);
    let changed = dir.path().join("changed.yaml");
    write(&changed, &changed_baseline_text());

    // What `audit --format json` plans for the changed policy.
    let audit_json = || -> Value {
        let output = ok(&[
            "audit",
            "--data-dir",
            path(&data),
            "--policy",
            path(&changed),
            "--format",
            "json",
        ]);
        serde_json::from_slice(&output.stdout).expect("json")
    };
    let plan = audit_json();
    let table = ok(&[
        "audit",
        "--data-dir",
        path(&data),
        "--policy",
        path(&changed),
    ]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("(removed)"));

    // Replaying the same file again applies nothing: the alerts are the re-audit's.
    let alerts = dir.path().join("alerts.jsonl");
    let replay_changed = || {
        ok(&[
            "replay",
            "--data-dir",
            path(&data),
            "--policy",
            path(&changed),
            "--alerts-file",
            path(&alerts),
            path(&fleet),
        ])
    };
    replay_changed();
    let (by_id, n) = alerts_by_id(&std::fs::read(&alerts).expect("alerts"));
    assert_eq!(n, by_id.len());
    let done = policy_alerts_by_rule(&by_id);
    let mut planned = BTreeMap::new();
    for rule in plan["rules"].as_array().expect("rules") {
        let counts = (
            rule["toOpen"].as_u64().expect("toOpen"),
            rule["toResolve"].as_u64().expect("toResolve"),
        );
        if counts != (0, 0) {
            planned.insert(rule["ruleId"].as_str().expect("id").to_owned(), counts);
        }
    }
    assert!(
        planned.len() >= 2,
        "the change should touch several rules: {planned:?}"
    );
    // The renamed rule keeps the baseline's `for`: its failures are new, pending from the
    // clock on (§9), so the audit plans no alert for them, and the re-audit raised none.
    let renamed = plan["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["ruleId"] == "device.security-module-present-v2")
        .expect("the renamed rule's plan");
    assert!(renamed["failingAfter"].as_u64() > Some(0), "{renamed}");
    assert_eq!(renamed["toOpen"], 0, "{renamed}");
    assert_eq!(
        done, planned,
        "audit said one thing, the re-audit did another"
    );

    // The failing counts after the re-audit, open and pending (§9), are the plan's
    // `failingAfter`.
    let mut violations =
        String::from_utf8(ok(&["violations", "--data-dir", path(&data)]).stdout).expect("utf-8");
    violations.push_str(
        &String::from_utf8(ok(&["violations", "--pending", "--data-dir", path(&data)]).stdout)
            .expect("utf-8"),
    );
    let mut failing: BTreeMap<String, u64> = BTreeMap::new();
    for line in violations.lines() {
        let v: Value = serde_json::from_str(line).expect("json");
        *failing
            .entry(v["ruleId"].as_str().expect("rule").to_owned())
            .or_default() += 1;
    }
    for rule in plan["rules"].as_array().expect("rules") {
        let id = rule["ruleId"].as_str().expect("id");
        assert_eq!(
            failing.get(id).copied().unwrap_or(0),
            rule["failingAfter"].as_u64().expect("after"),
            "{id}"
        );
    }
    // Now it is the snapshot's policy: nothing would change, and nothing does.
    let again = audit_json();
    assert!(again["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .all(|r| r["toOpen"] == 0 && r["toResolve"] == 0));
    let before = std::fs::read(&alerts).expect("alerts").len();
    replay_changed();
    assert_eq!(std::fs::read(&alerts).expect("alerts").len(), before);

    // A policy that does not load: exit 2, nothing changed.
    let broken = dir.path().join("broken.yaml");
    write(
        &broken,
        "rules:\n  - {id: x, severity: loud, check: {path: /a, op: exists}}\n",
    );
    assert_eq!(
        run(&[
            "audit",
            "--data-dir",
            path(&data),
            "--policy",
            path(&broken)
        ])
        .status
        .code(),
        Some(2)
    );
}

#[test]
fn violations_pending_lists_the_deadlines_of_rules_with_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 200, 3_000, 3, 0.0);
    let policy = dir.path().join("slow.yaml");
    write(
        &policy,
        "rules:\n  - {id: owner-tagged, severity: low, for: P3650D, check: {path: /tags/owner, op: exists}}\n",
    );
    let data = dir.path().join("data");
    ok(&[
        "replay",
        "--data-dir",
        path(&data),
        "--policy",
        path(&policy),
        path(&fleet),
    ]);
    let open = ok(&["violations", "--data-dir", path(&data)]).stdout;
    assert!(open.is_empty(), "nothing lasted ten years");
    let pending =
        String::from_utf8(ok(&["violations", "--data-dir", path(&data), "--pending"]).stdout)
            .expect("utf-8");
    assert!(pending.lines().count() >= 100, "{pending}");
    for line in pending.lines() {
        let v: Value = serde_json::from_str(line).expect("json");
        assert!(v["deadline"]
            .as_str()
            .is_some_and(|d| d > v["since"].as_str().unwrap_or("")));
    }
}

fn sighup(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
}

#[test]
fn sighup_refuses_a_broken_policy_and_reaudits_with_a_changed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 300, 5_000, 11, 0.0);
    let hub = Hub::start(&fleet);
    let policy = dir.path().join("policy.yaml");
    write(&policy, &baseline_text());
    let Running {
        mut child,
        data,
        alerts,
        port,
    } = Running::consume(
        &hub,
        dir.path(),
        &[("--policy", &policy)],
        Duration::from_secs(120),
    );

    write(
        &policy,
        "rules:\n  - {id: x, severity: loud, check: {path: /a, op: exists}}\n",
    );
    sighup(child.child());
    wait_metric(
        port,
        "twinwatch_policy_reloads_total",
        "outcome=\"rejected\"",
        1.0,
        Duration::from_secs(60),
    );
    assert_eq!(
        readyz(port).map(|(status, _)| status),
        Some(200),
        "still ready"
    );
    assert_eq!(
        metric(
            port,
            "twinwatch_policy_reloads_total",
            "outcome=\"applied\""
        ),
        Some(0.0)
    );

    write(&policy, &changed_baseline_text());
    sighup(child.child());
    wait_metric(
        port,
        "twinwatch_policy_reloads_total",
        "outcome=\"applied\"",
        1.0,
        Duration::from_secs(60),
    );
    let twins = metric_plain(port, "twinwatch_reaudit_twins_total").unwrap_or(0.0);
    assert!(twins >= 300.0, "every twin is re-audited: {twins}");
    // The alerts of the re-audit reach the sink.
    wait_policy_alerts(&alerts);
    child.stop();
    // The snapshot now has the changed policy's violations: a replay of the same events
    // under it from scratch gives the same set, open and pending together. Which of them are
    // open differs (§9): the replay's clock is at its last event, the service's followed the
    // wall clock once caught up, opening what was pending before the reload, while the
    // failures the re-audit found new are pending for their whole `for` from the reload on.
    let replayed = dir.path().join("replayed");
    ok(&[
        "replay",
        "--data-dir",
        path(&replayed),
        "--policy",
        path(&policy),
        path(&fleet),
    ]);
    let mut live = ok(&["violations", "--data-dir", path(&data)]).stdout;
    live.extend(ok(&["violations", "--pending", "--data-dir", path(&data)]).stdout);
    let mut fresh = ok(&["violations", "--data-dir", path(&replayed)]).stdout;
    fresh.extend(ok(&["violations", "--pending", "--data-dir", path(&replayed)]).stdout);
    let mut fresh = rules_and_twins(&fresh);
    fresh.sort();
    let mut live = rules_and_twins(&live);
    live.sort();
    assert_eq!(
        live, fresh,
        "the re-audited violations are the changed policy's"
    );
}

/// The alerts delivered to the file `alerts` by id, once a re-audit's are among them.
fn wait_policy_alerts(alerts: &Path) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (by_id, _) = alerts_by_id(&std::fs::read(alerts).unwrap_or_default());
        if by_id.values().any(|a| a["data"]["reason"] == "policy") {
            return by_id;
        }
        assert!(Instant::now() < deadline, "no re-audit alert delivered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A re-audit's alerts were caused by no event: they carry no `enqueuedtime`, not even the
/// last applied event's. (Without rules with `for`, nothing else clears that time between
/// the last event and the reload.)
#[test]
fn a_reaudit_in_the_service_carries_no_enqueued_time() {
    let without_for = |text: String| {
        text.lines()
            .filter(|line| !line.trim_start().starts_with("for:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 200, 2_000, 12, 0.0);
    let hub = Hub::start(&fleet);
    let policy = dir.path().join("policy.yaml");
    write(&policy, &without_for(baseline_text()));
    let Running {
        mut child, alerts, ..
    } = Running::consume(
        &hub,
        dir.path(),
        &[("--policy", &policy)],
        Duration::from_secs(120),
    );
    write(&policy, &without_for(changed_baseline_text()));
    sighup(child.child());
    let by_id = wait_policy_alerts(&alerts);
    child.stop();
    assert!(
        by_id.values().any(|a| a.get("enqueuedtime").is_some()),
        "the events' alerts carry their enqueued time"
    );
    for alert in by_id.values().filter(|a| a["data"]["reason"] == "policy") {
        assert!(alert.get("enqueuedtime").is_none(), "{alert}");
    }
}

/// The (twin, rule) pairs of `violations` output, without `since` and versions (a re-audit
/// dates a new violation at the high-water mark, a replay at the event).
fn rules_and_twins(output: &[u8]) -> Vec<(String, String, String)> {
    String::from_utf8_lossy(output)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            (
                v["deviceId"].to_string(),
                v["moduleId"].to_string(),
                v["ruleId"].to_string(),
            )
        })
        .collect()
}
