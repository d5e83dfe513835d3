//! Data-driven scenarios across commands: `tests/data/scenarios/*.json`. Each runs steps in
//! order against one data directory through the library's engine and real RocksDB: events
//! (storage-route JSON lines, as a replay), seed passes of twin documents, and policy changes
//! (which re-audit when the next engine opens), then checks what the case expects: the
//! export, the open and pending violations, the alerts (from the outbox, in order) and the
//! dead letters. Each case states the contract rule it covers (`description`).
//!
//! A case: `{"description", "policy"?: YAML, "steps": [step, ...], "expect": {...}}`, where a
//! step is `{"events": [message, ...]}` (the notation of `support::expand`),
//! `{"seed": {"hub", "as_of", "documents": [document | {"text": raw} | {"events": [message,
//! ...]}], "grace"?: seconds, "reconcile"?: bool, "complete"?: bool, "events_while_evaluating"?:
//! [message, ...]}}` or `{"policy": YAML}`. Events inside a pass are applied through the same
//! engine between its documents (source `live`), as the service applies its feed while a pass
//! is open; `events_while_evaluating` between the first and the next batch of the pass's
//! evaluation. Expected alerts are
//! compared on the fields each expected object gives, from `id`, `type` (`opened` or
//! `resolved`), `subject`, `time`, `ruleId`, `severity`, `twinVersion`, `reason`.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use twinwatch::model::SourceId;
use twinwatch::pipeline::{Engine, EngineOptions, PassEnd, SourceHandle};
use twinwatch::policy::Policy;
use twinwatch::store::{Store, StoreOptions};
use twinwatch::time::Ticks;

use crate::support::{check_every_file, dead_letters, expand, export, replay_files, write_lines};

fn policy(text: Option<&str>) -> Result<Arc<Policy>, String> {
    let text = text.unwrap_or("rules: []");
    Policy::from_sources(&[("case.yaml".into(), text.into())])
        .map(Arc::new)
        .map_err(|e| format!("policy: {e}"))
}

fn options(policy: &Arc<Policy>) -> EngineOptions {
    EngineOptions {
        policy: policy.clone(),
        queue_alerts: true,
        // Small batches: the cases also cross batch boundaries.
        batch_messages: 3,
        ..EngineOptions::default()
    }
}

fn run_step(data_dir: &Path, n: usize, step: &Value, policy: &Arc<Policy>) -> Result<(), String> {
    if let Some(messages) = step.get("events").and_then(Value::as_array) {
        let input = data_dir.with_file_name(format!("events-{n}.json"));
        let lines: Vec<String> = messages.iter().map(expand).collect();
        write_lines(&input, &lines);
        replay_files(data_dir, &[input], options(policy));
        return Ok(());
    }
    let store =
        Arc::new(Store::open(data_dir, &StoreOptions::default()).map_err(|e| e.to_string())?);
    let mut engine = Engine::new(store, options(policy)).map_err(|e| e.to_string())?;
    if let Some(seed) = step.get("seed") {
        let hub = seed["hub"].as_str().unwrap_or(crate::support::HUB);
        let as_of = Ticks::parse_strict(seed["as_of"].as_str().ok_or("seed.as_of")?)
            .ok_or("seed.as_of is not a time")?;
        let mut pass = engine.begin_seed(hub, as_of).map_err(|e| e.to_string())?;
        let mut live = None;
        for document in seed["documents"].as_array().ok_or("seed.documents")? {
            if let Some(events) = document.get("events").and_then(Value::as_array) {
                live_events(&mut engine, &mut live, events)?;
                continue;
            }
            let raw = match document.get("text").and_then(Value::as_str) {
                Some(text) => text.to_owned(),
                None => document.to_string(),
            };
            engine
                .ingest_document(&mut pass, raw.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let grace = seed["grace"].as_i64().unwrap_or(3600);
        let reconcile = seed["reconcile"].as_bool().unwrap_or(true);
        let end = PassEnd {
            complete: seed["complete"].as_bool().unwrap_or(true),
            reconcile_grace: reconcile.then_some(Ticks(grace * 10_000_000)),
        };
        match seed["events_while_evaluating"].as_array() {
            None => {
                engine.end_seed(pass, end).map_err(|e| e.to_string())?;
            }
            Some(events) => {
                engine
                    .begin_end_seed(&mut pass, end)
                    .map_err(|e| e.to_string())?;
                let mut done = engine
                    .evaluate_seed_step(&mut pass)
                    .map_err(|e| e.to_string())?
                    .is_some();
                live_events(&mut engine, &mut live, events)?;
                while !done {
                    done = engine
                        .evaluate_seed_step(&mut pass)
                        .map_err(|e| e.to_string())?
                        .is_some();
                }
            }
        }
    }
    engine.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// Applies `events` through `engine` from the source `live` (registered at first use).
fn live_events(
    engine: &mut Engine,
    live: &mut Option<(SourceHandle, u64)>,
    events: &[Value],
) -> Result<(), String> {
    if live.is_none() {
        let (handle, checkpoint) = engine
            .add_source(SourceId::Partition("live".into()), "live".into())
            .map_err(|e| e.to_string())?;
        *live = Some((handle, checkpoint.next_index));
    }
    let Some((handle, next)) = live else {
        return Err("no live source".into());
    };
    for event in events {
        let line = expand(event);
        engine
            .ingest_json_line(*handle, *next, 0, line.as_bytes())
            .map_err(|e| e.to_string())?;
        *next += 1;
    }
    Ok(())
}

/// The alerts queued in the outbox, in order, as comparable objects.
fn alerts(data_dir: &Path) -> Vec<Value> {
    let store = Store::open_read_only(data_dir).expect("open read-only");
    store
        .outbox_from(0, usize::MAX)
        .expect("outbox")
        .into_iter()
        .map(|(_, bytes)| {
            let event: Value = serde_json::from_slice(&bytes).expect("alert json");
            let kind = event["type"]
                .as_str()
                .and_then(|t| t.rsplit('.').next())
                .unwrap_or("?");
            let mut out = json!({
                "id": event["id"], "type": kind, "subject": event["subject"],
                "time": event["time"], "ruleId": event["data"]["ruleId"],
                "severity": event["data"]["severity"], "twinVersion": event["data"]["twinVersion"],
            });
            if let Some(reason) = event["data"].get("reason") {
                out["reason"] = reason.clone();
            }
            out
        })
        .collect()
}

fn violations(data_dir: &Path, pending: bool) -> Vec<Value> {
    let store = Store::open_read_only(data_dir).expect("open read-only");
    let items: Vec<_> = if pending {
        store.pending_violations().expect("pending").collect()
    } else {
        store.violations().expect("violations").collect()
    };
    items
        .into_iter()
        .map(|item| {
            let twinwatch::store::StoredViolation { key, violation: v } = item.expect("violation");
            let mut line = twinwatch::compliance::violation_line(key.as_key(), &v.rule_id, &v);
            if let Some(p) = &v.pending {
                line["deadline"] = json!(p.deadline.to_string());
            }
            line
        })
        .collect()
}

/// Keeps of each actual object only the fields its expected counterpart names.
fn project(actual: &[Value], expected: &[Value]) -> Value {
    Value::Array(
        actual
            .iter()
            .enumerate()
            .map(|(i, a)| match expected.get(i).and_then(Value::as_object) {
                Some(fields) => Value::Object(
                    fields
                        .keys()
                        .map(|k| (k.clone(), a.get(k).cloned().unwrap_or(Value::Null)))
                        .collect(),
                ),
                None => a.clone(),
            })
            .collect(),
    )
}

fn check(path: &Path) -> Result<(), String> {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| e.to_string())?)
            .map_err(|e| format!("case file: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data_dir = dir.path().join("data");
    let mut current = policy(case["policy"].as_str())?;
    for (n, step) in case["steps"]
        .as_array()
        .ok_or("no steps")?
        .iter()
        .enumerate()
    {
        if let Some(text) = step.get("policy").and_then(Value::as_str) {
            current = policy(Some(text))?;
        }
        run_step(&data_dir, n, step, &current).map_err(|e| format!("step {n}: {e}"))?;
    }
    let expect = &case["expect"];
    let mut problems = Vec::new();
    let mut compare = |what: &str, actual: Vec<Value>, projected: bool| {
        if let Some(expected) = expect.get(what) {
            let expected_items = expected.as_array().cloned().unwrap_or_default();
            let actual = if projected {
                project(&actual, &expected_items)
            } else {
                Value::Array(actual)
            };
            if &actual != expected {
                problems.push(format!(
                    "{what}:\n  expected {expected}\n  actual   {actual}"
                ));
            }
        }
    };
    compare("export", export(&data_dir), false);
    compare("violations", violations(&data_dir, false), true);
    compare("pending", violations(&data_dir, true), true);
    compare("alerts", alerts(&data_dir), true);
    compare("deadletters", dead_letters(&data_dir), false);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn scenarios() {
    check_every_file("scenarios", "scenarios", check);
}
