//! `twinwatch seed` from files, through the real binary: the documents are read, split and
//! parsed on a reader thread while the apply thread applies them, in blocks. Whatever the
//! blocks, every document is applied once, in order and numbered in order (dead letters keep
//! their document number), and a file that cannot be read whole makes the pass incomplete
//! (exit 1, the reason printed) after the documents before the fault.

use std::path::Path;

use serde_json::Value;

use crate::support::{dead_letters, export, ok, path, run, seed_args};

/// `n` device documents, one a line (about 2.5 MB for 30,000: several of the reader's
/// blocks), with a malformed document at every position in `bad`.
fn documents(n: usize, bad: &[usize]) -> String {
    let mut text = String::new();
    for i in 0..n {
        if bad.contains(&i) {
            text.push_str("{\"deviceId\": 7, \"version\": 1}\n");
        } else {
            text.push_str(&format!(
                "{{\"deviceId\":\"dev-{i:06}\",\"version\":{},\"tags\":{{\"note\":\"\\\"quoted\\\" [{i}]\"}},\"properties\":{{\"desired\":{{}},\"reported\":{{\"n\":{i}}}}}}}\n",
                i + 1
            ));
        }
    }
    text
}

fn seed(data: &Path, summary: &Path, files: &[&Path]) -> std::process::Output {
    let mut more = vec!["--summary", path(summary)];
    more.extend(files.iter().map(|f| path(f)));
    run(&seed_args(data, "2030-01-01T00:00:00Z", &more))
}

fn read_summary(summary: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(summary).expect("summary")).expect("json")
}

/// The device ids of the snapshot, in key order.
fn devices(data: &Path) -> Vec<String> {
    export(data)
        .iter()
        .map(|twin| twin["deviceId"].as_str().expect("deviceId").to_owned())
        .collect()
}

#[test]
fn every_document_is_applied_once_and_numbered_in_order_across_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = [0, 4_095, 4_096, 12_345, 29_999];
    let first = dir.path().join("first.json");
    std::fs::write(&first, documents(30_000, &bad)).expect("write");
    // The second file is an array: its documents number on after the first file's.
    let second = dir.path().join("second.json");
    std::fs::write(
        &second,
        "[{\"deviceId\":\"zz\",\"version\":1}, \"not a twin\"]",
    )
    .expect("write");
    let (data, summary) = (dir.path().join("data"), dir.path().join("summary.json"));
    let output = seed(&data, &summary, &[&first, &second]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let summary = read_summary(&summary);
    assert_eq!(summary["documents"], 30_002);
    assert_eq!(summary["applied"], 30_000 - bad.len() + 1);
    assert_eq!(summary["dead_lettered"]["missing_device_id"], bad.len());
    assert_eq!(summary["dead_lettered"]["bad_body"], 1);
    let records: Vec<u64> = dead_letters(&data)
        .iter()
        .map(|letter| letter["record"].as_u64().expect("record"))
        .collect();
    assert_eq!(records, [0, 4_095, 4_096, 12_345, 29_999, 30_001]);
    let devices = devices(&data);
    assert_eq!(devices.len(), 30_000 - bad.len() + 1);
    assert_eq!(devices.last().map(String::as_str), Some("zz"));
}

#[test]
fn a_file_that_cannot_be_read_whole_ends_the_pass_after_what_came_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = documents(30_000, &[]);
    // A file cut inside its last document: the 30,000 before it are applied, once.
    let cut = dir.path().join("cut.json");
    std::fs::write(&cut, format!("{text}{{\"deviceId\":\"dev-x\",\"vers")).expect("write");
    let whole = dir.path().join("whole.json");
    std::fs::write(&whole, "{\"deviceId\":\"after\",\"version\":1}\n").expect("write");
    let (data, summary) = (dir.path().join("data"), dir.path().join("summary.json"));
    let output = seed(&data, &summary, &[&cut, &whole]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("INCOMPLETE")
            && stdout.contains("cut.json: the input ends inside document 30000"),
        "{stdout}"
    );
    let report = read_summary(&summary);
    assert_eq!(report["complete"], false);
    assert_eq!(report["documents"], 30_000);
    assert_eq!(report["applied"], 30_000);
    let expected: Vec<String> = (0..30_000).map(|i| format!("dev-{i:06}")).collect();
    assert_eq!(
        devices(&data),
        expected,
        "each document once; none of the next file"
    );

    // A file that is not there: the files before it are applied, none after it.
    let missing = dir.path().join("missing.json");
    let (data, summary) = (dir.path().join("data2"), dir.path().join("summary2.json"));
    let output = seed(&data, &summary, &[&whole, &missing, &whole]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("INCOMPLETE") && stdout.contains("missing.json: No such file"),
        "{stdout}"
    );
    assert_eq!(read_summary(&summary)["documents"], 1);
    assert_eq!(devices(&data), ["after"]);

    // A directory cannot be read as a file either.
    let (data, summary) = (dir.path().join("data3"), dir.path().join("summary3.json"));
    let output = seed(&data, &summary, &[dir.path()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("INCOMPLETE"));
    assert_eq!(read_summary(&summary)["documents"], 0);
    // The same data directory takes a whole pass afterwards.
    ok(&[
        "seed",
        "--data-dir",
        path(&data),
        "--hub",
        "hub",
        "--as-of",
        "2030-01-01T00:00:00Z",
        path(&whole),
    ]);
    assert_eq!(devices(&data), ["after"]);
}
