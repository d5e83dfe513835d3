//! Evaluating stored twins in key order on every core: the re-audit, the `audit` dry run and
//! the end of a seed pass.
//!
//! One thread reads the twins' raw bytes from the store in key order and cuts them into
//! batches of whole devices (a device twin's `/$modules` are the module twins stored beside
//! it, so a device is never split); the batches go round-robin to evaluator threads, which
//! decode and evaluate them; the caller takes the results back in the same round-robin order,
//! so it sees the twins in key order whatever the number of evaluators. Decoding and
//! evaluating, most of the work of a pass, run on every core; the caller's part (violations,
//! alerts, commits) stays on its own thread.

use crossbeam_channel::{bounded, Receiver, Sender};

use super::violations::failing_rules;
use super::PipelineError;
use crate::model::OwnedTwinKey;
use crate::policy::Policy;
use crate::store::keys::{decode_twin_key, device_prefix_len};
use crate::store::{decode_twin, Store, StoreError};

/// A twin evaluated by a scan: its encoded and decoded key, its version and the positions of
/// the rules failing on it.
pub(super) struct Audited {
    pub encoded: Vec<u8>,
    pub key: OwnedTwinKey,
    pub version: i64,
    pub failing: Vec<usize>,
}

/// Which twins a scan evaluates.
#[derive(Clone, Copy)]
pub(super) enum Scope<'a> {
    /// Every stored twin from this encoded key on (inclusive).
    From(&'a [u8]),
    /// The stored twins among these encoded keys (sorted, without repeats); a key that is not
    /// stored yields nothing.
    Keys(&'a [Vec<u8>]),
}

/// Twins in a batch (at least; a batch ends at the end of a device).
const BATCH_TWINS: usize = 256;

/// Batches queued per evaluator, each way.
const QUEUED_BATCHES: usize = 2;

/// The most evaluator threads (beyond the machine's cores they only add memory).
const MAX_EVALUATORS: usize = 8;

/// Stored twins as read, whole devices: their bytes one after another (one allocation for
/// the lot), and each twin's place in them.
#[derive(Default)]
struct Raw {
    bytes: Vec<u8>,
    twins: Vec<RawTwin>,
}

/// A twin in [`Raw`]: its encoded key is `bytes[start..key_end]`, its encoded record
/// `bytes[key_end..end]`; `wanted`: the scan evaluates it (a device's other twins are read
/// with it for `/$modules`).
struct RawTwin {
    start: usize,
    key_end: usize,
    end: usize,
    wanted: bool,
}

impl Raw {
    fn push(&mut self, key: &[u8], record: &[u8], wanted: bool) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(record);
        self.twins.push(RawTwin {
            start,
            key_end,
            end: self.bytes.len(),
            wanted,
        });
    }

    fn key(&self, twin: &RawTwin) -> &[u8] {
        &self.bytes[twin.start..twin.key_end]
    }

    fn record(&self, twin: &RawTwin) -> &[u8] {
        &self.bytes[twin.key_end..twin.end]
    }

    /// Forgets the twins from the `n`th on.
    fn truncate(&mut self, n: usize) {
        if let Some(twin) = self.twins.get(n) {
            self.bytes.truncate(twin.start);
            self.twins.truncate(n);
        }
    }
}

type RawBatch = Result<Raw, PipelineError>;
type AuditedBatch = Vec<Result<Audited, PipelineError>>;

/// Evaluates the twins of `scope` under `policy` and gives each to `consume` in key order, on
/// the calling thread. The first error (reading, decoding, or `consume`'s) ends the scan.
pub(super) fn evaluate_in_order(
    store: &Store,
    scope: Scope<'_>,
    policy: &Policy,
    consume: impl FnMut(Audited) -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    let n = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_EVALUATORS);
    evaluate_with(n, store, scope, policy, consume)
}

/// [`evaluate_in_order`] with `n` evaluator threads.
fn evaluate_with(
    n: usize,
    store: &Store,
    scope: Scope<'_>,
    policy: &Policy,
    mut consume: impl FnMut(Audited) -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    std::thread::scope(|scope_| -> Result<(), PipelineError> {
        let mut inputs = Vec::with_capacity(n);
        let mut outputs = Vec::with_capacity(n);
        for i in 0..n {
            let (to_evaluator, batches) = bounded::<RawBatch>(QUEUED_BATCHES);
            let (results, from_evaluator) = bounded::<AuditedBatch>(QUEUED_BATCHES);
            std::thread::Builder::new()
                .name(format!("twinwatch-eval-{i}"))
                .spawn_scoped(scope_, move || evaluate_batches(policy, &batches, &results))
                .map_err(PipelineError::Thread)?;
            inputs.push(to_evaluator);
            outputs.push(from_evaluator);
        }
        std::thread::Builder::new()
            .name("twinwatch-scan-read".into())
            .spawn_scoped(scope_, move || read_batches(store, scope, &inputs))
            .map_err(PipelineError::Thread)?;
        // Batch i went to evaluator i % n: when that one has no more, there is no batch i.
        for from_evaluator in outputs.iter().cycle() {
            let Ok(batch) = from_evaluator.recv() else {
                break;
            };
            for twin in batch {
                consume(twin?)?;
            }
        }
        Ok(())
    })
}

/// The reading thread: whole devices, in key order, in batches dealt round-robin to
/// `evaluators`. An error is the last batch. Stops when an evaluator hangs up.
fn read_batches(store: &Store, scope: Scope<'_>, evaluators: &[Sender<RawBatch>]) {
    let mut next = 0usize;
    let mut send = |batch: RawBatch| -> bool {
        let sent = evaluators[next % evaluators.len()].send(batch).is_ok();
        next += 1;
        sent
    };
    let mut batch = Raw::default();
    let result = read_devices(store, scope, &mut batch, |batch| {
        if batch.twins.len() >= BATCH_TWINS {
            return send(Ok(std::mem::take(batch)));
        }
        true
    });
    match result {
        Ok(()) if !batch.twins.is_empty() => {
            send(Ok(batch));
        }
        Ok(()) => {}
        Err(e) => {
            send(Err(e));
        }
    }
}

/// Reads the devices of `scope` in key order into `batch`, each whole, calling `device_read`
/// after each (which may take the batch, and returns false to stop).
fn read_devices(
    store: &Store,
    scope: Scope<'_>,
    batch: &mut Raw,
    mut device_read: impl FnMut(&mut Raw) -> bool,
) -> Result<(), PipelineError> {
    let mut cursor = store.twin_cursor()?;
    match scope {
        Scope::From(from) => {
            cursor.seek(from);
            // Where the device being read starts in `batch`.
            let mut device = None;
            while let Some((key, record)) = cursor.current() {
                let n = device_prefix_len(key).ok_or_else(|| StoreError::bad_key(key))?;
                let next_device = device
                    .is_some_and(|first| !batch.key(&batch.twins[first]).starts_with(&key[..n]));
                if next_device {
                    if !device_read(batch) {
                        return Ok(());
                    }
                    device = None;
                }
                device.get_or_insert(batch.twins.len());
                batch.push(key, record, true);
                cursor.next();
            }
            cursor.status()?;
            if device.is_some() {
                device_read(batch);
            }
        }
        Scope::Keys(keys) => {
            let mut keys = keys.iter().peekable();
            while let Some(first) = keys.peek() {
                let prefix =
                    &first[..device_prefix_len(first).ok_or_else(|| StoreError::bad_key(first))?];
                // The cursor is past the last device read: a gap is skipped by a seek, and a
                // device read before this one is right under it.
                if cursor.current().is_none_or(|(key, _)| key < prefix) {
                    cursor.seek(prefix);
                }
                let (device, mut wanted_any) = (batch.twins.len(), false);
                while let Some((key, record)) =
                    cursor.current().filter(|(k, _)| k.starts_with(prefix))
                {
                    while keys.next_if(|k| k.as_slice() < key).is_some() {}
                    let wanted = keys.next_if(|k| k.as_slice() == key).is_some();
                    wanted_any |= wanted;
                    batch.push(key, record, wanted);
                    cursor.next();
                }
                cursor.status()?;
                // This device's keys that are not stored.
                while keys.next_if(|k| k.starts_with(prefix)).is_some() {}
                if !wanted_any {
                    batch.truncate(device);
                } else if !device_read(batch) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// An evaluator thread: decodes and evaluates each batch, and sends back its wanted twins.
/// Stops when the reader is done or the caller hangs up.
fn evaluate_batches(policy: &Policy, batches: &Receiver<RawBatch>, results: &Sender<AuditedBatch>) {
    let mut device = Vec::new();
    for batch in batches {
        let out = match batch {
            Ok(batch) => evaluate_batch(policy, batch, &mut device),
            Err(e) => vec![Err(e)],
        };
        if results.send(out).is_err() {
            return;
        }
    }
}

/// Evaluates a batch of whole devices; an undecodable twin ends the batch with its error.
fn evaluate_batch(
    policy: &Policy,
    batch: Raw,
    device: &mut Vec<(usize, OwnedTwinKey)>,
) -> AuditedBatch {
    let mut out = Vec::with_capacity(batch.twins.len());
    device.clear();
    for (i, twin) in batch.twins.iter().enumerate() {
        let Some(key) = decode_twin_key(batch.key(twin)) else {
            out.push(Err(StoreError::bad_key(batch.key(twin)).into()));
            return out;
        };
        let next_device = device
            .first()
            .is_some_and(|(_, first)| first.hub != key.hub || first.device_id != key.device_id);
        if next_device {
            if let Err(e) = evaluate_device(policy, &batch, device, &mut out) {
                out.push(Err(e));
                return out;
            }
        }
        device.push((i, key));
    }
    if let Err(e) = evaluate_device(policy, &batch, device, &mut out) {
        out.push(Err(e));
    }
    out
}

/// Evaluates one device's wanted twins (`device`: their places in `batch` and their keys; the
/// device twin's modules are the module twins read with it), in key order, into `out`;
/// empties `device`.
fn evaluate_device(
    policy: &Policy,
    batch: &Raw,
    device: &mut Vec<(usize, OwnedTwinKey)>,
    out: &mut AuditedBatch,
) -> Result<(), PipelineError> {
    let modules: Vec<Box<str>> = device
        .iter()
        .filter(|(_, key)| !key.module_id.is_empty())
        .map(|(_, key)| key.module_id.clone())
        .collect();
    for (i, key) in device.drain(..) {
        let twin = &batch.twins[i];
        if !twin.wanted {
            continue;
        }
        let record = decode_twin(batch.record(twin))?;
        let twin_key = key.as_key();
        let modules = if twin_key.is_device_twin() {
            &modules[..]
        } else {
            &[]
        };
        let mut failing = Vec::new();
        failing_rules(
            policy,
            modules,
            twin_key,
            record.version,
            &record.doc,
            &mut failing,
        );
        out.push(Ok(Audited {
            encoded: batch.key(twin).to_vec(),
            version: record.version,
            failing,
            key,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TwinKey;
    use crate::store::keys::twin_key;
    use crate::store::{encode_twin, Batch, StoreOptions};
    use crate::time::Ticks;
    use crate::value::{Map, Value};

    /// A stored twin: its encoded and decoded key, version, document and `/$modules`.
    type Stored = (Vec<u8>, OwnedTwinKey, i64, Map, Vec<Box<str>>);

    /// A fleet of devices with zero to three module twins, some module twins without their
    /// device twin, stored, in key order.
    fn fleet(store: &Store) -> Vec<Stored> {
        let mut twins = Vec::new();
        // Ids of several lengths, some the start of others, a short one before a long one.
        let ids = (0..300)
            .map(|d| format!("dev-{d}"))
            .chain(["x".to_owned(), "x-with-a-much-longer-id".to_owned()]);
        for (d, device_id) in ids.enumerate() {
            let modules: Vec<Box<str>> = ["azureiotsecurity", "edgeAgent", "m\0x"]
                .iter()
                .take(d % 4)
                .map(|m| Box::<str>::from(*m))
                .collect();
            let mut ids: Vec<&str> = vec![""];
            ids.extend(modules.iter().map(|m| &**m));
            for (i, module_id) in ids.into_iter().enumerate() {
                if module_id.is_empty() && d % 7 == 3 {
                    continue; // modules without their device twin
                }
                let tags = if (d + i) % 3 == 0 {
                    serde_json::json!({})
                } else {
                    serde_json::json!({"owner": format!("team-{i}")})
                };
                let json = serde_json::json!({
                    "tags": tags,
                    "properties": {"reported": {"firmwareVersion": format!("{}.0", d % 5)}},
                });
                let doc = Value::from(&json).as_object().cloned().expect("an object");
                let key = TwinKey {
                    hub: "hub",
                    device_id: &device_id,
                    module_id,
                };
                let own = if module_id.is_empty() {
                    modules.clone()
                } else {
                    Vec::new()
                };
                twins.push((twin_key(key), key.to_owned_key(), d as i64 + 1, doc, own));
            }
        }
        twins.sort_by(|a, b| a.0.cmp(&b.0));
        let mut batch = Batch::default();
        for (encoded, _, version, doc, _) in &twins {
            let mut record = Vec::new();
            encode_twin(*version, None, Ticks(0), doc, &mut record);
            store.put_twin(&mut batch, encoded, &record).expect("put");
        }
        store.write(&mut batch).expect("write");
        twins
    }

    /// Whatever the number of evaluators and the scope, the twins come back in key order
    /// with the failing sets evaluated one by one; an error from `consume` ends the scan.
    #[test]
    fn a_scan_evaluates_in_key_order_whatever_the_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
        let twins = fleet(&store);
        let policy = Policy::baseline();
        let expected: Vec<(Vec<u8>, i64, Vec<usize>)> = twins
            .iter()
            .map(|(encoded, key, version, doc, modules)| {
                let mut failing = Vec::new();
                failing_rules(&policy, modules, key.as_key(), *version, doc, &mut failing);
                (encoded.clone(), *version, failing)
            })
            .collect();
        assert!(expected.iter().any(|(_, _, f)| !f.is_empty()));
        assert!(expected.iter().any(|(_, _, f)| f.is_empty()));
        let middle = expected[expected.len() / 2].0.clone();
        // Every third twin, a few keys nobody stored, and a whole device's.
        let mut keys: Vec<Vec<u8>> = expected.iter().step_by(3).map(|t| t.0.clone()).collect();
        for (device_id, module_id) in [("dev-0", "zzz"), ("dev-00", ""), ("zzz", "")] {
            keys.push(twin_key(TwinKey {
                hub: "hub",
                device_id,
                module_id,
            }));
        }
        keys.sort();
        let run = |n: usize, scope: Scope<'_>| {
            let mut out = Vec::new();
            evaluate_with(n, &store, scope, &policy, |a| {
                assert_eq!(twin_key(a.key.as_key()), a.encoded);
                out.push((a.encoded, a.version, a.failing));
                Ok(())
            })
            .expect("scan");
            out
        };
        for n in 1..=3 {
            assert_eq!(run(n, Scope::From(&[])), expected, "{n} evaluators");
            let from: Vec<_> = expected.iter().filter(|t| t.0 >= middle).cloned().collect();
            assert_eq!(run(n, Scope::From(&middle)), from);
            let wanted: Vec<_> = expected
                .iter()
                .filter(|t| keys.contains(&t.0))
                .cloned()
                .collect();
            assert_eq!(run(n, Scope::Keys(&keys)), wanted);
            let mut seen = 0;
            let stopped = evaluate_with(n, &store, Scope::From(&[]), &policy, |_| {
                seen += 1;
                if seen == 600 {
                    return Err(PipelineError::Thread(std::io::Error::other("stop")));
                }
                Ok(())
            });
            assert!(stopped.is_err());
            assert_eq!(seen, 600);
        }
    }
}
