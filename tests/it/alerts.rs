//! Compliance end to end through the real binary: the alert stream of scenario files
//! (`tests/data/alerts/*.json`, snapshot-tested with insta), policy rejection, byte-identical
//! alert files across replays, and at-least-once delivery across SIGKILLs.

use std::path::Path;
use std::process::{Command, Stdio};

use rand::SeedableRng;
use serde_json::Value;

use crate::support::{
    assert_every_alert_delivered, binary, data_path, expand, generate_fleet, ok, path, run,
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
        ok(&[
            "replay",
            "--data-dir",
            path(&data),
            "--alerts-file",
            path(&alerts),
            path(&fleet),
        ]);
        files.push(std::fs::read(&alerts).expect("alerts"));
    }
    assert!(files[0].len() > 1000, "the fleet should raise alerts");
    assert!(
        files[0] == files[1],
        "two replays of the same input wrote different alert files"
    );
}
#[test]
fn a_killed_replay_delivers_every_alert_at_least_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 10_000, 120_000, 11, 0.05);
    let clean_alerts = dir.path().join("clean.jsonl");
    let started = std::time::Instant::now();
    ok(&[
        "replay",
        "--data-dir",
        path(&dir.path().join("clean")),
        "--batch-size",
        "500",
        "--alerts-file",
        path(&clean_alerts),
        path(&fleet),
    ]);
    let whole = started.elapsed();
    let killed_alerts = dir.path().join("killed.jsonl");
    let killed_data = dir.path().join("killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut kills = 0;
    for attempt in 0..8 {
        let mut child = Command::new(binary())
            .args([
                "replay",
                "--data-dir",
                path(&killed_data),
                "--batch-size",
                "500",
                "--alerts-file",
                path(&killed_alerts),
                path(&fleet),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        if attempt == 7 {
            assert!(
                child.wait().expect("wait").success(),
                "the final replay failed"
            );
            break;
        }
        std::thread::sleep(crate::kill::kill_delay(&mut rng, whole));
        if child.try_wait().expect("try_wait").is_none() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            kills += 1;
        }
    }
    assert!(kills >= 3, "only {kills} replays were killed mid-way");
    assert_every_alert_delivered(&clean_alerts, &killed_alerts, 1000);
}
