//! The HTTP API end to end: the real server on 127.0.0.1:0 over a real
//! store, driven by a minimal HTTP/1.1 client (one request per connection).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_aggregator::api::{self, ApiState, Health};
use outpost_aggregator::metrics::Metrics;
use outpost_aggregator::state::{
    DeadLetter, DeviceUpdate, Flush, Gap, LastValue, StatusUpdate, Store,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789";
const T0: i64 = 1_700_000_000_000;

fn dead_letter(i: i64, reason: &str) -> DeadLetter {
    DeadLetter {
        received_ms: T0 + i,
        topic: format!("outpost/v1/gw-{i}/telemetry"),
        device: Some(format!("gw-{i}")),
        reason: reason.into(),
        detail: format!("detail {i}"),
        payload: vec![0xde, 0xad, i as u8],
    }
}

/// A store with two devices (gw-1 online, with last values and a gap; gw-2
/// seen but without a status) and three dead letters, committed through the
/// real writer. The writer stays open (as in the aggregator) while the API
/// reads through its own read-only connection.
fn seed_store() -> (tempfile::TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agg.sqlite");
    let mut store = Store::open(&path).unwrap();
    let flush = Flush {
        marks: vec![("gw-1".into(), 42), ("gw-2".into(), 7)],
        devices: vec![
            DeviceUpdate {
                device: "gw-1".into(),
                seen_ms: T0,
                readings: 40,
                batches: 2,
                gap_readings: 2,
                gaps: 1,
                last_seq: Some(42),
                last_values: vec![
                    LastValue {
                        sensor: "temp".into(),
                        time_ms: T0,
                        seq: 42,
                        value: json!(21.5),
                        kind: "f32",
                    },
                    LastValue {
                        sensor: "pump".into(),
                        time_ms: T0 - 1000,
                        seq: 41,
                        value: json!("RUN"),
                        kind: "str",
                    },
                ],
                status: Some(StatusUpdate {
                    online: true,
                    time_ms: T0,
                    agent_version: "0.1.0".into(),
                    labels: [("site".to_owned(), "north".to_owned())].into(),
                    buffer_rows: 5,
                    dropped_total: 0,
                }),
                ..DeviceUpdate::default()
            },
            DeviceUpdate {
                device: "gw-2".into(),
                seen_ms: T0,
                readings: 7,
                batches: 1,
                last_seq: Some(7),
                ..DeviceUpdate::default()
            },
        ],
        gaps: vec![Gap {
            device: "gw-1".into(),
            from_seq: 10,
            to_seq: 11,
            detected_ms: T0 - 5000,
        }],
        dead_letters: vec![
            dead_letter(1, "malformed"),
            dead_letter(2, "bad-topic"),
            dead_letter(3, "malformed"),
        ],
        kv: vec![],
        alerts: vec![],
    };
    store.commit(&flush).unwrap();
    (dir, path, store)
}

/// A switchable health report.
#[derive(Debug)]
struct FakeHealth(AtomicBool);

impl Health for FakeHealth {
    fn report(&self) -> (bool, Value) {
        let ok = self.0.load(Ordering::SeqCst);
        (
            ok,
            json!({ "ingest": if ok { "running" } else { "stopped" } }),
        )
    }
}

struct Server {
    addr: SocketAddr,
    health: Arc<FakeHealth>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
    store: Store,
    _dir: tempfile::TempDir,
}

fn state(store: &Store, token: Option<&str>) -> (ApiState, Arc<FakeHealth>, Arc<Metrics>) {
    let health = Arc::new(FakeHealth(AtomicBool::new(true)));
    let metrics = Arc::new(Metrics::default());
    let state = ApiState {
        reader: Arc::new(Mutex::new(store.reader().unwrap())),
        metrics: metrics.clone(),
        health: health.clone(),
        token: token.map(str::to_owned),
    };
    (state, health, metrics)
}

async fn start(token: Option<&str>) -> Server {
    let (dir, path, store) = seed_store();
    let (state, health, metrics) = state(&store, token);
    let cancel = CancellationToken::new();
    let (addr, task) = api::serve(
        "127.0.0.1:0".parse().unwrap(),
        api::router(state),
        cancel.clone(),
    )
    .await
    .unwrap();
    Server {
        addr,
        health,
        metrics,
        cancel,
        task,
        path,
        store,
        _dir: dir,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Asserts the JSON error shape and returns the message.
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let v = self.json();
        assert_eq!(v["status"], status, "{self:?}");
        v["error"].as_str().unwrap().to_owned()
    }
}

/// One HTTP/1.1 request with `Connection: close` and `headers`; reads to EOF.
async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    parse(&raw)
}

/// A request with an optional `Authorization` header.
async fn request(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> Reply {
    match auth {
        Some(a) => request_with(addr, method, path, &[("Authorization", a)]).await,
        None => request_with(addr, method, path, &[]).await,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, None).await
}

fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of head");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        body = dechunk(&body);
    } else if let Some(len) = headers.get("content-length") {
        assert_eq!(body.len(), len.parse::<usize>().unwrap());
    }
    Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_str = std::str::from_utf8(&data[..eol]).unwrap();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[tokio::test]
async fn healthz_reports_200_then_503_when_unhealthy() {
    let s = start(None).await;
    let r = get(s.addr, "/healthz").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({ "healthy": true, "checks": { "ingest": "running" } })
    );

    s.health.0.store(false, Ordering::SeqCst);
    let r = get(s.addr, "/healthz").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.json(),
        json!({ "healthy": false, "checks": { "ingest": "stopped" } })
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let s = start(None).await;
    s.metrics.readings.inc_by(3);
    let r = get(s.addr, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{r:?}"
    );
    assert!(
        r.body.contains("outpost_aggregator_readings_total 3"),
        "{}",
        r.body
    );

    // Prometheus asks for OpenMetrics first, and gets it.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let r = request_with(s.addr, "GET", "/metrics", &[("Accept", accept)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{r:?}"
    );
    assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
}

#[tokio::test]
async fn devices_list_and_detail_with_last_values() {
    let s = start(None).await;
    let r = get(s.addr, "/api/v1/devices").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let devices = v["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gw-1", "gw-2"]);
    assert_eq!(devices[0]["online"], true);
    assert_eq!(devices[0]["labels"], json!({ "site": "north" }));
    assert_eq!(devices[0]["buffer_rows"], 5);
    assert_eq!(devices[0]["mark"], 42);
    assert_eq!(devices[1]["online"], false);
    assert_eq!(devices[1]["agent_version"], Value::Null);

    let r = get(s.addr, "/api/v1/devices/gw-1").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["id"], "gw-1");
    assert_eq!(v["readings_total"], 40);
    assert_eq!(
        v["last_values"],
        json!([
            { "sensor": "pump", "time_ms": T0 - 1000, "seq": 41, "value": "RUN", "kind": "str" },
            { "sensor": "temp", "time_ms": T0, "seq": 42, "value": 21.5, "kind": "f32" },
        ])
    );
    assert_eq!(
        v["recent_gaps"],
        json!([{ "from_seq": 10, "to_seq": 11, "detected_ms": T0 - 5000 }])
    );
}

#[tokio::test]
async fn later_commits_are_visible() {
    let mut s = start(None).await;
    s.store
        .commit(&Flush {
            devices: vec![DeviceUpdate {
                device: "gw-3".into(),
                seen_ms: T0 + 1,
                ..DeviceUpdate::default()
            }],
            ..Flush::default()
        })
        .unwrap();
    let v = get(s.addr, "/api/v1/devices").await.json();
    assert_eq!(v["devices"].as_array().unwrap().len(), 3);
    assert_eq!(get(s.addr, "/api/v1/devices/gw-3").await.status, 200);
}

#[tokio::test]
async fn unknown_device_is_404_and_invalid_id_is_400() {
    let s = start(None).await;
    let msg = get(s.addr, "/api/v1/devices/gw-9").await.error(404);
    assert!(msg.contains("gw-9"), "{msg}");
    for bad in ["bad!id", "alerts", "%2F..%2Fx", &"x".repeat(65)] {
        let msg = get(s.addr, &format!("/api/v1/devices/{bad}"))
            .await
            .error(400);
        assert!(msg.starts_with("invalid device id"), "{bad}: {msg}");
    }
}

#[tokio::test]
async fn dead_letters_newest_first_with_counts_and_filters() {
    let s = start(None).await;
    let r = get(s.addr, "/api/v1/dead-letters").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["limit"], 100);
    assert_eq!(v["counts"], json!({ "bad-topic": 1, "malformed": 2 }));
    let reasons: Vec<&str> = v["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["malformed", "bad-topic", "malformed"]);
    let newest = &v["dead_letters"][0];
    assert_eq!(newest["topic"], "outpost/v1/gw-3/telemetry");
    assert_eq!(newest["device"], "gw-3");
    assert_eq!(newest["payload_hex"], "dead03");
    assert_eq!(newest["payload_len"], 3);

    let v = get(s.addr, "/api/v1/dead-letters?limit=1&reason=malformed")
        .await
        .json();
    let list = v["dead_letters"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["reason"], "malformed");
    assert_eq!(v["counts"]["bad-topic"], 1, "counts are not filtered");

    let v = get(s.addr, "/api/v1/dead-letters?limit=5000").await.json();
    assert_eq!(v["limit"], 1000, "clamped");

    get(s.addr, "/api/v1/dead-letters?limit=lots")
        .await
        .error(400);
    get(s.addr, "/api/v1/dead-letters?limt=5").await.error(400);
}

#[tokio::test]
async fn token_guards_api_but_not_health_or_metrics() {
    let s = start(Some(TOKEN)).await;
    let path = "/api/v1/devices";

    let r = request(s.addr, "GET", path, None).await;
    r.error(401);
    assert!(
        r.header("www-authenticate").unwrap().starts_with("Bearer"),
        "{r:?}"
    );

    let r = request(s.addr, "GET", path, Some("Bearer not-the-token")).await;
    r.error(401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token"),
        "{r:?}"
    );
    assert!(!r.body.contains(TOKEN));

    let r = request(s.addr, "GET", path, Some("Basic dXNlcjpwdw==")).await;
    r.error(401);

    let right = format!("Bearer {TOKEN}");
    let r = request(s.addr, "GET", path, Some(&right)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["devices"].as_array().unwrap().len(), 2);

    // Unknown API paths are refused before routing: no probing without a token.
    request(s.addr, "GET", "/api/v1/nothing", None)
        .await
        .error(401);
    request(s.addr, "GET", "/api/v1/nothing", Some(&right))
        .await
        .error(404);

    assert_eq!(get(s.addr, "/healthz").await.status, 200);
    assert_eq!(get(s.addr, "/metrics").await.status, 200);
}

#[tokio::test]
async fn unknown_route_is_404_json_and_wrong_method_405_json() {
    let s = start(None).await;
    get(s.addr, "/nope").await.error(404);
    get(s.addr, "/api/v2/devices").await.error(404);

    let r = request(s.addr, "POST", "/api/v1/devices", None).await;
    r.error(405);
    assert!(r.header("allow").unwrap().contains("GET"), "{r:?}");
    request(s.addr, "DELETE", "/healthz", None).await.error(405);
}

#[tokio::test]
async fn store_failure_is_500_without_internals() {
    let s = start(None).await;
    // Break the schema under the reader (only a hand edit could do this).
    rusqlite::Connection::open(&s.path)
        .unwrap()
        .execute_batch("DROP TABLE devices")
        .unwrap();
    let msg = get(s.addr, "/api/v1/devices").await.error(500);
    assert_eq!(msg, "internal error");
    // The API keeps serving what still works.
    assert_eq!(get(s.addr, "/api/v1/dead-letters").await.status, 200);
}

#[tokio::test]
async fn cancel_stops_the_server() {
    let s = start(None).await;
    assert_eq!(get(s.addr, "/healthz").await.status, 200);
    s.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), s.task)
        .await
        .expect("server did not stop")
        .unwrap();
    assert!(TcpStream::connect(s.addr).await.is_err());
}

#[tokio::test]
async fn extra_routes_get_auth_and_json_errors() {
    use axum::routing::get as route_get;
    let extra = axum::Router::new()
        .route("/api/v1/extra", route_get(|| async { "extra" }))
        .route("/open", route_get(|| async { "open" }));
    let (_dir, _path, store) = seed_store();
    let (state, _, _) = state(&store, Some(TOKEN));
    let cancel = CancellationToken::new();
    let (addr, _task) = api::serve(
        "127.0.0.1:0".parse().unwrap(),
        api::router_with(state, extra),
        cancel,
    )
    .await
    .unwrap();
    request(addr, "GET", "/api/v1/extra", None).await.error(401);
    let r = request(
        addr,
        "GET",
        "/api/v1/extra",
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "extra"));
    assert_eq!(get(addr, "/open").await.body, "open");
    request(addr, "PUT", "/open", None).await.error(405);
}

#[tokio::test]
async fn shutdown_is_bounded_by_a_client_that_never_finishes_its_request() {
    let (_dir, _path, store) = seed_store();
    let (state, _, _) = state(&store, None);
    let cancel = CancellationToken::new();
    let (addr, task) = api::serve_with_drain(
        "127.0.0.1:0".parse().unwrap(),
        api::router(state),
        cancel.clone(),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    let _idle = TcpStream::connect(addr).await.unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert_eq!(get(addr, "/healthz").await.status, 200);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the drain was not bounded")
        .unwrap();
}
