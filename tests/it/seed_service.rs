//! The service's seed passes (`twinwatch run` with `[seed]`, `docs/semantics.md` §7) through the
//! real binary, the Event Hubs emulator and the twin query emulator over real HTTP: seeding
//! an empty snapshot then consuming equals `twinwatch seed` then `twinwatch replay` of the
//! same inputs; a reconcile by interval removes a ghost twin with a `deleted` alert, after an
//! incomplete pass (a page failed) that removed nothing; a stop during a pass exits in time,
//! and the next start goes on with that same pass.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use twinwatch::emulator::query::{QueryEmulator, QueryEmulatorConfig, QueryFault, TwinDocuments};
use twinwatch::time::Ticks;

use crate::service::{
    free_port, metric, metric_plain, readyz, run_args, service_paths, spawn_run_with, wait_metric,
    wait_readyz, Hub, KillOnDrop,
};
use crate::support::{alerts_by_id, export, generate, generate_fleet, ok, path};

/// The generator's default hub: the change notifications' `hubName`.
const HUB: &str = "contoso-hub";

/// The twin query emulator on the hub's runtime, plain HTTP on loopback.
fn start_query(hub: &Hub, documents: TwinDocuments) -> QueryEmulator {
    hub.runtime
        .block_on(QueryEmulator::start(
            QueryEmulatorConfig::new(HUB, None, Some(SocketAddr::from(([127, 0, 0, 1], 0)))),
            documents,
        ))
        .expect("the twin query emulator")
}

/// The twin documents of a fleet of `(devices, events, seed)` as of its last event, served by
/// the twin query emulator beside an Event Hubs emulator named `hub` with nothing published.
fn serving(dir: &Path, fleet: (u64, u64, u64), hub: &str) -> (PathBuf, Hub, QueryEmulator) {
    let (devices, events, seed) = fleet;
    let documents = documents_file(dir, devices, events, seed, events);
    let hub = Hub::empty(hub);
    let query = start_query(&hub, TwinDocuments::read(&documents).expect("documents"));
    (documents, hub, query)
}

/// `generate --format twin-documents` of the fleet as of its first `as_of_event` messages.
fn documents_file(dir: &Path, devices: u64, events: u64, seed: u64, as_of_event: u64) -> PathBuf {
    let out = dir.join(format!("twins-{as_of_event}.json"));
    let as_of_event = as_of_event.to_string();
    generate(
        &out,
        devices,
        events,
        seed,
        &["--format", "twin-documents", "--as-of-event", &as_of_event],
    );
    out
}

/// Just after the latest operation time of the fleet file's first `n` messages: the as-of
/// time of documents as of that point (the generator's clock is not the wall clock).
fn as_of_after(fleet: &Path, n: usize) -> Ticks {
    let file = std::fs::File::open(fleet).expect("fleet");
    let latest = std::io::BufReader::new(file)
        .lines()
        .take(n)
        .filter_map(|line| {
            let line: Value = serde_json::from_str(&line.expect("line")).ok()?;
            Ticks::parse_lenient(line["Properties"]["operationTimestamp"].as_str()?)
        })
        .max()
        .expect("operation times");
    Ticks(latest.0 + 1)
}

/// The `[seed]` configuration file for the emulator at `endpoint`.
fn config_file(dir: &Path, name: &str, endpoint: &str, settings: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(
        &file,
        format!("[seed]\nendpoint = \"{endpoint}\"\npage_size = 40\n{settings}\n"),
    )
    .expect("config");
    file
}

/// `twinwatch run` with `[seed]` from `config`, the query emulator's connection string in the
/// environment.
fn spawn_seeding(
    hub: &Hub,
    query: &QueryEmulator,
    config: &Path,
    data: &Path,
    alerts: &Path,
    port: u16,
) -> KillOnDrop {
    KillOnDrop::new(spawn_run_with(
        hub,
        &run_args(
            data,
            port,
            &[("--config", config), ("--alerts-file", alerts)],
        ),
        &[(
            "TWINWATCH_IOTHUB_CONNECTION_STRING",
            &query.connection_string().to_secret_string(),
        )],
    ))
}

/// Waits until the service has had a seed pass with `outcome` (`complete`, `incomplete`).
fn wait_pass(port: u16, outcome: &str) {
    wait_metric(
        port,
        "twinwatch_seed_passes_total",
        &format!("outcome=\"{outcome}\""),
        1.0,
        Duration::from_secs(60),
    );
}

/// Waits until the service's seed pass has waited out the hub's throttling once.
fn wait_throttled(port: u16) {
    wait_metric(
        port,
        "twinwatch_seed_throttled_total",
        "",
        1.0,
        Duration::from_secs(60),
    );
}

/// /readyz's body, as JSON.
fn readyz_json(port: u16) -> Value {
    let (_, body) = readyz(port).expect("/readyz");
    serde_json::from_str(&body).expect("json")
}

/// The (twin, rule) pairs of `violations` output.
fn violations(data: &Path) -> Vec<Value> {
    String::from_utf8_lossy(&ok(&["violations", "--data-dir", path(data)]).stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// The service seeds an empty snapshot as it starts (the hub's feed still empty), then
/// consumes the feed: the snapshot and violations are what `twinwatch seed` of the same
/// documents as of the same time, then `twinwatch replay` of the same feed, give.
#[test]
fn the_service_seeds_an_empty_snapshot_then_consumes_as_seed_then_replay_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, events, seed, as_of_event) = (150, 4_000, 11, 2_000);
    let fleet = generate_fleet(dir.path(), devices, events, seed, 0.0);
    let documents = documents_file(dir.path(), devices, events, seed, as_of_event);
    let as_of = as_of_after(&fleet, as_of_event as usize);

    let mut hub = Hub::empty("iothub-ehub-seed");
    let query = start_query(&hub, TwinDocuments::read(&documents).expect("documents"));
    let endpoint = query.http_endpoint().expect("http");
    let config = config_file(
        dir.path(),
        "seed.toml",
        &endpoint,
        &format!("as_of = \"{as_of}\"\nreconcile_every_hours = 0"),
    );
    let (data, alerts, port) = service_paths(dir.path());
    let mut service = spawn_seeding(&hub, &query, &config, &data, &alerts, port);
    wait_pass(port, "complete");
    // The receivers may attach after the pass (readiness never waits for it).
    let body = wait_readyz(port, Duration::from_secs(30), "readiness", |status, _| {
        status == 200
    });
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["seed"]["last"]["outcome"], "complete", "{body}");
    assert_eq!(body["seed"]["lastComplete"], as_of.to_string(), "{body}");
    let n_documents = TwinDocuments::read(&documents).expect("documents");
    let n_documents = (n_documents.device_count() + n_documents.module_count()) as f64;
    assert_eq!(
        metric(port, "twinwatch_seed_documents_total", "").unwrap_or(0.0),
        n_documents
    );
    assert_eq!(
        metric_plain(port, "twinwatch_seed_last_complete_timestamp_seconds"),
        Some(as_of.unix_millis() as f64 / 1000.0)
    );

    // Then the feed, the old part of it included (stale now, as the contract says).
    let published = hub.publish_file(&fleet);
    crate::service::wait_consumed(port, published, Duration::from_secs(120));
    // The feed after the seed's time changed twins: not everything was stale.
    assert!(metric(port, "twinwatch_messages_total", "outcome=\"applied\"").unwrap_or(0.0) > 0.0);
    assert!(metric(port, "twinwatch_messages_total", "outcome=\"stale\"").unwrap_or(0.0) > 0.0);
    service.stop();

    let expected = dir.path().join("expected");
    ok(&[
        "seed",
        "--data-dir",
        path(&expected),
        "--hub",
        HUB,
        "--as-of",
        &as_of.to_string(),
        path(&documents),
    ]);
    ok(&["replay", "--data-dir", path(&expected), path(&fleet)]);
    let (got, want) = (export(&data), export(&expected));
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "the service's snapshot differs from seed + replay"
    );
    // The service's quiet clock opens what a replay leaves pending (rules with `for`): the
    // same failures, open or pending.
    assert_eq!(failures(&data), failures(&expected));
    hub.runtime.block_on(query.shutdown());
}

/// Every violation, open or pending, without its state's own fields (a pending one's deadline).
fn failures(data: &Path) -> std::collections::BTreeSet<String> {
    let mut all = violations(data);
    all.extend(
        String::from_utf8_lossy(&ok(&["violations", "--pending", "--data-dir", path(data)]).stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("json")),
    );
    all.into_iter()
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("deadline");
            }
            v.to_string()
        })
        .collect()
}

/// The state `(version, tags, desired, reported)` of each twin, `$metadata` removed.
fn state_of(twins: &[Value]) -> BTreeMap<(String, String), Value> {
    fn strip(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| k.as_str() != "$metadata" && k.as_str() != "$version")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    twins
        .iter()
        .map(|twin| {
            let key = (
                twin["deviceId"].as_str().expect("deviceId").to_owned(),
                twin.get("moduleId")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            );
            let state = serde_json::json!([
                twin["version"],
                strip(&twin["tags"]),
                strip(&twin["properties"]["desired"]),
                strip(&twin["properties"]["reported"]),
            ]);
            (key, state)
        })
        .collect()
}

/// A snapshot fed by the feed alone holds a twin the hub no longer has (its delete was lost).
/// The service reconciling by interval: first a pass whose page fails (incomplete: nothing
/// removed, counted), then a complete one that removes the ghost with a `deleted` alert and
/// leaves the snapshot equal to the hub's twins.
#[test]
fn a_reconcile_by_interval_removes_a_ghost_twin_after_an_incomplete_pass_removed_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, events, seed) = (120, 3_000, 17);
    let fleet = generate_fleet(dir.path(), devices, events, seed, 0.0);
    let documents = documents_file(dir.path(), devices, events, seed, events);

    // The feed alone, into the data directory (no [seed]).
    let hub = Hub::start(&fleet);
    let (data, alerts, port) = service_paths(dir.path());
    let mut feed_only = KillOnDrop::new(crate::service::spawn_service(&hub, &data, &alerts, port));
    crate::service::wait_consumed(port, hub.published, Duration::from_secs(120));
    feed_only.stop();
    let fed = export(&data);

    // The ghost: a device twin failing a rule, which the hub's query no longer returns.
    let failing = violations(&data);
    let ghost = failing
        .iter()
        .find(|v| v["moduleId"].as_str().unwrap_or("").is_empty())
        .expect("a device twin failing a rule")["deviceId"]
        .as_str()
        .expect("deviceId")
        .to_owned();
    let all: Vec<Value> = serde_json::from_slice(&std::fs::read(&documents).expect("documents"))
        .expect("one JSON array");
    assert_eq!(
        state_of(&all),
        state_of(&fed),
        "the documents are the fed twins"
    );
    let mut served = TwinDocuments::new();
    let mut kept = Vec::new();
    for document in &all {
        let is_ghost = document["deviceId"] == ghost.as_str() && document.get("moduleId").is_none();
        if !is_ghost {
            served.push(document);
            kept.push(document.clone());
        }
    }
    assert_eq!(kept.len() + 1, all.len());

    // The first pass fails after its first page; the next one, an interval later, is whole.
    let query = start_query(&hub, served);
    query.inject_after(1, QueryFault::Status(500), 1);
    let config = config_file(
        dir.path(),
        "reconcile.toml",
        &query.http_endpoint().expect("http"),
        "on_empty = false\nreconcile_every_hours = 0.001\ngrace_secs = 0",
    );
    let mut service = spawn_seeding(&hub, &query, &config, &data, &alerts, port);
    wait_pass(port, "incomplete");
    assert_eq!(
        metric_plain(port, "twinwatch_seed_twins_removed_total"),
        Some(0.0),
        "an incomplete pass removes nothing"
    );
    let body = readyz_json(port);
    assert_eq!(body["seed"]["last"]["outcome"], "incomplete", "{body}");
    assert!(
        body["seed"]["last"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("500")),
        "{body}"
    );
    wait_pass(port, "complete");
    assert_eq!(
        metric_plain(port, "twinwatch_seed_twins_removed_total"),
        Some(1.0)
    );
    service.stop();

    assert_eq!(
        state_of(&export(&data)),
        state_of(&kept),
        "the snapshot is the hub's twins"
    );
    let (alerts, _) = alerts_by_id(&std::fs::read(&alerts).expect("alerts"));
    // The feed's own deletes raised `deleted` alerts too: the pass's ids start with `seed:`.
    let deleted: Vec<&Value> = alerts
        .iter()
        .filter(|(id, a)| id.starts_with("seed:") && a["data"]["reason"] == "deleted")
        .map(|(_, a)| a)
        .collect();
    let rules_failing = failing
        .iter()
        .filter(|v| {
            v["deviceId"] == ghost.as_str() && v["moduleId"].as_str().unwrap_or("").is_empty()
        })
        .count();
    assert_eq!(deleted.len(), rules_failing, "{deleted:?}");
    for alert in deleted {
        assert_eq!(alert["data"]["deviceId"], ghost.as_str());
        assert_eq!(alert["type"], twinwatch::compliance::wire::RESOLVED_TYPE);
    }
    hub.runtime.block_on(query.shutdown());
}

/// A stop while a pass waits out the hub's throttling exits in time (0); the next start goes
/// on with that same pass (its as-of time) and completes it.
#[test]
fn a_stop_during_a_pass_exits_in_time_and_the_next_start_goes_on_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (documents, hub, query) = serving(dir.path(), (60, 1_500, 23), "iothub-ehub-stop");
    // After two pages, the hub throttles for longer than the stop may take.
    query.inject_after(
        2,
        QueryFault::Throttle {
            retry_after_secs: 60,
        },
        1,
    );
    let config = config_file(
        dir.path(),
        "stop.toml",
        &query.http_endpoint().expect("http"),
        "reconcile_every_hours = 0",
    );
    let (data, alerts, port) = service_paths(dir.path());
    let mut service = spawn_seeding(&hub, &query, &config, &data, &alerts, port);
    wait_throttled(port);
    let all = TwinDocuments::read(&documents).expect("documents");
    let total = all.device_count() + all.module_count();
    // The apply thread reports the pages it has applied.
    // Ready (every partition connected: that may take a moment after the start) while the
    // pass is under way: readiness does not wait for the pass.
    let body = wait_readyz(
        port,
        Duration::from_secs(20),
        "readiness while the pass has applied pages",
        |status, body| {
            let body: Value = serde_json::from_str(body).expect("json");
            status == 200 && body["seed"]["running"]["documents"].as_u64().unwrap_or(0) > 0
        },
    );
    let body: Value = serde_json::from_str(&body).expect("json");
    let running = &body["seed"]["running"];
    let read = running["documents"].as_u64().expect("documents") as usize;
    assert!(read < total, "{read} of {total} read before the throttling");
    assert_eq!(running["throttled"], 1, "{body}");
    let as_of = running["asOf"].as_str().expect("asOf").to_owned();
    let stopping = Instant::now();
    service.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "the stop took {:?}",
        stopping.elapsed()
    );

    // The next start: the faults are used up; the same pass goes on and completes.
    let port = free_port();
    let mut service = spawn_seeding(&hub, &query, &config, &data, &alerts, port);
    wait_pass(port, "complete");
    let body = readyz_json(port);
    assert_eq!(body["seed"]["last"]["asOf"], as_of.as_str(), "{body}");
    service.stop();
    assert_eq!(export(&data).len(), total);
    hub.runtime.block_on(query.shutdown());
}

/// A service killed (SIGKILL) in the middle of a pass and started again goes on with that
/// pass and ends where a run never killed ends: the same snapshot, the same alerts with the
/// same ids, none twice.
#[test]
fn a_service_killed_mid_pass_ends_as_one_never_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, hub, query) = serving(dir.path(), (90, 2_500, 29), "iothub-ehub-kill");
    // A fixed as-of time, so that both runs' alert ids are comparable.
    let config = config_file(
        dir.path(),
        "kill.toml",
        &query.http_endpoint().expect("http"),
        "as_of = \"2026-06-01T00:00:00Z\"\nreconcile_every_hours = 0",
    );
    let run = |name: &str, kill_after_pages: Option<u32>| {
        let (data, alerts) = (
            dir.path().join(format!("data-{name}")),
            dir.path().join(format!("alerts-{name}.jsonl")),
        );
        if let Some(pages) = kill_after_pages {
            query.inject_after(
                pages,
                QueryFault::Throttle {
                    retry_after_secs: 60,
                },
                1,
            );
            let port = free_port();
            let mut service = spawn_seeding(&hub, &query, &config, &data, &alerts, port);
            wait_throttled(port);
            service.kill();
        }
        let port = free_port();
        let mut service = spawn_seeding(&hub, &query, &config, &data, &alerts, port);
        wait_pass(port, "complete");
        service.stop();
        let bytes = std::fs::read(&alerts).expect("alerts");
        (export(&data), alerts_by_id(&bytes), bytes)
    };
    let (clean_twins, (clean_alerts, _), _) = run("clean", None);
    let (killed_twins, (killed_alerts, lines), bytes) = run("killed", Some(2));
    assert!(!clean_alerts.is_empty(), "the pass raised alerts");
    assert!(clean_twins == killed_twins, "the snapshots differ");
    assert_eq!(clean_alerts, killed_alerts);
    assert_eq!(
        lines,
        killed_alerts.len(),
        "an alert delivered twice: {}",
        String::from_utf8_lossy(&bytes)
    );
    hub.runtime.block_on(query.shutdown());
}

/// `twinwatch demo` seeds from its embedded twin query before the live feed goes on, and says
/// so: the banner names the query and the fleet's twins; the pass completes as of the
/// fleet's own clock (just after the preloaded events), so the events published after it
/// still apply.
#[test]
fn the_demo_seeds_from_its_twin_query_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut child = std::process::Command::new(crate::support::binary())
        .args([
            "demo",
            "--devices",
            "150",
            "--events",
            "3000",
            "--rate",
            "200",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
            path(dir.path()),
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn twinwatch demo");
    let stdout = child.stdout.take().expect("stdout");
    let banner = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines.push(line);
        }
        lines
    });
    let mut demo = KillOnDrop::new(child);
    wait_pass(port, "complete");
    let body = readyz_json(port);
    let as_of = body["seed"]["last"]["asOf"]
        .as_str()
        .expect("asOf")
        .to_owned();
    let as_of = Ticks::parse_strict(&as_of).expect("a time");
    assert!(
        as_of < Ticks::now(),
        "the fleet's clock, not the wall clock: {body}"
    );
    let documents = body["seed"]["last"]["documents"]
        .as_u64()
        .expect("documents");
    assert!(documents > 150, "{body}");
    // The feed published after the preloaded events is newer than the pass: it applies.
    let applied = |port| metric(port, "twinwatch_messages_total", "outcome=\"applied\"");
    let before = applied(port).unwrap_or(0.0);
    wait_metric(
        port,
        "twinwatch_messages_total",
        "outcome=\"applied\"",
        before + 100.0,
        Duration::from_secs(30),
    );
    demo.stop();
    let lines = banner.join().expect("stdout");
    let seeding = lines
        .iter()
        .find(|l| l.trim_start().starts_with("seeding:"))
        .unwrap_or_else(|| panic!("no seeding line in {lines:#?}"));
    let twins = format!(
        "{} device twins",
        documents - seeding_modules(seeding).expect("module twins in the line")
    );
    assert!(seeding.contains(&twins), "{seeding} / {twins}");
}

/// The number before "module twins" in the demo's seeding line.
fn seeding_modules(line: &str) -> Option<u64> {
    let before = line.split(" module twins").next()?;
    before.rsplit(' ').next()?.parse().ok()
}
