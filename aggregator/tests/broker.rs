//! The broker stage against real brokers: rumqttd embedded in process, and a
//! Mosquitto child process for the external mode. Real rumqttc clients play
//! the agents. Every wait is a poll with a generous deadline; ports come
//! from 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mosquitto.rs"]
mod mosquitto;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use mosquitto::{free_port, Mosquitto};
use outpost_aggregator::ingest::broker::{
    self, BrokerConfig, BrokerError, BrokerHandle, EmbeddedConfig, EmbeddedTlsConfig,
    ExternalConfig, Inbound,
};
use outpost_proto::topics;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Upper bound of every wait; generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------- clients

#[derive(Debug)]
enum Ev {
    Connected,
    SubAck,
    PubAck,
    Publish(rumqttc::Publish),
    Error(String),
}

/// A rumqttc client standing in for an agent. It (re)subscribes to `subs`
/// on every CONNACK and retries the connection every 100 ms while the
/// broker is away.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Ev>,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    fn new(port: u16, id: &str, login: Option<(&str, &str)>, subs: &[String]) -> Client {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let subs = subs.to_vec();
        let c = client.clone();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for s in &subs {
                            c.try_subscribe(s.clone(), QoS::AtLeastOnce).unwrap();
                        }
                        Ev::Connected
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => Ev::SubAck,
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish(p),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Error(e.to_string()));
                        // Retry pace of a test client, not a synchronisation.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Client {
            client,
            events,
            task,
        }
    }

    async fn next_event(&mut self, what: &str) -> Ev {
        timeout(DEADLINE, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
            .expect("client task ended")
    }

    /// Waits for CONNACK and, if it subscribes, the SUBACK.
    async fn connected(mut self, subscribes: bool) -> Client {
        loop {
            if let Ev::Connected = self.next_event("CONNACK").await {
                break;
            }
        }
        if subscribes {
            loop {
                if let Ev::SubAck = self.next_event("SUBACK").await {
                    break;
                }
            }
        }
        self
    }

    async fn next_publish(&mut self, topic: &str) -> rumqttc::Publish {
        loop {
            if let Ev::Publish(p) = self.next_event(&format!("a publish on {topic}")).await {
                if p.topic == topic {
                    return p;
                }
            }
        }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
    }
}

async fn next_inbound(h: &mut BrokerHandle, what: &str) -> Inbound {
    timeout(DEADLINE, h.inbound.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
        .expect("inbound channel closed")
}

/// Publishes `payload(n)` on `topic` with n = 0, 1, ... until one of them
/// arrives on `inbound` (other messages are skipped). Returns that n.
async fn publish_until_received(
    client: &Client,
    h: &mut BrokerHandle,
    topic: &str,
    payload: impl Fn(u32) -> String,
) -> u32 {
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut sent = Vec::new();
    for n in 0.. {
        assert!(
            tokio::time::Instant::now() < end,
            "nothing published on {topic} arrived within {DEADLINE:?}"
        );
        let p = payload(n);
        // The client may be reconnecting: queue without waiting.
        let _ = client
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, p.clone());
        sent.push(p);
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, h.inbound.recv()).await {
            if m.topic == topic {
                if let Some(i) = sent.iter().position(|s| s.as_bytes() == m.payload.as_ref()) {
                    return u32::try_from(i).unwrap();
                }
            }
        }
    }
    unreachable!()
}

// --------------------------------------------------------------- embedded

fn embedded(port: u16) -> EmbeddedConfig {
    EmbeddedConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        max_connections: 100,
        max_segment_size: 1024 * 1024,
        ..EmbeddedConfig::default()
    }
}

async fn start_embedded(cfg: EmbeddedConfig) -> BrokerHandle {
    broker::start(&BrokerConfig::Embedded(cfg))
        .await
        .expect("embedded broker starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_delivers_device_messages_and_acks() {
    init_logs();
    let port = free_port();
    let mut h = start_embedded(embedded(port)).await;
    let telemetry = topics::telemetry("dev1").unwrap();
    let status = topics::status("dev1").unwrap();
    let ack = topics::ack("dev1").unwrap();

    let agent = Client::new(port, "agent-dev1", None, std::slice::from_ref(&ack))
        .connected(true)
        .await;
    agent.publish(&telemetry, b"batch-1".to_vec(), false).await;
    agent.publish(&status, b"online".to_vec(), true).await;

    let m = next_inbound(&mut h, "telemetry").await;
    assert_eq!(
        m,
        Inbound {
            topic: telemetry.clone(),
            payload: Bytes::from_static(b"batch-1"),
            retained: false
        }
    );
    let m = next_inbound(&mut h, "status").await;
    assert_eq!(m.topic, status);
    assert_eq!(m.payload.as_ref(), b"online");
    // A live message is forwarded without the retain flag (MQTT 3.1.1).
    assert!(!m.retained);

    // The ack reaches the subscribed agent...
    let mut agent = agent;
    h.outbound
        .publish(ack.clone(), b"ack-7".to_vec(), true)
        .unwrap();
    let p = agent.next_publish(&ack).await;
    assert_eq!(p.payload.as_ref(), b"ack-7");
    // ...and a late subscriber gets it as a retained message.
    let mut late = Client::new(port, "agent-dev1-late", None, std::slice::from_ref(&ack))
        .connected(true)
        .await;
    let p = late.next_publish(&ack).await;
    assert_eq!(p.payload.as_ref(), b"ack-7");
    assert!(p.retain, "a late subscriber sees the ack as retained");

    // Other topics do not reach ingest.
    agent.publish("other/topic", b"x".to_vec(), false).await;
    agent.publish(&telemetry, b"batch-2".to_vec(), false).await;
    let m = next_inbound(&mut h, "second telemetry").await;
    assert_eq!(m.payload.as_ref(), b"batch-2");

    let outbound = h.outbound.clone();
    h.shutdown().await;
    assert!(matches!(
        outbound.publish(ack, b"late".to_vec(), true),
        Err(BrokerError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_late_consumer_gets_all_2000_messages() {
    init_logs();
    const N: u32 = 2000;
    let port = free_port();
    let mut h = start_embedded(embedded(port)).await;
    let telemetry = topics::telemetry("dev-late").unwrap();
    let mut agent = Client::new(port, "agent-late", None, &[])
        .connected(false)
        .await;
    // Publish everything while nobody reads `inbound` (it holds 1024):
    // the local link must wait, and get going again after each Unschedule.
    let publisher = agent.client.clone();
    let topic = telemetry.clone();
    let sending = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    i.to_be_bytes().to_vec(),
                )
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < N {
        if let Ev::PubAck = agent.next_event("PUBACKs").await {
            acked += 1;
        }
    }
    sending.await.unwrap();
    // The local link fills the channel, then waits for us.
    let end = tokio::time::Instant::now() + DEADLINE;
    while h.inbound.len() < broker::INBOUND_CAPACITY {
        assert!(
            tokio::time::Instant::now() < end,
            "the inbound channel never filled up ({} of {})",
            h.inbound.len(),
            broker::INBOUND_CAPACITY
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut got = Vec::with_capacity(N as usize);
    while got.len() < N as usize {
        let m = next_inbound(&mut h, &format!("message {} of {N}", got.len())).await;
        assert_eq!(m.topic, telemetry);
        got.push(u32::from_be_bytes(m.payload.as_ref().try_into().unwrap()));
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "all, in order, once");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_shutdown_disconnects_clients_and_releases_the_port() {
    init_logs();
    let port = free_port();
    let h = start_embedded(embedded(port)).await;
    let mut agent = Client::new(port, "agent-shutdown", None, &[])
        .connected(false)
        .await;
    h.shutdown().await;

    // The connected client is dropped...
    loop {
        if let Ev::Error(e) = agent.next_event("the disconnection").await {
            assert!(!e.is_empty());
            break;
        }
    }
    drop(agent);
    // ...new connections are refused...
    let refused = std::net::TcpStream::connect(("127.0.0.1", port))
        .expect_err("nothing listens after shutdown");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // ...and the port can be bound again (what a restarted aggregator does).
    let again = tokio::net::TcpListener::bind(("127.0.0.1", port)).await;
    assert!(again.is_ok(), "port {port} still held: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_users_are_checked() {
    init_logs();
    let port = free_port();
    let cfg = EmbeddedConfig {
        users: BTreeMap::from([("gw1".to_owned(), "pw1".to_owned())]),
        ..embedded(port)
    };
    let mut h = start_embedded(cfg).await;

    // Wrong password, and no login at all: closed without a CONNACK.
    for (id, login) in [("intruder", Some(("gw1", "wrong"))), ("anon", None)] {
        let mut c = Client::new(port, id, login, &[]);
        match c.next_event("the refusal").await {
            Ev::Error(e) => eprintln!("{id}: refused as expected: {e}"),
            other => panic!("{id}: expected a refused connection, got {other:?}"),
        }
    }

    let good = Client::new(port, "gw1", Some(("gw1", "pw1")), &[])
        .connected(false)
        .await;
    let telemetry = topics::telemetry("gw1").unwrap();
    good.publish(&telemetry, b"hello".to_vec(), false).await;
    assert_eq!(next_inbound(&mut h, "telemetry").await.topic, telemetry);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_start_reports_a_port_in_use() {
    init_logs();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    match broker::start(&BrokerConfig::Embedded(embedded(port))).await {
        Err(BrokerError::Listen { addr, reason }) => {
            assert_eq!(addr.port(), port);
            assert!(!reason.is_empty());
        }
        other => panic!("expected a listen error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_tls_is_refused_until_built_in() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "x").unwrap();
    std::fs::write(&key, "x").unwrap();
    let cfg = EmbeddedConfig {
        tls_listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
        tls: Some(EmbeddedTlsConfig {
            cert_file: cert,
            key_file: key,
            ca_file: None,
        }),
        ..embedded(free_port())
    };
    let r = broker::start(&BrokerConfig::Embedded(cfg)).await;
    assert!(matches!(r, Err(BrokerError::TlsNotBuilt)), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_an_error_not_a_panic() {
    let cfg = EmbeddedConfig {
        max_segment_size: 10, // rumqttd would panic in its router thread
        ..embedded(free_port())
    };
    match broker::start(&BrokerConfig::Embedded(cfg)).await {
        Err(BrokerError::Config(p)) => {
            assert!(p[0].starts_with("broker.max-segment-size"), "{p:?}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

// --------------------------------------------------------------- external

fn external(port: u16, client_id: &str) -> ExternalConfig {
    ExternalConfig {
        host: "127.0.0.1".into(),
        port,
        client_id: Some(client_id.into()),
        keep_alive: Duration::from_secs(5),
        max_reconnect_backoff: Duration::from_millis(500),
        ..ExternalConfig::default()
    }
}

async fn start_external(cfg: ExternalConfig) -> BrokerHandle {
    broker::start(&BrokerConfig::External(cfg))
        .await
        .expect("external client starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_flow_against_mosquitto() {
    init_logs();
    let mosquitto = Mosquitto::start();
    let port = mosquitto.port;
    let telemetry = topics::telemetry("dev1").unwrap();
    let status = topics::status("dev1").unwrap();
    let ack = topics::ack("dev1").unwrap();

    // A status retained before the aggregator subscribes...
    let mut agent = Client::new(port, "agent-dev1", None, std::slice::from_ref(&ack))
        .connected(true)
        .await;
    agent.publish(&status, b"online".to_vec(), true).await;
    loop {
        if let Ev::PubAck = agent.next_event("PUBACK of the status").await {
            break;
        }
    }

    let mut h = start_external(external(port, "test-aggregator-flow")).await;
    // ...arrives flagged as retained once the subscription is in place.
    let m = next_inbound(&mut h, "retained status").await;
    assert_eq!(
        m,
        Inbound {
            topic: status.clone(),
            payload: Bytes::from_static(b"online"),
            retained: true
        }
    );

    agent.publish(&telemetry, b"batch-1".to_vec(), false).await;
    let m = next_inbound(&mut h, "telemetry").await;
    assert_eq!(m.topic, telemetry);
    assert_eq!(m.payload.as_ref(), b"batch-1");
    assert!(!m.retained);

    h.outbound
        .publish(ack.clone(), b"ack-3".to_vec(), true)
        .unwrap();
    let p = agent.next_publish(&ack).await;
    assert_eq!(p.payload.as_ref(), b"ack-3");
    let mut late = Client::new(port, "agent-dev1-late", None, std::slice::from_ref(&ack))
        .connected(true)
        .await;
    let p = late.next_publish(&ack).await;
    assert_eq!(p.payload.as_ref(), b"ack-3");
    assert!(p.retain);

    let outbound = h.outbound.clone();
    h.shutdown().await;
    assert!(matches!(
        outbound.publish(ack, b"late".to_vec(), true),
        Err(BrokerError::Closed)
    ));
    drop(mosquitto);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_reconnects_after_mosquitto_restarts() {
    init_logs();
    let mut mosquitto = Mosquitto::start();
    let port = mosquitto.port;
    let telemetry = topics::telemetry("dev-restart").unwrap();
    let ack = topics::ack("dev-restart").unwrap();
    let mut h = start_external(external(port, "test-aggregator-restart")).await;
    let mut agent = Client::new(port, "agent-restart", None, std::slice::from_ref(&ack))
        .connected(true)
        .await;
    publish_until_received(&agent, &mut h, &telemetry, |n| format!("before-{n}")).await;

    // A crash and a restart on the same port: sessions are gone
    // (persistence false), so the aggregator must subscribe again.
    mosquitto.kill();
    let _mosquitto = Mosquitto::start_on(port);
    publish_until_received(&agent, &mut h, &telemetry, |n| format!("after-{n}")).await;

    // Acks flow again too (the agent resubscribed on its CONNACK).
    let end = tokio::time::Instant::now() + DEADLINE;
    'acked: loop {
        assert!(
            tokio::time::Instant::now() < end,
            "no ack after the restart"
        );
        h.outbound
            .publish(ack.clone(), b"ack-after".to_vec(), true)
            .unwrap();
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(ev)) = tokio::time::timeout_at(until, agent.events.recv()).await {
            if let Ev::Publish(p) = ev {
                if p.topic == ack && p.payload.as_ref() == b"ack-after" {
                    break 'acked;
                }
            }
        }
    }
    h.shutdown().await;
}
