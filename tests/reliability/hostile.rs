//! Hostile input through the real binary: deep nesting, huge bodies, invalid UTF-8, numbers
//! out of range, duplicate keys, truncated lines, NUL bytes, interleaved at seeded positions
//! with a generated fleet's lines. Each must end as a dead letter at its own record, never a
//! panic, never a stall, and every good line around them must be applied. Hostile policy files
//! must each be a policy error.

use std::path::Path;
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::report;
use crate::support::{assert_export_is_replays, binary, generate_fleet, ok, path, replay_export};

/// Runs the binary, killing it after `limit` (a stall) and failing on a panic. Its output goes
/// to files (a pipe nobody reads while waiting would stall a chatty run).
fn run_bounded(args: &[&str], limit: Duration) -> Output {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let (stdout, stderr) = (out_dir.path().join("stdout"), out_dir.path().join("stderr"));
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&stdout).expect("stdout"))
        .stderr(std::fs::File::create(&stderr).expect("stderr"))
        .spawn()
        .expect("spawn twinwatch");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("twinwatch {args:?} stalled: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: std::fs::read(&stdout).expect("stdout"),
        stderr: std::fs::read(&stderr).expect("stderr"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "twinwatch {args:?} panicked: {stderr}"
    );
    out
}

/// An `updateTwin` line for `device` (created by the fleet's first line's template) with the
/// body written as raw JSON text `body`.
fn update_line(template: &Value, device: &str, body: &[u8]) -> Vec<u8> {
    let mut line = template.clone();
    line["Properties"]["deviceId"] = json!(device);
    line["Properties"]["opType"] = json!("updateTwin");
    line["Properties"]["iothub-message-schema"] = json!("twinChangeNotification");
    line["SystemProperties"]["iothub-message-source"] = json!("twinChangeEvents");
    line["Body"] = json!("@BODY@");
    let text = serde_json::to_string(&line).expect("json");
    let (before, after) = text.split_once("\"@BODY@\"").expect("placeholder");
    [before.as_bytes(), body, after.as_bytes()].concat()
}

/// The hostile lines: (name, line, whether it is applied rather than dead-lettered).
fn hostile_lines(template: &Value, device: &str) -> Vec<(&'static str, Vec<u8>, bool)> {
    let nest = |levels: usize, open: &str, close: &str| {
        let mut body = String::from("{\"version\":5,\"properties\":{\"reported\":{\"x\":");
        body.push_str(&open.repeat(levels));
        body.push('1');
        body.push_str(&close.repeat(levels));
        body.push_str("}}}");
        body.into_bytes()
    };
    let mut huge = b"{\"version\":5,\"properties\":{\"reported\":{\"x\":\"".to_vec();
    huge.resize(huge.len() + (64 << 20), b'a');
    huge.extend_from_slice(b"\"}}}");
    let mut mib = b"{\"version\":5,\"properties\":{\"reported\":{\"x\":\"".to_vec();
    mib.resize(mib.len() + (1 << 20), b'b');
    mib.extend_from_slice(b"\"}}}");
    let good = update_line(template, device, b"{\"version\":5}");
    let mut invalid_utf8_property = good.clone();
    let at = memchr_find(&invalid_utf8_property, device.as_bytes());
    invalid_utf8_property.splice(at..at, [0xff, 0xfe]);
    let mut duplicate_property = good.clone();
    let at = memchr_find(&duplicate_property, b"\"deviceId\"");
    duplicate_property.splice(at..at, *b"\"opType\":\"replaceTwin\",");
    let mut nul = good.clone();
    nul.insert(good.len() / 2, 0);
    let line = |body: &[u8]| update_line(template, device, body);
    // Times cut inside a multi-byte character (issue 23: byte 19 of `"…06:06:3é"` is inside
    // the `é`, and slicing there panicked, every run, from the durable checkpoint on).
    let cut = "2019-05-10T06:06:3é";
    let with_times = |operation: Option<&str>, enqueued: &str, enqueued_utc: &str| {
        let mut value: Value = serde_json::from_slice(&good).expect("good line");
        match operation {
            Some(operation) => value["Properties"]["operationTimestamp"] = json!(operation),
            None => {
                value["Properties"]
                    .as_object_mut()
                    .expect("properties")
                    .remove("operationTimestamp");
            }
        }
        value["SystemProperties"]["enqueuedTime"] = json!(enqueued);
        value["EnqueuedTimeUtc"] = json!(enqueued_utc);
        serde_json::to_vec(&value).expect("json")
    };
    let fine = "2019-05-10T06:06:32.722Z";
    vec![
        (
            "operation-timestamp-cut-in-a-character",
            with_times(Some(cut), fine, fine),
            false,
        ),
        // Without `operationTimestamp` the enqueued times place the event: unreadable ones
        // are the documented fallback (the epoch), not a failure, so these lines apply.
        (
            "enqueued-time-cut-in-a-character",
            with_times(None, cut, fine),
            true,
        ),
        (
            "enqueued-time-utc-cut-in-a-character",
            with_times(None, cut, "2019-05-10T06:06:32€"),
            true,
        ),
        (
            "dotnet-enqueued-time-overflow",
            with_times(None, "12/8/99999999999999999999 3:03:17 AM", cut),
            true,
        ),
        ("nesting-70-objects", line(&nest(70, "{\"a\":", "}")), false),
        ("nesting-5000-arrays", line(&nest(5000, "[", "]")), false),
        (
            "nesting-100k-objects",
            line(&nest(100_000, "{\"a\":", "}")),
            false,
        ),
        ("nesting-100k-arrays", line(&nest(100_000, "[", "]")), false),
        ("body-64-mib", line(&huge), false),
        ("body-1-mib", line(&mib), false),
        ("body-1-mib-again", line(&mib), false),
        (
            "invalid-utf8-body",
            line(b"{\"version\":5,\"properties\":{\"reported\":{\"x\":\"\xc3\x28\"}}}"),
            false,
        ),
        ("invalid-utf8-property", invalid_utf8_property, false),
        (
            "number-1e400",
            line(b"{\"version\":5,\"properties\":{\"reported\":{\"x\":1e400}}}"),
            false,
        ),
        (
            "number-minus-1e400",
            line(b"{\"version\":5,\"properties\":{\"reported\":{\"x\":-1e400}}}"),
            false,
        ),
        (
            "number-2-pow-64",
            line(b"{\"version\":5,\"properties\":{\"reported\":{\"x\":18446744073709551616}}}"),
            false,
        ),
        (
            "version-beyond-i64",
            line(b"{\"version\":99999999999999999999}"),
            false,
        ),
        ("version-1e3", line(b"{\"version\":1e3}"), false),
        (
            "exponent-huge",
            line(b"{\"version\":5,\"properties\":{\"reported\":{\"x\":1e99999999999}}}"),
            false,
        ),
        ("truncated", good[..good.len() / 2].to_vec(), false),
        ("nul-byte", nul, false),
        ("not-an-object", line(b"[1,2,3]"), false),
        // Duplicate keys: JSON leaves their meaning open and readers differ, so a body or a
        // line with one is refused rather than given a meaning IoT Hub may not share.
        (
            "duplicate-keys-body",
            line(b"{\"version\":6,\"version\":7}"),
            false,
        ),
        (
            "duplicate-keys-nested",
            line(b"{\"version\":6,\"properties\":{\"reported\":{\"x\":1,\"x\":2}}}"),
            false,
        ),
        ("duplicate-keys-properties", duplicate_property, false),
    ]
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle")
}

fn write_lines(file: &Path, lines: &[Vec<u8>]) {
    let mut text = Vec::new();
    for line in lines {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    std::fs::write(file, text).expect("write lines");
}

#[test]
fn hostile_lines_are_dead_letters_and_every_good_line_around_them_is_applied() {
    let mut rng = ChaCha8Rng::seed_from_u64(report::seed(20_261_127));
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 300, 3000, 35, 0.0);
    let good: Vec<Vec<u8>> = std::fs::read(&fleet)
        .expect("fleet")
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let template: Value = serde_json::from_slice(&good[0]).expect("template");
    let device = template["Properties"]["deviceId"]
        .as_str()
        .expect("device")
        .to_owned();

    // Interleave: each hostile line at a seeded position after the first line (which creates
    // `device`), so good lines come before and after it.
    let hostile = hostile_lines(&template, &device);
    let mut lines: Vec<(Option<&str>, Vec<u8>, bool)> =
        good.iter().map(|l| (None, l.clone(), true)).collect();
    for (name, line, applied) in &hostile {
        let at = rng.gen_range(1..=lines.len());
        lines.insert(at, (Some(*name), line.clone(), *applied));
    }
    let mixed = dir.path().join("mixed.json");
    write_lines(
        &mixed,
        &lines.iter().map(|(_, l, _)| l.clone()).collect::<Vec<_>>(),
    );
    // The reference: the same file without the lines that must be dead letters.
    let kept = dir.path().join("kept.json");
    write_lines(
        &kept,
        &lines
            .iter()
            .filter(|(_, _, applied)| *applied)
            .map(|(_, l, _)| l.clone())
            .collect::<Vec<_>>(),
    );

    let data = dir.path().join("data");
    // A sink makes the engine read each message's Event Hubs enqueued time (for its alerts),
    // one more time parser the hostile lines must reach.
    let alerts = dir.path().join("alerts.jsonl");
    let out = run_bounded(
        &[
            "replay",
            "--data-dir",
            path(&data),
            "--alerts-file",
            path(&alerts),
            path(&mixed),
        ],
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every hostile line that is not applied is a dead letter at its own record index.
    let dead = dead_letter_lines(&data);
    let expected: Vec<(u64, &str)> = lines
        .iter()
        .enumerate()
        .filter(|(_, (name, _, applied))| name.is_some() && !applied)
        .map(|(i, (name, _, _))| (i as u64, name.expect("hostile")))
        .collect();
    let got: Vec<u64> = dead
        .iter()
        .map(|d| d["record"].as_u64().expect("record"))
        .collect();
    assert_eq!(
        got,
        expected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        "dead letters at other records than the hostile lines {expected:?}"
    );
    for (d, (_, name)) in dead.iter().zip(&expected) {
        eprintln!("{name}: {}", d["reason"]);
    }

    // The good lines around the hostile ones were all applied.
    assert_export_is_replays(dir.path(), &kept, &data, "with the hostile lines");
    report::record(
        "hostile-lines",
        &[
            ("inputs", hostile.len() as u64),
            ("good_lines", good.len() as u64),
            ("dead_letters", expected.len() as u64),
            ("panics", 0),
            ("stalls", 0),
            ("lost", 0),
        ],
    );
}

#[test]
fn hostile_policy_files_are_policy_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rule = |check: &str| format!("rules:\n  - id: r\n    severity: high\n    check: {check}\n");
    let mut huge = String::from("rules:\n");
    for i in 0..report::scale().pick(200_000, 20_000) {
        huge.push_str(&format!(
            "  - id: r{i}\n    severity: high\n    check: {{ nosuchop: 1 }}\n"
        ));
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("nesting-100k-flow", format!("rules: {}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
        ("nesting-100k-block", {
            let mut text = String::from("rules:\n");
            for depth in 0..20_000 {
                text.push_str(&" ".repeat(depth * 2 + 2));
                text.push_str("- \n");
            }
            text.into_bytes()
        }),
        ("huge-bad-rules", huge.into_bytes()),
        ("invalid-utf8", b"rules:\n  - id: \xff\xfe\n    severity: high\n".to_vec()),
        ("duplicate-keys", b"rules: []\nrules: []\n".to_vec()),
        ("duplicate-rule-keys", rule("{ exists: /a }").replace("severity: high", "severity: high\n    severity: low").into_bytes()),
        ("number-out-of-range", rule("{ pointer: /a, op: \">\", value: 1e400 }").into_bytes()),
        ("regex-too-big", rule("{ pointer: /a, op: matches, value: \"a{1000}{1000}{1000}\" }").into_bytes()),
        ("yaml-alias-bomb", b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nrules: *g\n".to_vec()),
        ("nul-bytes", b"rules:\n  - id: \0\0\n".to_vec()),
    ];
    let n = cases.len() as u64;
    for (name, text) in cases {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &text).expect("policy file");
        let out = run_bounded(&["policy", "check", path(&file)], Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: not a policy error: {stdout}{stderr}"
        );
        assert!(
            stderr.contains(&format!("{name}.yaml")) || stdout.contains(&format!("{name}.yaml")),
            "{name}: the error does not name the file: {stdout}{stderr}"
        );
    }
    report::record(
        "hostile-policies",
        &[("inputs", n), ("panics", 0), ("stalls", 0), ("accepted", 0)],
    );
}

/// `deadletters` of a data directory, a JSON object a line.
fn dead_letter_lines(data: &Path) -> Vec<Value> {
    ok(&["deadletters", "--data-dir", path(data)])
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("dead letter"))
        .collect()
}

/// The highest resident set (VmHWM, KiB) of a running process, or 0 once it is gone.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Waits for `child` to exit, at most 120 s (a stall fails `name`): its exit status and its
/// peak resident set (KiB), sampled every 5 ms.
fn wait_watching_rss(child: &mut std::process::Child, name: &str) -> (ExitStatus, u64) {
    let started = Instant::now();
    let mut peak = 0;
    loop {
        peak = peak.max(peak_rss_kib(child.id()));
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (status, peak);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{name}: stalled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An Avro object container of `schema` and `codec` whose one block claims `count` records
/// and `size` bytes but holds `block`.
fn avro_container(schema: &str, codec: &str, size: i64, block: &[u8]) -> Vec<u8> {
    fn long(out: &mut Vec<u8>, n: i64) {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let mut out = b"Obj\x01".to_vec();
    long(&mut out, 2);
    for (key, value) in [("avro.schema", schema), ("avro.codec", codec)] {
        long(&mut out, key.len() as i64);
        out.extend_from_slice(key.as_bytes());
        long(&mut out, value.len() as i64);
        out.extend_from_slice(value.as_bytes());
    }
    long(&mut out, 0);
    let sync = [0x5au8; 16];
    out.extend_from_slice(&sync);
    long(&mut out, 1);
    long(&mut out, size);
    out.extend_from_slice(block);
    out.extend_from_slice(&sync);
    out
}

/// Issue 23: a block's claimed size (and a snappy block's claimed length) was allocated
/// before its bytes were there: a file of a few hundred bytes cost up to 4 GiB. Each hostile
/// file must be a file error (the run goes on with the next file, exit 1), with the process's
/// peak memory far below what the file claims.
#[test]
fn hostile_avro_files_are_file_errors_without_allocating_what_they_claim() {
    use twinwatch::generate::avro::STORAGE_SCHEMA;
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 100, 1000, 36, 0.0);
    let expected = replay_export(dir.path(), &fleet);
    let other_schema = STORAGE_SCHEMA.replace(
        r#"{"name":"Body","type":["null","bytes"]}"#,
        r#"{"name":"Body","type":["null","bytes"]},{"name":"Extra","type":"string"}"#,
    );
    // The varint of 4 GiB - 1, then a few literal bytes and a checksum.
    let mut snappy = vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x08, b'a', b'b', b'c'];
    snappy.extend_from_slice(&crc32fast::hash(b"abc").to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "null-block-claiming-1-gib",
            avro_container(STORAGE_SCHEMA, "null", (1 << 30) - 1, b"sixteen bytes..."),
        ),
        (
            "deflate-block-claiming-1-gib",
            avro_container(
                STORAGE_SCHEMA,
                "deflate",
                (1 << 30) - 1,
                b"sixteen bytes...",
            ),
        ),
        (
            "snappy-claiming-4-gib",
            avro_container(STORAGE_SCHEMA, "snappy", snappy.len() as i64, &snappy),
        ),
        (
            "generic-reader-block-claiming-500-mib",
            avro_container(&other_schema, "null", 500 << 20, b"sixteen bytes..."),
        ),
    ];
    let n = cases.len() as u64;
    let mut worst_kib = 0;
    for (name, bytes) in cases {
        let file = dir.path().join(format!("{name}.avro"));
        std::fs::write(&file, &bytes).expect("write");
        let data = dir.path().join(format!("data-{name}"));
        let mut child = Command::new(binary())
            .args([
                "replay",
                "--data-dir",
                path(&data),
                path(&file),
                path(&fleet),
            ])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let (status, peak) = wait_watching_rss(&mut child, name);
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert_eq!(status.code(), Some(1), "{name}: not a file error: {stderr}");
        assert!(
            stderr.contains(name),
            "{name}: the file is not named: {stderr}"
        );
        assert!(
            peak < 400 << 10,
            "{name}: {} MiB resident for a file of {} bytes",
            peak >> 10,
            bytes.len()
        );
        worst_kib = worst_kib.max(peak);
        let export = ok(&["export", "--data-dir", path(&data)]).stdout;
        assert!(
            export == expected,
            "{name}: the next file was not replayed whole"
        );
    }
    report::record(
        "hostile-avro",
        &[
            ("inputs", n),
            ("panics", 0),
            ("stalls", 0),
            ("peak_rss_mib", worst_kib >> 10),
        ],
    );
}

/// Issue 23: a JSON file with no newline was held in memory whole. A line longer than the
/// bound (64 MiB) is a dead letter `bad_record` at its position, in the middle of a file or
/// as its unterminated end, and the lines around it are applied.
#[test]
fn a_line_longer_than_the_bound_is_a_dead_letter_and_the_file_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = generate_fleet(dir.path(), 100, 1000, 37, 0.0);
    let good = std::fs::read(&fleet).expect("fleet");
    let lines: Vec<&[u8]> = good
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let half = lines.len() / 2;
    let long = vec![b'{'; 200 << 20];
    let mut text = Vec::new();
    for line in &lines[..half] {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    text.extend_from_slice(&long);
    text.push(b'\n');
    for line in &lines[half..] {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    // And a last line with no end at all.
    text.extend_from_slice(&long);
    let file = dir.path().join("long.json");
    std::fs::write(&file, &text).expect("write");
    drop(text);
    let data = dir.path().join("data");
    let mut child = Command::new(binary())
        .args(["replay", "--data-dir", path(&data), path(&file)])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let (status, peak) = wait_watching_rss(&mut child, "the long lines");
    assert!(status.success(), "replay failed");
    let dead = dead_letter_lines(&data);
    let at: Vec<(u64, &str)> = dead
        .iter()
        .map(|d| {
            (
                d["record"].as_u64().expect("record"),
                d["reason"].as_str().expect("reason"),
            )
        })
        .collect();
    let n = lines.len() as u64;
    assert_eq!(
        at,
        [(half as u64, "bad_record"), (n + 1, "bad_record")],
        "the long lines' dead letters"
    );
    // The lines around the long ones were all applied.
    assert_export_is_replays(dir.path(), &fleet, &data, "around the long lines");
    assert!(
        peak < 512 << 10,
        "{} MiB resident for 200 MiB lines",
        peak >> 10
    );
    report::record(
        "hostile-long-lines",
        &[
            ("inputs", 2),
            ("line_mib", 200),
            ("peak_rss_mib", peak >> 10),
            ("lost", 0),
        ],
    );
}
