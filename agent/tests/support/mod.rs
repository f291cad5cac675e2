//! Test support: a real rumqttd broker in process that can be taken down and
//! brought back on the same port, and an "aggregator" responder on its local
//! link that decodes telemetry batches and acks them (when told to).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::type_complexity
)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::batch;
use outpost_proto::pb::Ack;
use outpost_proto::topics;
use prost::Message;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it returns Some, panicking after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn router_config(segment: usize) -> RouterConfig {
    RouterConfig {
        max_connections: 100,
        max_outgoing_packet_count: 200,
        max_segment_size: segment,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn server_settings(port: u16) -> ServerSettings {
    ServerSettings {
        name: format!("v4-{port}"),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// rumqttd with a listener that can be stopped (connections reset, like a
/// crash) and restarted on the same port. The router (sessions, retained
/// messages) lives on, as rumqttd offers no shutdown API.
pub struct Broker {
    pub port: u16,
    make_server: Box<dyn Fn() -> Server<V4> + Send>,
    listener: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Broker {
    pub fn start() -> (Broker, LinkTx, LinkRx) {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> (Broker, LinkTx, LinkRx) {
        let router_tx = Router::new(0, router_config(4 * 1024 * 1024)).spawn();
        let (link_tx, link_rx, _) = LinkBuilder::new("test-aggregator", router_tx.clone())
            .build()
            .expect("local link");
        let make_server =
            Box::new(move || Server::new(server_settings(port), router_tx.clone(), V4));
        let mut b = Broker {
            port,
            make_server,
            listener: None,
        };
        b.up();
        (b, link_tx, link_rx)
    }

    pub fn up(&mut self) {
        assert!(self.listener.is_none());
        let mut server = (self.make_server)();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let th = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::select! {
                    _ = server.start(LinkType::Remote) => {}
                    _ = stop_rx => {}
                }
            });
        });
        self.listener = Some((stop_tx, th));
        let port = self.port;
        wait_until(Duration::from_secs(10), "broker to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    pub fn down(&mut self) {
        if let Some((stop, th)) = self.listener.take() {
            let _ = stop.send(());
            th.join().unwrap();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.down();
    }
}

/// A reading as the responder saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub device: String,
    pub sensor: String,
    pub seq: u64,
    pub time_ms: i64,
    pub value: batch::Value,
}

/// Stands in for the aggregator: consumes telemetry from the local link,
/// records every reading (duplicates included) and, while `acking`, acks the
/// highest contiguous sequence number it has per device.
#[derive(Clone, Default)]
pub struct Responder {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub acking: Arc<AtomicBool>,
    pub statuses: Arc<Mutex<Vec<(String, Vec<u8>)>>>,
    pub batches: Arc<Mutex<u64>>,
}

impl Responder {
    pub fn start(mut tx: LinkTx, mut rx: LinkRx) -> Responder {
        let r = Responder::default();
        r.acking.store(true, Ordering::SeqCst);
        tx.subscribe(topics::all_devices(topics::DeviceTopic::Telemetry))
            .unwrap();
        tx.subscribe(topics::all_devices(topics::DeviceTopic::Status))
            .unwrap();
        let me = r.clone();
        std::thread::spawn(move || {
            let mut highest: HashMap<String, u64> = HashMap::new();
            loop {
                let n = match rx.recv_deadline(Instant::now() + Duration::from_secs(1)) {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(rumqttd::local::LinkError::RecvTimeout(_)) => continue,
                    Err(_) => break,
                };
                match n {
                    Notification::Forward(f) => {
                        let topic = String::from_utf8_lossy(&f.publish.topic).to_string();
                        let Ok((device, kind)) = topics::parse_device_topic(&topic) else {
                            continue;
                        };
                        match kind {
                            topics::DeviceTopic::Telemetry => {
                                let b = batch::decode(&f.publish.payload).unwrap();
                                let mut seen = me.seen.lock().unwrap();
                                let h = highest.entry(device.to_string()).or_insert(0);
                                for r in batch::readings(&b).unwrap() {
                                    seen.push(Seen {
                                        device: device.to_string(),
                                        sensor: r.sensor.to_string(),
                                        seq: r.seq,
                                        time_ms: r.time_ms,
                                        value: r.value.to_value(),
                                    });
                                    *h = (*h).max(r.seq);
                                }
                                *me.batches.lock().unwrap() += 1;
                                if me.acking.load(Ordering::SeqCst) {
                                    let ack = Ack {
                                        device_id: device.to_string(),
                                        seq: *h,
                                        time_ms: 0,
                                    };
                                    let _ = tx
                                        .publish(topics::ack(device).unwrap(), ack.encode_to_vec());
                                }
                            }
                            topics::DeviceTopic::Status => {
                                me.statuses
                                    .lock()
                                    .unwrap()
                                    .push((device.to_string(), f.publish.payload.to_vec()));
                            }
                            topics::DeviceTopic::Ack => {}
                        }
                    }
                    Notification::Unschedule => {
                        let _ = rx.ready();
                    }
                    _ => {}
                }
            }
        });
        r
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Distinct sequence numbers seen, with how often each arrived.
    pub fn seq_counts(&self) -> BTreeMap<u64, usize> {
        let mut m = BTreeMap::new();
        for s in self.seen() {
            *m.entry(s.seq).or_insert(0) += 1;
        }
        m
    }
}

/// A config for an agent connecting to `port`, buffering in `dir`, with
/// short timeouts suitable for tests, and the given sources TOML appended.
pub fn agent_config(device: &str, port: u16, dir: &Path, sources: &str) -> String {
    format!(
        r#"
[device]
id = "{device}"
labels = {{ site = "test" }}

[mqtt]
host = "127.0.0.1"
port = {port}
keep-alive = "5s"
ack-timeout = "3s"
max-reconnect-backoff = "500ms"
status-interval = "2s"

[buffer]
path = "{buf}"
commit-interval = "200ms"

[batch]
max-readings = 50
linger = "50ms"

[metrics]
listen = "127.0.0.1:0"

[shutdown]
grace = "3s"

{sources}
"#,
        buf = dir.join("buffer.sqlite").display()
    )
}
