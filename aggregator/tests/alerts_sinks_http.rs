//! The HTTP sinks against real receivers: an HTTP server of the test's own
//! (webhook: body, headers, signature, error statuses, a closed port, a
//! receiver that never answers, HTTPS with a private CA) and the real
//! Prometheus Alertmanager 0.25 as a child process (an alert appears,
//! stays one alert when re-posted, and goes away when resolved).
//!
//! The Alertmanager test needs `prometheus-alertmanager` (Debian package;
//! CI installs it) and fails without it, unless
//! `OUTPOST_SKIP_ALERTMANAGER=1` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use outpost_aggregator::alerts::alertmanager::AlertmanagerSink;
use outpost_aggregator::alerts::config::{AlertmanagerConfig, Secret, WebhookConfig};
use outpost_aggregator::alerts::webhook::{
    verify, WebhookSink, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use outpost_aggregator::alerts::{AlertSink, Notification, SCHEMA};
use outpost_aggregator::rules::model::{AlertState, Severity};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "webhook-test-secret";
/// Generous: a loaded 2-core CI machine.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long Alertmanager may take to become ready, and to show a change.
const AM_DEADLINE: Duration = Duration::from_secs(60);

// A private CA and a server certificate for 127.0.0.1 / localhost signed by
// it (EC P-256, valid 2020-2120), made for this test only with `openssl ca`.
// The key protects nothing.
const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBZzCCAQ6gAwIBAgICEAAwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPT3V0cG9z
dCB0ZXN0IENBMCAXDTIwMDEwMTAwMDAwMFoYDzIxMjAwMTAxMDAwMDAwWjAaMRgw
FgYDVQQDDA9PdXRwb3N0IHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAQTbHx3nHOg72nyY9sZw3JIosQwXBOQ6J5JrcVEA5mWiYd255ajxPiyHE+23+Kp
t5o58/swBHz9Eon2+NwQ5ETRo0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB
/wQEAwICBDAdBgNVHQ4EFgQUyZLTbm9S0BDV3ZLeA+RyCt3OEjswCgYIKoZIzj0E
AwIDRwAwRAIhAO0v0u+wf1pYvikC1V6N0nYFJO0IwjitO5clICgtIP6XAh82NIPT
UYVHwj2GOYbiEFOrU/ILivBDfjeWgZarpIQC
-----END CERTIFICATE-----\n";
const TEST_SERVER_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgICEAEwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPT3V0cG9z
dCB0ZXN0IENBMCAXDTIwMDEwMTAwMDAwMFoYDzIxMjAwMTAxMDAwMDAwWjAUMRIw
EAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATq0noy
QPaP7Cw1FoyVJNjNELRlOSij83sUJvNauqVdaJdPZ+W787IcN6kaPtlS5KMpTmUi
nTz8r/3kXYczaaszo4GSMIGPMAwGA1UdEwEB/wQCMAAwDgYDVR0PAQH/BAQDAgeA
MBMGA1UdJQQMMAoGCCsGAQUFBwMBMBoGA1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9z
dDAfBgNVHSMEGDAWgBTJktNub1LQENXdkt4D5HIK3c4SOzAdBgNVHQ4EFgQU3M9x
xIXlH/jKtMG+ciYsVqW3aaowCgYIKoZIzj0EAwIDSAAwRQIhAPWmwCWZb6DU+3JT
884jj07U6L+bxEKOKWDchnDw16ueAiBgD4O0n1lh/DEif/oFUMnywBWfqNBHhfSn
jMyiuYgUZg==
-----END CERTIFICATE-----\n";
const TEST_SERVER_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKcfrKgLjXDBSiQn6
CDGA4m2SGf9xgwRZJhhUImCYjLKhRANCAATq0noyQPaP7Cw1FoyVJNjNELRlOSij
83sUJvNauqVdaJdPZ+W787IcN6kaPtlS5KMpTmUinTz8r/3kXYczaasz
-----END PRIVATE KEY-----\n";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn notification(state: AlertState, device: &str, number: u64) -> Notification {
    let t = now_ms();
    Notification {
        schema: SCHEMA.to_owned(),
        id: format!("f00d-{number}"),
        fingerprint: "f00d".to_owned(),
        number,
        repeat: 0,
        state,
        rule: "boiler-overheat".to_owned(),
        device: device.to_owned(),
        sensor: "temp".to_owned(),
        severity: Severity::Critical,
        labels: [
            ("site".to_owned(), "north".to_owned()),
            ("zone.name".to_owned(), "boiler-room".to_owned()),
        ]
        .into(),
        summary: "temp 91.5 > 90".to_owned(),
        value: Some(91.5),
        threshold: Some(90.0),
        event_time_ms: t - 1_000,
        processing_time_ms: t - 900,
        active_since_ms: Some(t - 60_000),
        queued_ms: t - 800,
        history_id: 7,
    }
}

// ---------------------------------------------------------------- webhook

type Requests = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// An HTTP receiver on 127.0.0.1:0 that records every POST to `/hook/...`
/// and answers `status`. Returns the URL to post to.
async fn receiver(status: StatusCode) -> (String, Requests) {
    let requests: Requests = Arc::default();
    let rec = requests.clone();
    let app = Router::new().route(
        "/hook/t0ken",
        post(move |headers: HeaderMap, body: Bytes| {
            let rec = rec.clone();
            async move {
                rec.lock().unwrap().push((headers, body));
                (status, "receiver says so\n")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook/t0ken"), requests)
}

fn webhook(url: &str, timeout: Duration) -> WebhookSink {
    let cfg = WebhookConfig {
        url: url.to_owned(),
        secret: Some(Secret::new(SECRET)),
        headers: [("Authorization".to_owned(), "Bearer abc".to_owned())].into(),
        ca_file: None,
    };
    WebhookSink::new("ops", &cfg, timeout).unwrap()
}

#[tokio::test]
async fn webhook_posts_the_signed_notification() {
    let (url, requests) = receiver(StatusCode::NO_CONTENT).await;
    let sink = webhook(&url, SEND_TIMEOUT);
    let n = notification(AlertState::Firing, "gw-1", 1);
    sink.send(&n).await.unwrap();

    let got = requests.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let (headers, body) = &got[0];
    let back: Notification = serde_json::from_slice(body).unwrap();
    assert_eq!(back, n);
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(header(IDEMPOTENCY_HEADER), n.id);
    assert_eq!(header("authorization"), "Bearer abc");
    assert_eq!(header("content-type"), "application/json");
    assert!(header("user-agent").starts_with("outpost-aggregator/"));
    let ts: i64 = header(TIMESTAMP_HEADER).parse().unwrap();
    assert!((ts - now_ms() / 1000).abs() < 600, "timestamp {ts}");
    let sig = header(SIGNATURE_HEADER);
    assert!(verify(SECRET.as_bytes(), ts, body, &sig), "{sig}");
    assert!(!verify(b"another secret", ts, body, &sig));
    assert!(!verify(SECRET.as_bytes(), ts + 1, body, &sig));
}

#[tokio::test]
async fn webhook_without_secret_sends_no_signature() {
    let (url, requests) = receiver(StatusCode::OK).await;
    let cfg = WebhookConfig {
        url,
        secret: None,
        headers: BTreeMap::new(),
        ca_file: None,
    };
    let sink = WebhookSink::new("plain", &cfg, SEND_TIMEOUT).unwrap();
    sink.send(&notification(AlertState::Resolved, "gw-2", 2))
        .await
        .unwrap();
    let got = requests.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert!(got[0].0.get(SIGNATURE_HEADER).is_none());
    assert!(got[0].0.get(IDEMPOTENCY_HEADER).is_some());
}

#[tokio::test]
async fn webhook_error_status_is_an_error_with_the_status_and_body() {
    let (url, requests) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let sink = webhook(&url, SEND_TIMEOUT);
    let e = sink
        .send(&notification(AlertState::Firing, "gw-3", 1))
        .await
        .unwrap_err();
    assert!(e.0.contains("500"), "{e}");
    assert!(e.0.contains("receiver says so"), "{e}");
    assert_eq!(requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn webhook_to_a_closed_port_is_an_error() {
    let port = support::mosquitto::free_port();
    let sink = webhook(&format!("http://127.0.0.1:{port}/hook/t0ken"), SEND_TIMEOUT);
    let e = sink
        .send(&notification(AlertState::Firing, "gw-4", 1))
        .await
        .unwrap_err();
    assert!(e.0.contains(&format!("connect to 127.0.0.1:{port}")), "{e}");
    assert!(!e.0.contains("t0ken"), "the URL path is not in errors: {e}");
}

#[tokio::test]
async fn webhook_to_a_receiver_that_never_answers_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts, reads, never answers; keeps the connections open.
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            open.push(s);
        }
    });
    let sink = webhook(
        &format!("http://{addr}/hook/t0ken"),
        Duration::from_millis(500),
    );
    let e = sink
        .send(&notification(AlertState::Firing, "gw-5", 1))
        .await
        .unwrap_err();
    assert!(e.0.contains("timed out after 500ms"), "{e}");
}

/// An HTTPS receiver with the test server certificate, on its own thread
/// (std + rustls, one connection at a time): answers 200 to every request
/// and counts them.
fn tls_receiver() -> (SocketAddr, Arc<Mutex<usize>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(TEST_SERVER_CERT_PEM.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(TEST_SERVER_KEY_PEM.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(Mutex::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let _ = tcp.set_read_timeout(Some(SEND_TIMEOUT));
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // The client refusing our certificate ends this early.
            if read_request(&mut tls).is_some() {
                let _ = tls.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
                *count.lock().unwrap() += 1;
            }
        }
    });
    (addr, served)
}

/// Reads one HTTP/1.1 request (headers and a Content-Length body).
fn read_request(s: &mut impl Read) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap_or(0))
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(buf);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn webhook_over_https_verifies_the_certificate() {
    let (addr, served) = tls_receiver();
    let url = format!("https://127.0.0.1:{}/hook/t0ken", addr.port());
    let n = notification(AlertState::Firing, "gw-6", 1);

    // The system's roots do not know our private CA: refused.
    let untrusted = webhook(&url, SEND_TIMEOUT);
    let e = untrusted.send(&n).await.unwrap_err();
    assert!(e.0.to_ascii_lowercase().contains("certificate"), "{e}");
    assert_eq!(*served.lock().unwrap(), 0);

    // With the CA as ca-file: delivered.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, TEST_CA_PEM).unwrap();
    let cfg = WebhookConfig {
        url,
        secret: None,
        headers: BTreeMap::new(),
        ca_file: Some(ca),
    };
    let trusted = WebhookSink::new("tls", &cfg, SEND_TIMEOUT).unwrap();
    trusted.send(&n).await.unwrap();
    assert_eq!(*served.lock().unwrap(), 1);
}

// ----------------------------------------------------------- alertmanager

/// The Alertmanager binary: `$ALERTMANAGER`, `/usr/bin/prometheus-alertmanager`,
/// or `prometheus-alertmanager` / `alertmanager` on `PATH`.
fn alertmanager_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ALERTMANAGER") {
        return Some(PathBuf::from(p));
    }
    let mut candidates = vec![PathBuf::from("/usr/bin/prometheus-alertmanager")];
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            candidates.push(d.join("prometheus-alertmanager"));
            candidates.push(d.join("alertmanager"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A running Alertmanager on a loopback port, routing everything to a
/// receiver that does nothing. Killed and reaped on drop.
struct Alertmanager {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Alertmanager {
    async fn start(bin: &Path) -> Alertmanager {
        let mut dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("alertmanager.yml");
        std::fs::write(
            &conf,
            "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n",
        )
        .unwrap();
        let deadline = Instant::now() + AM_DEADLINE;
        loop {
            let port = support::mosquitto::free_port();
            let log = std::fs::File::create(dir.path().join("alertmanager.log")).unwrap();
            let child = Command::new(bin)
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--cluster.listen-address=")
                .arg(format!(
                    "--storage.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--config.file={}", conf.display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            // From here on the guard kills and reaps it, also on a panic.
            let mut am = Alertmanager {
                port,
                child: Some(child),
                dir,
            };
            loop {
                if let Ok((200, _)) = http_get(port, "/-/ready").await {
                    return am;
                }
                let exited = am.child.as_mut().unwrap().try_wait().unwrap();
                assert!(
                    Instant::now() < deadline,
                    "alertmanager not ready on port {port} within {AM_DEADLINE:?}; log:\n{}",
                    am.log()
                );
                if exited.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // It exited: most likely the port was taken meanwhile. Again,
            // on another port.
            eprintln!("alertmanager exited early, retrying; log:\n{}", am.log());
            am.kill();
            dir = std::mem::replace(&mut am.dir, tempfile::tempdir().unwrap());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log"))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` over HTTP/1.0 (the server closes after the answer):
/// status and body.
async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The alerts Alertmanager lists at `path` for our rule and `device`.
async fn our_alerts(port: u16, path: &str, device: &str) -> Option<Vec<Value>> {
    let (status, body) = http_get(port, path).await.ok()?;
    if status != 200 {
        return None;
    }
    let all: Vec<Value> = serde_json::from_str(&body).ok()?;
    Some(
        all.into_iter()
            .filter(|a| {
                a["labels"]["alertname"] == "boiler-overheat" && a["labels"]["device"] == device
            })
            .collect(),
    )
}

#[tokio::test]
async fn alertmanager_shows_the_alert_and_drops_it_when_resolved() {
    let Some(bin) = alertmanager_binary() else {
        if std::env::var("OUTPOST_SKIP_ALERTMANAGER").as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED: prometheus-alertmanager is not installed and OUTPOST_SKIP_ALERTMANAGER=1"
            );
            return;
        }
        panic!(
            "prometheus-alertmanager is not installed (looked at $ALERTMANAGER, \
             /usr/bin/prometheus-alertmanager and PATH). The Alertmanager sink test needs it: \
             `apt-get install -y prometheus-alertmanager` (CI installs it), or set \
             OUTPOST_SKIP_ALERTMANAGER=1 to skip this test."
        );
    };
    let am = Alertmanager::start(&bin).await;
    let port = am.port;
    let cfg = AlertmanagerConfig {
        url: format!("http://127.0.0.1:{}/", am.port),
        headers: BTreeMap::new(),
        ca_file: None,
        generator_url: Some("http://127.0.0.1:8080/api/v1/alerts".to_owned()),
    };
    let sink = AlertmanagerSink::new("am", &cfg, SEND_TIMEOUT, Duration::from_secs(60)).unwrap();
    let device = format!("gw-am-{}", std::process::id());

    let firing = notification(AlertState::Firing, &device, 1);
    sink.send(&firing).await.unwrap_or_else(|e| {
        panic!(
            "posting the firing alert: {e}; alertmanager log:\n{}",
            am.log()
        )
    });
    let alert = support::wait_async(AM_DEADLINE, "the alert to be active", || {
        let device = device.clone();
        async move {
            let found = our_alerts(port, "/api/v2/alerts", &device).await?;
            found.into_iter().find(|a| a["status"]["state"] == "active")
        }
    })
    .await;
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["sensor"], "temp");
    assert_eq!(alert["labels"]["site"], "north");
    assert_eq!(
        alert["labels"]["zone_name"], "boiler-room",
        "label names are made valid for Alertmanager"
    );
    assert_eq!(alert["annotations"]["outpost_id"], firing.id.as_str());
    assert_eq!(alert["annotations"]["summary"], "temp 91.5 > 90");
    assert_eq!(alert["generatorURL"], "http://127.0.0.1:8080/api/v1/alerts");

    // A repeat updates the same alert (Alertmanager's identity is the
    // label set), it does not add one.
    let mut repeat = firing.clone();
    repeat.repeat = 1;
    repeat.id = format!("{}-r1", firing.id);
    sink.send(&repeat).await.unwrap();
    support::wait_async(AM_DEADLINE, "the repeat to update the alert", || {
        let device = device.clone();
        let want = repeat.id.clone();
        async move {
            let found = our_alerts(port, "/api/v2/alerts", &device).await?;
            (found.len() == 1 && found[0]["annotations"]["outpost_id"] == want.as_str())
                .then_some(())
        }
    })
    .await;

    let mut resolved = notification(AlertState::Resolved, &device, 2);
    resolved.event_time_ms = now_ms() - 1_000;
    sink.send(&resolved).await.unwrap();
    support::wait_async(AM_DEADLINE, "the resolved alert to go away", || {
        let device = device.clone();
        async move {
            let all = our_alerts(port, "/api/v2/alerts", &device).await?;
            let active = our_alerts(port, "/api/v2/alerts?active=true", &device).await?;
            (all.is_empty() && active.is_empty()).then_some(())
        }
    })
    .await;
}
