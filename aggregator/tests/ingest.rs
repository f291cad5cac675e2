//! The aggregator's receiving half end to end: real brokers (rumqttd in
//! process, or a Mosquitto child process), real MQTT clients standing in for
//! agents (with the agent's resend-from-last-ack rule), the real SQLite
//! state, and the HTTP API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_aggregator::config::Config;
use outpost_aggregator::ingest::ReadingSink;
use outpost_proto::batch::{BatchBuilder, ReadingRef, Value};
use outpost_proto::pb::{Ack, Quality};
use outpost_proto::topics;
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

const LONG: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Records every reading handed to the sink; optionally slow.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<(String, u64)>>>,
    delay: Option<Duration>,
}

impl ReadingSink for Recorder {
    fn readings(
        &mut self,
        device: &str,
        _l: &BTreeMap<String, String>,
        readings: &[ReadingRef<'_>],
    ) {
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.seen
            .lock()
            .unwrap()
            .extend(readings.iter().map(|r| (device.to_string(), r.seq)));
    }
    fn device_status(&mut self, _d: &str, _o: bool, _t: i64) {}
}

impl Recorder {
    fn counts(&self) -> HashMap<(String, u64), usize> {
        let mut m = HashMap::new();
        for k in self.seen.lock().unwrap().iter() {
            *m.entry(k.clone()).or_insert(0) += 1;
        }
        m
    }
}

struct Aggregator {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    api: std::net::SocketAddr,
}

async fn start_aggregator(toml: &str, sink: Recorder) -> Aggregator {
    let config = Config::parse(toml, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(outpost_aggregator::run_with_sink(
        config,
        Box::new(sink),
        cancel.clone(),
        Some(tx),
    ));
    let running = tokio::time::timeout(LONG, rx)
        .await
        .expect("aggregator starts in time")
        .expect("aggregator started");
    Aggregator {
        cancel,
        task,
        api: running.api_addr,
    }
}

impl Aggregator {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(LONG, self.task)
            .await
            .expect("aggregator stops")
            .unwrap()
            .unwrap();
    }
}

fn embedded_toml(port: u16, dir: &Path, extra: &str) -> String {
    format!(
        "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n{extra}\n[state]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[ingest]\nflush-interval = \"20ms\"\n",
        dir.join("state.sqlite").display()
    )
}

fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http_get(addr, path, None);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn encode(device: &str, prev: u64, seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    encode_acked(device, prev, 0, seqs)
}

fn encode_acked(
    device: &str,
    prev: u64,
    acked: u64,
    seqs: std::ops::RangeInclusive<u64>,
) -> Vec<u8> {
    let mut b = BatchBuilder::new(device).unwrap();
    b.set_prev_seq(prev);
    b.set_acked_seq(acked);
    for s in seqs {
        b.push(
            s,
            1_700_000_000_000 + s as i64,
            "temp",
            &Value::F32(s as f32),
            Quality::Good,
        )
        .unwrap();
    }
    b.encode()
}

/// Agents as the aggregator sees them: per device, batches of readings with
/// increasing sequence numbers, and the agent's delivery rule: resend
/// everything after the last ack when the ack stops advancing.
struct Agents {
    client: AsyncClient,
    acks: Arc<Mutex<HashMap<String, u64>>>,
}

impl Agents {
    async fn connect(port: u16, name: &str) -> Agents {
        let mut o = MqttOptions::new(name, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(100);
        let (client, mut el) = AsyncClient::new(o, 1000);
        let acks: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let a = acks.clone();
        let c2 = client.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe("outpost/v1/+/ack", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok((device, topics::DeviceTopic::Ack)) =
                            topics::parse_device_topic(&p.topic)
                        {
                            if let Ok(ack) = Ack::decode(p.payload.as_ref()) {
                                let mut m = a.lock().unwrap();
                                let e = m.entry(device.to_string()).or_insert(0);
                                *e = (*e).max(ack.seq);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Agents { client, acks }
    }

    async fn publish(&self, device: &str, prev: u64, seqs: std::ops::RangeInclusive<u64>) {
        self.client
            .publish(
                topics::telemetry(device).unwrap(),
                QoS::AtLeastOnce,
                false,
                encode_acked(device, prev, self.acked(device), seqs),
            )
            .await
            .unwrap();
    }

    fn acked(&self, device: &str) -> u64 {
        self.acks.lock().unwrap().get(device).copied().unwrap_or(0)
    }

    /// Sends `1..=total` for each device in batches of `per_batch`, then keeps
    /// resending from the last ack (ack timeout `timeout`) until every
    /// device is acked up to `total`, or `deadline` passes.
    async fn deliver_all(&self, devices: &[String], total: u64, per_batch: u64, timeout: Duration) {
        for d in devices {
            let mut s = 1;
            while s <= total {
                let e = (s + per_batch - 1).min(total);
                self.publish(d, s - 1, s..=e).await;
                s = e + 1;
            }
        }
        let deadline = Instant::now() + LONG;
        let mut progress: HashMap<String, (u64, Instant)> = HashMap::new();
        loop {
            let pending: Vec<&String> = devices.iter().filter(|d| self.acked(d) < total).collect();
            if pending.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every device was acked: {} left",
                pending.len()
            );
            for d in pending {
                let acked = self.acked(d);
                let p = progress.entry(d.clone()).or_insert((acked, Instant::now()));
                if acked > p.0 {
                    *p = (acked, Instant::now());
                } else if p.1.elapsed() >= timeout {
                    // The agent's rule: resend everything after the last ack.
                    let mut s = acked + 1;
                    while s <= total {
                        let e = (s + per_batch - 1).min(total);
                        self.publish(d, s - 1, s..=e).await;
                        s = e + 1;
                    }
                    *p = (acked, Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_processes_acks_dedups_and_records_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let rec = Recorder::default();
    let agg = start_aggregator(&embedded_toml(port, dir.path(), ""), rec.clone()).await;
    let agents = Agents::connect(port, "agent-1").await;

    agents.publish("gw-1", 0, 1..=10).await;
    let a = &agents;
    support::wait_async(LONG, "ack 10", || async move {
        (a.acked("gw-1") == 10).then_some(())
    })
    .await;
    // A resend of the same batch: counted as duplicates, not delivered twice, still acked.
    agents.publish("gw-1", 0, 1..=10).await;
    // The agent dropped 11..=20 (its buffer overflowed): a gap, accepted.
    agents.publish("gw-1", 10, 21..=30).await;
    support::wait_async(LONG, "ack 30", || async move {
        (a.acked("gw-1") == 30).then_some(())
    })
    .await;

    let counts = rec.counts();
    assert_eq!(counts.len(), 20, "1..=10 and 21..=30");
    assert!(counts.values().all(|n| *n == 1), "nothing delivered twice");
    let dev = json(agg.api, "/api/v1/devices/gw-1");
    assert_eq!(dev["duplicates_total"], 10);
    assert_eq!(dev["gap_readings_total"], 10);
    assert_eq!(dev["recent_gaps"][0]["from_seq"], 11);
    assert_eq!(dev["recent_gaps"][0]["to_seq"], 20);
    assert_eq!(dev["last_values"][0]["value"], 30.0);
    agg.stop().await;

    // Restart on the same state: duplicates still recognised, device listed.
    let rec2 = Recorder::default();
    let agg = start_aggregator(&embedded_toml(port, dir.path(), ""), rec2.clone()).await;
    let agents = Agents::connect(port, "agent-2").await;
    agents.publish("gw-1", 20, 21..=30).await;
    agents.publish("gw-1", 30, 31..=35).await;
    let a = &agents;
    support::wait_async(LONG, "ack 35 after restart", || async move {
        (a.acked("gw-1") == 35).then_some(())
    })
    .await;
    let seqs: Vec<u64> = rec2.seen.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(
        seqs,
        (31..=35).collect::<Vec<_>>(),
        "only the new readings after a restart"
    );
    let list = json(agg.api, "/api/v1/devices");
    assert!(list.to_string().contains("gw-1"), "{list}");
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_land_in_the_dead_letter_table_and_the_aggregator_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let rec = Recorder::default();
    let toml = embedded_toml(port, dir.path(), "").replace(
        "flush-interval = \"20ms\"",
        "flush-interval = \"20ms\"\nmax-payload = 4096",
    );
    let agg = start_aggregator(&toml, rec.clone()).await;
    let agents = Agents::connect(port, "agent-x").await;
    let c = &agents.client;
    c.publish(
        "outpost/v1/gw-2/telemetry",
        QoS::AtLeastOnce,
        false,
        vec![0xde, 0xad, 0xbe, 0xef],
    )
    .await
    .unwrap();
    c.publish(
        "outpost/v1/gw-2/telemetry",
        QoS::AtLeastOnce,
        false,
        encode("victim", 0, 1..=3),
    )
    .await
    .unwrap();
    c.publish(
        "outpost/v1/gw-2/telemetry",
        QoS::AtLeastOnce,
        false,
        vec![7u8; 8000],
    )
    .await
    .unwrap();
    c.publish(
        "outpost/v1/bad$id/telemetry",
        QoS::AtLeastOnce,
        false,
        encode("gw-2", 0, 1..=3),
    )
    .await
    .unwrap();
    // And a good one after all that.
    agents.publish("gw-2", 0, 1..=5).await;
    let a = &agents;
    support::wait_async(LONG, "the good batch acked", || async move {
        (a.acked("gw-2") == 5).then_some(())
    })
    .await;
    let api = agg.api;
    let dl = support::wait_async(LONG, "4 dead letters", || async move {
        let v = json(api, "/api/v1/dead-letters");
        (v.to_string().matches("\"reason\"").count() >= 4).then_some(v)
    })
    .await;
    let text = dl.to_string();
    for reason in ["malformed", "device-mismatch", "oversize", "bad-topic"] {
        assert!(text.contains(reason), "{reason} missing: {text}");
    }
    assert!(
        rec.counts().keys().all(|(d, _)| d == "gw-2"),
        "the victim's data is untouched"
    );
    let (status, metrics) = http_get(api, "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("outpost_aggregator_dead_letters_total{reason=\"oversize\"} 1"),
        "{metrics}"
    );
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_behind_small_broker_segments_still_processes_everything_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let rec = Recorder {
        delay: Some(Duration::from_millis(3)),
        ..Recorder::default()
    };
    let toml = embedded_toml(
        port,
        dir.path(),
        "max-segment-size = 16384\nmax-segment-count = 2",
    );
    let agg = start_aggregator(&toml, rec.clone()).await;
    let agents = Agents::connect(port, "agent-slow").await;
    let devices: Vec<String> = (0..4).map(|i| format!("slow-{i}")).collect();
    agents
        .deliver_all(&devices, 3000, 50, Duration::from_secs(2))
        .await;
    let counts = rec.counts();
    for d in &devices {
        for s in 1..=3000 {
            assert_eq!(
                counts.get(&(d.clone(), s)),
                Some(&1),
                "{d} seq {s} processed exactly once"
            );
        }
    }
    let (_, m) = http_get(agg.api, "/metrics", None);
    let held: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("outpost_aggregator_out_of_order_batches_total")
                || l.starts_with("outpost_aggregator_duplicates_total")
        })
        .collect();
    println!("slow consumer: 4 x 3000 readings processed exactly once; {held:?}");
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_requests_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let toml = embedded_toml(port, dir.path(), "").replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\ntoken = \"s3cret-token-0123456789\"",
    );
    let agg = start_aggregator(&toml, Recorder::default()).await;
    assert_eq!(http_get(agg.api, "/api/v1/devices", None).0, 401);
    assert_eq!(http_get(agg.api, "/api/v1/devices", Some("wrong")).0, 401);
    assert_eq!(
        http_get(agg.api, "/api/v1/devices", Some("s3cret-token-0123456789")).0,
        200
    );
    assert_eq!(http_get(agg.api, "/healthz", None).0, 200);
    assert_eq!(http_get(agg.api, "/metrics", None).0, 200);
    agg.stop().await;
}

fn external_toml(port: u16, dir: &Path, name: &str, index: u32) -> String {
    format!(
        "[broker]\nmode = \"external\"\nhost = \"127.0.0.1\"\nport = {port}\nclient-id = \"{name}\"\npartition = {{ index = {index}, count = 2 }}\n[state]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[ingest]\nflush-interval = \"20ms\"\n",
        dir.join(format!("{name}.sqlite")).display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partitioned_aggregators_on_mosquitto_process_every_device_exactly_once() {
    let mosquitto = support::mosquitto::Mosquitto::start();
    let port = mosquitto.port;
    let dir = tempfile::tempdir().unwrap();
    let (r0, r1) = (Recorder::default(), Recorder::default());
    let a0 = start_aggregator(&external_toml(port, dir.path(), "agg-0", 0), r0.clone()).await;
    let a1 = start_aggregator(&external_toml(port, dir.path(), "agg-1", 1), r1.clone()).await;
    let agents = Agents::connect(port, "agents").await;
    let devices: Vec<String> = (0..20).map(|i| format!("site-{i:02}")).collect();
    agents
        .deliver_all(&devices, 200, 25, Duration::from_secs(3))
        .await;

    let (c0, c1) = (r0.counts(), r1.counts());
    for d in &devices {
        let on0 = c0.keys().any(|(x, _)| x == d);
        let on1 = c1.keys().any(|(x, _)| x == d);
        assert!(on0 != on1, "{d} must be on exactly one aggregator");
        let c = if on0 { &c0 } else { &c1 };
        for s in 1..=200 {
            assert_eq!(c.get(&(d.clone(), s)), Some(&1), "{d} seq {s} exactly once");
        }
    }
    println!(
        "partitions: aggregator 0 has {} readings, aggregator 1 has {}",
        c0.len(),
        c1.len()
    );

    // Stop one aggregator, keep streaming, restart it: nothing lost (the
    // agents resend what was not acked).
    a1.stop().await;
    let more: Vec<String> = devices.clone();
    let a = &agents;
    let send_more = async move {
        for d in &more {
            a.publish(d, 200, 201..=250).await;
        }
    };
    send_more.await;
    let a1 = start_aggregator(&external_toml(port, dir.path(), "agg-1", 1), r1.clone()).await;
    agents
        .deliver_all(&devices, 250, 25, Duration::from_secs(3))
        .await;
    let (c0, c1) = (r0.counts(), r1.counts());
    for d in &devices {
        for s in 1..=250 {
            let n = c0.get(&(d.clone(), s)).unwrap_or(&0) + c1.get(&(d.clone(), s)).unwrap_or(&0);
            assert_eq!(n, 1, "{d} seq {s} exactly once across the restart");
        }
    }
    a0.stop().await;
    a1.stop().await;
}
