//! Compliance end to end through the real binary: the alert stream of scenario files
//! (`tests/data/alerts/*.json`, snapshot-tested with insta), policy rejection, byte-identical
//! alert files across replays, and at-least-once delivery across SIGKILLs.

use std::path::Path;

use rand::SeedableRng;
use serde_json::Value;

use crate::support::{
    assert_every_alert_delivered, data_path, expand, generate_fleet, ok, path, replay_args, run,
    write_lines,
};
/// Runs one scenario; returns the alert file followed by the violations left at the end.
fn scenario(file: &Path) -> String {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("input.json");
    let lines: Vec<String> = case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(expand)
        .collect();
    write_lines(&input, &lines);
    let data = dir.path().join("data");
    let alerts = dir.path().join("alerts.jsonl");
    let mut args = vec![
        "replay",
        "--data-dir",
        path(&data),
        "--alerts-file",
        path(&alerts),
    ];
    let policy = dir.path().join("policy.yaml");
    if let Some(text) = case["policy"].as_str() {
        std::fs::write(&policy, text).expect("write policy");
        args.extend(["--policy", path(&policy)]);
    }
    args.push(path(&input));
    ok(&args);
    let alerts = std::fs::read_to_string(&alerts).unwrap_or_default();
    let violations = ok(&["violations", "--data-dir", path(&data)]).stdout;
    format!(
        "{alerts}--- violations at the end\n{}",
        String::from_utf8_lossy(&violations)
    )
}

#[test]
fn alert_scenarios() {
    let dir = data_path("alerts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenario directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "scenarios missing in {}", dir.display());
    for file in files {
        let name = file
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        insta::assert_snapshot!(name, scenario(&file));
    }
}

#[test]
fn a_policy_with_a_bad_regex_is_rejected() {
    let policy = data_path("alerts/bad-regex-policy.yaml");
    let output = run(&["policy", "check", path(&policy)]);
    assert_eq!(output.status.code(), Some(2), "policy check must exit 2");
    let report = String::from_utf8_lossy(&output.stdout).replace(path(&policy), "POLICY");
    insta::assert_snapshot!("bad_regex_policy_check", report);

    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("input.json");
    std::fs::write(&input, "").expect("write");
    let data = dir.path().join("data");
    let output = run(&[
        "replay",
        "--data-dir",
        path(&data),
        "--policy",
        path(&policy),
        path(&input),
    ]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "replay must refuse an invalid policy"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("device-id-form"));
    assert!(
        !data.exists(),
        "nothing may be written with an invalid policy"
    );
}

#[test]
fn replaying_twice_gives_byte_identical_alert_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 2_000, 20_000, 11, 0.05);
    let mut files = Vec::new();
    for run in ["a", "b"] {
        let alerts = dir.path().join(format!("{run}.jsonl"));
        let data = dir.path().join(run);
        ok(&replay_args(&data, &alerts, &fleet, &[]));
        files.push(std::fs::read(&alerts).expect("alerts"));
    }
    assert!(files[0].len() > 1000, "the fleet should raise alerts");
    assert!(
        files[0] == files[1],
        "two replays of the same input wrote different alert files"
    );
}
/// An uninterrupted replay of `fleet` into `dir/clean`: its alert file, and how long it took.
fn clean_replay(dir: &Path, fleet: &Path) -> (std::path::PathBuf, std::time::Duration) {
    let alerts = dir.join("clean.jsonl");
    let started = std::time::Instant::now();
    ok(&replay_args(
        &dir.join("clean"),
        &alerts,
        fleet,
        &["--batch-size", "500"],
    ));
    (alerts, started.elapsed())
}

/// The same replay into `dir/killed` (with `more`: the batch size and the sinks), killed `attempts` times at random moments
/// (seeded with `seed`) early in a run that takes `whole`, then run to its end: its alert
/// file, and how many runs were killed.
fn killed_replays(
    dir: &Path,
    fleet: &Path,
    more: &[&str],
    attempts: usize,
    seed: u64,
    whole: std::time::Duration,
) -> (std::path::PathBuf, usize) {
    let alerts = dir.join("killed.jsonl");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let kills = crate::kill::kill_then_finish(
        &replay_args(&dir.join("killed"), &alerts, fleet, more),
        attempts,
        &mut rng,
        whole,
    );
    (alerts, kills)
}

#[test]
fn a_killed_replay_delivers_every_alert_at_least_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 10_000, 120_000, 11, 0.05);
    let (clean_alerts, whole) = clean_replay(dir.path(), &fleet);
    let (killed_alerts, kills) =
        killed_replays(dir.path(), &fleet, &["--batch-size", "500"], 7, 5, whole);
    assert!(kills >= 3, "only {kills} replays were killed mid-way");
    assert_every_alert_delivered(&clean_alerts, &killed_alerts, 1000);
}

/// The ids of the alerts in an alert file, with their rule ids.
fn alerts_of_file(file: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(file)
        .expect("alerts")
        .lines()
        .map(|line| {
            let event = twinwatch::compliance::wire::CloudEvent::parse(line.as_bytes())
                .expect("a CloudEvent");
            (event.id, event.data.rule_id)
        })
        .collect()
}

/// A webhook that refuses one rule's alerts for good (422) while it takes the others: the
/// file sink gets every alert, the webhook every alert but that rule's, and the refused ones
/// are alert dead letters (`deadletters --alerts`), each with the receiver's message. Nothing
/// waits: the replay ends with an empty outbox.
#[test]
fn a_webhook_refusing_one_rule_for_good_holds_back_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 2_000, 20_000, 11, 0.05);
    // Which rules fire: refuse the second most frequent, so that refused alerts are spread
    // among accepted ones.
    let clean = dir.path().join("clean.jsonl");
    ok(&[
        "replay",
        "--data-dir",
        path(&dir.path().join("clean")),
        "--alerts-file",
        path(&clean),
        path(&fleet),
    ]);
    let clean_alerts = alerts_of_file(&clean);
    let mut by_rule = std::collections::BTreeMap::<&str, usize>::new();
    for (_, rule) in &clean_alerts {
        *by_rule.entry(rule.as_str()).or_default() += 1;
    }
    let mut counts: Vec<(usize, &str)> = by_rule.iter().map(|(r, n)| (*n, *r)).collect();
    counts.sort();
    assert!(counts.len() >= 2, "the fleet should break several rules");
    let refused_rule = counts[counts.len() - 2].1.to_owned();

    let port = crate::service::free_port();
    let receiver = crate::service::Receiver::start(port);
    receiver.refuse_rule(&refused_rule);
    let alerts = dir.path().join("alerts.jsonl");
    let data = dir.path().join("data");
    let webhook = format!("http://127.0.0.1:{port}/alerts");
    ok(&replay_args(
        &data,
        &alerts,
        &fleet,
        &[
            "--webhook-url",
            &webhook,
            "--webhook-batch-max-alerts",
            "100",
        ],
    ));
    let delivered = alerts_of_file(&alerts);
    assert_eq!(
        delivered, clean_alerts,
        "the file sink gets every alert, once"
    );
    let expected: std::collections::BTreeSet<String> = clean_alerts
        .iter()
        .filter(|(_, rule)| *rule != refused_rule)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        receiver.stop(),
        expected,
        "the webhook gets every other alert"
    );
    let letters: Vec<Value> =
        String::from_utf8(ok(&["deadletters", "--data-dir", path(&data), "--alerts"]).stdout)
            .expect("UTF-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
            .collect();
    let refused: Vec<String> = clean_alerts
        .iter()
        .filter(|(_, rule)| *rule == refused_rule)
        .map(|(id, _)| id.clone())
        .collect();
    let letter_ids: Vec<String> = letters
        .iter()
        .map(|l| l["alertId"].as_str().expect("an id").to_owned())
        .collect();
    assert_eq!(letter_ids, refused);
    for letter in &letters {
        assert_eq!(letter["sink"], "webhook");
        assert_eq!(letter["status"], 422);
        assert_eq!(letter["message"], "rule not accepted");
        assert_eq!(letter["alert"]["data"]["ruleId"], refused_rule.as_str());
    }
    // The other dead letters (of messages) are untouched by the alerts'.
    let messages = ok(&["deadletters", "--data-dir", path(&data)]).stdout;
    assert!(!String::from_utf8_lossy(&messages).contains("\"alertId\""));
}

/// Killed replays delivering to a file and a webhook: each sink has its own committed
/// cursor, and at-least-once holds at both (every alert reaches each, none is lost).
#[test]
fn killed_replays_deliver_every_alert_to_every_sink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 5_000, 50_000, 13, 0.05);
    let (clean_alerts, whole) = clean_replay(dir.path(), &fleet);
    let port = crate::service::free_port();
    let receiver = crate::service::Receiver::start(port);
    let webhook = format!("http://127.0.0.1:{port}/alerts");
    let (killed_alerts, kills) = killed_replays(
        dir.path(),
        &fleet,
        &[
            "--batch-size",
            "500",
            "--webhook-url",
            &webhook,
            "--webhook-batch-max-alerts",
            "50",
        ],
        5,
        7,
        whole,
    );
    assert!(kills >= 2, "only {kills} replays were killed mid-way");
    assert_every_alert_delivered(&clean_alerts, &killed_alerts, 500);
    let expected: std::collections::BTreeSet<String> = alerts_of_file(&clean_alerts)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let received = receiver.stop();
    let missing: Vec<&String> = expected.difference(&received).collect();
    assert!(
        missing.is_empty(),
        "{} alerts never reached the webhook, e.g. {:?}",
        missing.len(),
        missing.first()
    );
}
