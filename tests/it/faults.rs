//! Faults a service meets in production, injected around the real binary: here, the data
//! directory's disk filling up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::live::{consumed, free_port, sigterm_and_wait, spawn_run, Hub};
use crate::support::{generate_fleet, ok, path};

/// A tmpfs of `mib` MiB mounted at `at` (the tests run as root, as `.ci/run` does), unmounted
/// when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, mib: u64) -> SmallDisk {
        std::fs::create_dir_all(at).expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                path(at),
            ])
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: the storage-fault test needs root"
        );
        SmallDisk(at.to_owned())
    }

    fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail", path(&self.0)])
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df's answer")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", path(&self.0)]).status();
    }
}

fn readyz(port: u16) -> Option<(u16, String)> {
    let response = ureq::get(&format!("http://127.0.0.1:{port}/readyz"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.into_body().read_to_string().ok()?))
}

fn committed(port: u16) -> f64 {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_body().read_to_string().ok())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("twinwatch_checkpoint_sequence_number{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|seq| seq + 1.0)
        .sum()
}

#[test]
fn a_full_disk_pauses_consuming_and_it_resumes_once_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 600, 6000, 23, 0.03);
    let hub = Hub::start(&file);
    let disk = SmallDisk::mount(&dir.path().join("small"), 64);
    let data = disk.0.join("data");
    let port = free_port();
    let config = dir.path().join("twinwatch.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\nmin_free_disk_mib = 16\nshutdown_deadline_secs = 5\n[batching]\nmax_messages = 200\n",
            path(&data)
        ),
    )
    .expect("config");

    // Fill the disk to 8 MiB free, below the 16 the service keeps.
    let filler = disk.0.join("filler");
    let keep = 8u64 << 20;
    let size = disk.free_bytes().saturating_sub(keep);
    std::fs::write(&filler, vec![0u8; size as usize]).expect("filler");
    let mut service = spawn_run(&hub, &["run", "--config", path(&config)]);

    // Paused: not ready, saying why; nothing committed; consuming stops short.
    let deadline = Instant::now() + Duration::from_secs(60);
    let problem = loop {
        if let Some((503, body)) = readyz(port) {
            if body.contains("disk is full") {
                break body;
            }
        }
        assert!(Instant::now() < deadline, "never reported the full disk");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(problem.contains("consuming is paused"), "{problem}");
    std::thread::sleep(Duration::from_secs(2));
    let before = consumed(port).expect("metrics");
    std::thread::sleep(Duration::from_secs(2));
    let after = consumed(port).expect("metrics");
    assert_eq!(before, after, "it went on consuming with a full disk");
    assert!(
        after < hub.published,
        "it consumed everything with a full disk"
    );
    assert_eq!(committed(port), 0.0, "it committed with a full disk");

    // Space freed: it goes on by itself and catches up.
    std::fs::remove_file(&filler).expect("free the space");
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed(port) < hub.published as f64 {
        assert!(
            Instant::now() < deadline,
            "did not catch up after space was freed: {} of {} committed",
            committed(port),
            hub.published
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = readyz(port).expect("readyz");
    assert_eq!(status, 200, "{body}");
    sigterm_and_wait(&mut service);

    // Nothing lost, nothing applied twice: the snapshot of a replay of the same events.
    let replayed = dir.path().join("replayed");
    ok(&["replay", "--data-dir", path(&replayed), path(&file)]);
    let live = ok(&["export", "--data-dir", path(&data)]).stdout;
    let reference = ok(&["export", "--data-dir", path(&replayed)]).stdout;
    assert!(live == reference, "the export after the full disk differs");
}
