//! The real binary, killed: a replay SIGKILLed at random moments and started again with the
//! same arguments ends with the same export as an uninterrupted run, and replaying the same
//! files again changes nothing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::support::{binary, generate_fleet, ok, path};

/// A random delay before a kill: between 30 ms and a quarter of an uninterrupted run (at most
/// 400 ms), so that six kills in a row still leave work for the next start.
pub fn kill_delay(rng: &mut impl Rng, uninterrupted: Duration) -> Duration {
    let cap = (uninterrupted.as_millis() as u64 / 4).clamp(60, 400);
    Duration::from_millis(rng.gen_range(30..=cap))
}

/// Runs `twinwatch args` `attempts` times, each SIGKILLed after a [`kill_delay`] unless it
/// ended first (successfully), then once more to its end, which must succeed; returns how
/// many runs were killed. Early attempts die at a random moment early enough that work is
/// always left (each restart resumes with less to do).
pub fn kill_then_finish(
    args: &[&str],
    attempts: usize,
    rng: &mut impl Rng,
    uninterrupted: Duration,
) -> usize {
    let spawn = || {
        Command::new(binary())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn twinwatch")
    };
    let mut kills = 0;
    for _ in 0..attempts {
        let mut child = spawn();
        std::thread::sleep(kill_delay(rng, uninterrupted));
        match child.try_wait().expect("try_wait") {
            Some(status) => assert!(status.success(), "{args:?} failed: {status}"),
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
            }
        }
    }
    let status = spawn().wait().expect("wait");
    assert!(status.success(), "the final {args:?} failed: {status}");
    kills
}

#[test]
fn a_replay_killed_repeatedly_ends_with_the_same_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 20_000, 200_000, 7, 0.05);
    let clean = dir.path().join("clean");
    let started = Instant::now();
    ok(&[
        "replay",
        "--data-dir",
        path(&clean),
        "--batch-size",
        "500",
        path(&fleet),
    ]);
    let uninterrupted = started.elapsed();

    let killed = dir.path().join("killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let kills = kill_then_finish(
        &[
            "replay",
            "--data-dir",
            path(&killed),
            "--batch-size",
            "500",
            path(&fleet),
        ],
        6,
        &mut rng,
        uninterrupted,
    );
    assert!(
        kills >= 3,
        "only {kills} replays were killed mid-way (an uninterrupted run took {uninterrupted:?})"
    );
    let expected = ok(&["export", "--data-dir", path(&clean)]).stdout;
    let actual = ok(&["export", "--data-dir", path(&killed)]).stdout;
    assert!(!expected.is_empty());
    assert!(
        expected == actual,
        "the export after {kills} kills differs from the uninterrupted run"
    );
    let expected = ok(&["deadletters", "--data-dir", path(&clean)]).stdout;
    let actual = ok(&["deadletters", "--data-dir", path(&killed)]).stdout;
    assert!(!expected.is_empty());
    assert!(expected == actual, "the dead letters differ");
}

#[test]
fn replaying_the_same_files_again_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 500, 5_000, 7, 0.05);
    let data = dir.path().join("data");
    let summary = dir.path().join("summary.json");
    ok(&["replay", "--data-dir", path(&data), path(&fleet)]);
    let first = ok(&["export", "--data-dir", path(&data)]).stdout;
    ok(&[
        "replay",
        "--data-dir",
        path(&data),
        "--summary",
        path(&summary),
        path(&fleet),
    ]);
    let second = ok(&["export", "--data-dir", path(&data)]).stdout;
    assert!(first == second, "a second replay changed the export");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).expect("summary")).expect("json");
    assert_eq!(summary["messages"], 0, "{summary}");
}
