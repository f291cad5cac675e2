//! The embedded broker: rumqttd 0.20 in process, isolated on its own threads.
//!
//! ```text
//!  agents --TCP--> [listener thread: current-thread runtime, rumqttd Server]
//!                          |
//!                          v
//!                  [router thread: rumqttd Router]  (cannot be stopped)
//!                          ^ local link (in-process, no TCP)
//!                          v
//!                  [link thread: current-thread runtime]
//!                     consume: LinkRx -> Inbound channel (waits when full)
//!                     publish: Outbound queue -> LinkTx (acks, retained)
//! ```
//!
//! Invariants and traps (see `/work/shared/DEPENDENCIES.md`):
//! * The local link answers every `Notification::Unschedule` with `wake()`
//!   (the async `ready()`); without it the router stops forwarding after
//!   about 200 messages.
//! * The link subscribes before the listener starts, so no client message
//!   can reach the router before our filters exist (events on the router's
//!   channel are handled in order).
//! * While the inbound channel is full, the consumer waits and does not ask
//!   the router for more: messages stay in rumqttd's per-filter log, whose
//!   size is the memory budget (`max-segment-size x max-segment-count`).
//!   Past it rumqttd drops the oldest segment; agents resend what is not
//!   acked.
//! * Per-device ack filters (`outpost/v1/{device}/ack`, one per agent
//!   subscription) get a small fixed budget ([`ACK_SEGMENT_SIZE`] x
//!   [`ACK_SEGMENT_COUNT`]) instead of the telemetry-sized default, or 10,000
//!   agents would be allowed 10,000 x 32 MiB. Acks are cumulative, so an
//!   agent that misses old ones loses nothing; the retained ack is stored
//!   apart from the log.
//! * rumqttd drops an existing connection when a client connects with the
//!   same client id, local links included. Our link's id carries a random
//!   suffix so no agent can take it over by accident or on purpose.
//! * TLS needs rumqttd's "use-rustls" feature, which this build leaves out;
//!   without it rumqttd would silently serve plain MQTT on the "TLS" port, so
//!   a config with `tls` is refused ([`super::BrokerError::TlsNotBuilt`]).
//! * rumqttd has no shutdown API. Shutdown first ends the link thread (no
//!   more consuming; acks already queued are handed to the router, so agents
//!   still connected get them, best effort), then drops the listener's
//!   runtime, which drops every connection task (clients see the socket
//!   close, the port is released). The router thread stays
//!   blocked on its channel until the process exits, holding its memory; it
//!   never sees the dropped connections' DISCONNECT (no last wills fire).
//!   Retained messages and sessions live only in that memory: they do not
//!   survive an aggregator restart.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use outpost_proto::topics::{self, DeviceTopic};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, SegmentConfig, Server,
    ServerSettings,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    BrokerError, BrokerHandle, EmbeddedConfig, Inbound, Outbound, OutboundInner, OutboundMessage,
    INBOUND_CAPACITY, OUTBOUND_CAPACITY, SHUTDOWN_TIMEOUT,
};

/// Segment size of each per-device ack filter's log.
pub const ACK_SEGMENT_SIZE: usize = 4 * 1024;
/// Segments kept per ack filter (2, so a reader that is caught up never
/// sees its segment dropped under it).
pub const ACK_SEGMENT_COUNT: usize = 2;
/// Messages the router hands the local link per read (its QoS 0 window).
pub const ROUTER_MAX_OUTGOING_PACKETS: u64 = 200;
/// QoS 1/2 messages in flight towards one client.
pub const CLIENT_MAX_INFLIGHT: usize = 100;
/// Pause between two accepted connections (smooths a reconnect storm).
pub const NEXT_CONNECTION_DELAY_MS: u64 = 1;
/// How long starting the embedded broker waits for its listener to bind.
pub const LISTENER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Client id prefix of the aggregator's local link; a random suffix follows.
pub const LOCAL_LINK_PREFIX: &str = "outpost-aggregator-local-";
/// Local links: the aggregator's one, added to `max-connections`.
const LOCAL_LINKS: usize = 1;

/// Starts rumqttd as configured (already validated by [`super::start`]).
pub(super) async fn start(cfg: &EmbeddedConfig) -> Result<BrokerHandle, BrokerError> {
    if cfg.tls.is_some() {
        return Err(BrokerError::TlsNotBuilt);
    }
    let router_tx = Router::new(0, router_config(cfg)).spawn();

    let link_id = local_link_id();
    let (mut link_tx, link_rx, _connack) = LinkBuilder::new(&link_id, router_tx.clone())
        .build()
        .map_err(|e| BrokerError::Link(e.to_string()))?;
    for kind in [DeviceTopic::Telemetry, DeviceTopic::Status] {
        link_tx
            .subscribe(topics::all_devices(kind))
            .map_err(|e| BrokerError::Link(e.to_string()))?;
    }

    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let link_cancel = CancellationToken::new();
    let link_rt = runtime("local-link runtime")?;
    let cancel = link_cancel.clone();
    let link_thread = std::thread::Builder::new()
        .name("outpost-broker-link".into())
        .spawn(move || {
            link_rt.block_on(async move {
                tokio::join!(
                    consume(link_rx, inbound_tx, cancel.clone()),
                    publish(link_tx, outbound_rx, cancel),
                );
            });
        })
        .map_err(|source| BrokerError::Runtime {
            what: "local-link thread",
            source,
        })?;

    let mut stop = Stop {
        listener: None,
        link_cancel,
        link_thread: Some(link_thread),
    };
    // On error, dropping `stop` ends the link thread.
    let server = Server::new(server_settings(cfg), router_tx, V4);
    let listener = Listener::start(cfg.listen, server).await?;
    stop.listener = Some(listener);
    info!(
        listen = %cfg.listen,
        max_connections = cfg.max_connections,
        filter_budget_bytes = cfg.filter_budget(),
        auth = !cfg.users.is_empty(),
        link = %link_id,
        "embedded MQTT broker listening"
    );
    Ok(BrokerHandle {
        inbound: inbound_rx,
        outbound: Outbound {
            inner: OutboundInner::Queue(outbound_tx),
        },
        stop: super::Stop::Embedded(stop),
    })
}

fn router_config(cfg: &EmbeddedConfig) -> RouterConfig {
    let ack_segments = HashMap::from([(
        topics::all_devices(DeviceTopic::Ack),
        SegmentConfig {
            max_segment_size: ACK_SEGMENT_SIZE,
            max_segment_count: ACK_SEGMENT_COUNT,
        },
    )]);
    RouterConfig {
        max_connections: cfg.max_connections.saturating_add(LOCAL_LINKS),
        max_outgoing_packet_count: ROUTER_MAX_OUTGOING_PACKETS,
        max_segment_size: cfg.max_segment_size,
        max_segment_count: cfg.max_segment_count,
        custom_segment: Some(ack_segments),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn server_settings(cfg: &EmbeddedConfig) -> ServerSettings {
    let auth = if cfg.users.is_empty() {
        None
    } else {
        Some(
            cfg.users
                .iter()
                .map(|(u, p)| (u.clone(), p.clone()))
                .collect(),
        )
    };
    ServerSettings {
        name: format!("outpost-v4-{}", cfg.listen),
        listen: cfg.listen,
        // Never Some without rumqttd's TLS feature: it would serve plain MQTT.
        tls: None,
        next_connection_delay_ms: NEXT_CONNECTION_DELAY_MS,
        connections: ConnectionSettings {
            // Validated: at most u16::MAX milliseconds.
            connection_timeout_ms: u16::try_from(cfg.connection_timeout.as_millis())
                .unwrap_or(u16::MAX),
            max_payload_size: cfg.max_payload_size,
            max_inflight_count: CLIENT_MAX_INFLIGHT,
            auth,
            external_auth: None,
            dynamic_filters: false,
        },
    }
}

/// `outpost-aggregator-local-{16 random hex digits}`: unguessable, so no
/// client can connect with our id and make rumqttd drop our link.
fn local_link_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{LOCAL_LINK_PREFIX}{:016x}", h.finish())
}

fn runtime(what: &'static str) -> Result<tokio::runtime::Runtime, BrokerError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| BrokerError::Runtime { what, source })
}

/// Router -> inbound channel. Waits (without asking the router for more)
/// while the channel is full.
async fn consume(mut rx: LinkRx, tx: mpsc::Sender<Inbound>, cancel: CancellationToken) {
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            n = rx.next() => n,
        };
        match next {
            Ok(Some(Notification::Forward(f))) => {
                let Ok(topic) = String::from_utf8(f.publish.topic.to_vec()) else {
                    // rumqttd validates topics as UTF-8; kept for safety.
                    warn!("message with a non-UTF-8 topic ignored");
                    continue;
                };
                let msg = Inbound {
                    topic,
                    payload: f.publish.payload,
                    retained: f.publish.retain,
                };
                let sent = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    r = tx.send(msg) => r,
                };
                if sent.is_err() {
                    debug!("inbound channel closed; local link stops consuming");
                    break;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                // The router paused us (our buffer hit its limit): ask for more.
                if let Err(e) = rx.wake().await {
                    error!(error = %e, "embedded broker router is gone; ingest stops");
                    break;
                }
            }
            Ok(Some(Notification::Disconnect(..))) => {
                error!("embedded broker disconnected the aggregator's local link; ingest stops");
                break;
            }
            // Acks of our SUBSCRIBEs, and wake-ups with nothing new.
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => {
                if !cancel.is_cancelled() {
                    error!(error = %e, "local link to the embedded broker failed; ingest stops");
                }
                break;
            }
        }
    }
}

/// Outbound queue -> router. A retained QoS 0 publish from the local link
/// goes straight into the router's log and retained store. On cancel, what
/// is already queued is still handed to the router (in order), then the
/// queue closes and [`Outbound::publish`] fails with
/// [`BrokerError::Closed`].
async fn publish(
    mut link_tx: LinkTx,
    mut rx: mpsc::Receiver<OutboundMessage>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                rx.close();
                while let Some(m) = rx.recv().await {
                    if !send(&mut link_tx, m).await {
                        break;
                    }
                }
                break;
            }
            m = rx.recv() => m,
        };
        let Some(m) = msg else { break };
        if !send(&mut link_tx, m).await {
            break;
        }
    }
}

async fn send(link_tx: &mut LinkTx, m: OutboundMessage) -> bool {
    let publish = Publish::new(Bytes::from(m.topic), Bytes::from(m.payload), m.retain);
    match link_tx.send(Packet::Publish(publish, None)).await {
        Ok(_) => true,
        Err(e) => {
            error!(error = %e, "embedded broker router is gone; acks stop");
            false
        }
    }
}

/// A rumqttd listener on its own thread and runtime.
#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Binds and serves `settings.listen`; returns once bound (or with the
    /// bind error).
    async fn start(addr: SocketAddr, mut server: Server<V4>) -> Result<Listener, BrokerError> {
        let rt = runtime("listener runtime")?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name(format!("outpost-broker-listen-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    let serve = server.start(LinkType::Remote);
                    tokio::pin!(serve);
                    // rumqttd binds inside `start` before its first await
                    // that can pend (the accept loop): after one poll the
                    // socket is bound, or the bind error is ready.
                    let first =
                        std::future::poll_fn(|cx| Poll::Ready(serve.as_mut().poll(cx))).await;
                    match first {
                        Poll::Ready(r) => {
                            let reason = match r {
                                Err(e) => e.to_string(),
                                Ok(()) => "the listener stopped at once".to_owned(),
                            };
                            let _ = ready_tx.send(Err(reason));
                            return;
                        }
                        Poll::Pending => {
                            let _ = ready_tx.send(Ok(()));
                        }
                    }
                    tokio::select! {
                        r = &mut serve => {
                            error!(listen = %addr, result = ?r.err().map(|e| e.to_string()),
                                "embedded broker listener stopped; agents cannot connect");
                        }
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime drops every connection task: clients
                // see their socket close and the port is released.
                drop(rt);
            })
            .map_err(|source| BrokerError::Runtime {
                what: "listener thread",
                source,
            })?;
        let mut listener = Listener {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match tokio::time::timeout(LISTENER_START_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(listener),
            Ok(Ok(Err(reason))) => {
                listener.stop_and_join().await;
                Err(BrokerError::Listen { addr, reason })
            }
            Ok(Err(_)) => {
                listener.stop_and_join().await;
                Err(BrokerError::Listen {
                    addr,
                    reason: "the listener thread ended before binding".into(),
                })
            }
            Err(_) => {
                listener.signal();
                Err(BrokerError::Listen {
                    addr,
                    reason: format!("not bound after {LISTENER_START_TIMEOUT:?}"),
                })
            }
        }
    }

    fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    async fn stop_and_join(&mut self) {
        self.signal();
        if let Some(thread) = self.thread.take() {
            join(thread, "listener").await;
        }
        debug!(listen = %self.addr, "embedded broker listener stopped");
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.signal();
    }
}

/// What [`super::BrokerHandle::shutdown`] needs to stop the embedded broker.
#[derive(Debug)]
pub(super) struct Stop {
    listener: Option<Listener>,
    link_cancel: CancellationToken,
    link_thread: Option<std::thread::JoinHandle<()>>,
}

impl Stop {
    /// Link first (stop consuming, hand the queued acks to the router while
    /// agents are still connected), then the listener.
    pub(super) async fn shutdown(mut self) {
        self.link_cancel.cancel();
        if let Some(thread) = self.link_thread.take() {
            join(thread, "local link").await;
        }
        if let Some(mut l) = self.listener.take() {
            l.stop_and_join().await;
        }
        info!("embedded MQTT broker stopped (its router thread stays idle until exit)");
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        // Without `shutdown`: stop everything, wait for nothing.
        self.link_cancel.cancel();
    }
}

/// Joins a broker thread off the async runtime, bounded by
/// [`SHUTDOWN_TIMEOUT`].
async fn join(thread: std::thread::JoinHandle<()>, what: &'static str) {
    let joined = tokio::task::spawn_blocking(move || thread.join());
    match tokio::time::timeout(SHUTDOWN_TIMEOUT, joined).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(_))) => error!(thread = what, "embedded broker thread panicked"),
        Ok(Err(e)) => warn!(thread = what, error = %e, "cannot join embedded broker thread"),
        Err(_) => warn!(
            thread = what,
            timeout = ?SHUTDOWN_TIMEOUT,
            "embedded broker thread did not stop in time; left behind"
        ),
    }
}
