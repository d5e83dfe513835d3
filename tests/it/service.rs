//! The service as a child process: the embedded emulator on a runtime of its own, spawning
//! `twinwatch run` against it, reading its /metrics and /readyz, stopping it, and a minimal
//! HTTP receiver standing in for a webhook. Shared by the integration tests and the
//! reliability suite.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinwatch::app::emulator::events_of_file;
use twinwatch::emulator::{Emulator, EmulatorConfig};

use crate::support::{binary, path};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
/// The emulator on a runtime of its own, preloaded with a file.
pub struct Hub {
    pub runtime: tokio::runtime::Runtime,
    pub emulator: Option<Emulator>,
    pub published: u64,
}

impl Hub {
    /// An emulator with 4 partitions and nothing published yet.
    pub fn empty(hub: &str) -> Hub {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let emulator = runtime
            .block_on(Emulator::start(EmulatorConfig::new(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                hub,
                4,
            )))
            .expect("emulator");
        Hub {
            runtime,
            emulator: Some(emulator),
            published: 0,
        }
    }

    /// An emulator named `hub` publishing a file's events in the background at
    /// `events_per_second` (so that faults land mid-stream); `published` is their number.
    pub fn publishing(hub: &str, file: &Path, events_per_second: f64) -> Hub {
        let mut hub = Hub::empty(hub);
        let events = events_of_file(file).expect("events");
        hub.published = events.len() as u64;
        {
            let _guard = hub.runtime.enter();
            hub.emulator
                .as_ref()
                .expect("running")
                .spawn_publisher(events.into_iter(), events_per_second);
        }
        hub
    }

    /// An emulator preloaded with a file's events.
    pub fn start(file: &Path) -> Hub {
        let mut hub = Hub::empty("iothub-ehub-test");
        hub.publish_file(file);
        hub
    }

    /// Publishes a file's events now, counting them in `published`; returns their number.
    pub fn publish_file(&mut self, file: &Path) -> u64 {
        let events = events_of_file(file).expect("events");
        let n = events.len() as u64;
        for event in events {
            self.emulator.as_ref().expect("running").publish(event);
        }
        self.published += n;
        n
    }

    pub fn connection_string(&self) -> String {
        self.emulator.as_ref().expect("running").connection_string()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(emulator) = self.emulator.take() {
            self.runtime.block_on(emulator.shutdown());
        }
    }
}

/// Where a test's service keeps its snapshot (`dir/data`) and its alerts
/// (`dir/alerts.jsonl`), and a free port for it to listen on.
pub fn service_paths(dir: &Path) -> (PathBuf, PathBuf, u16) {
    (dir.join("data"), dir.join("alerts.jsonl"), free_port())
}

pub fn spawn_service(hub: &Hub, data: &Path, alerts: &Path, port: u16) -> Child {
    spawn_service_with(hub, data, alerts, port, &[])
}

/// [`spawn_service`] with `more` arguments (`("--policy", file)`, `("--config", file)`).
pub fn spawn_service_with(
    hub: &Hub,
    data: &Path,
    alerts: &Path,
    port: u16,
    more: &[(&str, &Path)],
) -> Child {
    let mut all = vec![("--alerts-file", alerts)];
    all.extend_from_slice(more);
    spawn_run(hub, &run_args(data, port, &all))
}

/// The arguments of `twinwatch run` on `data`, listening on loopback `port`, with `more`
/// (`("--config", file)`, `("--alerts-file", file)`, `("--policy", file)`) after them.
pub fn run_args(data: &Path, port: u16, more: &[(&str, &Path)]) -> Vec<String> {
    let mut args = vec![
        "run".to_owned(),
        "--data-dir".to_owned(),
        path(data).to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
    ];
    for (flag, file) in more {
        args.push((*flag).to_owned());
        args.push(path(file).to_owned());
    }
    args
}

/// Starts the binary with `args`, the hub's connection string in the environment.
pub fn spawn_run<S: AsRef<std::ffi::OsStr>>(hub: &Hub, args: &[S]) -> Child {
    spawn_run_with(hub, args, &[])
}

/// [`spawn_run`] with more environment variables (`FAILPOINTS`, another connection string).
pub fn spawn_run_with<S: AsRef<std::ffi::OsStr>>(
    hub: &Hub,
    args: &[S],
    env: &[(&str, &str)],
) -> Child {
    let mut command = Command::new(binary());
    command.args(args).env(
        "TWINWATCH_EVENTHUB_CONNECTION_STRING",
        hub.connection_string(),
    );
    for (name, value) in env {
        command.env(name, value);
    }
    spawn_quiet(&mut command)
}

/// Spawns `command` logging at warn, its output discarded (TWINWATCH_TEST_LOGS=1 shows the
/// log, for debugging a test).
pub fn spawn_quiet(command: &mut Command) -> Child {
    command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("TWINWATCH_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn twinwatch")
}

/// A service a test started with [`Running::consume`].
pub struct Running {
    pub child: KillOnDrop,
    pub data: PathBuf,
    pub alerts: PathBuf,
    pub port: u16,
}

impl Running {
    /// Starts `twinwatch run` on `hub` with `more` arguments, its snapshot and alerts in `dir`
    /// ([`service_paths`]), and waits (at most `limit`) until it has consumed what the hub
    /// holds.
    pub fn consume(hub: &Hub, dir: &Path, more: &[(&str, &Path)], limit: Duration) -> Running {
        let (data, alerts, port) = service_paths(dir);
        let child = KillOnDrop::new(spawn_service_with(hub, &data, &alerts, port, more));
        wait_consumed(port, hub.published, limit);
        Running {
            child,
            data,
            alerts,
            port,
        }
    }
}

/// A child process killed if the test fails before it stops it.
pub struct KillOnDrop(pub Option<Child>);

impl KillOnDrop {
    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop(Some(child))
    }

    /// The running child.
    pub fn child(&self) -> &Child {
        self.0.as_ref().expect("running")
    }

    /// Stops the child with SIGTERM, requiring a clean exit ([`sigterm_and_wait`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.0.take() {
            sigterm_and_wait(&mut child);
        }
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.0.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("killed");
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A configuration file at `file` for a service on `data` listening on loopback `port`, with
/// `more` (TOML) after those two settings.
pub fn config_file(file: &Path, data: &Path, port: u16, more: &str) -> PathBuf {
    std::fs::write(
        file,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n{more}",
            path(data)
        ),
    )
    .expect("config");
    file.to_owned()
}

/// `dir/NAME.toml` for a service on `dir/NAME` listening on `port`, with `eventhub` (TOML) in
/// its `[eventhub]` table.
pub fn eventhub_config(dir: &Path, name: &str, port: u16, eventhub: &str) -> PathBuf {
    config_file(
        &dir.join(format!("{name}.toml")),
        &dir.join(name),
        port,
        &format!("[eventhub]\n{eventhub}\n"),
    )
}

/// The text of the service's /metrics (None while it is not listening).
pub fn metrics_text(port: u16) -> Option<String> {
    ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()
}

/// The sum of the samples of the metric `name` (with labels) whose labels contain `labels`.
fn sum_samples(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `twinwatch_messages_total`, all outcomes, from the service's /metrics (None while it is
/// not listening).
pub fn consumed(port: u16) -> Option<u64> {
    Some(sum_samples(&metrics_text(port)?, "twinwatch_messages_total", "") as u64)
}

pub fn wait_consumed(port: u16, at_least: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let n = consumed(port).unwrap_or(0);
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {at_least} messages consumed in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends SIGTERM and waits up to 40 s for a clean exit (0).
pub fn sigterm_and_wait(child: &mut Child) {
    let (_, status) = sigterm_within(child, Duration::from_secs(40));
    assert!(
        status.success(),
        "twinwatch run exited with {status} on SIGTERM"
    );
}

/// Sends SIGTERM; how long the process took to exit, and how it exited. Past `limit` it is
/// killed and the test fails.
pub fn sigterm_within(child: &mut Child, limit: Duration) -> (Duration, std::process::ExitStatus) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (started.elapsed(), status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("twinwatch run did not stop within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the service has no violation pending and an empty outbox, seen twice half a
/// second apart. Caught up on a hub whose events are long past (generated fleets start in
/// 2026-01), the service's quiet clock (`docs/semantics.md` §9) opens every pending violation
/// of a rule with `for` (the baseline has some); what it opens is committed within a batch
/// interval and then delivered. A test comparing a live run's violations or alerts with
/// another's waits for this first.
pub fn wait_quiet_clock(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut settled = 0;
    loop {
        if metric(port, "twinwatch_pending_violations", "") == Some(0.0)
            && metric_plain(port, "twinwatch_outbox_pending_alerts") == Some(0.0)
        {
            settled += 1;
            if settled == 2 {
                return;
            }
        } else {
            settled = 0;
        }
        assert!(
            Instant::now() < deadline,
            "violations still pending or alerts undelivered after {limit:?} (pending {:?})",
            metric(port, "twinwatch_pending_violations", "")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until /readyz answers 200; fails with its last answer after `limit`.
pub fn wait_ready(port: u16, limit: Duration) {
    wait_readyz(port, limit, "readiness", |status, _| status == 200);
}

/// Polls /readyz until `done(status, body)` holds, and returns that body; fails after
/// `limit`, naming `what` it waited for and the last answer.
pub fn wait_readyz(
    port: u16,
    limit: Duration,
    what: &str,
    done: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let answer = readyz(port);
        if let Some((status, body)) = &answer {
            if done(*status, body) {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "waited {limit:?} for {what}; the last /readyz: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// /readyz's status and body.
pub fn readyz(port: u16) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let response = agent
        .get(&format!("http://127.0.0.1:{port}/readyz"))
        .call()
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.into_body().read_to_string().ok()?))
}

pub fn committed(port: u16) -> f64 {
    let text = metrics_text(port).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("twinwatch_checkpoint_sequence_number{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|seq| seq + 1.0)
        .sum()
}

/// The sum of a metric's samples whose labels contain `labels` (None while not listening).
pub fn metric(port: u16, name: &str, labels: &str) -> Option<f64> {
    Some(sum_samples(&metrics_text(port)?, name, labels))
}

/// Waits until `name{labels}` (a metric without labels where `labels` is empty) reaches
/// `at_least`; returns it.
pub fn wait_metric(port: u16, name: &str, labels: &str, at_least: f64, limit: Duration) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let value = if labels.is_empty() {
            metric_plain(port, name)
        } else {
            metric(port, name, labels)
        }
        .unwrap_or(0.0);
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{labels}}} stayed at {value}, below {at_least}: /readyz {:?}",
            readyz(port)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal HTTP/1.1 receiver on `port`: answers 200 to every request (keep-alive) and keeps
/// each request's body; or, while failing, 503 without keeping it. [`Receiver::stop`] takes it
/// down: the port refuses connections and open connections are cut.
pub struct Receiver {
    port: u16,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    failing: Arc<AtomicBool>,
    /// A rule whose alerts are refused for good (422): a request carrying one is refused
    /// whole and nothing of it kept, as a receiver validating a batch does.
    refused_rule: Arc<Mutex<Option<String>>>,
    stopped: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<std::net::TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    pub fn start(port: u16) -> Receiver {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let mut receiver = Receiver {
            port,
            bodies: Arc::default(),
            failing: Arc::default(),
            refused_rule: Arc::default(),
            stopped: Arc::default(),
            open: Arc::default(),
            accept: None,
        };
        let (bodies, failing, stopped, open) = (
            receiver.bodies.clone(),
            receiver.failing.clone(),
            receiver.stopped.clone(),
            receiver.open.clone(),
        );
        let refused_rule = receiver.refused_rule.clone();
        receiver.accept = Some(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                open.lock()
                    .expect("lock")
                    .push(stream.try_clone().expect("clone"));
                let (bodies, failing, refused_rule) =
                    (bodies.clone(), failing.clone(), refused_rule.clone());
                std::thread::spawn(move || {
                    serve_requests(stream, &bodies, &failing, &refused_rule)
                });
            }
        }));
        receiver
    }

    /// Refuses for good (422) every request that carries an alert of `rule`.
    pub fn refuse_rule(&self, rule: &str) {
        *self.refused_rule.lock().expect("lock") = Some(rule.to_owned());
    }

    /// Answers 503 (and keeps nothing) while `failing`.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Takes the receiver down (connections to its port are refused, open ones cut) and
    /// returns the ids it received.
    pub fn stop(mut self) -> std::collections::BTreeSet<String> {
        self.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop, which then drops the listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            accept.join().expect("the accept loop");
        }
        for stream in self.open.lock().expect("lock").drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        self.ids()
    }

    /// The ids of the CloudEvents received (one a request, or arrays of them).
    pub fn ids(&self) -> std::collections::BTreeSet<String> {
        self.bodies
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|b| twinwatch::compliance::wire::CloudEvent::parse_body(b).ok())
            .flatten()
            .map(|event| event.id)
            .collect()
    }
}

/// Reads requests from one connection until it closes, answering each.
fn serve_requests(
    stream: std::net::TcpStream,
    bodies: &Mutex<Vec<Vec<u8>>>,
    failing: &AtomicBool,
    refused_rule: &Mutex<Option<String>>,
) {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let refused = refused_rule
            .lock()
            .expect("lock")
            .clone()
            .is_some_and(|rule| {
                twinwatch::compliance::wire::CloudEvent::parse_body(&body)
                    .map(|events| events.iter().any(|e| e.data.rule_id == rule))
                    .unwrap_or(false)
            });
        let answer: &[u8] = if failing.load(Ordering::SeqCst) {
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
        } else if refused {
            b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 17\r\n\r\nrule not accepted"
        } else {
            bodies.lock().expect("lock").push(body);
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        };
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}

/// A metric without labels.
pub fn metric_plain(port: u16, name: &str) -> Option<f64> {
    metrics_text(port)?
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A tmpfs of `mib` MiB mounted at `at` (the tests run as root, as `.ci/run` does), for
/// storage faults; unmounted when dropped.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    pub fn mount(at: &Path, mib: u64) -> SmallDisk {
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
            "mounting a tmpfs failed: this campaign needs root"
        );
        SmallDisk(at.to_owned())
    }

    /// A service's data directory on this disk, and its configuration in
    /// `dir/twinwatch.toml` (listening on loopback `port`, with `settings` after).
    pub fn service_config(&self, dir: &Path, port: u16, settings: &str) -> (PathBuf, PathBuf) {
        let data = self.0.join("data");
        let config = config_file(&dir.join("twinwatch.toml"), &data, port, settings);
        (data, config)
    }

    pub fn free_bytes(&self) -> u64 {
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

    /// Fills the disk until `keep` bytes are free; returns the filler's path.
    pub fn fill_to(&self, keep: u64) -> PathBuf {
        let filler = self.0.join("filler");
        let size = self.free_bytes().saturating_sub(keep);
        std::fs::write(&filler, vec![0u8; size as usize]).expect("filler");
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", path(&self.0)]).status();
    }
}
