//! The command line (`README.md`, "Commands"): argument types only; `app` runs them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config;

/// Owned by `telemetry`, which sets logging up; named here for the argument.
pub use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "twinwatch",
    version,
    about = "A live snapshot of an Azure IoT Hub fleet's device and security-module twins, with compliance alerts",
    long_about = "twinwatch reads IoT Hub twin-change and lifecycle notifications (from captured files, \
                  or from the Event Hub-compatible endpoint), applies them in batches to a RocksDB \
                  snapshot of every twin, and dead-letters what it cannot use.\n\n\
                  Exit codes: 0 success, 1 runtime failure, 2 bad usage, configuration or policy."
)]
pub struct Cli {
    /// Log format: `text` for people, `json` for collectors; by default text on a terminal
    /// and JSON otherwise. The level comes from RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The service: consume an IoT Hub's Event Hub-compatible endpoint into the snapshot,
    /// raise alerts, serve /metrics, /healthz and /readyz; with an IoT Hub connection string
    /// (TWINWATCH_IOTHUB_CONNECTION_STRING, [seed]) also seed the snapshot from the hub's twin
    /// query when it holds none of its twins and reconcile it on a schedule, beside the feed;
    /// SIGHUP reloads the policy files (a changed policy re-audits every twin) and reopens the
    /// alert file; stops cleanly on SIGTERM or Ctrl-C
    Run(RunArgs),
    /// Replay captured files (storage-route JSON lines, Capture or storage-route Avro) into a data directory
    Replay(ReplayArgs),
    /// Write every twin of a data directory, one JSON object per line, sorted by key
    Export(DataDirArgs),
    /// Write every dead letter of a data directory with its reason and position (with
    /// --alerts: every alert a sink refused for good)
    Deadletters(DeadlettersArgs),
    /// Write every failing (twin, rule) of a data directory, one JSON object per line; with
    /// --pending, the failures of rules with `for` that have not lasted long enough yet
    Violations(ViolationsArgs),
    /// Seed (and reconcile) the snapshot from the hub's own view of its twins: twin documents
    /// from files (`--hub NAME --as-of TIME FILE...`) or from the hub's twin query API
    /// (TWINWATCH_IOTHUB_CONNECTION_STRING). Exit 0 for a complete pass, 1 for an incomplete
    /// one (what was read is applied, nothing is removed), 2 for bad usage
    Seed(SeedArgs),
    /// A dry run of a policy change: per rule, the twins failing now and under the given
    /// policy, and the alerts a re-audit would open and resolve; changes nothing (exit 2 for a
    /// policy that does not load)
    Audit(AuditArgs),
    /// Policy files: `twinwatch policy check FILE...`
    Policy(PolicyArgs),
    /// Write a deterministic synthetic fleet's notifications (JSON lines or Avro)
    Generate(GenerateArgs),
    /// A first look: a generated fleet in the embedded emulator and its twin query, the service
    /// seeding from the query then consuming the feed with the baseline policy, alerts on the
    /// terminal, metrics on localhost, until Ctrl-C
    Demo(DemoArgs),
    /// A local Event Hubs endpoint (AMQP 1.0, plain TCP) for development and tests, preloaded
    /// with captured files, and IoT Hub's twin query (HTTPS and HTTP) over twin documents;
    /// prints the connection strings and endpoints to use
    Emulator(EmulatorArgs),
}

#[derive(Debug, Args)]
pub struct DataDirArgs {
    /// The snapshot's data directory
    #[arg(long, env = "TWINWATCH_DATA_DIR")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ViolationsArgs {
    /// The snapshot's data directory
    #[arg(long, env = "TWINWATCH_DATA_DIR")]
    pub data_dir: PathBuf,

    /// List the pending violations (rules with `for`) with their deadlines instead
    #[arg(long)]
    pub pending: bool,
}

#[derive(Debug, Args)]
pub struct DeadlettersArgs {
    #[command(flatten)]
    pub dir: DataDirArgs,

    /// The alert dead letters instead (alerts a sink refused for good: sink, alert id, HTTP
    /// status, the receiver's message, the alert), one JSON object a line, in outbox order
    #[arg(long)]
    pub alerts: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The snapshot's data directory (created if missing)
    #[arg(long, env = "TWINWATCH_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Also write the run's counts here as JSON
    #[arg(long)]
    pub summary: Option<PathBuf>,

    /// Policy file (repeatable, concatenated in order); the built-in security-twin baseline
    /// when none is given
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,

    #[command(flatten)]
    pub sinks: SinkArgs,

    #[command(flatten)]
    pub tuning: TuningArgs,

    /// Files or directories (walked recursively, in path order) to replay, in order
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// The snapshot's data directory (created if missing)
    #[arg(long, env = "TWINWATCH_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Policy file (repeatable, concatenated in order); the built-in security-twin baseline
    /// when none is given. A policy other than the snapshot's re-audits it first
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,

    /// The hub whose twins the files hold (its name as in the change notifications' hubName);
    /// required with files. From the hub, it is the first label of the connection string's
    /// HostName
    #[arg(long)]
    pub hub: Option<String>,

    /// The pass's as-of time (RFC 3339, e.g. 2026-12-01T00:00:00Z): when the documents were
    /// read from the hub. Required with files; from the hub, the moment the pass begins unless
    /// given (give the same one to go on with an interrupted pass)
    #[arg(long, value_name = "TIME")]
    pub as_of: Option<String>,

    /// After a complete pass, remove only twins of the hub absent from it that have not
    /// changed for this long before the as-of time (seconds; the hub's query results may lag)
    #[arg(long, value_name = "SECS", default_value_t = config::DEFAULT_SEED_GRACE_SECS)]
    pub grace: u64,

    /// Do not remove twins that the pass did not see
    #[arg(long)]
    pub no_reconcile: bool,

    /// The twin query endpoint instead of https://<HostName> (an emulator or a private
    /// endpoint; plain http:// allowed)
    #[arg(long, value_name = "URL")]
    pub iothub_endpoint: Option<String>,

    /// A PEM file of extra certificate authorities to trust for the twin query endpoint
    #[arg(long, value_name = "FILE")]
    pub iothub_ca_file: Option<PathBuf>,

    /// The IoT Hub connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...;
    /// a policy with registry read) when no file is given: from the environment only, never a
    /// flag (a command line is visible to other users)
    #[arg(skip = std::env::var("TWINWATCH_IOTHUB_CONNECTION_STRING").ok().map(crate::config::Secret::new))]
    pub iothub_connection_string: Option<crate::config::Secret>,

    /// The service's configuration file (`twinwatch run --config`): when no file of documents
    /// is given, its `[seed]` table gives the connection string (unless
    /// TWINWATCH_IOTHUB_CONNECTION_STRING is set), the endpoint and the CA file (unless
    /// --iothub-endpoint and --iothub-ca-file are)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Twin documents per page asked of the hub
    #[arg(long, default_value_t = crate::iothub::DEFAULT_PAGE_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::iothub::MAX_PAGE_SIZE)))]
    pub page_size: u32,

    /// Also write the pass's counts here as JSON
    #[arg(long)]
    pub summary: Option<PathBuf>,

    #[command(flatten)]
    pub sinks: SinkArgs,

    #[command(flatten)]
    pub tuning: TuningArgs,

    /// Files of twin documents (a JSON array as `az iot hub query` prints, or one document per
    /// line), read in order; none: read the hub's twin query API
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The snapshot's data directory (read only; works beside a running writer)
    #[arg(long, env = "TWINWATCH_DATA_DIR")]
    pub data_dir: PathBuf,

    /// The policy to compare with (repeatable, concatenated in order)
    #[arg(long = "policy", value_name = "FILE", required = true)]
    pub policies: Vec<PathBuf>,

    /// `table` for people, `json` for programs
    #[arg(long, value_enum, default_value = "table")]
    pub format: AuditFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuditFormat {
    Table,
    Json,
}

/// Batching and memory; the defaults suit most fleets.
#[derive(Debug, Args)]
pub struct TuningArgs {
    /// Commit a batch after this many messages
    #[arg(long, default_value_t = config::DEFAULT_BATCH_MESSAGES,
          value_parser = clap::value_parser!(u64).range(1..=config::MAX_BATCH_MESSAGES))]
    pub batch_size: u64,

    /// ...or when the open batch is this old (milliseconds)
    #[arg(long, default_value_t = config::DEFAULT_BATCH_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..=config::MAX_BATCH_INTERVAL_MS))]
    pub batch_interval_ms: u64,

    /// Bodies larger than this are dead letters (body_too_large); IoT Hub's maximum by default
    #[arg(long, default_value_t = crate::decode::DEFAULT_MAX_BODY_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1..=config::MAX_BODY_BYTES_LIMIT))]
    pub max_body_bytes: u64,

    /// Memory for the cache of recently used twins, MiB
    #[arg(long, default_value_t = config::DEFAULT_CACHE_MIB, value_parser = clap::value_parser!(u64).range(0..=65_536))]
    pub cache_mib: u64,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Devices in the fleet
    #[arg(long, default_value_t = 1000)]
    pub devices: u64,

    /// Messages to write
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,

    /// Seed: the same options give the same bytes
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// The hub's name
    #[arg(long, default_value = "contoso-hub")]
    pub hub: String,

    /// Fraction (0 to 1) of extra messages: duplicates, stale versions, telemetry, malformed
    #[arg(long, default_value_t = 0.0)]
    pub noise: f64,

    /// Output file; `-` for standard output
    #[arg(long)]
    pub out: PathBuf,

    /// The container: storage-route JSON lines, Event Hubs Capture Avro, or storage-route Avro
    /// (a line that is not JSON has no Avro form: the Avro containers leave those out); or,
    /// instead of the messages, the twins they leave (twin-documents)
    #[arg(long, value_enum, default_value = "json")]
    pub format: GenerateFormat,

    /// The Avro block codec
    #[arg(long, value_enum, default_value = "deflate")]
    pub avro_codec: AvroCodec,

    /// With `--format twin-documents`: the fleet's twins after this many messages of the
    /// stream (default: all of --events), so that a seed as of N plus the messages from N on
    /// describe one fleet
    #[arg(long, value_name = "N")]
    pub as_of_event: Option<u64>,

    /// With `--format twin-documents`: one JSON array (as `az iot hub query` prints) or one
    /// document per line
    #[arg(long, value_enum, default_value = "array")]
    pub documents_layout: DocumentsLayoutArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DocumentsLayoutArg {
    Array,
    Lines,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GenerateFormat {
    Json,
    CaptureAvro,
    StorageAvro,
    /// The fleet's twins as IoT Hub's twin query returns them (with `$metadata` and
    /// `$version`): the input of a seed pass from a file
    TwinDocuments,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AvroCodec {
    Null,
    Deflate,
    Snappy,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Devices in the generated fleet
    #[arg(long, default_value_t = 5_000)]
    pub devices: u64,

    /// Events preloaded into the emulator before the service starts; the twin query serves
    /// the fleet as of them, and the service seeds from it
    #[arg(long, default_value_t = 50_000)]
    pub events: u64,

    /// Events per second published after that, as a live hub would
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,

    /// The HTTP listener of the service (/metrics, /healthz, /readyz)
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    pub listen: String,

    /// Where to keep the snapshot (default: a new temporary directory, removed at the end)
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Append every alert (CloudEvents JSON lines) to this file; the terminal shows a summary
    #[arg(long, value_name = "FILE")]
    pub alerts_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files; every error is reported with its file and rule (exit 2)
    Check {
        /// Policy files, concatenated in order as the service would load them
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Where alerts go. Without any sink, alerts are only counted (the violation set is kept all
/// the same); with several, each sink moves through the outbox on its own, and an alert leaves
/// it once every sink has accepted it (or refused it for good: an alert dead letter).
#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Append alerts (CloudEvents JSON lines) to this file
    #[arg(long, value_name = "FILE")]
    pub alerts_file: Option<PathBuf>,

    /// Print alerts (CloudEvents JSON lines) on standard output
    #[arg(long)]
    pub alerts_stdout: bool,

    /// POST alerts to this URL (http:// or https://; CloudEvents HTTP binding, batched mode
    /// unless --webhook-mode structured)
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,

    /// `batched`: a JSON array of alerts a request (application/cloudevents-batch+json);
    /// `structured`: one alert a request, for receivers that need it
    #[arg(long, value_name = "MODE", default_value = "batched", value_parser = ["batched", "structured"])]
    pub webhook_mode: String,

    /// Alerts per webhook request at most (batched mode)
    #[arg(long, default_value_t = config::DEFAULT_WEBHOOK_BATCH_MAX_ALERTS,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub webhook_batch_max_alerts: u64,

    /// Bytes per webhook request body at most (batched mode; a larger alert goes alone)
    #[arg(long, default_value_t = config::DEFAULT_WEBHOOK_BATCH_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    pub webhook_batch_max_bytes: u64,

    /// Webhook requests in flight at once
    #[arg(long, default_value_t = config::DEFAULT_WEBHOOK_IN_FLIGHT,
          value_parser = clap::value_parser!(u64).range(1..=config::MAX_WEBHOOK_IN_FLIGHT))]
    pub webhook_in_flight: u64,

    /// A PEM file of CA certificates trusted for https sinks, besides the system's
    #[arg(long, value_name = "FILE")]
    pub sink_ca_file: Option<PathBuf>,

    /// Bearer token for the webhook, sent only over https or to a loopback address (prefer
    /// the environment variable: a command line is visible to other users)
    #[arg(long, env = "TWINWATCH_WEBHOOK_TOKEN", hide_env_values = true)]
    pub webhook_token: Option<String>,

    /// Prometheus Alertmanager base URL (`http://host:9093`): alerts go to /api/v2/alerts
    #[arg(long, value_name = "URL")]
    pub alertmanager_url: Option<String>,

    /// How often open alerts are re-sent to Alertmanager (keep it well below its
    /// resolve_timeout, 5 minutes by default)
    #[arg(long, default_value_t = config::DEFAULT_ALERTMANAGER_REPOST_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub alertmanager_repost_secs: u64,

    /// Alertmanager's resolve_timeout, seconds: the re-post interval must be at most half
    /// of it
    #[arg(long, default_value_t = config::DEFAULT_ALERTMANAGER_RESOLVE_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub alertmanager_resolve_timeout_secs: u64,

    /// Timeout of one HTTP request to a sink, seconds
    #[arg(long, default_value_t = config::DEFAULT_SINK_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub sink_timeout_secs: u64,
}

impl SinkArgs {
    /// The flags validated, by the code that validates the configuration file's `[alerts]`
    /// (problems name the flags), or what is wrong with them, one problem a line.
    pub fn alerts_config(&self) -> Result<config::AlertsConfig, String> {
        config::alerts_config(self.raw(), config::SinkSettingsFrom::Flags)
    }

    /// The flags as the configuration file's `[alerts]` table.
    pub fn raw(&self) -> config::RawAlerts {
        config::RawAlerts {
            file: self.alerts_file.clone(),
            stdout: self.alerts_stdout,
            webhook_url: self.webhook_url.clone(),
            webhook_token: self.webhook_token.clone(),
            alertmanager_url: self.alertmanager_url.clone(),
            alertmanager_repost_secs: Some(self.alertmanager_repost_secs),
            sink_timeout_secs: Some(self.sink_timeout_secs),
            webhook_mode: Some(self.webhook_mode.clone()),
            webhook_batch_max_alerts: Some(self.webhook_batch_max_alerts),
            webhook_batch_max_bytes: Some(self.webhook_batch_max_bytes),
            webhook_in_flight: Some(self.webhook_in_flight),
            ca_file: self.sink_ca_file.clone(),
            alertmanager_resolve_timeout_secs: Some(self.alertmanager_resolve_timeout_secs),
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML; see deploy/twinwatch.toml). The connection strings may come
    /// from TWINWATCH_EVENTHUB_CONNECTION_STRING and (seed passes, [seed])
    /// TWINWATCH_IOTHUB_CONNECTION_STRING instead
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The snapshot's data directory (overrides the file; or TWINWATCH_DATA_DIR)
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Policy file (repeatable; overrides the file's); the built-in baseline when none
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,

    /// Append alerts (CloudEvents JSON lines) to this file (overrides the file's)
    #[arg(long, value_name = "FILE")]
    pub alerts_file: Option<PathBuf>,

    /// Print alerts on standard output
    #[arg(long)]
    pub alerts_stdout: bool,

    /// Address of the HTTP listener for /metrics, /healthz, /readyz (default 127.0.0.1:9464)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Address to listen on (port 0: any free port; the connection string tells which)
    #[arg(long, default_value = "127.0.0.1:5672")]
    pub listen: String,

    /// The Event Hub's name (the connection string's EntityPath)
    #[arg(long, default_value = "iothub-ehub-twinwatch")]
    pub hub: String,

    /// Partitions; each event goes to one by a stable hash of its device id
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub partitions: u32,

    /// Keep publishing generated events at this rate (events per second; 0: none)
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// Devices of the generated fleet published at --rate
    #[arg(long, default_value_t = 1000)]
    pub devices: u64,

    /// Seed of the generated fleet published at --rate
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Generated events (of the fleet of --devices and --seed) preloaded before any file's;
    /// --rate then continues the same stream from there
    #[arg(long, default_value_t = 0)]
    pub events: u64,

    /// Serve IoT Hub's twin query (`POST /devices/query`) from these twin documents (one JSON
    /// array as `az iot hub query` prints, or one per line). Without it, the twin query serves
    /// the generated fleet's twins as of --events, when there is a generated fleet
    #[arg(long, value_name = "FILE")]
    pub twins: Option<PathBuf>,

    /// The IoT hub's name for the twin query: its host name is NAME.azure-devices.net
    /// (default: --hub, the name the generated events carry)
    #[arg(long, value_name = "NAME")]
    pub iothub_name: Option<String>,

    /// HTTPS listener of the twin query (port 0: any free port; printed)
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub query_listen: String,

    /// Plain HTTP listener of the twin query (port 0: any free port; printed)
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub query_http_listen: String,

    /// Where to write the CA certificate (PEM) that clients of the HTTPS twin query must
    /// trust (default: a file in the temporary directory; printed)
    #[arg(long, value_name = "FILE")]
    pub ca_cert_out: Option<PathBuf>,

    /// Captured files or directories to preload (any replay format), in order
    pub paths: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    const EMULATOR: &str =
        "Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=k;SharedAccessKey=v;EntityPath=hub";

    fn replay(flags: &[&str]) -> Result<ReplayArgs, clap::Error> {
        let args = ["twinwatch", "replay", "--data-dir", "/d"]
            .iter()
            .chain(flags)
            .chain(&["in.jsonl"]);
        match Cli::try_parse_from(args)?.command {
            Command::Replay(args) => Ok(args),
            other => panic!("not a replay: {other:?}"),
        }
    }

    /// The sink flags left out validate to what an empty `[alerts]` table does: the flags and
    /// the file have one set of defaults and one validation.
    #[test]
    fn sink_flags_default_as_the_file_does() {
        let flags = replay(&[])
            .expect("parses")
            .sinks
            .alerts_config()
            .expect("valid");
        let file =
            config::alerts_config(config::RawAlerts::default(), config::SinkSettingsFrom::File)
                .expect("valid");
        assert_eq!(format!("{flags:?}"), format!("{file:?}"));
    }

    /// A problem with a sink flag names the flag the user wrote, not the file's key.
    #[test]
    fn sink_flag_problems_name_the_flags() {
        let error = replay(&[
            "--webhook-url",
            "ftp://hooks.example.com/x",
            "--alertmanager-url",
            "http://am:9093",
            "--alertmanager-repost-secs",
            "200",
            "--sink-ca-file",
            "/nonexistent/ca.pem",
        ])
        .expect("parses")
        .sinks
        .alerts_config()
        .expect_err("invalid");
        for expected in [
            "--webhook-url: must be an http:// or https:// URL",
            "--alertmanager-repost-secs: a re-post every 200 s",
            "give the real resolve_timeout as --alertmanager-resolve-timeout-secs",
            "--sink-ca-file: /nonexistent/ca.pem is not a file",
        ] {
            assert!(error.contains(expected), "{expected} missing from: {error}");
        }
        assert!(!error.contains("alerts."), "{error}");
        replay(&[
            "--alertmanager-url",
            "http://am:9093",
            "--alertmanager-repost-secs",
            "200",
            "--alertmanager-resolve-timeout-secs",
            "400",
        ])
        .expect("parses")
        .sinks
        .alerts_config()
        .expect("within half of the given resolve_timeout");
    }

    /// The flags and the file refuse the same values past the limits they share.
    #[test]
    fn flags_and_file_share_their_limits() {
        for (flag, key, max) in [
            (
                "--webhook-in-flight",
                "[alerts]\nwebhook_in_flight",
                config::MAX_WEBHOOK_IN_FLIGHT,
            ),
            (
                "--batch-size",
                "[batching]\nmax_messages",
                config::MAX_BATCH_MESSAGES,
            ),
            (
                "--batch-interval-ms",
                "[batching]\nmax_delay_ms",
                config::MAX_BATCH_INTERVAL_MS,
            ),
            (
                "--max-body-bytes",
                "[batching]\nmax_body_bytes",
                config::MAX_BODY_BYTES_LIMIT,
            ),
        ] {
            for (value, valid) in [(max, true), (max + 1, false), (0, false)] {
                let value = value.to_string();
                let flags = replay(&[flag, value.as_str()]).map(|args| args.sinks.alerts_config());
                assert_eq!(
                    matches!(flags, Ok(Ok(_))),
                    valid,
                    "{flag} {value}: {flags:?}"
                );
                let file = toml::from_str::<config::RawConfig>(&format!(
                    "data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\n{key} = {value}\n"
                ))
                .expect("parses")
                .validate();
                assert_eq!(file.is_ok(), valid, "{key} = {value}: {file:?}");
            }
        }
    }

    /// `--help` shows each default, taken from its named constant.
    #[test]
    fn help_shows_the_defaults() {
        let mut cli = Cli::command();
        let help = |cli: &mut clap::Command, command: &str| {
            cli.find_subcommand_mut(command)
                .expect("a command")
                .render_long_help()
                .to_string()
        };
        let default_of = |help: &str, flag: &str| {
            let at = help.find(&format!("{flag} ")).expect(flag);
            let rest = &help[at..];
            let start = rest.find("[default: ").expect("a default") + "[default: ".len();
            rest[start..].split(']').next().unwrap_or("").to_owned()
        };
        let replay = help(&mut cli, "replay");
        for (flag, default) in [
            ("--batch-size", config::DEFAULT_BATCH_MESSAGES.to_string()),
            (
                "--batch-interval-ms",
                config::DEFAULT_BATCH_INTERVAL_MS.to_string(),
            ),
            (
                "--max-body-bytes",
                crate::decode::DEFAULT_MAX_BODY_BYTES.to_string(),
            ),
            ("--cache-mib", config::DEFAULT_CACHE_MIB.to_string()),
            ("--webhook-mode", "batched".to_owned()),
            (
                "--webhook-batch-max-alerts",
                config::DEFAULT_WEBHOOK_BATCH_MAX_ALERTS.to_string(),
            ),
            (
                "--webhook-batch-max-bytes",
                config::DEFAULT_WEBHOOK_BATCH_MAX_BYTES.to_string(),
            ),
            (
                "--webhook-in-flight",
                config::DEFAULT_WEBHOOK_IN_FLIGHT.to_string(),
            ),
            (
                "--alertmanager-repost-secs",
                config::DEFAULT_ALERTMANAGER_REPOST_SECS.to_string(),
            ),
            (
                "--alertmanager-resolve-timeout-secs",
                config::DEFAULT_ALERTMANAGER_RESOLVE_TIMEOUT_SECS.to_string(),
            ),
            (
                "--sink-timeout-secs",
                config::DEFAULT_SINK_TIMEOUT_SECS.to_string(),
            ),
        ] {
            assert_eq!(default_of(&replay, flag), default, "replay {flag}");
        }
        let seed = help(&mut cli, "seed");
        assert_eq!(
            default_of(&seed, "--grace"),
            config::DEFAULT_SEED_GRACE_SECS.to_string()
        );
        assert_eq!(
            default_of(&seed, "--page-size"),
            crate::iothub::DEFAULT_PAGE_SIZE.to_string()
        );
        assert_eq!(
            default_of(&help(&mut cli, "demo"), "--listen"),
            config::DEFAULT_LISTEN
        );
        // `run --listen` has no clap default (the file's `listen` comes first): its text says it.
        let run = help(&mut cli, "run");
        assert!(
            run.contains(&format!("(default {})", config::DEFAULT_LISTEN)),
            "{run}"
        );
    }

    /// `replay` and `seed` without tuning flags run the engine with its `Default` options.
    #[cfg(feature = "service")]
    #[test]
    fn tuning_flags_default_as_the_engine_does() {
        let policy = std::sync::Arc::new(crate::policy::Policy::baseline());
        let flags = replay(&[])
            .expect("parses")
            .tuning
            .engine_options(policy, false);
        let default = crate::pipeline::EngineOptions::default();
        assert_eq!(
            (
                flags.batch_messages,
                flags.batch_interval,
                flags.max_body_bytes,
                flags.cache_bytes
            ),
            (
                default.batch_messages,
                default.batch_interval,
                default.max_body_bytes,
                default.cache_bytes
            )
        );
    }
}
