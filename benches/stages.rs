//! Per-stage benchmarks on a deterministic generated fleet: decode (parse + classify + checks),
//! apply (the pure twin logic), store (one RocksDB batch write) and the whole engine.
//!
//! `cargo bench --bench stages`; throughput is in messages.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use twinwatch::decode::{decode_body, decode_header, Body, DEFAULT_MAX_BODY_BYTES};
use twinwatch::generate::{write_json_lines, GenerateOptions};
use twinwatch::model::SourceId;
use twinwatch::pipeline::{Engine, EngineOptions};
use twinwatch::policy::Policy;
use twinwatch::source::storage_json::StorageJsonMessage;
use twinwatch::store::{encode_twin, Batch, Store, StoreOptions};
use twinwatch::twin::{apply, MemoryTwins};

fn fleet(devices: u64, events: u64) -> Vec<Vec<u8>> {
    let options = GenerateOptions {
        devices,
        events,
        seed: 1,
        hub: "bench-hub".into(),
        noise: 0.0,
    };
    let mut out = Vec::new();
    write_json_lines(&options, &mut out).expect("generate");
    out.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let lines = fleet(2_000, 20_000);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("storage_json_line", |b| {
        let mut buffers = simd_json::Buffers::default();
        let mut buf = Vec::new();
        b.iter(|| {
            let mut n_events = 0usize;
            for line in &lines {
                buf.clear();
                buf.extend_from_slice(line);
                let tape = simd_json::to_tape_with_buffers(&mut buf, &mut buffers).expect("json");
                let message = StorageJsonMessage::new(&tape.0, line.len()).expect("object");
                if let Ok(header) = decode_header(&message, DEFAULT_MAX_BODY_BYTES) {
                    if let Body::Tape(body) = header.body {
                        n_events += usize::from(decode_body(&header, body).is_ok());
                    }
                }
            }
            n_events
        })
    });
    group.finish();
}

fn bench_apply(c: &mut Criterion) {
    let lines = fleet(2_000, 20_000);
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("memory_twins", |b| {
        b.iter_batched(
            || lines.clone(),
            |mut lines| {
                let mut twins = MemoryTwins::default();
                for line in &mut lines {
                    let len = line.len();
                    let tape = simd_json::to_tape(line).expect("json");
                    let message = StorageJsonMessage::new(&tape.0, len).expect("object");
                    if let Ok(header) = decode_header(&message, DEFAULT_MAX_BODY_BYTES) {
                        if let Body::Tape(body) = header.body {
                            if let Ok(event) = decode_body(&header, body) {
                                let _ = apply(&event, &mut twins);
                            }
                        }
                    }
                }
                twins
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn bench_store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("store");
    let mut doc = twinwatch::twin::empty_doc();
    doc.insert("etag", "AAAAAAAAAAE=".into());
    let mut record = Vec::new();
    encode_twin(3, None, twinwatch::time::Ticks(0), &doc, &mut record);
    let n = 8192u64;
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(n));
    let mut round = 0u64;
    group.bench_function("batch_8192_twins", |b| {
        b.iter(|| {
            round += 1;
            let mut batch = Batch::default();
            for i in 0..n {
                let key = format!(
                    "hub\0\x01device-{:08}\0\x01\0\x01",
                    (round * n + i) % 400_000
                );
                store
                    .put_twin(&mut batch, key.as_bytes(), &record)
                    .expect("put");
            }
            store.write(&mut batch).expect("write");
        })
    });
    group.finish();
}

fn bench_engine(c: &mut Criterion) {
    let lines = fleet(5_000, 50_000);
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.sample_size(10);
    group.bench_function("ingest_into_rocksdb", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let store =
                    Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("store"));
                let mut engine = Engine::new(store, EngineOptions::default()).expect("engine");
                let (source, _) = engine
                    .add_source(SourceId::File("bench".into()), "bench".into())
                    .expect("source");
                for (i, line) in lines.iter().enumerate() {
                    engine
                        .ingest_json_line(source, i as u64, i as u64, line)
                        .expect("ingest");
                }
                engine.finish().expect("finish");
                dir
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// A re-audit of a whole snapshot (`docs/semantics.md` §8): the policy switches between the
/// baseline and a changed copy of it, so that every iteration re-audits every twin.
fn bench_reaudit(c: &mut Criterion) {
    let lines = fleet(20_000, 200_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("store"));
    let mut engine = Engine::new(store, EngineOptions::default()).expect("engine");
    let (source, _) = engine
        .add_source(SourceId::File("bench".into()), "bench".into())
        .expect("source");
    for (i, line) in lines.iter().enumerate() {
        engine
            .ingest_json_line(source, i as u64, i as u64, line)
            .expect("ingest");
    }
    let twins = engine.snapshot().directory.n_live() as u64;
    let baseline = Arc::new(Policy::baseline());
    let text = include_str!("../policies/security-twin-baseline.yaml").replacen(
        "severity: medium",
        "severity: high",
        1,
    );
    let changed = Arc::new(
        Policy::from_sources(&[("changed.yaml".into(), text)]).expect("the changed policy"),
    );
    let mut group = c.benchmark_group("reaudit");
    group.throughput(Throughput::Elements(twins));
    group.sample_size(10);
    let mut flip = false;
    group.bench_function("every_twin_of_the_snapshot", |b| {
        b.iter(|| {
            flip = !flip;
            let policy = if flip { &changed } else { &baseline };
            engine
                .set_policy(policy.clone(), &mut |_| {})
                .expect("re-audit")
                .expect("the fingerprint differs")
        })
    });
    group.finish();
    engine.finish().expect("finish");
}

criterion_group!(
    benches,
    bench_decode,
    bench_apply,
    bench_store,
    bench_engine,
    bench_reaudit
);
criterion_main!(benches);
