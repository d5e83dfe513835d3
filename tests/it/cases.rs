//! Data-driven cases: `tests/data/apply/*.json` (every row of the apply table) and
//! `tests/data/decode/*.json` (classification and every dead-letter reason), each run through
//! the real pipeline into RocksDB.
//!
//! A case file: `{"description", "options"?: {"max_body_bytes"}, "messages": [...],
//! "expect": {"export"?, "summary"?, "deadletters"?}}`; see `support::expand` for the
//! message notation. Only the expectations a case gives are checked.

use serde_json::Value;
use twinwatch::pipeline::EngineOptions;

use crate::support::{
    check_every_file, dead_letters, expand, export, replay_files, summary, write_lines,
};

/// Runs one case file; returns what differs.
fn check(path: &std::path::Path) -> Result<(), String> {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| e.to_string())?)
            .map_err(|e| format!("case file: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let input = dir.path().join("input.json");
    let lines: Vec<String> = case["messages"]
        .as_array()
        .ok_or("no messages")?
        .iter()
        .map(expand)
        .collect();
    write_lines(&input, &lines);
    let mut options = EngineOptions::default();
    if let Some(limit) = case["options"]["max_body_bytes"].as_u64() {
        options.max_body_bytes = limit as usize;
    }
    let data_dir = dir.path().join("data");
    let report = replay_files(&data_dir, &[input], options);
    let expect = &case["expect"];
    let mut problems = Vec::new();
    if let Some(expected) = expect.get("export") {
        let actual = Value::Array(export(&data_dir));
        if &actual != expected {
            problems.push(format!(
                "export:\n  expected {expected}\n  actual   {actual}"
            ));
        }
    }
    if let Some(expected) = expect.get("summary") {
        let actual = summary(&report);
        for (key, value) in expected.as_object().ok_or("summary is not an object")? {
            if actual.get(key) != Some(value) {
                problems.push(format!(
                    "summary.{key}: expected {value}, actual {}",
                    actual.get(key).unwrap_or(&Value::Null)
                ));
            }
        }
    }
    if let Some(expected) = expect.get("deadletters") {
        let actual = Value::Array(dead_letters(&data_dir));
        if &actual != expected {
            problems.push(format!(
                "deadletters:\n  expected {expected}\n  actual   {actual}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn run_dir(relative: &str) {
    check_every_file(relative, "cases", check);
}

#[test]
fn apply_cases() {
    run_dir("apply");
}

#[test]
fn decode_cases() {
    run_dir("decode");
}
