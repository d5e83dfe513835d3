//! Issue 23, through the real binary against the emulator: the position `latest` stands for
//! is kept across a reconnect before the first event; a hub that never answers a detach does
//! not hold the stop past its deadline; no secret given on any path (a flag, the environment,
//! the configuration file, a URL) shows in the log, in errors or in /readyz.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use twinwatch::app::emulator::events_of_file;
use twinwatch::emulator::query::{QueryEmulator, QueryEmulatorConfig, TwinDocuments};

/// The IoT Hub key given to the service (base64 of `IOTHUB-KEY-SECRET-9`): never shown.
const IOTHUB_KEY: &str = "SU9USFVCLUtFWS1TRUNSRVQtOQ==";

use crate::service::{
    consumed, free_port, run_args, sigterm_within, wait_consumed, wait_ready, wait_readyz, Hub,
    Receiver,
};
use crate::support::{assert_export_is_replays, binary, generate_fleet, path};

/// `twinwatch run --config FILE` on `data` listening on `port`, the hub's connection string
/// and `env` in the environment, its log (info) to `log`.
fn spawn_logged(
    hub: &Hub,
    config: &Path,
    data: &Path,
    port: u16,
    env: &[(&str, &str)],
    log: &Path,
) -> Child {
    let mut command = Command::new(binary());
    command
        .args(run_args(data, port, &[("--config", config)]))
        .env(
            "TWINWATCH_EVENTHUB_CONNECTION_STRING",
            hub.connection_string(),
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().expect("spawn twinwatch run")
}

/// Sends SIGTERM; how long the process took to exit, and whether it exited 0.
fn stop(child: &mut Child, limit: Duration) -> (Duration, bool) {
    let (took, status) = sigterm_within(child, limit);
    (took, status.success())
}

/// Issue 23: with `start_position = "latest"`, a receiver that reconnected before its first
/// event reopened at the new "latest" and skipped what arrived in between.
#[test]
fn latest_is_remembered_across_a_reconnect_before_the_first_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 200, 2000, 31, 0.0);
    let mut events = events_of_file(&file).expect("events");
    let later = events.split_off(events.len() / 2);
    let n_later = later.len() as u64;
    let hub = Hub::empty("iothub-ehub-latest");
    let emulator = hub.emulator.as_ref().expect("running");
    for event in events {
        emulator.publish(event);
    }
    let config = dir.path().join("twinwatch.toml");
    std::fs::write(&config, "[eventhub]\nstart_position = \"latest\"\n").expect("config");
    let port = free_port();
    let data = dir.path().join("data");
    let log = dir.path().join("log");
    let mut child = spawn_logged(&hub, &config, &data, port, &[], &log);
    wait_ready(port, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        consumed(port),
        Some(0),
        "what came before latest is not read"
    );
    // Every receiver loses its connection before any event; the next events arrive while
    // they reconnect (the first backoff alone is 200 ms).
    assert!(emulator.drop_connections() > 0, "no receiver was connected");
    for event in later {
        emulator.publish(event);
    }
    wait_consumed(port, n_later, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        consumed(port),
        Some(n_later),
        "each event after latest counts exactly once"
    );
    let (_, success) = stop(&mut child, Duration::from_secs(40));
    assert!(success);
}

/// Issue 23: `receiver.close()` had no timeout and the apply loop never looked at the
/// cancellation, so a hub that never answers a detach held the stop for ever.
#[test]
fn a_hub_that_never_answers_a_detach_does_not_hold_the_stop_past_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 100, 1000, 32, 0.0);
    let hub = Hub::start(&file);
    let config = dir.path().join("twinwatch.toml");
    // Half of it goes to the receivers, more than their 2 s close timeout.
    let deadline = Duration::from_secs(6);
    std::fs::write(
        &config,
        format!("shutdown_deadline_secs = {}\n", deadline.as_secs()),
    )
    .expect("config");
    let port = free_port();
    let data = dir.path().join("data");
    let log = dir.path().join("log");
    let mut child = spawn_logged(&hub, &config, &data, port, &[], &log);
    wait_consumed(port, hub.published, Duration::from_secs(120));
    hub.emulator
        .as_ref()
        .expect("running")
        .ignore_detaches(true);
    let (took, success) = stop(&mut child, Duration::from_secs(40));
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(success, "exit status not 0: {log}");
    assert!(
        took <= deadline + Duration::from_secs(1),
        "the stop took {took:?}, beyond its deadline of {deadline:?}: {log}"
    );
    assert!(
        log.contains("did not answer the receiver's detach"),
        "the emulator answered the detach after all: {log}"
    );
    // Nothing lost: the snapshot is the replay's.
    assert_export_is_replays(dir.path(), &file, &data, "after the hung stop");
}

/// Issue 23: the startup log printed sink URLs whole and `RawConfig`'s `Debug` showed the
/// connection string and the token. No secret, given on any path, may show in the log, in an
/// error or in /readyz.
#[test]
fn no_secret_shows_in_logs_errors_or_readyz() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = generate_fleet(dir.path(), 100, 1000, 33, 0.0);
    let hub = Hub::start(&file);
    let emulator = hub.emulator.as_ref().expect("running");
    let connection_string = hub.connection_string();
    assert!(connection_string.contains("SAS_KEY_VALUE"));
    let webhook_port = free_port();
    let webhook = Receiver::start(webhook_port);
    // Seed passes: the IoT Hub connection string's key is not the twin query's, so the pass
    // fails (401), is logged and reported in /readyz, all without the key.
    let query = hub
        .runtime
        .block_on(QueryEmulator::start(
            QueryEmulatorConfig::new("contoso-hub", None, Some(([127, 0, 0, 1], 0).into())),
            TwinDocuments::new(),
        ))
        .expect("twin query");
    let iothub_connection_string = format!(
        "HostName=contoso-hub.azure-devices.net;SharedAccessKeyName=registryRead;SharedAccessKey={IOTHUB_KEY}"
    );
    let config = dir.path().join("twinwatch.toml");
    std::fs::write(
        &config,
        format!(
            "[alerts]\nwebhook_url = \"http://hookuser:FILE-URL-PASSWORD@127.0.0.1:{webhook_port}/hook?token=FILE-URL-QUERY\"\nwebhook_token = \"FILE-WEBHOOK-TOKEN\"\n[seed]\nendpoint = \"{}\"\nreconcile_every_hours = 0\n",
            query.http_endpoint().expect("http")
        ),
    )
    .expect("config");
    let secrets = [
        "SAS_KEY_VALUE",
        "ENV-API-TOKEN",
        "FILE-URL-PASSWORD",
        "FILE-URL-QUERY",
        "FILE-WEBHOOK-TOKEN",
        "FLAG-URL-PASSWORD",
        "FLAG-URL-QUERY",
        "FLAG-WEBHOOK-TOKEN",
        IOTHUB_KEY,
    ];
    let assert_clean = |what: &str, text: &str| {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} shows in {what}: {text}");
        }
    };

    // The service: the key in the environment's connection string, the API token in the
    // environment, the webhook's URL and token in the file; refused at first (/readyz
    // reports why), then consuming.
    emulator.refuse_tokens(true);
    let port = free_port();
    let data = dir.path().join("data");
    let log = dir.path().join("run.log");
    let mut child = spawn_logged(
        &hub,
        &config,
        &data,
        port,
        &[
            ("TWINWATCH_API_TOKEN", "ENV-API-TOKEN"),
            (
                "TWINWATCH_IOTHUB_CONNECTION_STRING",
                &iothub_connection_string,
            ),
        ],
        &log,
    );
    let body = wait_readyz(
        port,
        Duration::from_secs(60),
        "the refusal",
        |status, body| status == 503 && body.to_lowercase().contains("authoriz"),
    );
    assert_clean("/readyz", &body);
    emulator.refuse_tokens(false);
    wait_consumed(port, hub.published, Duration::from_secs(120));
    let body = wait_readyz(
        port,
        Duration::from_secs(60),
        "a failed seed pass",
        |_, body| body.contains("\"outcome\":\"failed\""),
    );
    assert!(
        body.contains("contoso-hub"),
        "the refusal names the hub: {body}"
    );
    assert_clean("/readyz's seed details", &body);
    assert!(query.refused() > 0, "the twin query was never asked");
    let (_, success) = stop(&mut child, Duration::from_secs(40));
    assert!(success);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("starting") && logged.contains("127.0.0.1"),
        "the startup log is missing: {logged}"
    );
    assert_clean("the service's log", &logged);
    assert!(
        logged.contains("seed pass is not complete"),
        "the failed pass is not in the log: {logged}"
    );
    assert!(!webhook.stop().is_empty(), "the webhook got no alert");

    // Errors: an invalid configuration (the key in the file this time).
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "listen = \"nowhere\"\napi_token = \"ENV-API-TOKEN\"\n[eventhub]\nconnection_string = \"{connection_string}\"\n[alerts]\nwebhook_url = \"https://u:FILE-URL-PASSWORD@h/?t=FILE-URL-QUERY\"\n[seed]\nconnection_string = \"{iothub_connection_string}\"\npage_size = 0\n"
        ),
    )
    .expect("bad config");
    let out = Command::new(binary())
        .args(["run", "--config", path(&bad), "--data-dir", path(&data)])
        .env("RUST_LOG", "debug")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "an invalid configuration");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("seed.page_size"), "{stderr}");
    assert_clean("a configuration error", &stderr);

    // Flags: replay with a webhook given on the command line, refusing at first (so that
    // its failures are logged, naming the sink), then accepting.
    let flag_port = free_port();
    let flag_webhook = Receiver::start(flag_port);
    flag_webhook.set_failing(true);
    let replay_log = dir.path().join("replay.log");
    let mut replay = Command::new(binary())
        .args([
            "replay",
            "--data-dir",
            path(&dir.path().join("replayed")),
            "--webhook-url",
            &format!(
                "http://flaguser:FLAG-URL-PASSWORD@127.0.0.1:{flag_port}/hook?token=FLAG-URL-QUERY"
            ),
            "--webhook-token",
            "FLAG-WEBHOOK-TOKEN",
            path(&file),
        ])
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&replay_log).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("replay");
    std::thread::sleep(Duration::from_secs(2));
    flag_webhook.set_failing(false);
    let status = replay.wait().expect("replay");
    let logged = std::fs::read_to_string(&replay_log).expect("log");
    assert!(status.success(), "replay failed: {logged}");
    assert!(
        logged.contains(&format!("127.0.0.1:{flag_port}")),
        "the sink's failures are not in the log: {logged}"
    );
    assert_clean("replay's log", &logged);
    assert!(!flag_webhook.stop().is_empty(), "the webhook got no alert");
    hub.runtime.block_on(query.shutdown());
}
