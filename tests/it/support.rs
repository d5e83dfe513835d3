//! Shared helpers: building storage-route JSON lines from a compact case notation, running
//! the real pipeline into a temporary RocksDB, and reading its outputs back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use twinwatch::pipeline::replay::{replay, ReplayReport};
use twinwatch::pipeline::EngineOptions;
use twinwatch::store::{Store, StoreOptions};
use twinwatch::twin::export_value;

pub const HUB: &str = "hub";

/// Expands one message of a case file into a line of the storage-route JSON encoding.
///
/// Forms: `{"text": "..."}` is the raw line; `{"line": {...}}` the whole line object;
/// otherwise a shorthand `{"op", "device", "module"?, "time"?, "version"?, "body"?,
/// "properties"?, "system"?}` where `version` goes into the body, and `properties` and
/// `system` are merged over the generated ones (a `null` removes a key).
pub fn expand(message: &Value) -> String {
    if let Some(text) = message.get("text").and_then(Value::as_str) {
        return text.to_owned();
    }
    if let Some(line) = message.get("line") {
        return line.to_string();
    }
    let op = message["op"].as_str().unwrap_or("updateTwin");
    let (schema, source) = match op {
        "updateTwin" | "replaceTwin" => ("twinChangeNotification", "twinChangeEvents"),
        _ => ("deviceLifecycleNotification", "deviceLifecycleEvents"),
    };
    let device = message["device"].as_str().unwrap_or("d1");
    let time = message["time"]
        .as_str()
        .unwrap_or("2024-01-01T00:00:00.0000000Z");
    let mut properties = json!({
        "hubName": HUB, "deviceId": device, "opType": op,
        "iothub-message-schema": schema, "operationTimestamp": time,
    });
    let mut system = json!({
        "connectionDeviceId": device, "enqueuedTime": time,
        "contentType": "application/json", "contentEncoding": "utf-8",
        "iothub-message-source": source,
    });
    if let Some(module) = message.get("module").and_then(Value::as_str) {
        properties["moduleId"] = json!(module);
        system["connectionModuleId"] = json!(module);
    }
    let mut body = message.get("body").cloned().unwrap_or_else(|| json!({}));
    if let (Some(version), Some(obj)) = (message.get("version"), body.as_object_mut()) {
        obj.insert("version".into(), version.clone());
    }
    overlay(&mut properties, message.get("properties"));
    overlay(&mut system, message.get("system"));
    let mut line = json!({
        "EnqueuedTimeUtc": time,
        "Properties": properties,
        "SystemProperties": system,
        "Body": body,
    });
    if let Some(extra) = message.get("envelope").and_then(Value::as_object) {
        for (k, v) in extra {
            if v.is_null() {
                line.as_object_mut().expect("object").remove(k);
            } else {
                line[k] = v.clone();
            }
        }
    }
    line.to_string()
}

fn overlay(target: &mut Value, patch: Option<&Value>) {
    let (Some(target), Some(Value::Object(patch))) = (target.as_object_mut(), patch) else {
        return;
    };
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            target.insert(k.clone(), v.clone());
        }
    }
}

/// Writes lines to a file.
pub fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write input");
}

/// Replays files into `data_dir` with the library's pipeline and real RocksDB.
pub fn replay_files(data_dir: &Path, files: &[PathBuf], options: EngineOptions) -> ReplayReport {
    let store = Store::open(data_dir, &StoreOptions::default()).expect("open store");
    let files = twinwatch::source::replay::expand_paths(files).expect("paths");
    replay(Arc::new(store), &files, options).expect("replay")
}

/// Every twin of a data directory in export form.
pub fn export(data_dir: &Path) -> Vec<Value> {
    let store = Store::open_read_only(data_dir).expect("open read-only");
    store
        .twins()
        .expect("iterate")
        .map(|item| {
            let (key, record) = item.expect("twin");
            serde_json::to_value(export_value(key.as_key(), record.version, &record.doc))
                .expect("json")
        })
        .collect()
}

/// Every dead letter of a data directory as `{"record", "reason"}`.
pub fn dead_letters(data_dir: &Path) -> Vec<Value> {
    let store = Store::open_read_only(data_dir).expect("open read-only");
    store
        .dead_letters()
        .expect("iterate")
        .map(|item| {
            let (_, index, record) = item.expect("dead letter");
            json!({"record": index, "reason": record.reason})
        })
        .collect()
}

/// The counts a summary file holds.
pub fn summary(report: &ReplayReport) -> Value {
    let c = &report.counters;
    let dead: Map<String, Value> = c
        .dead_lettered
        .iter()
        .map(|(r, n)| (r.as_str().to_owned(), json!(n)))
        .collect();
    json!({"messages": c.messages, "applied": c.applied, "stale": c.stale, "ignored": c.ignored, "dead_lettered": dead})
}

/// The path of the built binary (cargo builds it for integration tests).
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinwatch"))
}

pub fn data_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(relative)
}

/// Runs `check` on every `.json` file of the data directory `relative` (in name order), and
/// fails naming every file it failed for (`what` the files are: cases, scenarios).
pub fn check_every_file(relative: &str, what: &str, check: impl Fn(&Path) -> Result<(), String>) {
    let dir = data_path(relative);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no {what} in {}", dir.display());
    let failures: Vec<String> = paths
        .iter()
        .filter_map(|p| check(p).err().map(|e| format!("{}:\n{e}", p.display())))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} {what} failed:\n\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n\n")
    );
}

/// Runs the real binary (logs at warn), whatever its exit.
pub fn run(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run twinwatch")
}

/// Runs the real binary and requires success.
pub fn ok(args: &[&str]) -> Output {
    let output = run(args);
    assert!(
        output.status.success(),
        "twinwatch {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `twinwatch seed` into `data` of hub `hub` as of `as_of`, then `more` (the files last).
pub fn seed_args<'a>(data: &'a Path, as_of: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "seed",
        "--data-dir",
        path(data),
        "--hub",
        "hub",
        "--as-of",
        as_of,
    ];
    args.extend_from_slice(more);
    args
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The arguments of a replay of `input` into `data`, alerts into the file `alerts`, with
/// `more` before the input.
pub fn replay_args<'a>(
    data: &'a Path,
    alerts: &'a Path,
    input: &'a Path,
    more: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "replay",
        "--data-dir",
        path(data),
        "--alerts-file",
        path(alerts),
    ];
    args.extend_from_slice(more);
    args.push(path(input));
    args
}

/// The export of `file` replayed into `scratch/replayed`: what a live run of the same events
/// must end with.
pub fn replay_export(scratch: &Path, file: &Path) -> Vec<u8> {
    let replayed = scratch.join("replayed");
    ok(&["replay", "--data-dir", path(&replayed), path(file)]);
    ok(&["export", "--data-dir", path(&replayed)]).stdout
}

/// Requires the export of `data` to be [`replay_export`]'s of `file`: nothing lost, nothing
/// applied twice. `after` says what the run went through, for the message. Returns the export.
pub fn assert_export_is_replays(scratch: &Path, file: &Path, data: &Path, after: &str) -> Vec<u8> {
    let reference = replay_export(scratch, file);
    let live = ok(&["export", "--data-dir", path(data)]).stdout;
    assert!(
        live == reference,
        "the export {after} differs from a replay's"
    );
    live
}

/// The alerts of a file sink's content by id, and how many lines there were; the same id
/// must always carry the same alert.
pub fn alerts_by_id(bytes: &[u8]) -> (BTreeMap<String, Value>, usize) {
    let mut by_id = BTreeMap::new();
    let mut n = 0;
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let alert: Value = serde_json::from_slice(line).expect("alert json");
        let id = alert["id"].as_str().expect("id").to_owned();
        if let Some(previous) = by_id.insert(id.clone(), alert.clone()) {
            assert_eq!(previous, alert, "two different alerts share the id {id}");
        }
        n += 1;
    }
    (by_id, n)
}

/// Checks that the alert file of a run that was killed and restarted holds every alert of an
/// uninterrupted run's file, each id with the same alert (duplicates allowed), and that the
/// uninterrupted run raised at least `at_least` alerts, each once.
pub fn assert_every_alert_delivered(clean: &Path, killed: &Path, at_least: usize) {
    let (expected, n_expected) = alerts_by_id(&std::fs::read(clean).expect("clean alerts"));
    let (delivered, n_delivered) = alerts_by_id(&std::fs::read(killed).expect("killed alerts"));
    assert_eq!(
        n_expected,
        expected.len(),
        "an uninterrupted run delivers each alert once"
    );
    assert!(
        n_expected >= at_least,
        "only {n_expected} alerts: the fleet should raise more"
    );
    assert_same_alerts(&expected, &delivered, "");
    assert!(n_delivered >= n_expected);
}

/// Requires `delivered` to hold every alert of `expected` under the same id, and nothing else;
/// `context` starts the messages.
pub fn assert_same_alerts(
    expected: &BTreeMap<String, Value>,
    delivered: &BTreeMap<String, Value>,
    context: &str,
) {
    let missing: Vec<&String> = expected
        .keys()
        .filter(|id| !delivered.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{context}{} alerts never delivered, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert_eq!(
        expected, delivered,
        "{context}the delivered alerts differ from the uninterrupted run's"
    );
}

/// [`assert_every_alert_delivered`] for two live runs of the built-in baseline: alerts of its
/// rules with `for` are left out of the comparison. The service's clock is one for all
/// partitions, and two live runs (one of them killed and restarted) interleave partitions
/// differently, so whether a failure shorter than its `for` opened and resolved may differ
/// between them (`docs/semantics.md` §9); the violations once the feed is quiet do not, and the
/// tests compare those. Alerts of the other rules depend only on each twin's own events.
pub fn assert_every_live_alert_delivered(clean: &Path, killed: &Path, at_least: usize) {
    let with_for = baseline_rules_with_for();
    assert!(!with_for.is_empty(), "the baseline has no rule with `for`");
    let keep = |path: &Path| live_comparable(&std::fs::read(path).expect("alerts"), &with_for);
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (
        dir.path().join("clean.jsonl"),
        dir.path().join("killed.jsonl"),
    );
    std::fs::write(&a, keep(clean)).expect("write");
    std::fs::write(&b, keep(killed)).expect("write");
    assert_every_alert_delivered(&a, &b, at_least);
}

/// An alert file's lines without the alerts of rules in `skip`, each alert's id replaced by
/// what it says (kind, subject, rule, time): an event's alerts are numbered in the order of
/// its transitions (`<source>#<record>.<n>`), so where one live run resolved a violation of a
/// `for` rule that another never opened, the same alert of another rule of that event has
/// another number.
pub fn live_comparable(bytes: &[u8], skip: &std::collections::BTreeSet<String>) -> Vec<u8> {
    let mut out = Vec::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let mut alert: Value = serde_json::from_slice(line).expect("alert json");
        let rule = alert["data"]["ruleId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if skip.contains(&rule) {
            continue;
        }
        let id = format!(
            "{} {} {} {}",
            alert["type"].as_str().unwrap_or_default(),
            alert["subject"].as_str().unwrap_or_default(),
            rule,
            alert["time"].as_str().unwrap_or_default()
        );
        alert["id"] = Value::String(id);
        out.extend_from_slice(alert.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// The built-in baseline pack's text.
pub fn baseline_text() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/security-twin-baseline.yaml"),
    )
    .expect("the baseline pack")
}

/// The ids of the built-in baseline's rules that have a `for`.
pub fn baseline_rules_with_for() -> std::collections::BTreeSet<String> {
    let text = baseline_text();
    let mut out = std::collections::BTreeSet::new();
    let mut rule = None;
    for line in text.lines() {
        if let Some(id) = line.strip_prefix("  - id: ") {
            rule = Some(id.trim().to_owned());
        } else if line.starts_with("    for:") {
            out.extend(rule.take());
        }
    }
    out
}

/// A generated fleet (`twinwatch generate`, storage-route JSON lines) in `dir/fleet.json`.
pub fn generate_fleet(dir: &Path, devices: u64, events: u64, seed: u64, noise: f64) -> PathBuf {
    let fleet = dir.join("fleet.json");
    generate(
        &fleet,
        devices,
        events,
        seed,
        &["--noise", &noise.to_string()],
    );
    fleet
}

/// `twinwatch generate` of `devices` and `events` from `seed` into `out`, with `more`
/// arguments (`--format twin-documents`, `--as-of-event N`, `--noise X`).
pub fn generate(out: &Path, devices: u64, events: u64, seed: u64, more: &[&str]) {
    let (devices, events, seed) = (devices.to_string(), events.to_string(), seed.to_string());
    let mut args = vec![
        "generate",
        "--devices",
        &devices,
        "--events",
        &events,
        "--seed",
        &seed,
        "--out",
        path(out),
    ];
    args.extend_from_slice(more);
    ok(&args);
}
