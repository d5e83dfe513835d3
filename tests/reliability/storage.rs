//! Storage faults: the data directory's filesystem filling up again and again while the
//! service consumes a stream, and data directories of another format.
//!
//! The disk is a tmpfs with a size limit, mounted by the test (it runs as root, as `.ci/run`
//! does). Each time it fills, the service must stop consuming, commit nothing, say why on
//! /readyz, and go on by itself once space is freed; at the end one process has counted every
//! event exactly once and its snapshot is a replay's.

use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinwatch::app::emulator::events_of_file;
use twinwatch::store::keys::{ALL_CFS, CF_META, META_FORMAT};

use crate::report;
use crate::service::{
    committed, consumed, free_port, readyz, sigterm_and_wait, spawn_run, wait_ready, Hub, SmallDisk,
};
use crate::support::{assert_export_is_replays, generate_fleet, ok, path, run};

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn full_disk_campaign() {
    let scale = report::scale();
    let mut rng = ChaCha8Rng::seed_from_u64(report::seed(20_261_126));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 2000, scale.pick(90_000, 30_000), 33, 0.03);
    let events = events_of_file(&file).expect("events");
    let total = events.len() as u64;
    let mut hub = Hub::empty("iothub-ehub-disk");
    hub.published = total;
    // RocksDB preallocates its write-ahead log (tens of MiB): the disk is roomy enough for that
    // and the snapshot, and the filler takes the rest.
    let disk = SmallDisk::mount(&dir.path().join("small"), 384);
    let port = free_port();
    let (data, config) = disk.service_config(
        dir.path(),
        port,
        "min_free_disk_mib = 64\n[batching]\nmax_messages = 200\n",
    );
    let mut service = spawn_run(&hub, &["run", "--config", path(&config)]);
    {
        let _guard = hub.runtime.enter();
        hub.emulator
            .as_ref()
            .expect("running")
            // At 2,000 events/s the stream outlasts the fill cycles (about 5 s each): the service
            // only learns of a full disk when it has a batch to write.
            .spawn_publisher(events.into_iter(), 2000.0);
    }
    wait_for(
        "the service starts consuming",
        Duration::from_secs(60),
        || consumed(port).unwrap_or(0) > 0,
    );

    let cycles = scale.pick(6, 2);
    let mut fills = 0;
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        // 40 MiB free, below the 64 the service keeps (and room for RocksDB's own flushes).
        let filler = disk.fill_to(40 << 20);
        fills += 1;
        wait_for(
            "/readyz reports the full disk",
            Duration::from_secs(30),
            || matches!(readyz(port), Some((503, body)) if body.contains("disk is full")),
        );
        // Paused: the writer waits before its next batch, the apply thread and the receivers
        // stop behind it; give what was in flight a moment, then nothing moves.
        std::thread::sleep(Duration::from_secs(1));
        let (consumed_before, committed_before) = (consumed(port), committed(port));
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..2500)));
        assert_eq!(
            consumed(port),
            consumed_before,
            "it went on consuming with a full disk"
        );
        assert_eq!(
            committed(port),
            committed_before,
            "it committed with a full disk"
        );
        std::fs::remove_file(&filler).expect("free the space");
        // Ready again once the space is freed.
        wait_ready(port, Duration::from_secs(30));
    }

    // Every event counted once by the one process, all committed.
    wait_for("the service catches up", Duration::from_secs(180), || {
        committed(port) as u64 == total
    });
    std::thread::sleep(Duration::from_secs(2));
    let counted = consumed(port).expect("metrics");
    assert_eq!(
        counted, total,
        "events counted (applied, stale, ignored, dead) != published"
    );
    sigterm_and_wait(&mut service);
    assert_export_is_replays(
        dir.path(),
        &file,
        &data,
        &format!("after {fills} full disks"),
    );
    report::record(
        "storage-full-disk",
        &[
            ("fills", fills),
            ("events", total),
            ("lost", total.saturating_sub(counted)),
            ("doubled", counted.saturating_sub(total)),
        ],
    );
}

/// Puts `format` as the data directory's format marker, as another build would have.
fn set_format(data: &Path, format: &str) {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(false);
    let db = rocksdb::DB::open_cf(&options, data, ALL_CFS).expect("open the data directory");
    db.put_cf(db.cf_handle(CF_META).expect("meta"), META_FORMAT, format)
        .expect("put the format");
}

fn format_of(data: &Path) -> String {
    let db = rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), data, ALL_CFS, false)
        .expect("open the data directory");
    let raw = db
        .get_cf(db.cf_handle(CF_META).expect("meta"), META_FORMAT)
        .expect("get the format")
        .expect("a format marker");
    String::from_utf8(raw).expect("utf-8")
}

#[test]
fn data_directories_of_another_format_are_refused_by_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 100, 1000, 34, 0.0);
    let data = dir.path().join("data");
    ok(&["replay", "--data-dir", path(&data), path(&file)]);
    let mut tried = 0;
    for format in [
        "twinwatch-snapshot-2",
        "twinwatch-snapshot-0",
        "something-else",
    ] {
        set_format(&data, format);
        let hub = Hub::start(&file);
        for args in [
            vec!["replay", "--data-dir", path(&data), path(&file)],
            vec!["export", "--data-dir", path(&data)],
            vec!["violations", "--data-dir", path(&data)],
        ] {
            let out = run(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} accepted format {format}");
            assert!(
                stderr.contains(format) && stderr.contains(twinwatch::store::FORMAT),
                "{args:?} on format {format}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
            tried += 1;
        }
        let mut service = spawn_run(
            &hub,
            &["run", "--data-dir", path(&data), "--listen", "127.0.0.1:0"],
        );
        let status = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = service.try_wait().expect("try_wait") {
                    break status;
                }
                if Instant::now() > deadline {
                    sigterm_and_wait(&mut service);
                    panic!("`run` went on with a data directory of format {format}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        assert!(!status.success(), "`run` accepted format {format}");
        tried += 1;
        assert_eq!(format_of(&data), format, "a refusal changed the directory");
    }
    report::record("storage-format", &[("refusals", tried), ("accepted", 0)]);
}
