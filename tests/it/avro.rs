//! Avro replay through the real binary: fixtures written by another implementation (Python's
//! fastavro, in a virtual environment this test creates), one fleet from three containers, and
//! damaged files reported and skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::support::{ok, path, run};

fn lines(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn summary(file: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(file).expect("summary")).expect("json")
}

/// The arguments of a replay of `input` into `data` writing its summary to `summary`.
fn replay_summarized<'a>(data: &'a Path, summary: &'a Path, input: &'a Path) -> [&'a str; 6] {
    [
        "replay",
        "--data-dir",
        path(data),
        "--summary",
        path(summary),
        path(input),
    ]
}

/// Runs `command` (`what` it is, for the message) and requires success.
fn succeeded(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what} did not run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A virtual environment with fastavro (and cramjam for snappy), made once per target dir.
fn python_with_fastavro() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyvenv-fastavro");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if !ready.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv", path(&venv)])
            .status()
            .expect("python3 -m venv (Debian: python3-venv)");
        assert!(status.success(), "creating the virtual environment failed");
        succeeded(
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "fastavro==1.*",
                "cramjam",
            ]),
            "pip install fastavro",
        );
        std::fs::write(&ready, "").expect("marker");
    }
    python
}

#[test]
fn fixtures_written_by_fastavro_replay_to_the_expected_snapshot() {
    let python = python_with_fastavro();
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = dir.path().join("fixtures");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/write_avro_fixtures.py");
    succeeded(
        Command::new(&python).args([path(&script), path(&fixtures)]),
        "the fixture script",
    );
    let data = dir.path().join("data");
    let summary_file = dir.path().join("summary.json");
    ok(&replay_summarized(&data, &summary_file, &fixtures));
    let export = lines(&ok(&["export", "--data-dir", path(&data)]));
    assert_eq!(
        Value::Array(export),
        json!([
            {"hubName": "contoso-hub", "deviceId": "gw-1", "version": 2, "etag": "AAAAAAAAAAE=",
             "tags": {"env": "prod"}, "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}},
            {"hubName": "contoso-hub", "deviceId": "gw-1", "moduleId": "azureiotsecurity", "version": 4, "tags": {},
             "properties": {"desired": {"$version": 2, "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration":
                                         {"maxMessageSizeInBytes": {"value": 10000}}},
                            "reported": {"$version": 1, "latest": true}}},
            {"hubName": "contoso-hub", "deviceId": "gw-2", "version": 2, "tags": {"env": "prod", "site": "plant-7"},
             "properties": {"desired": {}, "reported": {}}}
        ])
    );
    let s = summary(&summary_file);
    assert_eq!(
        (
            &s["messages"],
            &s["applied"],
            &s["ignored"],
            &s["dead_lettered"],
            &s["files"]
        ),
        (
            &json!(9),
            &json!(6),
            &json!(1),
            &json!({"bad_body": 1, "bad_op_type": 1}),
            &json!(5)
        )
    );
    let dead = lines(&ok(&["deadletters", "--data-dir", path(&data)]));
    assert_eq!(dead.len(), 2);
    assert!(dead[0]["raw"]
        .as_str()
        .expect("raw")
        .contains("\"opType\":\"updateTwin\""));
}

#[test]
fn one_fleet_from_three_containers_gives_the_same_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut results = Vec::new();
    for (format, codec) in [
        ("json", "null"),
        ("capture-avro", "deflate"),
        ("storage-avro", "snappy"),
    ] {
        let fleet = dir.path().join(format!("fleet.{format}"));
        ok(&[
            "generate",
            "--devices",
            "1500",
            "--events",
            "15000",
            "--seed",
            "9",
            "--noise",
            "0.05",
            "--format",
            format,
            "--avro-codec",
            codec,
            "--out",
            path(&fleet),
        ]);
        let data = dir.path().join(format!("data-{format}"));
        let summary_file = dir.path().join(format!("summary-{format}.json"));
        ok(&replay_summarized(&data, &summary_file, &fleet));
        let export = ok(&["export", "--data-dir", path(&data)]).stdout;
        let violations = ok(&["violations", "--data-dir", path(&data)]).stdout;
        let mut s = summary(&summary_file);
        // A line that is not JSON at all has no Avro form (an Avro container holds only
        // records): the JSON run's bad_record lines are the one expected difference.
        let bad_records = s["dead_lettered"]["bad_record"].as_u64().unwrap_or(0);
        if let Some(dead) = s["dead_lettered"].as_object_mut() {
            dead.remove("bad_record");
        }
        s["messages"] = json!(s["messages"].as_u64().expect("messages") - bad_records);
        s.as_object_mut().expect("object").remove("failed_files");
        results.push((format, export, violations, s));
    }
    assert!(
        results[0].1.len() > 10_000,
        "the export should not be empty"
    );
    assert!(!results[0].2.is_empty(), "the fleet should have violations");
    for (format, export, violations, s) in &results[1..] {
        assert!(
            *export == results[0].1,
            "{format}: the export differs from JSON's"
        );
        assert!(
            *violations == results[0].2,
            "{format}: the violations differ from JSON's"
        );
        assert_eq!(
            *s, results[0].3,
            "{format}: the summary differs from JSON's"
        );
    }
}

#[test]
fn damaged_files_are_reported_and_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("input");
    std::fs::create_dir_all(&input).expect("mkdir");
    let good = input.join("a-good.avro");
    ok(&[
        "generate",
        "--devices",
        "300",
        "--events",
        "3000",
        "--seed",
        "4",
        "--format",
        "capture-avro",
        "--out",
        path(&good),
    ]);
    let bytes = std::fs::read(&good).expect("read");
    // Cut in the middle of a block.
    std::fs::write(
        input.join("b-truncated.avro"),
        &bytes[..bytes.len() * 2 / 3],
    )
    .expect("write");
    // Garbage over the middle of the file: a compressed block that no longer inflates.
    let mut corrupt = bytes.clone();
    let middle = corrupt.len() / 2;
    for b in &mut corrupt[middle..middle + 512] {
        *b ^= 0xA5;
    }
    std::fs::write(input.join("c-corrupt.avro"), &corrupt).expect("write");
    let also_good = input.join("d-also-good.json");
    ok(&[
        "generate",
        "--devices",
        "100",
        "--events",
        "500",
        "--seed",
        "5",
        "--out",
        path(&also_good),
    ]);

    let data = dir.path().join("data");
    let summary_file = dir.path().join("summary.json");
    let output = run(&replay_summarized(&data, &summary_file, &input));
    assert_eq!(
        output.status.code(),
        Some(1),
        "unreadable files make the exit code 1"
    );
    let s = summary(&summary_file);
    let failed = s["failed_files"].as_array().expect("failed_files");
    let failed_paths: Vec<&str> = failed
        .iter()
        .map(|f| f["path"].as_str().expect("path"))
        .collect();
    assert_eq!(failed.len(), 2, "{s}");
    assert!(
        failed_paths[0].ends_with("b-truncated.avro")
            && failed_paths[1].ends_with("c-corrupt.avro")
    );
    assert!(failed
        .iter()
        .all(|f| !f["error"].as_str().expect("error").is_empty()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("b-truncated.avro"),
        "the log names the file: {stderr}"
    );

    // Every event of the good files was applied: their snapshots alone match.
    let alone = dir.path().join("alone");
    let only_good = dir.path().join("only-good");
    std::fs::create_dir_all(&only_good).expect("mkdir");
    std::fs::copy(&good, only_good.join("a-good.avro")).expect("copy");
    std::fs::copy(&also_good, only_good.join("d-also-good.json")).expect("copy");
    let alone_summary = dir.path().join("alone.json");
    ok(&replay_summarized(&alone, &alone_summary, &only_good));
    let good_messages = summary(&alone_summary)["messages"]
        .as_u64()
        .expect("messages");
    let all_messages = s["messages"].as_u64().expect("messages");
    assert!(
        all_messages >= good_messages,
        "{all_messages} < {good_messages}"
    );
    let export_all = lines(&ok(&["export", "--data-dir", path(&data)]));
    let export_good = lines(&ok(&["export", "--data-dir", path(&alone)]));
    let d_devices: Vec<&Value> = export_good
        .iter()
        .filter(|t| t["hubName"] == "contoso-hub")
        .collect();
    assert!(!d_devices.is_empty());
    // The damaged files hold the first part of the same fleet as a-good, so every twin of
    // the good files is there, with the good files' last state for the files read last.
    for twin in &export_good {
        assert!(
            export_all
                .iter()
                .any(|t| t["deviceId"] == twin["deviceId"] && t["moduleId"] == twin["moduleId"]),
            "{twin} is missing"
        );
    }
}
