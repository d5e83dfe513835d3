//! Property tests where an invariant is crisp: re-applying a prefix of a stream changes
//! nothing; a device delete leaves no module behind; the real pipeline (batches, cache,
//! RocksDB) ends with the same snapshot as the reference in-memory application.

use proptest::prelude::*;
use serde_json::{json, Value};
use twinwatch::model::{Op, TwinEvent, TwinKey};
use twinwatch::time::Ticks;
use twinwatch::twin::{apply, MemoryTwins, Outcome, Slot, Twins};

use crate::support::{expand, export, replay_files, write_lines};

const DEVICES: [&str; 2] = ["d1", "d2"];
const MODULES: [&str; 3] = ["", "azureiotsecurity", "m2"];

/// One generated event: its key, op, time, version and body.
#[derive(Clone, Debug)]
struct Ev {
    device: &'static str,
    module: &'static str,
    op: Op,
    seconds: i64,
    version: i64,
    body: Value,
}

impl Ev {
    fn op_name(&self) -> &'static str {
        match self.op {
            Op::UpdateTwin => "updateTwin",
            Op::ReplaceTwin => "replaceTwin",
            Op::CreateIdentity => "createDeviceIdentity",
            Op::DeleteIdentity => "deleteDeviceIdentity",
        }
    }

    fn time(&self) -> String {
        Ticks(self.seconds * 10_000_000).to_string()
    }

    fn line(&self) -> String {
        let mut message = json!({
            "op": self.op_name(), "device": self.device, "time": self.time(),
            "version": self.version, "body": self.body,
        });
        if !self.module.is_empty() {
            message["module"] = json!(self.module);
        }
        expand(&message)
    }
}

/// A patch of a few keys, some deleted with `null`, some nested.
fn arb_patch() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        prop::sample::select(vec!["a", "b", "c"]),
        prop_oneof![
            Just(Value::Null),
            any::<i8>().prop_map(|n| json!(n)),
            any::<i8>().prop_map(|n| json!({"x": n, "$metadata": {"$lastUpdated": "t"}})),
        ],
        0..3,
    )
    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// A raw choice of event; [`realize`] turns the choices into a stream IoT Hub could send.
fn arb_choice() -> impl Strategy<Value = (usize, usize, u8, Value, Value)> {
    (
        0..DEVICES.len(),
        0..MODULES.len(),
        0u8..10,
        arb_patch(),
        arb_patch(),
    )
}

/// Makes a stream realistic: versions and times increase, and a deleted twin comes back
/// only through a create (updates go to live or never-seen twins).
fn realize(choices: Vec<(usize, usize, u8, Value, Value)>) -> Vec<Ev> {
    let mut live = std::collections::BTreeSet::new();
    let mut dead = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, (d, m, kind, p1, p2)) in choices.into_iter().enumerate() {
        let key = (d, m);
        let op = match kind {
            0..=4 => Op::UpdateTwin,
            5 => Op::ReplaceTwin,
            6 | 7 => Op::CreateIdentity,
            _ => Op::DeleteIdentity,
        };
        // IoT Hub deletes only what exists, and only a create brings a deleted twin back.
        let op = match op {
            Op::UpdateTwin | Op::ReplaceTwin if dead.contains(&key) => Op::CreateIdentity,
            Op::DeleteIdentity if !live.contains(&key) => Op::CreateIdentity,
            op => op,
        };
        let body = match op {
            Op::UpdateTwin => json!({"tags": p1, "properties": {"desired": p2}}),
            _ => json!({"tags": p1, "properties": {"reported": p2}, "etag": format!("e{i}")}),
        };
        match op {
            Op::DeleteIdentity => {
                if live.remove(&key) {
                    dead.insert(key);
                }
                if m == 0 && dead.contains(&key) {
                    for module in 1..MODULES.len() {
                        if live.remove(&(d, module)) {
                            dead.insert((d, module));
                        }
                    }
                }
            }
            _ => {
                dead.remove(&key);
                live.insert(key);
            }
        }
        out.push(Ev {
            device: DEVICES[d],
            module: MODULES[m],
            op,
            seconds: 1_700_000_000 + i as i64,
            version: i as i64 + 1,
            body,
        });
    }
    out
}

fn apply_all(
    twins: &mut MemoryTwins,
    events: &[Ev],
    mut after: impl FnMut(&Ev, &Outcome, &MemoryTwins),
) {
    for ev in events {
        let mut text = serde_json::to_vec(&ev.body).expect("json");
        let tape = simd_json::to_tape(&mut text).expect("valid json");
        let event = TwinEvent {
            key: TwinKey {
                hub: "hub",
                device_id: ev.device,
                module_id: ev.module,
            },
            op: ev.op,
            op_time: Ticks(ev.seconds * 10_000_000),
            version: ev.version,
            body: &tape.0,
        };
        let outcome = apply(&event, twins).expect("infallible");
        after(ev, &outcome, twins);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn reapplying_a_prefix_changes_nothing(
        choices in prop::collection::vec(arb_choice(), 1..40),
        cut in any::<prop::sample::Index>(),
    ) {
        let events = realize(choices);
        let mut twins = MemoryTwins::default();
        apply_all(&mut twins, &events, |_, _, _| {});
        let before = twins.clone();
        let k = cut.index(events.len() + 1);
        let mut changed = Vec::new();
        apply_all(&mut twins, &events[..k], |ev, outcome, _| {
            if *outcome != Outcome::Stale {
                changed.push(format!("{ev:?} -> {outcome:?}"));
            }
        });
        prop_assert!(changed.is_empty(), "re-applied events changed the snapshot: {changed:?}");
        prop_assert_eq!(before, twins);
    }

    #[test]
    fn a_device_delete_leaves_no_module_behind(choices in prop::collection::vec(arb_choice(), 1..60)) {
        let events = realize(choices);
        let mut twins = MemoryTwins::default();
        let mut checked = 0;
        apply_all(&mut twins, &events, |ev, outcome, twins| {
            if ev.module.is_empty() && matches!(outcome, Outcome::Removed { .. }) {
                checked += 1;
                let left = twins.live_modules("hub", ev.device);
                assert!(left.is_empty(), "modules left after deleting {}: {left:?}", ev.device);
                for (key, slot) in &twins.slots {
                    if &*key.device_id == ev.device {
                        assert!(matches!(slot, Slot::Dead { .. }), "{key:?} is {slot:?}");
                    }
                }
            }
        });
        // Deletes of live devices are frequent enough that most streams check something;
        // the count is only informative.
        let _ = checked;
    }
}

proptest! {
    // Each case opens a real RocksDB: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn the_pipeline_matches_the_reference(
        choices in prop::collection::vec(arb_choice(), 1..80),
        batch_messages in 1usize..8,
        cache_bytes in prop::sample::select(vec![0usize, 200, 1 << 20]),
    ) {
        let events = realize(choices);
        let mut twins = MemoryTwins::default();
        apply_all(&mut twins, &events, |_, _, _| {});
        let expected: Vec<Value> = twins
            .export()
            .iter()
            .map(|v| serde_json::to_value(v).expect("json"))
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("input.json");
        write_lines(&input, &events.iter().map(Ev::line).collect::<Vec<_>>());
        let options = twinwatch::pipeline::EngineOptions {
            batch_messages,
            cache_bytes,
            ..Default::default()
        };
        let data_dir = dir.path().join("data");
        let report = replay_files(&data_dir, &[input], options);
        prop_assert_eq!(report.counters.messages, events.len() as u64);
        prop_assert_eq!(export(&data_dir), expected);
    }
}
