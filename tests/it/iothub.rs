//! IoT Hub's twin query side through the real binary: `generate --format twin-documents`
//! against what replaying the same stream leaves in the snapshot, and `twinwatch emulator
//! --twins` served to the library's query client, faults included.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{binary, export, generate, generate_fleet, ok, path};
use twinwatch::iothub::{ConnectionString, QueryClient, QueryEvent, QueryOptions};

/// Every `$metadata`, at any depth, removed (what the snapshot does to a body).
fn without_metadata(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| k.as_str() != "$metadata")
                .map(|(k, v)| (k.clone(), without_metadata(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_metadata).collect()),
        other => other.clone(),
    }
}

/// `(deviceId, moduleId)` → `(version, tags, desired, reported)` without `$metadata`.
type State = BTreeMap<(String, String), (Value, Value, Value, Value)>;

fn state_of<'a>(twins: impl IntoIterator<Item = &'a Value>) -> State {
    twins
        .into_iter()
        .map(|twin| {
            let key = (
                twin["deviceId"].as_str().expect("deviceId").to_string(),
                twin.get("moduleId")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            );
            let value = (
                twin["version"].clone(),
                without_metadata(&twin["tags"]),
                without_metadata(&twin["properties"]["desired"]),
                without_metadata(&twin["properties"]["reported"]),
            );
            (key, value)
        })
        .collect()
}

/// Asserts two states equal, showing only the first differences.
fn assert_same_state(documents: &State, snapshot: &State) {
    let mut differences = Vec::new();
    for (key, value) in documents {
        match snapshot.get(key) {
            None => differences.push(format!("{key:?} only in the documents")),
            Some(other) if other != value => differences.push(format!(
                "{key:?}: documents {value:?}\n  snapshot {other:?}"
            )),
            Some(_) => {}
        }
    }
    for key in snapshot.keys().filter(|k| !documents.contains_key(*k)) {
        differences.push(format!("{key:?} only in the snapshot"));
    }
    assert!(
        differences.is_empty(),
        "{} differences, the first: {:#?}",
        differences.len(),
        &differences[..differences.len().min(5)]
    );
}

fn twin_documents(dir: &Path, devices: u64, events: u64, seed: u64, extra: &[&str]) -> Vec<Value> {
    let out = dir.join("twins.json");
    let mut args = vec!["--format", "twin-documents"];
    args.extend_from_slice(extra);
    generate(&out, devices, events, seed, &args);
    let bytes = std::fs::read(&out).expect("documents");
    if bytes.first() == Some(&b'[') {
        serde_json::from_slice(&bytes).expect("one JSON array")
    } else {
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("one document per line"))
            .collect()
    }
}

#[test]
fn twin_documents_are_the_twins_the_stream_leaves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 300, 20_000, 9, 0.0);
    let data = dir.path().join("data");
    ok(&["replay", "--data-dir", path(&data), path(&fleet)]);
    let replayed = export(&data);
    let documents = twin_documents(dir.path(), 300, 20_000, 9, &[]);
    assert!(documents.len() > 300, "{} documents", documents.len());
    assert!(documents.iter().any(|d| d.get("moduleId").is_some()));
    assert_same_state(&state_of(&documents), &state_of(&replayed));
}

#[test]
fn twin_documents_as_of_an_event_are_the_twins_of_that_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 200, 3_000, 4, 0.0);
    let data = dir.path().join("data");
    ok(&["replay", "--data-dir", path(&data), path(&fleet)]);
    let prefix = twin_documents(
        dir.path(),
        200,
        50_000,
        4,
        &["--as-of-event", "3000", "--documents-layout", "lines"],
    );
    assert_same_state(&state_of(&prefix), &state_of(&export(&data)));
}

/// `twinwatch emulator` as a child process, killed on drop.
struct EmulatorProcess {
    child: Child,
    lines: BTreeMap<String, String>,
}

impl EmulatorProcess {
    fn start(args: &[&str]) -> EmulatorProcess {
        let mut child = Command::new(binary())
            .arg("emulator")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the emulator");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut lines = BTreeMap::new();
        // The Event Hubs connection string, then four labelled lines.
        for _ in 0..5 {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a line");
            let line = line.trim();
            match line.split_once(": ") {
                Some((label, value)) if label.starts_with("iothub") => {
                    lines.insert(label.to_string(), value.to_string());
                }
                _ => {
                    lines.insert("eventhub".into(), line.to_string());
                }
            }
        }
        EmulatorProcess { child, lines }
    }

    /// The emulator serving the twin documents of `file` as hub `contoso-hub`, its CA
    /// certificate written to `ca`.
    fn serving(file: &Path, ca: &Path) -> EmulatorProcess {
        EmulatorProcess::start(&[
            "--twins",
            path(file),
            "--iothub-name",
            "contoso-hub",
            "--ca-cert-out",
            path(ca),
        ])
    }

    fn line(&self, label: &str) -> &str {
        self.lines
            .get(label)
            .unwrap_or_else(|| panic!("no {label} line in {:?}", self.lines))
    }

    fn client(&self, https: bool) -> QueryClient {
        let conn = ConnectionString::parse(self.line("iothub-connection-string")).expect("parses");
        let options = QueryOptions {
            endpoint: Some(
                self.line(if https {
                    "iothub-endpoint"
                } else {
                    "iothub-endpoint-http"
                })
                .to_string(),
            ),
            ca_file: Some(self.line("iothub-ca-certificate").into()),
            page_size: 40,
            max_retries: 3,
            initial_backoff: Duration::from_millis(10),
            ..QueryOptions::default()
        };
        QueryClient::new(&conn, options).expect("client")
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_all(client: &QueryClient, query: &str) -> (Vec<Value>, Vec<QueryEvent>) {
    let mut twins = Vec::new();
    let mut events = Vec::new();
    client
        .run_query::<String>(
            query,
            &mut |page| {
                let page: Vec<Value> = serde_json::from_slice(page).map_err(|e| e.to_string())?;
                twins.extend(page);
                Ok(())
            },
            &mut |event| events.push(event),
        )
        .expect("the query completes");
    (twins, events)
}

#[test]
fn the_emulator_command_serves_a_documents_file_over_https_and_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let documents = twin_documents(dir.path(), 120, 6_000, 2, &[]);
    let (file, ca) = (dir.path().join("twins.json"), dir.path().join("ca.pem"));
    let emulator = EmulatorProcess::serving(&file, &ca);
    assert_eq!(emulator.line("iothub-ca-certificate"), path(&ca));
    assert!(emulator
        .line("iothub-connection-string")
        .starts_with("HostName=contoso-hub.azure-devices.net;"));

    let client = emulator.client(true);
    let (devices, _) = read_all(&client, "SELECT * FROM devices");
    let (modules, _) = read_all(&client, "SELECT * FROM devices.modules");
    let served: Vec<Value> = devices.into_iter().chain(modules).collect();
    assert_same_state(&state_of(&served), &state_of(&documents));
    assert_eq!(served.len(), documents.len());

    // Faults scripted over HTTP, as a test driving the command would.
    let control = format!("{}/_emulator/faults", emulator.line("iothub-endpoint-http"));
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    agent
        .post(&control)
        .send(r#"{"fault": "status", "status": 503, "count": 1}"#)
        .expect("script a 503");
    agent
        .post(&control)
        .send(r#"{"fault": "drop", "after": 1, "count": 1}"#)
        .expect("script a dropped connection");
    let (again, events) = read_all(&emulator.client(false), "SELECT * FROM devices");
    assert_eq!(
        again.len(),
        documents
            .iter()
            .filter(|d| d.get("moduleId").is_none())
            .count()
    );
    let retries = events
        .iter()
        .filter(|e| matches!(e, QueryEvent::Retrying { .. }))
        .count();
    assert_eq!(retries, 2, "{events:?}");
}

#[test]
fn the_emulator_serves_its_generated_fleet_as_of_the_preloaded_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let documents = twin_documents(dir.path(), 80, 50_000, 6, &["--as-of-event", "2500"]);
    let emulator = EmulatorProcess::start(&[
        "--hub",
        "fleet-hub",
        "--devices",
        "80",
        "--seed",
        "6",
        "--events",
        "2500",
        "--ca-cert-out",
        path(&dir.path().join("ca.pem")),
    ]);
    let client = emulator.client(true);
    let (devices, _) = read_all(&client, "SELECT * FROM devices");
    let (modules, _) = read_all(&client, "SELECT * FROM devices.modules");
    let served: Vec<Value> = devices.into_iter().chain(modules).collect();
    assert_same_state(&state_of(&served), &state_of(&documents));
}

/// `twinwatch seed` from the emulator's twin query (HTTPS, its own CA, small pages) gives the
/// snapshot, violations and counts of a seed from the same documents as a file; a wrong key
/// is an incomplete pass that names the hub, never the key, and applies nothing.
#[test]
fn seed_from_the_hub_equals_seed_from_the_same_documents_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let documents = twin_documents(dir.path(), 150, 6_000, 5, &[]);
    let (file, ca) = (dir.path().join("twins.json"), dir.path().join("ca.pem"));
    let emulator = EmulatorProcess::serving(&file, &ca);
    let connection = emulator.line("iothub-connection-string").to_owned();
    let seed_from_hub = |data: &Path, connection: &str| {
        Command::new(binary())
            .args([
                "seed",
                "--data-dir",
                path(data),
                "--iothub-endpoint",
                emulator.line("iothub-endpoint"),
                "--iothub-ca-file",
                path(&ca),
                "--page-size",
                "37",
                "--as-of",
                "2030-01-01T00:00:00Z",
            ])
            .env("TWINWATCH_IOTHUB_CONNECTION_STRING", connection)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run seed")
    };
    let from_hub = dir.path().join("from-hub");
    let output = seed_from_hub(&from_hub, &connection);
    assert!(output.status.success(), "{output:?}");
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        line.contains(&format!("{} documents", documents.len())),
        "{line}"
    );
    let from_file = dir.path().join("from-file");
    ok(&[
        "seed",
        "--data-dir",
        path(&from_file),
        "--hub",
        "contoso-hub",
        "--as-of",
        "2030-01-01T00:00:00Z",
        path(&file),
    ]);
    assert_eq!(export(&from_hub), export(&from_file));
    assert_eq!(export(&from_hub).len(), documents.len());

    // The service's configuration file serves too: its `[seed]` table gives the connection
    // string, the endpoint and the CA file, with nothing in the environment.
    let config = dir.path().join("twinwatch.toml");
    std::fs::write(
        &config,
        format!(
            "[seed]\nconnection_string = \"{connection}\"\nendpoint = \"{}\"\nca_file = \"{}\"\n",
            emulator.line("iothub-endpoint"),
            path(&ca)
        ),
    )
    .expect("write the configuration");
    let from_config = dir.path().join("from-config");
    let output = Command::new(binary())
        .args([
            "seed",
            "--data-dir",
            path(&from_config),
            "--config",
            path(&config),
            "--as-of",
            "2030-01-01T00:00:00Z",
        ])
        .env_remove("TWINWATCH_IOTHUB_CONNECTION_STRING")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run seed");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(export(&from_config), export(&from_file));
    assert_eq!(
        ok(&["violations", "--data-dir", path(&from_hub)]).stdout,
        ok(&["violations", "--data-dir", path(&from_file)]).stdout,
        "page order never matters: the pass is evaluated once, in key order"
    );

    // A wrong key: the hub refuses, nothing is applied, the key is never shown.
    let key = connection
        .split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .expect("a key");
    let wrong_key = "d3JvbmcgdHdpbndhdGNoIGtleSB3cm9uZyB0d2lud2F0Y2gga2V5ISE=";
    let wrong = connection.replace(key, wrong_key);
    let refused = dir.path().join("refused");
    let output = seed_from_hub(&refused, &wrong);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("contoso-hub"),
        "the error names the hub: {text}"
    );
    assert!(!text.contains(wrong_key) && !text.contains(key), "{text}");
    assert!(
        export(&refused).is_empty(),
        "a refused pass applies nothing"
    );
}
