//! The emulator at its boundaries: placement and numbering, start positions and epoch rules,
//! and Microsoft's official Python client against a running emulator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value as Json;

use super::event::{EmulatedEvent, SystemValue};
use super::registry::{condition, partition_for_key, Hub};
use super::selector::{OffsetValue, StartPosition};
use super::{connection_string_for, Emulator, EmulatorConfig};
use crate::generate::{messages, GenerateOptions};

fn generated_events(hub: &str, events: u64) -> Vec<EmulatedEvent> {
    let options = GenerateOptions {
        devices: 12,
        events,
        seed: 11,
        hub: hub.to_string(),
        noise: 0.1,
    };
    messages(&options)
        .map(|message| EmulatedEvent::from_generated(&message))
        .collect()
}

fn event_for(key: &str, enqueued_time_ms: Option<i64>) -> EmulatedEvent {
    EmulatedEvent {
        body: b"{}".to_vec(),
        properties: Vec::new(),
        system_properties: Vec::new(),
        message_id: None,
        user_id: None,
        content_type: None,
        content_encoding: None,
        correlation_id: None,
        partition_key: key.to_string(),
        enqueued_time_ms,
    }
}

fn localhost() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

#[test]
fn placement_is_fnv1a_of_the_key_modulo_the_partition_count() {
    // FNV-1a 32-bit reference values.
    for (key, hash) in [
        ("", 0x811c_9dc5u32),
        ("a", 0xe40c_292c),
        ("foobar", 0xbf9c_f968),
    ] {
        for partitions in [1, 2, 4, 7, 32] {
            assert_eq!(
                partition_for_key(key, partitions),
                hash % partitions,
                "{key}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_numbers_each_partition_from_zero() {
    let emulator = Emulator::start(EmulatorConfig::new(localhost(), "hub1", 4))
        .await
        .expect("emulator starts");
    let events = generated_events("hub1", 300);
    for event in events.iter().cloned() {
        emulator.publish(event);
    }
    let mut expected_per_partition = vec![Vec::new(); 4];
    for event in &events {
        let partition = emulator.partition_of(&event.partition_key);
        assert_eq!(partition, partition_for_key(&event.partition_key, 4));
        expected_per_partition[partition as usize].push(event);
    }
    for (partition, expected) in expected_per_partition.iter().enumerate() {
        let stored = emulator
            .hub
            .partition(partition as u32)
            .expect("partition")
            .read(0, 10_000);
        assert_eq!(stored.len(), expected.len());
        let mut latest = i64::MIN;
        for (index, (stored, expected)) in stored.iter().zip(expected).enumerate() {
            assert_eq!(stored.position.sequence_number, index as i64);
            assert_eq!(&*stored.event, *expected, "events keep their order");
            // A duplicate keeps its old time and is raised to the partition's latest.
            latest = latest.max(
                expected
                    .enqueued_time_ms
                    .expect("generated events have one"),
            );
            assert_eq!(stored.position.enqueued_time_ms, latest);
        }
        for pair in stored.windows(2) {
            assert!(pair[0].position.offset < pair[1].position.offset);
            assert!(pair[0].position.enqueued_time_ms <= pair[1].position.enqueued_time_ms);
        }
        let snapshot = emulator
            .partition_snapshot(partition as u32)
            .expect("partition");
        assert_eq!(
            snapshot.last_enqueued_sequence_number,
            expected.len() as i64 - 1
        );
        assert_eq!(snapshot.is_empty, expected.is_empty());
        if let Some(last) = stored.last() {
            assert_eq!(
                snapshot.last_enqueued_offset,
                last.position.offset.to_string()
            );
            assert_eq!(
                snapshot.last_enqueued_time_ms,
                last.position.enqueued_time_ms
            );
        }
    }
    assert!(emulator.partition_snapshot(4).is_none());
    emulator.shutdown().await;
}

#[tokio::test]
async fn enqueued_times_never_go_back_and_default_to_now() {
    let emulator = Emulator::start(EmulatorConfig::new(localhost(), "hub1", 1))
        .await
        .expect("emulator starts");
    emulator.publish(event_for("d", Some(5_000)));
    emulator.publish(event_for("d", Some(4_000)));
    emulator.publish(event_for("d", None));
    let stored = emulator.hub.partition(0).expect("partition").read(0, 10);
    let times: Vec<i64> = stored.iter().map(|s| s.position.enqueued_time_ms).collect();
    assert_eq!(&times[..2], &[5_000, 5_000]);
    assert!(times[2] > 1_700_000_000_000, "now, not {}", times[2]);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_connection_string_is_the_development_emulators() {
    assert_eq!(
        connection_string_for("127.0.0.1:5672".parse().expect("address"), "telemetry"),
        "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;\
         SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;EntityPath=telemetry"
    );
    assert!(
        connection_string_for("0.0.0.0:5672".parse().expect("address"), "h")
            .starts_with("Endpoint=sb://localhost:5672;")
    );
    assert!(
        connection_string_for("[::1]:5672".parse().expect("address"), "h")
            .starts_with("Endpoint=sb://[::1]:5672;")
    );
    let emulator = Emulator::start(EmulatorConfig::new(localhost(), "hub1", 2))
        .await
        .expect("emulator starts");
    let port = emulator.local_addr().port();
    assert_ne!(port, 0);
    assert_eq!(
        emulator.connection_string(),
        format!(
            "Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;EntityPath=hub1"
        )
    );
    emulator.shutdown().await;
    let refused = Emulator::start(EmulatorConfig::new(localhost(), "hub1", 0)).await;
    assert!(refused.is_err());
}

/// A hub with one partition of three events enqueued at 1000, 2000 and 2000 ms.
fn three_event_hub() -> Arc<Hub> {
    let hub = Arc::new(Hub::new("hub1".to_string(), 1, Vec::new()));
    for time in [1_000, 2_000, 2_000] {
        hub.publish(event_for("d", Some(time)));
    }
    hub
}

#[test]
fn start_positions_resolve_as_the_service_resolves_them() {
    let hub = three_event_hub();
    let partition = hub.partition(0).expect("partition");
    let offsets: Vec<u64> = partition
        .read(0, 10)
        .iter()
        .map(|s| s.position.offset)
        .collect();
    let start = |position| partition.start_index(position);
    let offset = |offset, inclusive| StartPosition::Offset { offset, inclusive };
    let sequence = |value, inclusive| StartPosition::SequenceNumber { value, inclusive };
    let time = |ms, inclusive| StartPosition::EnqueuedTime { ms, inclusive };

    assert_eq!(start(offset(OffsetValue::Earliest, false)), Ok(0));
    assert_eq!(start(offset(OffsetValue::Latest, false)), Ok(3));
    assert_eq!(start(offset(OffsetValue::At(offsets[1]), true)), Ok(1));
    assert_eq!(start(offset(OffsetValue::At(offsets[1]), false)), Ok(2));
    assert_eq!(start(offset(OffsetValue::At(offsets[1] + 1), true)), Ok(2));
    assert_eq!(start(offset(OffsetValue::At(offsets[2]), false)), Ok(3));

    assert_eq!(start(sequence(-1, false)), Ok(0));
    assert_eq!(start(sequence(0, true)), Ok(0));
    assert_eq!(start(sequence(1, true)), Ok(1));
    assert_eq!(start(sequence(1, false)), Ok(2));
    assert_eq!(
        start(sequence(2, false)),
        Ok(3),
        "after the last: wait for new events"
    );
    assert_eq!(start(sequence(3, true)), Ok(3));
    let beyond = start(sequence(3, false)).expect_err("beyond the end");
    assert_eq!(beyond.condition, condition::ARGUMENT_OUT_OF_RANGE);
    assert_eq!(
        beyond.description,
        "The supplied sequence number '3' is invalid. The last sequence number in the system is '2'."
    );
    assert!(start(sequence(10, true)).is_err());

    assert_eq!(start(time(999, false)), Ok(0));
    assert_eq!(start(time(1_000, true)), Ok(0));
    assert_eq!(start(time(1_000, false)), Ok(1));
    assert_eq!(start(time(2_000, true)), Ok(1));
    assert_eq!(start(time(2_000, false)), Ok(3));
    assert_eq!(start(time(9_000, false)), Ok(3));
}

#[test]
fn partition_ids_out_of_range_are_the_services_error() {
    let hub = Hub::new("hub1".to_string(), 4, vec!["twinwatch".to_string()]);
    assert!(hub.partition_by_id("3").is_ok());
    for id in ["4", "-1", "x", ""] {
        let fault = hub.partition_by_id(id).err().expect("out of range");
        assert_eq!(fault.condition, condition::ARGUMENT_OUT_OF_RANGE);
        assert!(fault.description.contains("between 0 and 3"));
    }
    assert!(hub.is_named("HUB1"));
    assert!(hub.has_consumer_group("$default"));
    assert!(hub.has_consumer_group("TwinWatch"));
    assert!(!hub.has_consumer_group("other"));
    assert!(Hub::new("h".to_string(), 1, Vec::new()).has_consumer_group("anything"));
}

#[test]
fn epochs_steal_and_refuse_as_the_service_does() {
    let hub = three_event_hub();
    let mut first = hub
        .register_reader(0, "$Default", Some(1), "first")
        .expect("first owner");
    // A lower epoch, and a receiver without one, are refused while epoch 1 reads.
    let lower = hub
        .register_reader(0, "$Default", Some(0), "lower")
        .err()
        .expect("refused");
    assert_eq!(lower.condition, condition::LINK_STOLEN);
    let plain = hub
        .register_reader(0, "$default", None, "plain")
        .err()
        .expect("refused");
    assert_eq!(plain.condition, condition::LINK_STOLEN);
    // Another consumer group is independent.
    let _other = hub
        .register_reader(0, "other", None, "other")
        .expect("another group");
    // An equal epoch takes over and the first owner is told.
    let second = hub
        .register_reader(0, "$Default", Some(1), "second")
        .expect("equal epoch takes over");
    let fault = first.stop.try_recv().expect("first is disconnected");
    assert_eq!(fault.condition, condition::LINK_STOLEN);
    assert!(fault.description.contains("higher epoch of '1'"));
    drop(second);
    // With no epoch owner left, five plain receivers fit and a sixth does not.
    let plain: Vec<_> = (0..5)
        .map(|index| {
            hub.register_reader(0, "$Default", None, &format!("plain-{index}"))
                .expect("five fit")
        })
        .collect();
    let sixth = hub
        .register_reader(0, "$Default", None, "sixth")
        .err()
        .expect("refused");
    assert_eq!(sixth.condition, condition::RESOURCE_LIMIT_EXCEEDED);
    // An epoch receiver displaces them all.
    let _owner = hub
        .register_reader(0, "$Default", Some(0), "owner")
        .expect("epoch receiver");
    for mut lease in plain {
        assert_eq!(
            lease.stop.try_recv().expect("told").condition,
            condition::LINK_STOLEN
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Microsoft's official Python client (azure-eventhub from PyPI)
// ---------------------------------------------------------------------------------------------

/// The directory holding this file, whether the compiler was given an absolute path.
fn source_dir() -> PathBuf {
    let file = Path::new(file!());
    let file = if file.is_absolute() {
        file.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(file)
    };
    file.parent().expect("a file has a directory").to_path_buf()
}

/// The Cargo target directory: the test binary is `<target>/<profile>/deps/<name>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(3)
        .expect("the test binary lies under the target directory")
        .to_path_buf()
}

/// Runs `command` to its end within `limit` (killed past it), stdin closed.
pub(super) async fn run(
    command: &mut tokio::process::Command,
    limit: Duration,
) -> Result<std::process::Output, String> {
    command.kill_on_drop(true).stdin(Stdio::null());
    let description = format!("{command:?}");
    match tokio::time::timeout(limit, command.output()).await {
        Err(_) => Err(format!("{description} did not finish within {limit:?}")),
        Ok(Err(error)) => Err(format!("{description} could not run: {error}")),
        Ok(Ok(output)) => Ok(output),
    }
}

/// Runs a check script of an official client (within 240 s) and returns what it printed, one
/// JSON document, once it succeeded.
pub(super) async fn run_check(command: &mut tokio::process::Command) -> Json {
    let output = run(command, Duration::from_secs(240))
        .await
        .unwrap_or_else(|reason| panic!("{reason}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stderr}"
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "the Python client printed no JSON ({error}):\n{}\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A virtual environment `name` under the target directory with `packages` from PyPI (made
/// once, then reused while `module` imports); the test fails where there can be none. Microsoft's official
/// clients, which the emulators are checked against, are Python packages.
pub(super) async fn python_venv(name: &str, module: &str, packages: &[&str]) -> PathBuf {
    try_python_venv(name, module, packages)
        .await
        .unwrap_or_else(|reason| panic!("cannot set up Microsoft's Python client: {reason}"))
}

async fn try_python_venv(name: &str, module: &str, packages: &[&str]) -> Result<PathBuf, String> {
    let venv = target_dir().join(name);
    let python = venv.join("bin").join("python");
    if python.exists() {
        let check = run(
            tokio::process::Command::new(&python).args(["-c", &format!("import {module}")]),
            Duration::from_secs(60),
        )
        .await?;
        if check.status.success() {
            return Ok(python);
        }
    }
    let created = run(
        tokio::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv),
        Duration::from_secs(180),
    )
    .await?;
    if !created.status.success() {
        return Err(format!(
            "python3 -m venv failed (on Debian, install python3-venv): {}",
            String::from_utf8_lossy(&created.stderr)
        ));
    }
    let installed = run(
        tokio::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages),
        Duration::from_secs(600),
    )
    .await?;
    if !installed.status.success() {
        return Err(format!(
            "pip install {} failed: {}",
            packages.join(" "),
            String::from_utf8_lossy(&installed.stderr)
        ));
    }
    Ok(python)
}

/// The JSON the check script prints for an annotation value.
fn annotation_json(value: &SystemValue) -> Json {
    match value {
        SystemValue::Str(text) => serde_json::json!({ "string": text }),
        SystemValue::Long(number) | SystemValue::Timestamp(number) => {
            serde_json::json!({ "int": number })
        }
    }
}

/// Microsoft's Python client reads a noisy fleet whole, every partition from its first event,
/// and sees every event as it was preloaded. The noise holds a twin change of about 270 KB
/// (past IoT Hub's 256 KiB body limit, within Event Hubs' 1 MB): the client announces a
/// max-frame-size of 1 MiB, so it arrives as one transfer frame far larger than the small
/// ones, and that frame too needs its full-length performative (the client takes the payload
/// as the transfer's twelfth element: `list index out of range` otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_reads_partitions_and_events() {
    const START: i64 = 0;
    const PARTITIONS: u32 = 4;
    let python = python_venv("eventhub-venv", "azure.eventhub", &["azure-eventhub"]).await;
    let script = source_dir().join("../../tests/python/eventhub_client_check.py");
    assert!(script.exists(), "{} is missing", script.display());

    let emulator = Emulator::start(EmulatorConfig::new(localhost(), "fleet-hub", PARTITIONS))
        .await
        .expect("emulator starts");
    let events = generated_events("fleet-hub", 200);
    let largest = events.iter().map(|event| event.body.len()).max();
    assert!(
        largest > Some(262_144),
        "the noise holds a body past IoT Hub's limit: largest {largest:?}"
    );
    for event in events.iter().cloned() {
        emulator.publish(event);
    }
    let seen = run_check(
        tokio::process::Command::new(&python)
            .arg(&script)
            .arg(emulator.connection_string())
            .arg(START.to_string())
            .arg("30"),
    )
    .await;

    assert_eq!(seen["eventhub"]["name"], "fleet-hub");
    assert_eq!(
        seen["eventhub"]["partition_ids"],
        serde_json::json!(["0", "1", "2", "3"])
    );
    let mut total = 0;
    for partition in 0..PARTITIONS {
        let seen_partition = &seen["partitions"][partition.to_string()];
        assert_eq!(
            seen_partition["errors"],
            serde_json::json!([]),
            "partition {partition}"
        );
        let snapshot = emulator.partition_snapshot(partition).expect("partition");
        let properties = &seen_partition["properties"];
        assert_eq!(properties["eventhub_name"], "fleet-hub");
        assert_eq!(properties["id"], partition.to_string());
        assert_eq!(
            properties["beginning_sequence_number"],
            snapshot.begin_sequence_number
        );
        assert_eq!(
            properties["last_enqueued_sequence_number"],
            snapshot.last_enqueued_sequence_number
        );
        assert_eq!(
            properties["last_enqueued_offset"],
            snapshot.last_enqueued_offset
        );
        assert_eq!(
            properties["last_enqueued_time_ms"],
            snapshot.last_enqueued_time_ms
        );
        assert_eq!(properties["is_empty"], snapshot.is_empty);

        let stored = emulator
            .hub
            .partition(partition)
            .expect("partition")
            .read(START as usize, 10_000);
        let received = seen_partition["events"].as_array().expect("events");
        let sequence_numbers: Vec<&Json> = received
            .iter()
            .map(|event| &event["sequence_number"])
            .collect();
        assert_eq!(
            received.len(),
            stored.len(),
            "partition {partition}: received sequence numbers {sequence_numbers:?}"
        );
        for (stored, received) in stored.iter().zip(received) {
            let event = &stored.event;
            let position = stored.position;
            assert_eq!(received["sequence_number"], position.sequence_number);
            assert_eq!(received["offset"], position.offset.to_string());
            assert_eq!(received["enqueued_time_ms"], position.enqueued_time_ms);
            assert_eq!(
                received["body_base64"],
                base64::engine::general_purpose::STANDARD.encode(&event.body)
            );
            let properties: BTreeMap<&str, Json> = event
                .properties
                .iter()
                .map(|(name, value)| (name.as_str(), Json::from(value.as_str())))
                .collect();
            assert_eq!(received["properties"], serde_json::json!(properties));
            let mut annotations: BTreeMap<&str, Json> = event
                .system_properties
                .iter()
                .map(|(name, value)| (name.as_str(), annotation_json(value)))
                .collect();
            annotations.insert(
                "x-opt-sequence-number",
                serde_json::json!({ "int": position.sequence_number }),
            );
            annotations.insert(
                "x-opt-offset",
                serde_json::json!({ "string": position.offset.to_string() }),
            );
            annotations.insert(
                "x-opt-enqueued-time",
                serde_json::json!({ "int": position.enqueued_time_ms }),
            );
            assert_eq!(received["annotations"], serde_json::json!(annotations));
            let mut amqp = serde_json::Map::new();
            let text = |value: &Option<String>| value.as_deref().map(Json::from);
            for (name, value) in [
                ("message_id", text(&event.message_id)),
                (
                    "user_id",
                    event
                        .user_id
                        .as_ref()
                        .map(|bytes| Json::from(String::from_utf8_lossy(bytes).into_owned())),
                ),
                ("content_type", text(&event.content_type)),
                ("content_encoding", text(&event.content_encoding)),
                ("correlation_id", text(&event.correlation_id)),
            ] {
                if let Some(value) = value {
                    amqp.insert(name.to_string(), value);
                }
            }
            assert_eq!(received["amqp_properties"], Json::Object(amqp));
            total += 1;
        }
    }
    assert_eq!(total, events.len(), "every preloaded event compared");
    emulator.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Error conditions on the wire (fe2o3-amqp's client, the engine under the official Rust client)
// ---------------------------------------------------------------------------------------------

mod wire_errors {
    use fe2o3_amqp::connection::ConnectionHandle;
    use fe2o3_amqp::sasl_profile::SaslProfile;
    use fe2o3_amqp::types::definitions::Fields;
    use fe2o3_amqp::types::messaging::{Body, Source};
    use fe2o3_amqp::types::primitives::{Symbol, Value};
    use fe2o3_amqp::{Connection, Receiver, Session};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    async fn connect(emulator: &Emulator) -> ConnectionHandle<()> {
        let url = format!("amqp://{}", emulator.local_addr());
        tokio::time::timeout(
            LIMIT,
            Connection::builder()
                .container_id("wire-test")
                .sasl_profile(SaslProfile::Anonymous)
                .open(url.as_str()),
        )
        .await
        .expect("connects in time")
        .expect("connects")
    }

    fn source(address: &str, selector: Option<&str>) -> Source {
        let mut builder = Source::builder().address(address.to_string());
        if let Some(selector) = selector {
            let mut filter = fe2o3_amqp::types::messaging::FilterSet::new();
            filter.insert(
                Symbol::from("apache.org:selector-filter:string"),
                Value::String(selector.to_string()),
            );
            builder = builder.filter(filter);
        }
        builder.build()
    }

    /// The text of the error that closes `receiver` within its next three receives (events
    /// still in flight may come first), each within `LIMIT` (`who` it is, for the message).
    async fn closing_error(receiver: &mut Receiver, who: &str) -> Option<String> {
        for _ in 0..3 {
            match tokio::time::timeout(LIMIT, receiver.recv::<Body<Value>>())
                .await
                .unwrap_or_else(|_| panic!("the {who} hears in time"))
            {
                Ok(_) => continue,
                Err(error) => return Some(format!("{error:?}")),
            }
        }
        None
    }

    /// An emulator of one partition holding one event, and a receiver `name` that received
    /// it, with its connection and its session (kept open).
    async fn one_receiver(
        name: &str,
    ) -> (
        Emulator,
        ConnectionHandle<()>,
        fe2o3_amqp::session::SessionHandle<()>,
        Receiver,
    ) {
        let emulator = Emulator::start(EmulatorConfig::new(localhost(), "hub1", 1))
            .await
            .expect("emulator starts");
        emulator.publish(event_for("d", None));
        let mut connection = connect(&emulator).await;
        let mut session = Session::begin(&mut connection).await.expect("session");
        let (receiver, first) = first_event(&mut session, name, &address("0"), None, None).await;
        assert_eq!(first, Ok(0));
        (emulator, connection, session, receiver.expect("attached"))
    }

    /// Attaches a receiver; `Ok` with the first sequence number it receives, or `Err` with
    /// the text of the error that closed it.
    async fn first_event(
        session: &mut fe2o3_amqp::session::SessionHandle<()>,
        name: &str,
        address: &str,
        selector: Option<&str>,
        epoch: Option<i64>,
    ) -> (Option<Receiver>, Result<i64, String>) {
        let mut builder = Receiver::builder()
            .name(name)
            .source(source(address, selector));
        if let Some(epoch) = epoch {
            let mut properties = Fields::new();
            properties.insert(Symbol::from("com.microsoft:epoch"), Value::Long(epoch));
            builder = builder.properties(properties);
        }
        let mut receiver = match tokio::time::timeout(LIMIT, builder.attach(session)).await {
            Ok(Ok(receiver)) => receiver,
            Ok(Err(error)) => return (None, Err(format!("{error:?}"))),
            Err(_) => panic!("attach of {name} timed out"),
        };
        let received = tokio::time::timeout(LIMIT, receiver.recv::<Body<Value>>())
            .await
            .expect("a delivery or an error in time");
        let result = match received {
            Ok(delivery) => {
                let sequence =
                    delivery
                        .message()
                        .message_annotations
                        .as_ref()
                        .and_then(|annotations| {
                            annotations
                                .iter()
                                .find(|(key, _)| {
                                    format!("{key:?}").contains("x-opt-sequence-number")
                                })
                                .map(|(_, value)| value.clone())
                        });
                match sequence {
                    Some(Value::Long(sequence)) => Ok(sequence),
                    other => Err(format!("no sequence number: {other:?}")),
                }
            }
            Err(error) => Err(format!("{error:?}")),
        };
        (Some(receiver), result)
    }

    fn address(partition: &str) -> String {
        format!("amqps://localhost/hub1/ConsumerGroups/$Default/Partitions/{partition}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receivers_get_the_services_error_conditions() {
        let emulator = Emulator::start(EmulatorConfig::new(localhost(), "hub1", 2))
            .await
            .expect("emulator starts");
        for _ in 0..3 {
            emulator.publish(event_for("device-a", None));
        }
        let partition = emulator.partition_of("device-a").to_string();
        let mut connection = connect(&emulator).await;
        let mut session = Session::begin(&mut connection).await.expect("session");

        // Quoted and unquoted selectors start where they say.
        let (quoted, first) = first_event(
            &mut session,
            "quoted",
            &address(&partition),
            Some("amqp.annotation.x-opt-sequence-number >= '1'"),
            None,
        )
        .await;
        assert_eq!(first, Ok(1));
        let (unquoted, first) = first_event(
            &mut session,
            "unquoted",
            &format!("hub1/ConsumerGroups/$Default/Partitions/{partition}"),
            Some("amqp.annotation.x-opt-sequence-number > 1"),
            None,
        )
        .await;
        assert_eq!(first, Ok(2));
        // Close, not drop: a dropped fe2o3 receiver cannot take the detach reply, and its
        // session then ends with an error.
        for receiver in [quoted, unquoted].into_iter().flatten() {
            let _ = tokio::time::timeout(LIMIT, receiver.close()).await;
        }

        for (name, address, selector, expected) in [
            ("bad-partition", address("7"), None, "argument-out-of-range"),
            (
                "beyond-end",
                address(&partition),
                Some("amqp.annotation.x-opt-sequence-number > '5'"),
                "argument-out-of-range",
            ),
            (
                "bad-hub",
                "amqps://localhost/other/ConsumerGroups/$Default/Partitions/0".to_string(),
                None,
                // fe2o3-amqp decodes `amqp:not-found` into its own enum.
                "NotFound",
            ),
        ] {
            let mut session = Session::begin(&mut connection).await.expect("session");
            let (_receiver, result) =
                first_event(&mut session, name, &address, selector, None).await;
            let error = result.expect_err(name);
            assert!(error.contains(expected), "{name}: {error}");
        }

        // A higher epoch steals the partition from the current owner.
        let mut owner_session = Session::begin(&mut connection).await.expect("session");
        let (owner, first) = first_event(
            &mut owner_session,
            "owner",
            &address(&partition),
            Some("amqp.annotation.x-opt-offset > '-1'"),
            Some(1),
        )
        .await;
        assert_eq!(first, Ok(0));
        let mut owner = owner.expect("attached");
        let mut thief_session = Session::begin(&mut connection).await.expect("session");
        let (thief, first) = first_event(
            &mut thief_session,
            "thief",
            &address(&partition),
            Some("amqp.annotation.x-opt-offset > '-1'"),
            Some(2),
        )
        .await;
        assert_eq!(first, Ok(0));
        let stolen = closing_error(&mut owner, "owner")
            .await
            .expect("the owner is disconnected");
        assert!(
            stolen.contains("Stolen") || stolen.contains("stolen"),
            "{stolen}"
        );
        // A lower epoch is refused while the thief reads.
        let mut late_session = Session::begin(&mut connection).await.expect("session");
        let (_late, result) = first_event(
            &mut late_session,
            "late",
            &address(&partition),
            None,
            Some(1),
        )
        .await;
        let refused = result.expect_err("a lower epoch is refused");
        assert!(refused.contains("tolen"), "{refused}");

        // Fault injection reaches the thief.
        assert_eq!(
            emulator.detach_receivers(
                None,
                super::super::registry::condition::SERVER_BUSY,
                "injected"
            ),
            1
        );
        let mut thief = thief.expect("attached");
        let busy = closing_error(&mut thief, "thief")
            .await
            .expect("the thief is detached");
        assert!(busy.contains("com.microsoft:server-busy"), "{busy}");
        let _ = tokio::time::timeout(LIMIT, connection.close()).await;
        emulator.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_closes_live_connections() {
        let (emulator, _connection, _session, mut receiver) = one_receiver("live").await;
        let started = std::time::Instant::now();
        emulator.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "shutdown took {:?}",
            started.elapsed()
        );
        let after = tokio::time::timeout(LIMIT, receiver.recv::<Body<Value>>())
            .await
            .expect("the client hears in time");
        assert!(after.is_err(), "the link is gone after shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_connections_end_without_a_close_and_new_ones_are_served() {
        let (emulator, mut connection, _session, mut receiver) = one_receiver("cut").await;

        assert_eq!(emulator.drop_connections(), 1, "one receiver was carried");
        let after = tokio::time::timeout(LIMIT, receiver.recv::<Body<Value>>())
            .await
            .expect("the client hears in time");
        let error = format!(
            "{:?}",
            after.expect_err("the link is gone with its connection")
        );
        // Dropped, not closed: the client got no AMQP error condition from the emulator.
        assert!(!error.contains("amqp:"), "{error}");
        let closed = tokio::time::timeout(LIMIT, connection.close())
            .await
            .expect("the client closes in time");
        assert!(closed.is_err(), "the connection was already gone");

        // A new connection reads on, from where the client asks.
        emulator.publish(event_for("d", None));
        let mut connection = connect(&emulator).await;
        let mut session = Session::begin(&mut connection).await.expect("session");
        let (_receiver, next) = first_event(
            &mut session,
            "again",
            &address("0"),
            Some("amqp.annotation.x-opt-sequence-number > '0'"),
            None,
        )
        .await;
        assert_eq!(next, Ok(1));
        let _ = tokio::time::timeout(LIMIT, connection.close()).await;
        emulator.shutdown().await;
    }
}
