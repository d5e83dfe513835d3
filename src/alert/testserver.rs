//! Test helpers of the HTTP sinks: alerts rendered like `compliance::cloud_event` (with
//! chosen times), and a real HTTP/1.1 server (keep-alive, `Content-Length` bodies, scripted
//! answers, a delay per request, optionally TLS) that keeps what it receives.

#![cfg(test)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::sinks::{Failed, SinkError};
use crate::compliance::wire::{OPENED_TYPE, RESOLVED_TYPE};

pub struct Twin<'a> {
    pub hub: &'a str,
    pub device: &'a str,
    pub module: Option<&'a str>,
}

pub const DEVICE_TWIN: Twin<'static> = Twin {
    hub: "hub-1",
    device: "dev-1",
    module: None,
};
pub const MODULE_TWIN: Twin<'static> = Twin {
    hub: "hub-1",
    device: "dev-2",
    module: Some("azureiotsecurity"),
};

pub struct Rule<'a> {
    pub id: &'a str,
    pub severity: &'a str,
    pub title: &'a str,
}

pub const HIGH_RULE: Rule<'static> = Rule {
    id: "tls-required",
    severity: "high",
    title: "TLS must be required",
};
pub const LOW_RULE: Rule<'static> = Rule {
    id: "firmware-current",
    severity: "low",
    title: "Firmware is current",
};

pub fn event(
    id: &str,
    opened: bool,
    twin: &Twin,
    rule: &Rule,
    time: &str,
    version: i64,
) -> Vec<u8> {
    let mut data = json!({
        "hubName": twin.hub,
        "deviceId": twin.device,
        "ruleId": rule.id,
        "title": rule.title,
        "severity": rule.severity,
        "twinVersion": version,
    });
    let subject = match twin.module {
        Some(module) => {
            data["moduleId"] = json!(module);
            format!("{}/modules/{module}", twin.device)
        }
        None => twin.device.to_owned(),
    };
    let kind = if opened { OPENED_TYPE } else { RESOLVED_TYPE };
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "id": id,
        "type": kind,
        "source": format!("/iothub/{}", twin.hub),
        "subject": subject,
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
    }))
    .expect("a JSON value always serializes")
}

/// `at` as `Ticks` writes it: UTC, seven fraction digits.
pub fn rfc3339(at: SystemTime) -> String {
    let since_epoch = at.duration_since(UNIX_EPOCH).expect("after 1970");
    let seconds = since_epoch.as_secs() as i64;
    let ticks = since_epoch.subsec_nanos() / 100;
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ticks:07}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

#[test]
fn rfc3339_matches_a_known_instant() {
    let at = UNIX_EPOCH + Duration::from_nanos(1_654_122_470_261_258_600);
    assert_eq!(rfc3339(at), "2022-06-01T22:27:50.2612586Z");
}

pub fn ago(seconds: u64) -> String {
    rfc3339(SystemTime::now() - Duration::from_secs(seconds))
}

// ---- A real HTTP/1.1 server.

#[derive(Clone, Debug)]
pub struct Received {
    pub request_line: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: status, extra headers, body.
pub type Answer = (u16, Vec<(String, String)>, String);

/// Decides the answer to the i-th request (from 0).
pub type Script = Arc<dyn Fn(usize, &Received) -> Answer + Send + Sync>;

pub struct TestServer {
    addr: SocketAddr,
    tls: bool,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    accepting: Option<JoinHandle<()>>,
}

/// The answer to a status: a short body for errors.
pub fn answer(status: u16) -> Answer {
    let body = if status == 200 { "" } else { "try again later" };
    (status, Vec::new(), body.to_owned())
}

impl TestServer {
    /// Answers the i-th request (from 0) with `statuses[i]`, and 200 once they run out.
    pub fn start(statuses: Vec<u16>) -> TestServer {
        TestServer::scripted(
            Arc::new(move |i, _| answer(statuses.get(i).copied().unwrap_or(200))),
            Duration::ZERO,
            None,
        )
    }

    /// Answers by `script`, each answer after `delay` (a slow receiver); over TLS with `tls`.
    pub fn scripted(
        script: Script,
        delay: Duration,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let is_tls = tls.is_some();
        let accepting = std::thread::spawn({
            let received = received.clone();
            let stop = stop.clone();
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let received = received.clone();
                    let script = script.clone();
                    let tls = tls.clone();
                    std::thread::spawn(move || {
                        // Bounds a test whose client went silent.
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                        match tls {
                            None => {
                                let Ok(writer) = stream.try_clone() else {
                                    return;
                                };
                                serve(BufReader::new(stream), writer, &received, &*script, delay)
                            }
                            Some(config) => {
                                let Ok(connection) = rustls::ServerConnection::new(config) else {
                                    return;
                                };
                                let tls = Arc::new(Mutex::new(rustls::StreamOwned::new(
                                    connection, stream,
                                )));
                                serve(
                                    BufReader::new(Shared(tls.clone())),
                                    Shared(tls),
                                    &received,
                                    &*script,
                                    delay,
                                )
                            }
                        }
                    });
                }
            }
        });
        TestServer {
            addr,
            tls: is_tls,
            received,
            stop,
            accepting: Some(accepting),
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .expect("no test thread panicked")
            .clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.join();
        }
    }
}

/// A TLS stream read and written from one thread through two handles.
struct Shared(Arc<Mutex<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>>);

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .read(buf)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .flush()
    }
}

/// Serves the requests of one connection until the client closes it.
fn serve<R: BufRead, W: Write>(
    mut reader: R,
    mut writer: W,
    received: &Mutex<Vec<Received>>,
    script: &(dyn Fn(usize, &Received) -> Answer + Send + Sync),
    delay: Duration,
) {
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut headers = Vec::new();
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
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request = Received {
            request_line: request_line.trim_end().to_owned(),
            headers,
            body,
        };
        let (status, extra, answer) = {
            let mut received = received.lock().expect("no test thread panicked");
            let answer = script(received.len(), &request);
            received.push(request);
            answer
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut response = format!(
            "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\n",
            answer.len()
        );
        for (name, value) in extra {
            response.push_str(&format!("{name}: {value}\r\n"));
        }
        response.push_str("\r\n");
        response.push_str(&answer);
        if writer
            .write_all(response.as_bytes())
            .and_then(|()| writer.flush())
            .is_err()
        {
            return;
        }
    }
}

pub fn assert_http_error(result: Result<(), SinkError>, expected_status: u16) -> String {
    match result {
        Err(SinkError::Http { status, detail, .. }) if status == expected_status => detail,
        other => panic!("expected an HTTP {expected_status} error, got {other:?}"),
    }
}

/// The error of a failed run, checking how many alerts it says were accepted first.
pub fn assert_failed(result: Result<(), Failed>, accepted: usize, expected_status: u16) -> String {
    match result {
        Err(Failed { accepted: a, error }) if a == accepted => {
            assert_http_error(Err(error), expected_status)
        }
        other => panic!("expected a failure after {accepted} accepted alerts, got {other:?}"),
    }
}

/// A loopback port nobody listens on (bound, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("bound").port()
}

/// A server certificate for 127.0.0.1 signed by a test CA made here with `openssl`: the CA's
/// PEM file (for the sink's `ca_file`) and the server's rustls configuration.
pub fn test_ca(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    use std::process::Command;
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (the Debian package openssl) runs");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    // A new P-256 key in `key` and a request for `subject` in `out`, with `more` arguments.
    let request = |key: &str, out: &str, subject: &str, more: &[&str]| {
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key,
            "-out",
            out,
            "-subj",
            subject,
        ];
        args.extend_from_slice(more);
        run(&args);
    };
    // The CA: self-signed.
    request(
        "ca.key",
        "ca.pem",
        "/CN=twinwatch test CA",
        &["-x509", "-days", "2"],
    );
    request("server.key", "server.csr", "/CN=127.0.0.1", &[]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        ureq::tls::parse_pem(&std::fs::read(dir.join("server.pem")).expect("read"))
            .filter_map(|item| match item.expect("PEM") {
                ureq::tls::PemItem::Certificate(c) => {
                    Some(rustls::pki_types::CertificateDer::from(c.der().to_vec()))
                }
                _ => None,
            })
            .collect();
    let key = ureq::tls::parse_pem(&std::fs::read(dir.join("server.key")).expect("read"))
        .find_map(|item| match item.expect("PEM") {
            ureq::tls::PemItem::PrivateKey(k) => Some(k),
            _ => None,
        })
        .expect("a private key");
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.der().to_vec()).expect("a key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("the server certificate");
    (dir.join("ca.pem"), Arc::new(config))
}
