//! The external broker mode: a rumqttc 0.25 client of an existing broker
//! (Mosquitto, EMQX, HiveMQ), driven by one tokio task.
//!
//! * Stable client id and `clean-session = false` (default), so the broker
//!   keeps our subscriptions and queues messages while we are away.
//! * On every CONNACK without a session, the subscriptions
//!   (`outpost/v1/+/telemetry`, `outpost/v1/+/status`) are put at the front
//!   of rumqttc's pending queue: sent first, and never stuck behind a full
//!   request channel (this task is the one that drains it).
//! * rumqttc has no reconnect backoff: after a `poll()` error we sleep with
//!   jittered exponential backoff ([`MIN_RECONNECT_BACKOFF`] doubling up to
//!   `max-reconnect-backoff`), then poll again, which reconnects.
//! * Queued outbound publishes (acks, alerts) are kept across reconnects:
//!   they are small, cumulative and retained, so a late one is harmless.
//! * Inbound publishes are forwarded with `send().await`: while ingest's
//!   channel is full this task does not poll, so rumqttc sends no PINGREQ.
//!   That is the backpressure: the broker holds further messages for our
//!   session. If the wait passes 1.5 x keep-alive the broker drops the
//!   connection; we log a WARN at half the keep-alive and reconnect as soon
//!   as ingest catches up. The alternative (keep polling and buffer here)
//!   would only move the unbounded queue into this process. rumqttc acks a
//!   QoS 1 message (PUBACK) when it reads it, before ingest has it: a message
//!   in our channel at a crash is lost for the broker, and the agent resends
//!   it because no application ack covered it.
//! * Shutdown: the queued publishes go out, then a clean DISCONNECT, bounded
//!   by [`DISCONNECT_TIMEOUT`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::topics::{self, DeviceTopic};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, Request,
    StateError, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    jitter, BrokerError, BrokerHandle, ExternalConfig, Inbound, Outbound, OutboundInner,
    INBOUND_CAPACITY, MIN_RECONNECT_BACKOFF, OUTBOUND_CAPACITY, SHUTDOWN_TIMEOUT,
};

/// QoS 1 publishes (acks) in flight towards the broker.
pub const OUTBOUND_INFLIGHT: u16 = 100;
/// What an MQTT PUBLISH carries besides its payload, at most: topic length
/// prefix, a 65,535-byte topic and the packet id.
pub const PACKET_HEADROOM: usize = 2 + u16::MAX as usize + 2;
/// Longest wait for the queued publishes and the DISCONNECT at shutdown.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Builds the client and starts its event-loop task (config validated by
/// [`super::start`]).
pub(super) fn start(cfg: &ExternalConfig) -> Result<BrokerHandle, BrokerError> {
    let client_id = cfg.client_id();
    let mut opts = MqttOptions::new(client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_session(cfg.clean_session);
    opts.set_inflight(OUTBOUND_INFLIGHT);
    let max_packet = cfg.max_payload_size.saturating_add(PACKET_HEADROOM);
    opts.set_max_packet_size(max_packet, max_packet);
    if let Some(user) = &cfg.username {
        opts.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(tls) = &cfg.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| BrokerError::TlsFile {
                path: p.display().to_string(),
                source,
            })
        };
        let ca = read(&tls.ca_file)?;
        let client_auth = match (&tls.client_cert, &tls.client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        install_crypto_provider();
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            },
        ));
    }
    let (client, eventloop) = AsyncClient::new(opts, OUTBOUND_CAPACITY);
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let cancel = CancellationToken::new();
    let stopped = Arc::new(AtomicBool::new(false));
    let qos = match cfg.subscribe_qos {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    };
    let driver = Driver {
        eventloop,
        client: client.clone(),
        inbound: inbound_tx,
        filters: [DeviceTopic::Telemetry, DeviceTopic::Status]
            .into_iter()
            .map(|k| SubscribeFilter::new(topics::all_devices(k), qos))
            .collect(),
        broker: format!("{}:{}", cfg.host, cfg.port),
        client_id,
        keep_alive: cfg.keep_alive,
        max_backoff: cfg.max_reconnect_backoff,
        cancel: cancel.clone(),
        stopped: stopped.clone(),
    };
    info!(
        broker = %driver.broker,
        client_id = %driver.client_id,
        clean_session = cfg.clean_session,
        tls = cfg.tls.is_some(),
        partition_index = cfg.partition.index,
        partition_count = cfg.partition.count,
        "connecting to the external MQTT broker"
    );
    let task = tokio::spawn(driver.run());
    Ok(BrokerHandle {
        inbound: inbound_rx,
        outbound: Outbound {
            inner: OutboundInner::Client { client, stopped },
        },
        stop: super::Stop::External(Stop {
            cancel,
            task: Some(task),
        }),
    })
}

/// Installs rustls' `ring` provider as the process default (rustls panics
/// at the first handshake when none, or two, are available). Harmless when
/// already installed.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The event-loop task's state.
struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    inbound: mpsc::Sender<Inbound>,
    filters: Vec<SubscribeFilter>,
    broker: String,
    client_id: String,
    keep_alive: Duration,
    max_backoff: Duration,
    cancel: CancellationToken,
    stopped: Arc<AtomicBool>,
}

/// What became of one inbound message.
enum Forwarded {
    Yes,
    /// Shutdown requested while waiting.
    Cancelled,
    /// Ingest dropped the receiver.
    Closed,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = MIN_RECONNECT_BACKOFF;
        let mut connected = false;
        let mut failures: u64 = 0;
        loop {
            let event = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                e = self.eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    backoff = MIN_RECONNECT_BACKOFF;
                    failures = 0;
                    info!(
                        broker = %self.broker,
                        session_present = ack.session_present,
                        "connected to the external MQTT broker"
                    );
                    if !ack.session_present {
                        self.eventloop
                            .pending
                            .push_front(Request::Subscribe(Subscribe::new_many(
                                self.filters.clone(),
                            )));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        error!(
                            broker = %self.broker,
                            codes = ?ack.return_codes,
                            "the broker refused our subscriptions (check its ACL); no telemetry will arrive"
                        );
                    } else {
                        debug!(broker = %self.broker, "subscribed to the device topics");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let msg = Inbound {
                        topic: p.topic,
                        payload: p.payload,
                        retained: p.retain,
                    };
                    match forward(
                        &self.inbound,
                        msg,
                        self.keep_alive,
                        &self.cancel,
                        &self.broker,
                    )
                    .await
                    {
                        Forwarded::Yes => {}
                        Forwarded::Cancelled => break,
                        Forwarded::Closed => {
                            debug!("inbound channel closed; disconnecting from the broker");
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.log_failure(&e, connected, failures);
                    connected = false;
                    failures += 1;
                    let delay = jitter(backoff);
                    backoff = (backoff * 2).min(self.max_backoff);
                    tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if connected {
            self.disconnect().await;
        }
        self.stopped.store(true, Ordering::Release);
        info!(broker = %self.broker, "external MQTT broker client stopped");
    }

    fn log_failure(&self, e: &ConnectionError, connected: bool, failures: u64) {
        match e {
            ConnectionError::MqttState(StateError::Deserialization(
                rumqttc::Error::PayloadSizeLimitExceeded(size),
            )) => error!(
                broker = %self.broker,
                size,
                "a message exceeds max-payload-size; the broker will redeliver it at every \
                 reconnect: set the broker's own size limit (Mosquitto message_size_limit) to match"
            ),
            ConnectionError::ConnectionRefused(code) if failures == 0 => error!(
                broker = %self.broker,
                client_id = %self.client_id,
                code = ?code,
                "the external MQTT broker refused the connection (credentials? client id?); retrying"
            ),
            _ if connected => warn!(
                broker = %self.broker,
                error = %e,
                "connection to the external MQTT broker lost; reconnecting"
            ),
            _ if failures == 0 => warn!(
                broker = %self.broker,
                error = %e,
                "cannot connect to the external MQTT broker; retrying with backoff"
            ),
            _ => debug!(broker = %self.broker, error = %e, failures, "MQTT connect failed"),
        }
    }

    /// Sends what is queued, then DISCONNECT; bounded by
    /// [`DISCONNECT_TIMEOUT`]. Messages that arrive meanwhile are dropped
    /// (the agents resend them).
    async fn disconnect(&mut self) {
        // Queued behind the outbound publishes, so they go out first.
        let mut queued = self.client.try_disconnect().is_ok();
        let deadline = tokio::time::Instant::now() + DISCONNECT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => {
                    debug!(broker = %self.broker, "sent DISCONNECT");
                    return;
                }
                Ok(Ok(_)) => {
                    if !queued {
                        queued = self.client.try_disconnect().is_ok();
                    }
                }
                Ok(Err(e)) => {
                    debug!(broker = %self.broker, error = %e, "connection ended during disconnect");
                    return;
                }
                Err(_) => {
                    warn!(
                        broker = %self.broker,
                        timeout = ?DISCONNECT_TIMEOUT,
                        "clean MQTT disconnect timed out"
                    );
                    return;
                }
            }
        }
    }
}

/// Hands `msg` to ingest, waiting while the channel is full (see the
/// module comment). Warns once the wait reaches half the keep-alive. A free
/// function: the event loop is not `Sync`, so `&Driver` cannot be held
/// across an await in a spawned task.
async fn forward(
    inbound: &mpsc::Sender<Inbound>,
    msg: Inbound,
    keep_alive: Duration,
    cancel: &CancellationToken,
    broker: &str,
) -> Forwarded {
    let permit = match inbound.try_reserve() {
        Ok(p) => p,
        Err(mpsc::error::TrySendError::Closed(())) => return Forwarded::Closed,
        Err(mpsc::error::TrySendError::Full(())) => {
            let warn_after = keep_alive / 2;
            let waited = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Forwarded::Cancelled,
                r = tokio::time::timeout(warn_after, inbound.reserve()) => r,
            };
            match waited {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Forwarded::Closed,
                Err(_) => {
                    warn!(
                        broker = %broker,
                        waited = ?warn_after,
                        keep_alive = ?keep_alive,
                        "ingest is not keeping up; MQTT polling paused, the broker may drop the connection"
                    );
                    let r = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Forwarded::Cancelled,
                        r = inbound.reserve() => r,
                    };
                    match r {
                        Ok(p) => p,
                        Err(_) => return Forwarded::Closed,
                    }
                }
            }
        }
    };
    permit.send(msg);
    Forwarded::Yes
}

/// What [`super::BrokerHandle::shutdown`] needs to stop the client.
#[derive(Debug)]
pub(super) struct Stop {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Stop {
    pub(super) async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(SHUTDOWN_TIMEOUT, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "external MQTT client task failed"),
                Err(_) => warn!(
                    timeout = ?SHUTDOWN_TIMEOUT,
                    "external MQTT client task did not stop in time"
                ),
            }
        }
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
