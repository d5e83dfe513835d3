//! Crash campaigns: a replay, and the service consuming from the emulator, each killed by
//! SIGKILL again and again (seeded), at random moments from outside and at the precise spots
//! of `twinwatch::failpoint` from inside (before a batch is handed to the writer, before and
//! after its write, after the sinks acknowledged alerts but before the outbox forgets them).
//!
//! A round is one data directory: killed until a run gets to the end, then run once more to
//! the end. After each round its export and violations must equal an uninterrupted run's, and
//! every alert of the uninterrupted run must be in the round's file sink at least once. Rounds
//! follow one another until the campaign has its kills.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinwatch::failpoint;

use crate::report::{self, Scale};
use crate::service::{
    committed, free_port, metric_plain, run_args, sigterm_and_wait, wait_quiet_clock, Hub,
};
use crate::support::{
    alerts_by_id, assert_same_alerts, baseline_rules_with_for, baseline_text, binary,
    generate_fleet, live_comparable, ok, path, replay_args, replay_export,
};

/// How an attempt is meant to die.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// SIGKILL from outside after this long.
    After(Duration),
    /// SIGKILL from inside at this failpoint's `n + 1`-th hit.
    At(&'static str, u32),
}

impl Kill {
    /// Every fifth attempt dies from outside, the others at each failpoint in turn, so that
    /// every spot is hit in every campaign.
    fn pick(
        attempt: usize,
        rng: &mut ChaCha8Rng,
        plan: &Plan,
        spots: &'static [&'static str],
    ) -> Kill {
        match attempt % (spots.len() + 1) {
            0 => Kill::After(Duration::from_millis(
                rng.gen_range(plan.outside_ms.clone()),
            )),
            i => {
                let hits = match spots[i - 1] {
                    failpoint::TIMER_AFTER_FIRE => plan.timer_hits,
                    _ => plan.hits,
                };
                Kill::At(spots[i - 1], rng.gen_range(0..hits.max(1)))
            }
        }
    }

    fn failpoints(self) -> Option<String> {
        match self {
            Kill::After(_) => None,
            Kill::At(name, n) => Some(format!("{name}={n}*off->return")),
        }
    }
}

/// How a campaign kills: how many, when from outside, after how many hits of a spot at most.
struct Plan {
    kills: u64,
    /// The delay before a kill from outside, in milliseconds.
    outside_ms: std::ops::RangeInclusive<u64>,
    /// A spot kills at its hit number 1 to `hits`.
    hits: u32,
    /// The same for `timer.after_fire`, which a run passes once per timer fired.
    timer_hits: u32,
}

impl Plan {
    /// `kills` at full and at CI scale, from outside after `outside_ms`, at a spot's hit 1 to
    /// `hits` (no timer spot).
    fn new(
        scale: Scale,
        kills: (u64, u64),
        outside_ms: std::ops::RangeInclusive<u64>,
        hits: u32,
    ) -> Plan {
        Plan {
            kills: scale.pick(kills.0, kills.1),
            outside_ms,
            hits,
            timer_hits: 0,
        }
    }
}

/// What a campaign's subject is: how to start it, and how to run it to the end.
trait Subject {
    /// Starts a run on `data`, alerts into `alerts`, `FAILPOINTS` set to `failpoints`.
    fn spawn(&self, data: &Path, alerts: &Path, failpoints: Option<&str>, log: &Path) -> Child;
    /// Runs once, uninterrupted, until everything is applied and every alert delivered.
    fn run_to_end(&self, data: &Path, alerts: &Path, log: &Path);
    /// How long an attempt may take to die at its failpoint before it is killed from outside
    /// (a live service idles once it has caught up; a replay may finish first).
    fn patience(&self) -> Duration;
    /// Whether the run started last has committed everything there is (a live service does
    /// not end by itself).
    fn caught_up(&self) -> bool {
        false
    }
    /// The failpoints its runs meet.
    fn spots(&self) -> &'static [&'static str] {
        failpoint::NAMES
    }
}

struct Replay {
    fleet: PathBuf,
    /// More arguments (`--policy FILE`), before the fleet.
    extra: Vec<String>,
    spots: &'static [&'static str],
}

impl Subject for Replay {
    fn spawn(&self, data: &Path, alerts: &Path, failpoints: Option<&str>, log: &Path) -> Child {
        let mut more = vec!["--batch-size", "500"];
        more.extend(self.extra.iter().map(String::as_str));
        let mut command = Command::new(binary());
        command.args(replay_args(data, alerts, &self.fleet, &more));
        start(command, failpoints, log)
    }

    fn run_to_end(&self, data: &Path, alerts: &Path, log: &Path) {
        finish(self.spawn(data, alerts, None, log), "replay", log);
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(120)
    }

    fn spots(&self) -> &'static [&'static str] {
        self.spots
    }
}

/// A command run on a copy of a prepared data directory, again with the same arguments after
/// each kill, as an operator would: a re-audit (a replay with nothing left to apply under a
/// changed policy, `docs/semantics.md` §8) or a seed pass (§7).
struct OnCopy {
    /// The prepared directory, copied for each round.
    base: PathBuf,
    /// The command and its arguments after `--data-dir DIR --alerts-file FILE`.
    args: Vec<String>,
    spots: &'static [&'static str],
}

impl Subject for OnCopy {
    fn spawn(&self, data: &Path, alerts: &Path, failpoints: Option<&str>, log: &Path) -> Child {
        if !data.exists() {
            copy_dir(&self.base, data);
        }
        let mut command = Command::new(binary());
        command
            .arg(&self.args[0])
            .args(["--data-dir", path(data), "--alerts-file", path(alerts)])
            .args(&self.args[1..]);
        start(command, failpoints, log)
    }

    fn run_to_end(&self, data: &Path, alerts: &Path, log: &Path) {
        finish(self.spawn(data, alerts, None, log), &self.args[0], log);
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(120)
    }

    fn spots(&self) -> &'static [&'static str] {
        self.spots
    }
}

/// Copies a closed data directory (RocksDB's files are plain files once no process has it
/// open).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a file");
    }
}

struct Live {
    hub: Hub,
    /// The configuration every run gets: small batches, so that a spot is hit often.
    config: PathBuf,
    /// The port of the run started last.
    port: std::cell::Cell<u16>,
}

impl Live {
    fn spawn_on(
        &self,
        data: &Path,
        alerts: &Path,
        failpoints: Option<&str>,
        log: &Path,
        port: u16,
    ) -> Child {
        let mut command = Command::new(binary());
        command
            .args(run_args(
                data,
                port,
                &[("--config", &self.config), ("--alerts-file", alerts)],
            ))
            .env(
                "TWINWATCH_EVENTHUB_CONNECTION_STRING",
                self.hub.connection_string(),
            );
        start(command, failpoints, log)
    }
}

impl Subject for Live {
    fn spawn(&self, data: &Path, alerts: &Path, failpoints: Option<&str>, log: &Path) -> Child {
        self.port.set(free_port());
        self.spawn_on(data, alerts, failpoints, log, self.port.get())
    }

    fn caught_up(&self) -> bool {
        committed(self.port.get()) as u64 == self.hub.published
    }

    fn run_to_end(&self, data: &Path, alerts: &Path, log: &Path) {
        let port = free_port();
        let mut child = self.spawn_on(data, alerts, None, log, port);
        // Every partition committed to its last event, and the outbox empty.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let caught_up = committed(port) as u64 == self.hub.published;
            if caught_up && metric_plain(port, "twinwatch_outbox_pending_alerts") == Some(0.0) {
                // Then what the quiet clock opens (the baseline has `for` rules).
                wait_quiet_clock(port, Duration::from_secs(60));
                break;
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("the service exited with {status} before catching up");
            }
            assert!(
                Instant::now() < deadline,
                "the service did not catch up within 300 s (committed {})",
                committed(port)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        sigterm_and_wait(&mut child);
        assert_no_panic(log);
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(3)
    }
}

fn start(mut command: Command, failpoints: Option<&str>, log: &Path) -> Child {
    command
        .env(
            "RUST_LOG",
            std::env::var("TWINWATCH_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("FAILPOINTS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    if let Some(failpoints) = failpoints {
        command.env("FAILPOINTS", failpoints);
    }
    command.spawn().expect("spawn twinwatch")
}

/// Waits for a run of `command` to end by itself within 300 s, successfully, without a panic
/// in its `log`.
fn finish(mut child: Child, command: &str, log: &Path) {
    let status = wait_at_most(&mut child, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("`{command}` did not finish within 300 s"));
    assert!(status.success(), "`{command}` failed: {status}");
    assert_no_panic(log);
}

/// The child's exit status, or `None` if it is still running after `limit`.
fn wait_at_most(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sigkill(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

fn assert_no_panic(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        !text.contains("panicked"),
        "twinwatch panicked (log {}):\n{text}",
        log.display()
    );
}

/// The outputs a round must reproduce.
struct Reference {
    export: Vec<u8>,
    violations: Vec<u8>,
    /// `violations --pending`: the pending set with its deadlines.
    pending: Vec<u8>,
    alerts: BTreeMap<String, serde_json::Value>,
    /// Rules whose alerts are not compared (see [`Reference::skipping`]).
    skip: std::collections::BTreeSet<String>,
}

impl Reference {
    fn of(data: &Path, alerts: &Path) -> Reference {
        let (alerts, n) = alerts_by_id(&std::fs::read(alerts).expect("alerts"));
        assert_eq!(
            n,
            alerts.len(),
            "an uninterrupted run delivers each alert once"
        );
        Reference {
            export: ok(&["export", "--data-dir", path(data)]).stdout,
            violations: ok(&["violations", "--data-dir", path(data)]).stdout,
            pending: ok(&["violations", "--pending", "--data-dir", path(data)]).stdout,
            alerts,
            skip: Default::default(),
        }
    }

    /// Leaves the alerts of `rules` out of the comparison: a live service's alerts of rules
    /// with `for` depend on how it interleaved partitions (`docs/semantics.md` §9), which differs
    /// between runs; the violations once the feed is quiet do not, and are still compared.
    /// The other alerts are compared by content rather than id (see
    /// `support::live_comparable`).
    fn skipping(mut self, rules: std::collections::BTreeSet<String>, alerts: &Path) -> Reference {
        let bytes = std::fs::read(alerts).expect("alerts");
        self.alerts = alerts_by_id(&live_comparable(&bytes, &rules)).0;
        self.skip = rules;
        self
    }
}

/// What a campaign did.
#[derive(Default)]
struct Tally {
    rounds: u64,
    attempts: u64,
    /// Kills by where they happened (`outside` or a failpoint's name).
    kills: BTreeMap<&'static str, u64>,
    /// Runs that got to the end of their work before their kill.
    finished_first: u64,
    alerts_expected: u64,
    alerts_delivered: u64,
}

impl Tally {
    fn kills(&self) -> u64 {
        self.kills.values().sum()
    }
}

/// Kills `subject` as `plan` says, in rounds, checking each round against `reference`.
fn campaign(
    subject: &dyn Subject,
    reference: &Reference,
    dir: &Path,
    plan: &Plan,
    rng: &mut ChaCha8Rng,
) -> Tally {
    let target = plan.kills;
    let mut tally = Tally::default();
    let log = dir.join("attempt.log");
    while tally.kills() < target {
        tally.rounds += 1;
        let data = dir.join(format!("round-{}", tally.rounds));
        let alerts = dir.join(format!("round-{}.jsonl", tally.rounds));
        // Kill until a run gets to the end by itself (or the campaign has its kills).
        let mut attempt = 0;
        while tally.kills() < target {
            let kill = Kill::pick(attempt, rng, plan, subject.spots());
            attempt += 1;
            tally.attempts += 1;
            let failpoints = kill.failpoints();
            let mut child = subject.spawn(&data, &alerts, failpoints.as_deref(), &log);
            let status = match kill {
                Kill::After(delay) => wait_at_most(&mut child, delay),
                Kill::At(spot, _) => match wait_at_most(&mut child, subject.patience()) {
                    Some(status) if status.signal() == Some(libc::SIGKILL) => {
                        *tally.kills.entry(spot).or_default() += 1;
                        assert_no_panic(&log);
                        continue;
                    }
                    status => status,
                },
            };
            assert_no_panic(&log);
            match status {
                Some(status) => {
                    assert!(
                        status.success(),
                        "a run ended with {status} (attempt {attempt}, {kill:?})"
                    );
                    tally.finished_first += 1;
                    break;
                }
                // A live service that has caught up waits for more: that is the end of the
                // round, not a kill worth counting.
                None if subject.caught_up() => {
                    sigkill(&mut child);
                    tally.finished_first += 1;
                    break;
                }
                None => {
                    sigkill(&mut child);
                    *tally.kills.entry("outside").or_default() += 1;
                }
            }
        }
        subject.run_to_end(&data, &alerts, &log);
        check_round(reference, &data, &alerts, &mut tally);
    }
    tally
}

fn check_round(reference: &Reference, data: &Path, alerts: &Path, tally: &mut Tally) {
    let round = tally.rounds;
    let export = ok(&["export", "--data-dir", path(data)]).stdout;
    assert!(
        export == reference.export,
        "round {round}: the export after {} kills differs from the uninterrupted run's",
        tally.kills()
    );
    let violations = ok(&["violations", "--data-dir", path(data)]).stdout;
    assert!(
        violations == reference.violations,
        "round {round}: the violations differ from the uninterrupted run's"
    );
    let pending = ok(&["violations", "--pending", "--data-dir", path(data)]).stdout;
    assert!(
        pending == reference.pending,
        "round {round}: the pending violations differ from the uninterrupted run's"
    );
    let mut bytes = std::fs::read(alerts).unwrap_or_default();
    if !reference.skip.is_empty() {
        bytes = live_comparable(&bytes, &reference.skip);
    }
    let (delivered, n_delivered) = alerts_by_id(&bytes);
    assert_same_alerts(&reference.alerts, &delivered, &format!("round {round}: "));
    tally.alerts_expected += reference.alerts.len() as u64;
    tally.alerts_delivered += n_delivered as u64;
}

fn record(campaign: &str, tally: &Tally, events: u64) {
    let mut figures = vec![
        ("kills", tally.kills()),
        ("rounds", tally.rounds),
        ("runs", tally.attempts + tally.rounds),
        ("finished_before_kill", tally.finished_first),
        ("events_per_round", events),
        ("alerts_expected", tally.alerts_expected),
        ("alerts_delivered", tally.alerts_delivered),
        ("alerts_missing", 0),
        ("export_mismatches", 0),
    ];
    for (at, n) in &tally.kills {
        figures.push((at, *n));
    }
    report::record(campaign, &figures);
}

fn assert_every_spot_hit(tally: &Tally, spots: &[&str]) {
    for spot in spots {
        assert!(
            tally.kills.get(spot).copied().unwrap_or(0) > 0,
            "no kill at {spot}: {:?}",
            tally.kills
        );
    }
}

/// A campaign's start: its scale, its seeded random choices, its directory and its fleet.
struct Setup {
    scale: Scale,
    rng: ChaCha8Rng,
    dir: tempfile::TempDir,
    /// The fleet's events.
    events: u64,
    fleet: PathBuf,
}

impl Setup {
    /// `events` at full and at CI scale, a device for every ten; the fleet generated with
    /// `fleet_seed` and `noise`; the random choices seeded with `seed` (or
    /// `TWINWATCH_RELIABILITY_SEED`).
    fn new(seed: u64, events: (u64, u64), fleet_seed: u64, noise: f64) -> Setup {
        let scale = report::scale();
        let rng = ChaCha8Rng::seed_from_u64(report::seed(seed));
        let dir = tempfile::tempdir().expect("tempdir");
        let events = scale.pick(events.0, events.1);
        let fleet = generate_fleet(dir.path(), events / 10, events, fleet_seed, noise);
        Setup {
            scale,
            rng,
            dir,
            events,
            fleet,
        }
    }

    /// The file sink of the uninterrupted run.
    fn clean_alerts(&self) -> PathBuf {
        self.dir.path().join("clean.jsonl")
    }

    /// Runs `subject` once, uninterrupted, in `clean`: its outputs, and how long it took (ms).
    fn clean_run(&self, subject: &dyn Subject) -> (Reference, u64) {
        let clean = self.dir.path().join("clean");
        let started = Instant::now();
        subject.run_to_end(
            &clean,
            &self.clean_alerts(),
            &self.dir.path().join("clean.log"),
        );
        let whole = started.elapsed().as_millis() as u64;
        (Reference::of(&clean, &self.clean_alerts()), whole)
    }

    /// Kills `subject` as `plan` says, checking each round against `reference`; at full
    /// scale every spot must have been hit. Records the figures as `name`.
    fn run(mut self, name: &str, subject: &dyn Subject, reference: &Reference, plan: &Plan) {
        let tally = campaign(subject, reference, self.dir.path(), plan, &mut self.rng);
        if self.scale == Scale::Full {
            assert_every_spot_hit(&tally, subject.spots());
        }
        record(name, &tally, self.events);
    }
}

#[test]
fn replay_crash_campaign() {
    let setup = Setup::new(20_261_124, (200_000, 60_000), 31, 0.05);
    let subject = Replay {
        fleet: setup.fleet.clone(),
        extra: Vec::new(),
        spots: failpoint::NAMES,
    };
    let (reference, whole) = setup.clean_run(&subject);
    assert!(reference.alerts.len() >= 500, "too few alerts to check");
    // From outside: anywhere from the start-up to a tenth of an uninterrupted run; a batch
    // is 500 events.
    let plan = Plan::new(setup.scale, (30, 10), 20..=(whole / 10).max(60), 6);
    setup.run("crash-replay", &subject, &reference, &plan);
}

#[test]
fn live_crash_campaign() {
    let setup = Setup::new(20_261_125, (150_000, 40_000), 32, 0.05);
    let config = setup.dir.path().join("twinwatch.toml");
    std::fs::write(&config, "[batching]\nmax_messages = 500\n").expect("config");
    let subject = Live {
        hub: Hub::start(&setup.fleet),
        config,
        port: std::cell::Cell::new(0),
    };
    assert_eq!(subject.hub.published, setup.events);

    let (reference, _) = setup.clean_run(&subject);
    let reference = reference.skipping(baseline_rules_with_for(), &setup.clean_alerts());
    assert!(reference.alerts.len() >= 200, "too few alerts to check");
    // The live snapshot is the replay's (tests/it/live.rs shows it; checked here again).
    assert!(
        replay_export(setup.dir.path(), &setup.fleet) == reference.export,
        "the uninterrupted live run's export differs from a replay's"
    );

    // The service starts consuming about 200 ms after it is started, and then takes 3 to 5 s
    // for the whole hub at full scale. A batch is 500 events (the configuration) or what
    // arrived in 50 ms.
    let plan = Plan::new(setup.scale, (30, 10), 100..=800, 6);
    setup.run("crash-live", &subject, &reference, &plan);
}

/// A policy change on a replayed fleet, killed during its re-audit from outside and at
/// `reaudit.before_commit`: each round ends with the uninterrupted re-audit's violations and
/// every one of its alerts (reason `policy`, same ids) at least once.
#[test]
fn reaudit_crash_campaign() {
    let setup = Setup::new(20_261_206, (200_000, 60_000), 33, 0.05);
    let dir = setup.dir.path();
    let base = dir.join("base");
    ok(&["replay", "--data-dir", path(&base), path(&setup.fleet)]);
    // The baseline with one rule dropped and one rule added that most twins fail.
    let changed = dir.join("changed.yaml");
    std::fs::write(
        &changed,
        format!(
            "{}\n  - id: every-twin-is-tagged-owner\n    severity: low\n    target: {{module: \"*\"}}\n    check: {{path: /tags/owner, op: exists}}\n",
            baseline_text().trim_end().replacen("  - id: device.security-module-present", "  - id: device.security-module-present-renamed", 1)
        ),
    )
    .expect("policy");
    ok(&["policy", "check", path(&changed)]);
    let subject = OnCopy {
        base,
        args: [
            "replay",
            "--batch-size",
            "500",
            "--policy",
            path(&changed),
            path(&setup.fleet),
        ]
        .map(String::from)
        .to_vec(),
        spots: &[failpoint::REAUDIT_BEFORE_COMMIT],
    };
    let (reference, whole) = setup.clean_run(&subject);
    assert!(reference.alerts.len() >= 500, "too few alerts to check");
    assert!(
        reference
            .alerts
            .values()
            .all(|a| a["data"]["reason"] == "policy"),
        "every alert of a re-audit carries reason policy"
    );
    // A batch is 500 twins.
    let plan = Plan::new(setup.scale, (20, 6), 20..=whole.max(60), 6);
    setup.run("crash-reaudit", &subject, &reference, &plan);
}

/// A seed pass killed from outside and after its documents are committed but before its
/// evaluation, then run again: each round ends with the uninterrupted pass's snapshot,
/// violations and alerts (same ids), nothing doubled or lost.
#[test]
fn seed_crash_campaign() {
    let setup = Setup::new(20_261_207, (150_000, 40_000), 34, 0.0);
    let (dir, events) = (setup.dir.path(), setup.events);
    let base = dir.join("base");
    ok(&["replay", "--data-dir", path(&base), path(&setup.fleet)]);
    // The hub's view: another history of the same fleet's devices.
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).expect("dir");
    let other = generate_fleet(&other_dir, events / 10, events, 35, 0.0);
    let replayed = dir.join("other-data");
    ok(&["replay", "--data-dir", path(&replayed), path(&other)]);
    let documents = dir.join("documents.json");
    std::fs::write(
        &documents,
        ok(&["export", "--data-dir", path(&replayed)]).stdout,
    )
    .expect("documents");
    let subject = OnCopy {
        base,
        args: [
            "seed",
            "--hub",
            "contoso-hub",
            "--as-of",
            "2030-01-01T00:00:00Z",
            "--grace",
            "0",
            "--batch-size",
            "500",
            path(&documents),
        ]
        .map(String::from)
        .to_vec(),
        spots: &[failpoint::SEED_BEFORE_EVALUATION],
    };
    let (reference, whole) = setup.clean_run(&subject);
    assert!(reference.alerts.len() >= 100, "too few alerts to check");
    // The spot is passed once per run.
    let plan = Plan::new(setup.scale, (20, 6), 20..=whole.max(60), 1);
    setup.run("crash-seed", &subject, &reference, &plan);
}

/// A replay under the baseline with grace periods on most rules (`docs/semantics.md` §9), killed
/// from outside, at each spot of a batch's way to RocksDB and at `timer.after_fire` (a pending
/// violation opened, its alert in the open batch, nothing written): each round ends with the
/// uninterrupted run's snapshot, open and pending violations (with their deadlines) and every
/// alert, timer-opened ones included, under the same ids.
#[test]
fn grace_crash_campaign() {
    let setup = Setup::new(20_261_208, (200_000, 60_000), 36, 0.05);
    let policy = setup.dir.path().join("grace.yaml");
    std::fs::write(&policy, with_grace_periods(&baseline_text())).expect("policy");
    ok(&["policy", "check", path(&policy)]);
    static SPOTS: [&str; 5] = [
        failpoint::TIMER_AFTER_FIRE,
        failpoint::APPLY_BEFORE_HANDOFF,
        failpoint::WRITER_BEFORE_WRITE,
        failpoint::WRITER_AFTER_WRITE,
        failpoint::DELIVERY_AFTER_ACK,
    ];
    let subject = Replay {
        fleet: setup.fleet.clone(),
        extra: vec!["--policy".into(), path(&policy).into()],
        spots: &SPOTS,
    };

    let (reference, whole) = setup.clean_run(&subject);
    // Alerts a timer opened carry the id given when the violation became pending,
    // `<source>#<record>/<rule>` (an event's own alerts are `<source>#<record>.<n>`).
    let fired = reference
        .alerts
        .keys()
        .filter(|id| {
            id.rsplit_once('#')
                .is_some_and(|(_, tail)| tail.contains('/'))
        })
        .count();
    assert!(fired >= 200, "too few timers fired to check ({fired})");
    assert!(
        !reference.pending.is_empty(),
        "the run ends with no violation pending"
    );

    let plan = Plan {
        // Anywhere in the first half of the run's timers.
        timer_hits: (fired / 2) as u32,
        // A batch is 500 events.
        ..Plan::new(setup.scale, (30, 10), 20..=(whole / 10).max(60), 6)
    };
    eprintln!("crash-grace: {fired} timers fired in the uninterrupted run");
    setup.run("crash-grace", &subject, &reference, &plan);
}

/// `baseline` with a grace period on every rule without one: ten minutes on high severity,
/// three on medium, thirty seconds on low (the generated fleet's events are 5 ms to 1 s apart,
/// so many failures end within the period and many outlast it).
fn with_grace_periods(baseline: &str) -> String {
    // The pack's rules, each from its `  - id:` line to the next.
    let mut blocks: Vec<Vec<&str>> = vec![Vec::new()];
    for line in baseline.lines() {
        if line.starts_with("  - id:") {
            blocks.push(Vec::new());
        }
        blocks.last_mut().expect("a block").push(line);
    }
    let mut out = String::with_capacity(baseline.len() + 1024);
    for block in blocks {
        let has_for = block.iter().any(|l| l.starts_with("    for:"));
        for line in block {
            out.push_str(line);
            out.push('\n');
            let grace = match line.trim_end() {
                "    severity: high" => "PT10M",
                "    severity: medium" => "PT3M",
                "    severity: low" => "PT30S",
                _ => continue,
            };
            if !has_for {
                out.push_str("    for: ");
                out.push_str(grace);
                out.push('\n');
            }
        }
    }
    out
}
