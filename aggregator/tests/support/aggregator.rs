//! The aggregator in process for integration tests: start it from config
//! text, talk to its API and broker, stop it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use outpost_aggregator::config::Config;
use outpost_proto::batch::{BatchBuilder, Value};
use outpost_proto::pb::Quality;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio_util::sync::CancellationToken;

/// Generous deadline for anything the tests wait for.
pub const LONG: Duration = Duration::from_secs(60);

/// A running aggregator.
pub struct Agg {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Where its HTTP API listens.
    pub api: SocketAddr,
}

/// Starts `outpost_aggregator::run` with this config text.
pub async fn start(toml: &str) -> Agg {
    let config = Config::parse(toml, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(outpost_aggregator::run(config, cancel.clone(), Some(tx)));
    let running = tokio::time::timeout(LONG, rx)
        .await
        .expect("the aggregator starts in time")
        .unwrap_or_else(|_| panic!("the aggregator did not start"));
    Agg {
        cancel,
        task,
        api: running.api_addr,
    }
}

impl Agg {
    /// Cancels it and waits for a clean exit.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(LONG, self.task)
            .await
            .expect("the aggregator stops in time")
            .unwrap()
            .unwrap();
    }
}

/// Config text for an embedded broker on `port`, state in `dir`, API on a
/// free port, 20 ms flushes, rules from `rules`, then `extra` TOML.
pub fn embedded_toml(port: u16, dir: &Path, rules: &Path, extra: &str) -> String {
    format!(
        "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n[state]\npath = \"{}\"\n\
         [api]\nlisten = \"127.0.0.1:0\"\n[ingest]\nflush-interval = \"20ms\"\n[rules]\ndir = \"{}\"\n{extra}",
        dir.join("state.sqlite").display(),
        rules.display()
    )
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path`: the whole response (status line, headers, body).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `GET path` as JSON.
pub fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let out = http_get(addr, path);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {out}"))
}

/// `/metrics` text.
pub fn metrics(addr: SocketAddr) -> String {
    http_get(addr, "/metrics")
}

/// The value of the first metric line starting with `name` (0 when absent).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    metrics(addr)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `f` every 50 ms until it yields Some; panics after [`LONG`].
pub async fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LONG;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An MQTT client of the broker on `port`, its event loop polled forever.
pub async fn client(port: u16, id: &str) -> AsyncClient {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (c, mut el) = AsyncClient::new(o, 100);
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    c
}

/// Publishes one telemetry batch of `device`: `temperature` readings one
/// second apart from `t0`, sequence numbers from `first_seq`.
pub async fn send_temperatures(
    c: &AsyncClient,
    device: &str,
    first_seq: u64,
    t0: i64,
    values: &[f32],
) {
    let mut b = BatchBuilder::new(device).unwrap();
    b.set_prev_seq(first_seq - 1);
    for (i, v) in values.iter().enumerate() {
        b.push(
            first_seq + i as u64,
            t0 + i as i64 * 1000,
            "temperature",
            &Value::F32(*v),
            Quality::Good,
        )
        .unwrap();
    }
    c.publish(
        format!("outpost/v1/{device}/telemetry"),
        QoS::AtLeastOnce,
        false,
        b.encode(),
    )
    .await
    .unwrap();
}
