//! The `mqtt` sink: each notification as JSON at QoS 1 on
//! `{topic-prefix}/{severity}/{rule}`, by default on the aggregator's own
//! broker. `send` returns `Ok` only once the broker's PUBACK for that very
//! publish arrived: that is what lets the outbox mark the row delivered.
//!
//! # Design
//!
//! One rumqttc 0.25 client per sink, driven by one tokio task (the
//! *driver*) that owns the `EventLoop`. rumqttc does not say which publish a
//! PUBACK acknowledges, so the sink is built so that the question has only
//! one answer:
//!
//! * **One publish at a time.** Sends are serialised by a tokio mutex. A
//!   send registers itself as *the waiting send* (under a std mutex shared
//!   with the driver) and queues its publish in the same critical section,
//!   and only while the connection is up.
//! * **Connection epochs.** Everything rumqttc holds for a connection is
//!   thrown away when it ends: on any `poll()` error, on shutdown and when a
//!   send gives up, the driver marks the link down (under the same mutex, so
//!   no send can queue a publish after that), fails the waiting send, and
//!   calls `EventLoop::clean()` (drops the socket, drains rumqttc's request
//!   channel), then clears rumqttc's pending queue, buffered events and
//!   collision slot. `clean_session = true`: the broker keeps nothing for us
//!   either, and rumqttc never resends an old publish on its own (the outbox
//!   retries, with the same notification id).
//! * **A send that gives up ends the connection.** When a send times out
//!   (or its future is dropped) after its publish was queued, the link is
//!   marked down and the driver drops the connection and reconnects. So at
//!   most one publish of ours is ever unacknowledged on a connection, and no
//!   late PUBACK of an abandoned publish can arrive on the connection a later
//!   send uses. (A broker that does not PUBACK within the sink's timeout is
//!   not working; reconnecting is cheap.)
//! * **Matching.** The waiting send learns its packet id from the
//!   `Outgoing::Publish(pkid)` event that follows its request (the only
//!   publish on the connection), and completes on the
//!   `Incoming::PubAck` with that packet id, never on an earlier one. rumqttc
//!   records an incoming PUBACK before it sends a publish that was waiting
//!   for that packet id, so even a packet-id collision could not mix them up.
//! * **Reconnect.** After a `poll()` error the driver sleeps with jittered
//!   exponential backoff ([`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`]), then
//!   polls again, which reconnects; it never spins while the broker is down.
//!   A send during an outage waits for the connection and fails after the
//!   sink's timeout, with the last connection error in its message. The
//!   timeout includes waiting for the turn behind other sends.
//! * **Shutdown.** The driver stops when the cancellation token given to
//!   [`MqttSink::new`] is cancelled or the sink is dropped: it fails the
//!   waiting send and sends a DISCONNECT, bounded by [`DISCONNECT_TIMEOUT`].
//!
//! Throughput is one publish per broker round trip, plenty for alerts.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::config::MqttSinkConfig;
use super::{AlertSink, BuildError, Notification, SendError, SendFuture};

/// MQTT keep-alive of the sink's connection.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Longest wait for TCP connect plus CONNACK (rumqttc takes whole seconds).
pub const CONNECT_TIMEOUT_SECS: u64 = 5;
/// First reconnect delay after a connection error (jittered).
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait for the DISCONNECT at shutdown.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest JSON notification the sink publishes; a larger one fails
/// (without touching the connection) and is retried until dead-lettered.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Largest MQTT packet: payload, a topic of at most 65,535 bytes with its
/// length, packet id and fixed header.
pub const MAX_PACKET: usize = MAX_PAYLOAD + 2 + u16::MAX as usize + 2 + 5;
/// Largest packet accepted from the broker (we subscribe to nothing; it
/// sends CONNACK, PUBACK and PINGRESP).
pub const MAX_INCOMING_PACKET: usize = 64 * 1024;
/// rumqttc's QoS 1 window. We keep at most one publish in flight; this only
/// sizes rumqttc's packet-id table.
pub const INFLIGHT: u16 = 10;
/// rumqttc's request channel (at most one publish and one DISCONNECT are
/// ever in it).
pub const REQUEST_CAPACITY: usize = 10;

/// `{prefix}/{severity}/{rule}`.
pub fn topic(prefix: &str, n: &Notification) -> String {
    format!("{prefix}/{}/{}", n.severity_name(), n.rule)
}

/// The topic for `n`, refused when the rule name would not be one topic
/// level (rules validate their names, but a publish on a wildcard or on
/// another level must be impossible).
fn checked_topic(prefix: &str, n: &Notification) -> Result<String, SendError> {
    let rule = n.rule.as_str();
    if rule.is_empty() || rule.contains(['+', '#', '/', '\0']) {
        return Err(SendError::new(format!(
            "rule name {rule:?} cannot be an MQTT topic level (empty, or contains '+', '#', '/' or NUL)"
        )));
    }
    let t = topic(prefix, n);
    if t.len() > usize::from(u16::MAX) {
        return Err(SendError::new(format!(
            "topic of {} bytes is longer than MQTT allows",
            t.len()
        )));
    }
    Ok(t)
}

/// See the module documentation.
pub struct MqttSink {
    name: String,
    broker: String,
    client_id: String,
    prefix: String,
    retain: bool,
    timeout: Duration,
    client: AsyncClient,
    shared: Arc<Shared>,
    /// One send at a time (see the module documentation).
    turn: tokio::sync::Mutex<()>,
    /// Stops the driver when the sink is dropped.
    _stop: DropGuard,
}

impl fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSink")
            .field("name", &self.name)
            .field("broker", &self.broker)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.prefix)
            .field("retain", &self.retain)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What the sink and the driver share.
struct Shared {
    link: Mutex<Link>,
    /// Bumped whenever `link` changes in a way a waiting send cares about.
    changed: watch::Sender<u64>,
    /// A send gave up: drop the connection.
    reset: Notify,
}

/// The connection as the sends see it.
#[derive(Default)]
struct Link {
    /// Connected and CONNACKed; publishes may be queued.
    up: bool,
    /// The driver has ended.
    stopped: bool,
    /// Why the last connection attempt or connection failed.
    last_error: Option<String>,
    /// The send waiting for its PUBACK.
    waiting: Option<Waiting>,
    /// Number of the next send.
    next_seq: u64,
}

struct Waiting {
    seq: u64,
    /// Learnt from `Outgoing::Publish`.
    pkid: Option<u16>,
    done: oneshot::Sender<Result<(), String>>,
}

impl Shared {
    /// The link; a panic elsewhere while holding the lock does not make
    /// the state unusable (every update is a few plain assignments).
    fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

impl MqttSink {
    /// A sink called `name` publishing to `cfg.host:cfg.port`, or to
    /// `default_broker` (the aggregator's own broker) for what is unset.
    /// Spawns the event-loop task (so it must be called inside a tokio
    /// runtime); it stops when `cancel` is cancelled and when the sink is
    /// dropped. `timeout` bounds one [`AlertSink::send`].
    pub fn new(
        name: &str,
        cfg: &MqttSinkConfig,
        default_broker: (String, u16),
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<MqttSink, BuildError> {
        let err = |m: String| BuildError::new(name, m);
        let host = cfg.host.clone().unwrap_or(default_broker.0);
        let port = cfg.port.unwrap_or(default_broker.1);
        if host.is_empty() {
            return Err(err("broker host is empty".into()));
        }
        if port == 0 {
            return Err(err("broker port is 0".into()));
        }
        let prefix = cfg.topic_prefix.clone();
        if prefix.is_empty() || prefix.contains(['+', '#', '\0']) || prefix.ends_with('/') {
            return Err(err(format!(
                "topic prefix {prefix:?} must be a topic without wildcards or a trailing '/'"
            )));
        }
        let client_id = cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("outpost-alerts-{name}"));
        if client_id.is_empty() {
            return Err(err("client id is empty".into()));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| err(format!("needs a tokio runtime: {e}")))?;

        let mut opts = MqttOptions::new(client_id.clone(), host.clone(), port);
        opts.set_keep_alive(KEEP_ALIVE);
        opts.set_clean_session(true);
        opts.set_inflight(INFLIGHT);
        opts.set_max_packet_size(MAX_INCOMING_PACKET, MAX_PACKET);
        if let Some(user) = &cfg.username {
            let pass = cfg.password.as_ref().map(|p| p.expose()).unwrap_or("");
            opts.set_credentials(user.clone(), pass);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
        let mut net = eventloop.network_options();
        net.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        eventloop.set_network_options(net);

        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            link: Mutex::new(Link::default()),
            changed,
            reset: Notify::new(),
        });
        let stop = cancel.child_token();
        let broker = format!("{host}:{port}");
        let driver = Driver {
            sink: name.to_owned(),
            broker: broker.clone(),
            eventloop,
            client: client.clone(),
            shared: shared.clone(),
            cancel: stop.clone(),
        };
        info!(sink = %name, broker = %broker, client_id = %client_id, "MQTT alert sink starting");
        runtime.spawn(driver.run());
        Ok(MqttSink {
            name: name.to_owned(),
            broker,
            client_id,
            prefix,
            retain: cfg.retain,
            timeout,
            client,
            shared,
            turn: tokio::sync::Mutex::new(()),
            _stop: stop.drop_guard(),
        })
    }

    /// Waits for the connection, queues the publish (then sets `queued`)
    /// and waits for its PUBACK. Unbounded: the caller bounds it.
    async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        queued: &AtomicBool,
    ) -> Result<(), SendError> {
        let _turn = self.turn.lock().await;
        let mut changes = self.shared.changed.subscribe();
        let (seq, done) = loop {
            {
                let mut link = self.shared.lock();
                if link.stopped {
                    return Err(SendError::new("MQTT sink stopped"));
                }
                if link.up {
                    if link.waiting.is_some() {
                        // Cannot happen: sends take turns and every end of
                        // a send clears its entry.
                        return Err(SendError::new("another publish is still waiting"));
                    }
                    if let Err(e) =
                        self.client
                            .try_publish(topic, QoS::AtLeastOnce, self.retain, payload)
                    {
                        return Err(SendError::new(format!("cannot queue the publish: {e}")));
                    }
                    let seq = link.next_seq;
                    link.next_seq = seq.wrapping_add(1);
                    let (tx, rx) = oneshot::channel();
                    link.waiting = Some(Waiting {
                        seq,
                        pkid: None,
                        done: tx,
                    });
                    queued.store(true, Ordering::Release);
                    break (seq, rx);
                }
            }
            // Subscribed before the check, so a change after it wakes us.
            if changes.changed().await.is_err() {
                return Err(SendError::new("MQTT sink stopped"));
            }
        };
        let _abandon = Abandon {
            shared: &self.shared,
            seq,
        };
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(SendError::new(m)),
            Err(_) => Err(SendError::new("MQTT sink stopped")),
        }
    }
}

/// Ends the connection when a send stops waiting for its PUBACK before it
/// came (timeout, or the caller dropped the future). Does nothing when the
/// driver already settled the send.
struct Abandon<'a> {
    shared: &'a Shared,
    seq: u64,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        let mut link = self.shared.lock();
        if link.waiting.as_ref().is_some_and(|w| w.seq == self.seq) {
            link.waiting = None;
            if link.up {
                link.up = false;
                drop(link);
                self.shared.bump();
                self.shared.reset.notify_one();
            }
        }
    }
}

impl AlertSink for MqttSink {
    fn send<'a>(&'a self, n: &'a Notification) -> SendFuture<'a> {
        Box::pin(async move {
            let topic = checked_topic(&self.prefix, n)?;
            let payload = serde_json::to_vec(n)
                .map_err(|e| SendError::new(format!("cannot encode the notification: {e}")))?;
            if payload.len() > MAX_PAYLOAD {
                return Err(SendError::new(format!(
                    "notification of {} bytes exceeds the MQTT sink's limit of {MAX_PAYLOAD}",
                    payload.len()
                )));
            }
            let queued = AtomicBool::new(false);
            let publish = self.publish(topic, payload, &queued);
            match tokio::time::timeout(self.timeout, publish).await {
                Ok(r) => r,
                Err(_) if queued.load(Ordering::Acquire) => Err(SendError::new(format!(
                    "no PUBACK from MQTT broker {} within {:?}",
                    self.broker, self.timeout
                ))),
                Err(_) => {
                    let link = self.shared.lock();
                    Err(SendError::new(match (&link.last_error, link.up) {
                        (_, true) => format!(
                            "no turn to publish to MQTT broker {} within {:?} (earlier publishes were waiting for their PUBACK)",
                            self.broker, self.timeout
                        ),
                        (Some(e), false) => format!(
                            "not connected to MQTT broker {} within {:?}: {e}",
                            self.broker, self.timeout
                        ),
                        (None, false) => format!(
                            "not connected to MQTT broker {} within {:?}",
                            self.broker, self.timeout
                        ),
                    }))
                }
            }
        })
    }
}

/// The event-loop task.
struct Driver {
    sink: String,
    broker: String,
    eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut failures: u64 = 0;
        loop {
            let event = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                // Cancelling `poll()` here is harmless: the connection is
                // thrown away right after.
                _ = self.shared.reset.notified() => {
                    warn!(
                        sink = %self.sink,
                        broker = %self.broker,
                        "no PUBACK in time; dropping the MQTT connection and starting a new session"
                    );
                    self.discard("connection reset after a PUBACK timeout");
                    continue;
                }
                e = self.eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    // A new session: nothing of the last one may be sent.
                    self.eventloop.pending.clear();
                    self.eventloop.state.collision = None;
                    if ack.session_present {
                        warn!(sink = %self.sink, broker = %self.broker, "broker resumed a session although we asked for a clean one");
                    }
                    if failures > 0 {
                        info!(sink = %self.sink, broker = %self.broker, failures, "MQTT alert sink connected");
                    } else {
                        debug!(sink = %self.sink, broker = %self.broker, "MQTT alert sink connected");
                    }
                    backoff = MIN_BACKOFF;
                    failures = 0;
                    {
                        let mut link = self.shared.lock();
                        link.up = true;
                        link.last_error = None;
                    }
                    self.shared.bump();
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut link = self.shared.lock();
                    match link.waiting.as_mut() {
                        Some(w) if w.pkid.is_none() => w.pkid = Some(pkid),
                        _ => debug!(sink = %self.sink, pkid, "publish without a waiting send"),
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let mut link = self.shared.lock();
                    let ours = link
                        .waiting
                        .as_ref()
                        .is_some_and(|w| w.pkid == Some(ack.pkid));
                    if ours {
                        if let Some(w) = link.waiting.take() {
                            // The send may have given up this instant.
                            let _ = w.done.send(Ok(()));
                        }
                    } else {
                        debug!(sink = %self.sink, pkid = ack.pkid, "PUBACK of no waiting send ignored");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let why = e.to_string();
                    if failures == 0 {
                        warn!(
                            sink = %self.sink,
                            broker = %self.broker,
                            error = %why,
                            "MQTT alert sink not connected; retrying with backoff"
                        );
                    } else {
                        debug!(sink = %self.sink, broker = %self.broker, error = %why, failures, "MQTT connect failed");
                    }
                    failures += 1;
                    self.discard(&why);
                    let delay = jitter(backoff);
                    backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                    tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.stop().await;
    }

    /// Marks the link down, fails the waiting send and forgets everything
    /// rumqttc holds for the connection (see the module documentation).
    fn discard(&mut self, why: &str) {
        {
            let mut link = self.shared.lock();
            link.up = false;
            link.last_error = Some(why.to_owned());
            if let Some(w) = link.waiting.take() {
                let _ = w.done.send(Err(format!(
                    "connection to MQTT broker {} lost before the PUBACK: {why}",
                    self.broker
                )));
            }
        }
        self.shared.bump();
        // No publish can be queued from here until the next CONNACK.
        self.eventloop.clean();
        self.eventloop.pending.clear();
        self.eventloop.state.events.clear();
        self.eventloop.state.collision = None;
    }

    /// Fails the waiting send, says DISCONNECT when connected, and marks
    /// the sink stopped.
    async fn stop(&mut self) {
        let connected = {
            let mut link = self.shared.lock();
            let up = link.up;
            link.up = false;
            link.stopped = true;
            if let Some(w) = link.waiting.take() {
                let _ = w.done.send(Err("MQTT sink stopped".to_owned()));
            }
            up
        };
        self.shared.bump();
        if connected && self.client.try_disconnect().is_ok() {
            let deadline = tokio::time::Instant::now() + DISCONNECT_TIMEOUT;
            loop {
                match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                }
            }
        }
        info!(sink = %self.sink, broker = %self.broker, "MQTT alert sink stopped");
    }
}

/// `d` scaled by a random factor in [0.5, 1.0].
fn jitter(d: Duration) -> Duration {
    let r = RandomState::new().build_hasher().finish();
    d.mul_f64(0.5 + (r % 1001) as f64 / 2000.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::alerts::config::{Secret, DEFAULT_MQTT_TOPIC_PREFIX};
    use crate::rules::model::{AlertState, Severity};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    fn n(rule: &str) -> Notification {
        Notification {
            schema: crate::alerts::SCHEMA.into(),
            id: "abc-1".into(),
            fingerprint: "abc".into(),
            number: 1,
            repeat: 0,
            state: AlertState::Firing,
            rule: rule.into(),
            device: "gw-1".into(),
            sensor: "temp".into(),
            severity: Severity::Critical,
            labels: Default::default(),
            summary: "hot".into(),
            value: Some(91.5),
            threshold: Some(90.0),
            event_time_ms: 1_700_000_000_000,
            processing_time_ms: 1_700_000_000_100,
            active_since_ms: Some(1_700_000_000_000),
            queued_ms: 1_700_000_000_200,
            history_id: 1,
        }
    }

    fn cfg(port: u16) -> MqttSinkConfig {
        MqttSinkConfig {
            host: Some("127.0.0.1".into()),
            port: Some(port),
            client_id: None,
            username: Some("alerts".into()),
            password: Some(Secret::new("hunter2")),
            topic_prefix: DEFAULT_MQTT_TOPIC_PREFIX.into(),
            retain: false,
        }
    }

    #[test]
    fn topics_and_bad_levels() {
        assert_eq!(
            topic("outpost/v1/alerts", &n("boiler-hot")),
            "outpost/v1/alerts/critical/boiler-hot"
        );
        assert!(checked_topic("p", &n("ok_rule-1")).is_ok());
        for bad in ["a+b", "a#", "a/b", "a\0b", ""] {
            let e = checked_topic("p", &n(bad)).unwrap_err();
            assert!(e.0.contains("topic level"), "{e}");
        }
    }

    #[tokio::test]
    async fn config_errors_and_no_password_in_debug() {
        let cancel = CancellationToken::new();
        let d = || ("127.0.0.1".to_owned(), 1883);
        let t = Duration::from_secs(1);
        let mut c = cfg(1883);
        c.topic_prefix = "a/#".into();
        assert!(MqttSink::new("m", &c, d(), t, cancel.clone()).is_err());
        let mut c = cfg(1883);
        c.client_id = Some(String::new());
        assert!(MqttSink::new("m", &c, d(), t, cancel.clone()).is_err());
        let mut c = cfg(1883);
        c.port = None;
        c.host = None;
        let s = MqttSink::new("m", &c, ("10.0.0.1".into(), 1884), t, cancel.clone()).unwrap();
        let dbg = format!("{s:?}");
        assert!(
            dbg.contains("10.0.0.1:1884") && dbg.contains("outpost-alerts-m"),
            "{dbg}"
        );
        assert!(!dbg.contains("hunter2"), "{dbg}");
        cancel.cancel();
    }

    /// What the fake broker does with a PUBLISH.
    #[derive(Clone, Copy)]
    enum Ack {
        Now,
        Never,
    }

    /// One MQTT packet: (first byte, body).
    async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let first = s.read_u8().await.ok()?;
        let mut len = 0usize;
        for shift in [0, 7, 14, 21] {
            let b = s.read_u8().await.ok()?;
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.ok()?;
        Some((first, body))
    }

    /// A minimal MQTT 3.1.1 broker: CONNACK, PINGRESP, and for each
    /// PUBLISH what `plan` says (in order; the last entry repeats).
    /// Reports (connection number, topic, pkid) of every PUBLISH.
    async fn fake_broker(plan: Vec<Ack>) -> (u16, mpsc::UnboundedReceiver<(usize, String, u16)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut publishes = 0usize;
            let mut conn = 0usize;
            while let Ok((mut s, _)) = listener.accept().await {
                conn += 1;
                // One connection at a time: the client has at most one.
                while let Some((first, body)) = read_packet(&mut s).await {
                    match first >> 4 {
                        1 => {
                            let _ = s.write_all(&[0x20, 2, 0, 0]).await;
                        }
                        3 => {
                            let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                            let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
                            let pkid = u16::from_be_bytes([body[2 + tlen], body[3 + tlen]]);
                            let _ = tx.send((conn, topic, pkid));
                            let ack = plan[publishes.min(plan.len() - 1)];
                            publishes += 1;
                            if let Ack::Now = ack {
                                let [hi, lo] = pkid.to_be_bytes();
                                let _ = s.write_all(&[0x40, 2, hi, lo]).await;
                            }
                        }
                        12 => {
                            let _ = s.write_all(&[0xd0, 0]).await;
                        }
                        _ => {}
                    }
                }
            }
        });
        (port, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unacked_publish_fails_and_is_not_resent_and_its_connection_is_dropped() {
        let (port, mut seen) = fake_broker(vec![Ack::Never, Ack::Now]).await;
        let cancel = CancellationToken::new();
        let timeout = Duration::from_millis(1500);
        let sink =
            MqttSink::new("t", &cfg(port), ("x".into(), 1), timeout, cancel.clone()).unwrap();
        let started = Instant::now();
        let e = sink.send(&n("first")).await.unwrap_err();
        assert!(e.0.contains("no PUBACK"), "{e}");
        assert!(started.elapsed() < timeout * 10, "{:?}", started.elapsed());
        let (c1, t1, _) = seen.recv().await.unwrap();
        assert_eq!((c1, t1.as_str()), (1, "outpost/v1/alerts/critical/first"));

        // The next send goes out on a new connection and succeeds on its
        // own PUBACK; the abandoned publish is never sent again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match sink.send(&n("second")).await {
                Ok(()) => break,
                Err(e) => assert!(Instant::now() < deadline, "never delivered: {e}"),
            }
        }
        let mut later = Vec::new();
        while let Ok(p) = seen.try_recv() {
            later.push(p);
        }
        assert!(!later.is_empty());
        for (conn, topic, _) in &later {
            assert!(
                *conn >= 2,
                "published again on the old connection: {later:?}"
            );
            assert!(topic.ends_with("/second"), "old publish resent: {later:?}");
        }
        cancel.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_and_bad_topics_fail_without_publishing() {
        let (port, mut seen) = fake_broker(vec![Ack::Now]).await;
        let cancel = CancellationToken::new();
        let sink = MqttSink::new(
            "t",
            &cfg(port),
            ("x".into(), 1),
            Duration::from_secs(30),
            cancel.clone(),
        )
        .unwrap();
        let mut big = n("big");
        big.summary = "x".repeat(MAX_PAYLOAD);
        assert!(sink.send(&big).await.unwrap_err().0.contains("exceeds"));
        assert!(sink.send(&n("a/b")).await.is_err());
        sink.send(&n("fine")).await.unwrap();
        let (conn, topic, _) = seen.recv().await.unwrap();
        assert_eq!(
            (conn, topic.as_str()),
            (1, "outpost/v1/alerts/critical/fine")
        );
        assert!(seen.try_recv().is_err(), "only the valid one was published");
        cancel.cancel();
    }
}
