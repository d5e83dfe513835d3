use super::*;

const EMULATOR: &str = "Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;EntityPath=hub";

fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[test]
fn the_emulator_string_implies_a_plain_amqp_endpoint() {
    let config = RawConfig::default()
        .with_environment(env(&[
            ("TWINWATCH_DATA_DIR", "/tmp/d"),
            ("TWINWATCH_EVENTHUB_CONNECTION_STRING", EMULATOR),
        ]))
        .validate()
        .expect("valid");
    assert_eq!(
        config.eventhub.custom_endpoint.as_deref(),
        Some("amqp://127.0.0.1:5673")
    );
    assert_eq!(config.eventhub.entity, "hub");
    assert_eq!(config.eventhub.partitions, Partitions::All);
    assert_eq!(config.eventhub.start_position, StartPosition::Earliest);
    assert!(
        !format!("{config:?}").contains("SAS_KEY_VALUE"),
        "the key leaked into Debug"
    );
}

#[test]
fn every_problem_is_reported_without_the_secret() {
    let raw: RawConfig = toml::from_str(
        r#"
listen = "nowhere"
[eventhub]
connection_string = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=TOPSECRET"
start_position = "middle"
[batching]
max_messages = 0
"#,
    )
    .expect("parses");
    let error = raw.validate().expect_err("invalid").to_string();
    for expected in ["data_dir", "listen", "EntityPath", "max_messages"] {
        assert!(error.contains(expected), "{expected} missing from: {error}");
    }
    assert!(!error.contains("TOPSECRET"));
}

/// https is accepted; a bearer token over plain http only to loopback; a re-post
/// interval that could outlive Alertmanager's resolve timeout is refused; the webhook's
/// mode is one of two.
#[test]
fn sink_settings_are_checked() {
    let alerts = |text: &str| {
        alerts_config(
            toml::from_str::<RawAlerts>(text).expect("parses"),
            SinkSettingsFrom::File,
        )
    };
    let ok = alerts(
        "webhook_url = \"https://hooks.example.com/x\"\nwebhook_token = \"t\"\n\
         alertmanager_url = \"https://am.example.com/\"\nwebhook_mode = \"structured\"\n",
    )
    .expect("valid");
    assert!(ok.webhook_structured);
    assert_eq!(
        ok.alertmanager_url.as_deref(),
        Some("https://am.example.com")
    );
    assert_eq!(
        (ok.webhook_batch_max_alerts, ok.webhook_in_flight),
        (500, 4)
    );
    // What the service logs at start: no credentials of a URL.
    let with_secrets = alerts(
        "webhook_url = \"https://user:PASSWORD@hooks.example.com/x?key=KEY\"\nwebhook_token = \"TOKEN\"\n",
    )
    .expect("valid");
    let shown = format!("{with_secrets:?}");
    for secret in ["PASSWORD", "KEY", "TOKEN"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("https://hooks.example.com/x"), "{shown}");
    alerts("webhook_url = \"http://127.0.0.1:8080/x\"\nwebhook_token = \"t\"\n")
        .expect("a token to loopback");
    let error =
        alerts("webhook_url = \"http://hooks.example.com/x\"\nwebhook_token = \"SECRET\"\n")
            .expect_err("a token in the clear");
    assert!(
        error.contains("webhook_url") && error.contains("https"),
        "{error}"
    );
    assert!(!error.contains("SECRET"));
    let error = alerts("alertmanager_url = \"http://am:9093\"\nalertmanager_repost_secs = 200\n")
        .expect_err("longer than half the default resolve_timeout");
    assert!(error.contains("resolve_timeout"), "{error}");
    alerts(
        "alertmanager_url = \"http://am:9093\"\nalertmanager_repost_secs = 200\n\
         alertmanager_resolve_timeout_secs = 600\n",
    )
    .expect("within half of the given resolve_timeout");
    let error =
        alerts("webhook_url = \"ftp://x/\"\nwebhook_mode = \"chunked\"\nwebhook_in_flight = 0\n")
            .expect_err("invalid");
    for expected in ["webhook_url", "webhook_mode", "webhook_in_flight"] {
        assert!(error.contains(expected), "{expected} missing from: {error}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let error = toml::from_str::<RawConfig>("[eventhub]\nconection_string = \"x\"\n")
        .expect_err("unknown field")
        .to_string();
    assert!(error.contains("conection_string"), "{error}");
}

#[test]
fn partitions_take_a_list() {
    let raw: RawConfig = toml::from_str(&format!(
        "data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\npartitions = [\"0\", 2]\n"
    ))
    .expect("parses");
    let config = raw.validate().expect("valid");
    assert_eq!(
        config.eventhub.partitions,
        Partitions::List(vec!["0".into(), "2".into()])
    );
}

/// Issue 23: two receivers on one partition were accepted.
#[test]
fn duplicate_partitions_are_refused() {
    let raw: RawConfig = toml::from_str(&format!(
        "data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\npartitions = [\"0\", 1, \"1\", \"0\", \"2\"]\n"
    ))
    .expect("parses");
    let error = raw.validate().expect_err("duplicates").to_string();
    assert!(
        error.contains("\"0\", \"1\" listed more than once"),
        "{error}"
    );
}

#[test]
fn urls_lose_their_user_info_and_query() {
    for (url, expected) in [
        (
            "http://user:pa55@alerts.example:8080/hook?token=t0k#frag",
            "http://<redacted>@alerts.example:8080/hook?<redacted>",
        ),
        ("http://host:9093", "http://host:9093"),
        ("http://host/p?x", "http://host/p?<redacted>"),
        (
            "amqp://sas:key@127.0.0.1:5672",
            "amqp://<redacted>@127.0.0.1:5672",
        ),
        ("host/p", "host/p"),
        ("http://a@b@host/", "http://<redacted>@host/"),
    ] {
        assert_eq!(redact_url(url), expected, "{url}");
    }
}

/// Issue 23: `RawConfig` derived `Debug` with the connection string and tokens in clear,
/// and the startup log printed sink URLs whole.
#[test]
fn debug_output_never_shows_a_secret() {
    let file = format!(
        r#"
data_dir = "/d"
api_token = "API-SECRET-1"
[eventhub]
connection_string = "{EMULATOR};SharedAccessSignature=SIG-SECRET-2"
custom_endpoint = "amqp://cuser:CUSTOM-SECRET-3@127.0.0.1:5672/?k=QUERY-SECRET-4"
[alerts]
webhook_url = "http://wuser:WEBHOOK-PASS-5@127.0.0.1:1/hook?token=WEBHOOK-QUERY-6"
webhook_token = "WEBHOOK-TOKEN-7"
alertmanager_url = "http://auser:AM-PASS-8@127.0.0.1:9093/?t=AM-QUERY-9"
"#
    );
    let raw: RawConfig = toml::from_str(&file).expect("parses");
    let raw_debug = format!("{raw:?}");
    let config = raw.validate().expect("valid");
    let config_debug = format!("{config:?}");
    for secret in [
        "SAS_KEY_VALUE",
        "API-SECRET-1",
        "SIG-SECRET-2",
        "CUSTOM-SECRET-3",
        "QUERY-SECRET-4",
        "WEBHOOK-PASS-5",
        "WEBHOOK-QUERY-6",
        "WEBHOOK-TOKEN-7",
        "AM-PASS-8",
        "AM-QUERY-9",
    ] {
        assert!(!raw_debug.contains(secret), "{secret} in {raw_debug}");
        assert!(!config_debug.contains(secret), "{secret} in {config_debug}");
    }
    // What is not secret still shows, so the log says which endpoints are meant.
    assert!(config_debug.contains("127.0.0.1:9093"), "{config_debug}");
    assert!(
        raw_debug.contains("api_token: Some(<redacted>)"),
        "{raw_debug}"
    );
}

#[test]
fn the_api_is_served_on_loopback_or_with_a_token() {
    let base = format!("data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\n");
    let serves = |listen: &str, token: Option<&str>| {
        let raw: RawConfig =
            toml::from_str(&format!("listen = \"{listen}\"\n{base}")).expect("parses");
        let vars: Vec<(&str, &str)> = token
            .map(|t| vec![("TWINWATCH_API_TOKEN", t)])
            .unwrap_or_default();
        raw.with_environment(env(&vars))
            .validate()
            .expect("valid")
            .serves_api()
    };
    assert!(serves("127.0.0.1:9464", None));
    assert!(serves("[::1]:9464", None));
    assert!(!serves("0.0.0.0:9464", None));
    assert!(!serves("[::]:9464", None));
    assert!(!serves("10.1.2.3:9464", None));
    assert!(serves("0.0.0.0:9464", Some("t")));
}

/// A StatefulSet replica owns every `replicas`-th partition from its ordinal, which comes
/// from `TWINWATCH_REPLICA_ORDINAL` or else from the pod's host name.
#[test]
fn partitions_by_ordinal_split_the_hub_between_replicas() {
    let file = format!(
        "data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\npartitions = \"ordinal\"\nreplicas = 3\n"
    );
    let hub: Vec<String> = (0..8).map(|i| i.to_string()).collect();
    let owned = |vars: &[(&str, &str)]| {
        let raw: RawConfig = toml::from_str(&file).expect("parses");
        let config = raw.with_environment(env(vars)).validate().expect("valid");
        config.eventhub.partitions.select(&hub).expect("select")
    };
    assert_eq!(owned(&[("HOSTNAME", "twinwatch-0")]), ["0", "3", "6"]);
    assert_eq!(owned(&[("HOSTNAME", "twinwatch-2")]), ["2", "5"]);
    assert_eq!(
        owned(&[
            ("TWINWATCH_REPLICA_ORDINAL", "1"),
            ("HOSTNAME", "twinwatch-2")
        ]),
        ["1", "4", "7"]
    );
    let mut all: Vec<String> = (0..3)
        .flat_map(|k| owned(&[("TWINWATCH_REPLICA_ORDINAL", &k.to_string())]))
        .collect();
    all.sort_by_key(|id| id.parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(all, hub, "every partition owned exactly once");
    for (vars, expected) in [
        (&[("HOSTNAME", "laptop")][..], "no ordinal"),
        (
            &[("TWINWATCH_REPLICA_ORDINAL", "3")][..],
            "not below replicas",
        ),
    ] {
        let raw: RawConfig = toml::from_str(&file).expect("parses");
        let error = raw
            .with_environment(env(vars))
            .validate()
            .expect_err("invalid")
            .to_string();
        assert!(error.contains(expected), "{expected} missing from: {error}");
    }
}

#[test]
fn the_api_token_comes_from_the_environment_or_a_file() {
    let base = format!("data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\n");
    let raw: RawConfig = toml::from_str(&base).expect("parses");
    let config = raw
        .with_environment(env(&[("TWINWATCH_API_TOKEN", "t0ken")]))
        .validate()
        .expect("valid");
    assert_eq!(config.api_token.as_ref().map(Secret::expose), Some("t0ken"));
    assert!(!format!("{config:?}").contains("t0ken"), "the token leaked");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, "from-file\n").expect("write");
    let raw: RawConfig = toml::from_str(&format!(
        "api_token_file = {:?}\n{base}",
        path.display().to_string()
    ))
    .expect("parses");
    let config = raw
        .with_environment(env(&[("TWINWATCH_API_TOKEN", "ignored")]))
        .validate()
        .expect("valid");
    assert_eq!(
        config.api_token.as_ref().map(Secret::expose),
        Some("from-file")
    );
}

/// The configuration files the repository ships (the example and the Kubernetes
/// ConfigMap's) are valid as they are, with the secrets from the environment.
#[test]
fn the_shipped_configurations_are_valid() {
    let configmap: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(include_str!("../../deploy/kubernetes/configmap.yaml"))
            .expect("configmap.yaml");
    let in_configmap = configmap["data"]["twinwatch.toml"]
        .as_str()
        .expect("the ConfigMap has twinwatch.toml");
    for (name, text) in [
        (
            "deploy/twinwatch.toml",
            include_str!("../../deploy/twinwatch.toml"),
        ),
        ("the ConfigMap's twinwatch.toml", in_configmap),
    ] {
        let raw: RawConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let config = raw
            .with_environment(env(&[
                ("TWINWATCH_EVENTHUB_CONNECTION_STRING", EMULATOR),
                ("HOSTNAME", "twinwatch-1"),
            ]))
            .validate()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.data_dir, std::path::Path::new("/data"), "{name}");
    }
}

const IOTHUB: &str = "HostName=contoso-hub.azure-devices.net;SharedAccessKeyName=registryRead;SharedAccessKey=SU9USFVCLUtFWS1TRUNSRVQ=";

/// `[seed]`: on with an IoT Hub connection string (from the environment or the file),
/// with its defaults; off without one, and then its other settings are refused; bad
/// values reported together; the key never shown.
#[test]
fn the_seed_section_is_validated() {
    let base = format!("data_dir = \"/d\"\n[eventhub]\nconnection_string = \"{EMULATOR}\"\n");
    let parse = |extra: &str, vars: &[(&str, &str)]| {
        let raw: RawConfig = toml::from_str(&format!("{base}{extra}")).expect("parses");
        raw.with_environment(env(vars)).validate()
    };
    assert!(parse("", &[]).expect("valid").seed.is_none());
    let seed = parse("", &[("TWINWATCH_IOTHUB_CONNECTION_STRING", IOTHUB)])
        .expect("valid")
        .seed
        .expect("seeding on");
    assert_eq!(seed.hub(), "contoso-hub");
    assert!(seed.on_empty);
    assert_eq!(seed.reconcile_every, Some(Duration::from_secs(86_400)));
    assert_eq!(seed.grace, Duration::from_secs(3600));
    assert_eq!((seed.page_size, seed.as_of), (1000, None));
    assert!(!format!("{seed:?}").contains("SU9USFVCLUtFWS1TRUNSRVQ="));

    let seed = parse(
        &format!(
            "[seed]\nconnection_string = \"{IOTHUB}\"\non_empty = false\nreconcile_every_hours = 0.5\ngrace_secs = 0\npage_size = 50\nendpoint = \"http://127.0.0.1:9000\"\nas_of = \"2026-01-02T00:00:00Z\"\n"
        ),
        &[],
    )
    .expect("valid")
    .seed
    .expect("seeding on");
    assert!(!seed.on_empty);
    assert_eq!(seed.reconcile_every, Some(Duration::from_secs(1800)));
    assert_eq!(seed.grace, Duration::ZERO);
    assert_eq!(seed.page_size, 50);
    assert_eq!(
        seed.as_of.map(|t| t.to_string()).as_deref(),
        Some("2026-01-02T00:00:00.0000000Z")
    );
    let off = parse(
        &format!("[seed]\nconnection_string = \"{IOTHUB}\"\nreconcile_every_hours = 0\n"),
        &[],
    )
    .expect("valid");
    assert_eq!(off.seed.expect("seeding on").reconcile_every, None);

    let error = parse(
        &format!(
            "[seed]\nconnection_string = \"{IOTHUB}\"\nreconcile_every_hours = -1\npage_size = 0\nendpoint = \"http://hub.example.com\"\nas_of = \"yesterday\"\n"
        ),
        &[],
    )
    .expect_err("invalid")
    .to_string();
    for expected in [
        "reconcile_every_hours",
        "page_size",
        "seed.endpoint",
        "seed.as_of",
    ] {
        assert!(error.contains(expected), "{expected} missing from: {error}");
    }
    assert!(!error.contains("SU9USFVCLUtFWS1TRUNSRVQ="), "{error}");
    let error = parse("[seed]\non_empty = true\n", &[])
        .expect_err("no connection string")
        .to_string();
    assert!(
        error.contains("seed.on_empty") && error.contains("TWINWATCH_IOTHUB_CONNECTION_STRING"),
        "{error}"
    );
    let error = parse(
        "[seed]\nconnection_string = \"HostName=h;SharedAccessKey=SECRETKEY\"\n",
        &[],
    )
    .expect_err("no key name")
    .to_string();
    assert!(
        error.contains("seed.connection_string") && !error.contains("SECRETKEY"),
        "{error}"
    );
    let raw: RawConfig =
        toml::from_str(&format!("{base}[seed]\nconnection_string = \"{IOTHUB}\"\n"))
            .expect("parses");
    assert!(!format!("{raw:?}").contains("SU9USFVCLUtFWS1TRUNSRVQ="));
}

/// What the file leaves out takes the named defaults (the ones the flags' `--help` shows),
/// the service's shorter batch interval included.
#[test]
fn what_the_file_leaves_out_takes_the_named_defaults() {
    let config = RawConfig::default()
        .with_environment(env(&[
            ("TWINWATCH_DATA_DIR", "/d"),
            ("TWINWATCH_EVENTHUB_CONNECTION_STRING", EMULATOR),
            ("TWINWATCH_IOTHUB_CONNECTION_STRING", IOTHUB),
        ]))
        .validate()
        .expect("valid");
    assert_eq!(
        config.listen,
        DEFAULT_LISTEN.parse::<SocketAddr>().expect("an address")
    );
    assert_eq!(config.batch_messages as u64, DEFAULT_BATCH_MESSAGES);
    assert_eq!(
        config.batch_interval,
        Duration::from_millis(SERVICE_BATCH_INTERVAL_MS)
    );
    assert_eq!(config.cache_bytes, (DEFAULT_CACHE_MIB as usize) << 20);
    assert_eq!(config.max_body_bytes, crate::decode::DEFAULT_MAX_BODY_BYTES);
    assert_eq!(
        config.shutdown_deadline,
        Duration::from_secs(DEFAULT_SHUTDOWN_DEADLINE_SECS)
    );
    assert_eq!(config.min_free_bytes, DEFAULT_MIN_FREE_DISK_MIB << 20);
    assert_eq!(
        config.allowed_event_delay,
        Duration::from_secs(DEFAULT_ALLOWED_EVENT_DELAY_SECS)
    );
    assert_eq!(config.eventhub.consumer_group, DEFAULT_CONSUMER_GROUP);
    let alerts = &config.alerts;
    assert!(!alerts.webhook_structured);
    assert_eq!(
        (
            alerts.webhook_batch_max_alerts as u64,
            alerts.webhook_batch_max_bytes as u64,
            alerts.webhook_in_flight as u64
        ),
        (
            DEFAULT_WEBHOOK_BATCH_MAX_ALERTS,
            DEFAULT_WEBHOOK_BATCH_MAX_BYTES,
            DEFAULT_WEBHOOK_IN_FLIGHT
        )
    );
    assert_eq!(
        alerts.alertmanager_repost,
        Duration::from_secs(DEFAULT_ALERTMANAGER_REPOST_SECS)
    );
    assert_eq!(
        alerts.sink_timeout,
        Duration::from_secs(DEFAULT_SINK_TIMEOUT_SECS)
    );
    let seed = config.seed.expect("seeding on");
    assert_eq!(seed.grace, Duration::from_secs(DEFAULT_SEED_GRACE_SECS));
    assert_eq!(seed.page_size, crate::iothub::DEFAULT_PAGE_SIZE);
    assert_eq!(
        seed.reconcile_every,
        Some(Duration::from_secs_f64(
            DEFAULT_RECONCILE_EVERY_HOURS * 3600.0
        ))
    );
}

/// `deploy/twinwatch.toml` writes the defaults out, set or commented out (`# key = number` in
/// `[alerts]` and `[seed]`): with those lines uncommented it configures exactly what a file of
/// its `data_dir` and `listen` alone does, so a reader of the example reads the defaults.
#[test]
fn the_example_configuration_states_the_defaults() {
    let example = include_str!("../../deploy/twinwatch.toml");
    let mut section = "";
    let mut uncommented = Vec::new();
    let mut text = String::new();
    for line in example.lines() {
        if line.starts_with('[') {
            section = line;
        }
        let default = line.strip_prefix("# ").filter(|rest| {
            matches!(section, "[alerts]" | "[seed]")
                && rest.split_once(" = ").is_some_and(|(key, value)| {
                    key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        && value
                            .split_whitespace()
                            .next()
                            .is_some_and(|v| v.parse::<f64>().is_ok())
                })
        });
        if let Some(default) = default {
            uncommented.push(default.split(" = ").next().unwrap_or(default));
        }
        text.push_str(default.unwrap_or(line));
        text.push('\n');
    }
    assert_eq!(
        uncommented,
        [
            "alertmanager_resolve_timeout_secs",
            "webhook_batch_max_alerts",
            "webhook_batch_max_bytes",
            "webhook_in_flight",
            "reconcile_every_hours",
            "grace_secs",
            "page_size"
        ]
    );
    let vars = env(&[
        ("TWINWATCH_EVENTHUB_CONNECTION_STRING", EMULATOR),
        ("TWINWATCH_IOTHUB_CONNECTION_STRING", IOTHUB),
    ]);
    let stated = toml::from_str::<RawConfig>(&text)
        .expect("parses")
        .with_environment(&vars)
        .validate()
        .expect("valid");
    let defaults = toml::from_str::<RawConfig>("data_dir = \"/data\"\nlisten = \"0.0.0.0:9464\"\n")
        .expect("parses")
        .with_environment(&vars)
        .validate()
        .expect("valid");
    assert_eq!(format!("{stated:?}"), format!("{defaults:?}"));
}
