//! The MQTT side of the publisher: rumqttc's event loop, driven by one task.
//!
//! * Stable client id and `clean_session = false`, so the broker keeps our
//!   ack subscription (and queues acks) while the link is down.
//! * Last will: retained `DeviceStatus { state: OFFLINE }` on the status
//!   topic, so operators see a gateway that vanished.
//! * Reconnect with jittered exponential backoff (rumqttc has none of its
//!   own: `poll()` fails at once while the broker is down).
//! * After a connection error, publishes still queued inside rumqttc are
//!   discarded: the publisher resends from its buffer on reconnect, so
//!   rumqttc's own replay would only send every reading twice.
//! * The driver reports link changes and acks on `watch` channels, which
//!   never block: the event loop must keep polling for the client's publish
//!   queue to drain.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, Request,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acks::decode_ack;
use super::{LinkState, Transport, TransportError};
use crate::config::Config;
use crate::metrics::Metrics;

/// Capacity of rumqttc's request queue (publishes waiting for the event loop).
pub const REQUEST_QUEUE: usize = 64;
/// First reconnect delay; doubles up to `mqtt.max-reconnect-backoff`.
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Largest MQTT packet accepted or sent (a batch of 10,000 readings is ~100 KB).
pub const MAX_PACKET: usize = 1024 * 1024;

/// Why the MQTT client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    TlsFile {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The topics could not be formed (invalid device id).
    #[error("invalid device id: {0}")]
    DeviceId(#[from] outpost_proto::topics::IdError),
}

/// [`Transport`] over a rumqttc client.
#[derive(Debug, Clone)]
pub struct MqttTransport {
    client: AsyncClient,
}

impl Transport for MqttTransport {
    async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), TransportError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))
    }

    async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

/// Everything the publisher needs from [`connect`].
#[allow(missing_debug_implementations)] // rumqttc's EventLoop has no Debug
pub struct MqttParts {
    /// Publishing side.
    pub transport: MqttTransport,
    /// Link state changes.
    pub link: watch::Receiver<LinkState>,
    /// Highest ack received.
    pub acks: watch::Receiver<u64>,
    /// The event loop; pass it to [`drive`].
    pub eventloop: EventLoop,
    /// Senders of the two watches, for [`drive`].
    pub senders: (watch::Sender<LinkState>, watch::Sender<u64>),
}

/// Builds the MQTT client from the config. `will` is the encoded offline
/// status. Nothing connects until [`drive`] runs the event loop.
pub fn connect(config: &Config, will: Vec<u8>) -> Result<MqttParts, MqttSetupError> {
    let m = &config.mqtt;
    let mut opts = MqttOptions::new(config.client_id(), m.host.clone(), m.port);
    opts.set_keep_alive(m.keep_alive);
    opts.set_clean_session(false);
    opts.set_inflight(u16::try_from(m.max_inflight_batches.clamp(1, 100) * 2 + 4).unwrap_or(100));
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let (Some(user), password) = (&m.username, &m.password) {
        opts.set_credentials(user.clone(), password.clone().unwrap_or_default());
    }
    let status_topic = outpost_proto::topics::status(&config.device.id)?;
    opts.set_last_will(LastWill::new(status_topic, will, QoS::AtLeastOnce, true));
    if let Some(tls) = &m.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| MqttSetupError::TlsFile {
                path: p.display().to_string(),
                source,
            })
        };
        let ca = read(&tls.ca_file)?;
        let client_auth = match (&tls.client_cert, &tls.client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        crate::tls::install_crypto_provider();
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            },
        ));
    }
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
    let (link_tx, link_rx) = watch::channel(LinkState::default());
    let (ack_tx, ack_rx) = watch::channel(0u64);
    Ok(MqttParts {
        transport: MqttTransport { client },
        link: link_rx,
        acks: ack_rx,
        eventloop,
        senders: (link_tx, ack_tx),
    })
}

/// Runs the event loop until a clean DISCONNECT was sent or `stop` fires.
pub async fn drive(
    mut eventloop: EventLoop,
    transport: MqttTransport,
    device: String,
    senders: (watch::Sender<LinkState>, watch::Sender<u64>),
    max_backoff: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let (link_tx, ack_tx) = senders;
    let ack_topic = match outpost_proto::topics::ack(&device) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "invalid device id; MQTT not started");
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    let mut generation = 0u64;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    warn!(code = ?ack.code, "broker refused the connection");
                    continue;
                }
                backoff = MIN_BACKOFF;
                generation += 1;
                metrics.mqtt_connects.inc();
                info!(
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                // Non-blocking: this task is the one that drains the queue.
                if let Err(e) = transport
                    .client
                    .try_subscribe(ack_topic.clone(), QoS::AtLeastOnce)
                {
                    warn!(error = %e, "cannot subscribe to acks");
                }
                link_tx.send_replace(LinkState {
                    generation,
                    up: true,
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == ack_topic {
                    match decode_ack(&p.payload, &device) {
                        Ok(seq) => {
                            ack_tx.send_if_modified(|cur| {
                                let newer = seq > *cur;
                                if newer {
                                    *cur = seq;
                                }
                                newer
                            });
                        }
                        Err(e) => warn!(error = %e, "ignored ack"),
                    }
                } else {
                    debug!(topic = %p.topic, "unexpected publish ignored");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                info!("disconnected from the MQTT broker");
                link_tx.send_replace(LinkState {
                    generation,
                    up: false,
                });
                break;
            }
            Ok(_) => {}
            Err(e) => {
                if link_tx.borrow().up {
                    warn!(error = %e, "MQTT connection lost");
                    link_tx.send_replace(LinkState {
                        generation,
                        up: false,
                    });
                } else {
                    debug!(error = %e, "MQTT connect failed");
                }
                // Our buffer resends everything unacknowledged on reconnect.
                eventloop
                    .pending
                    .retain(|r| !matches!(r, Request::Publish(_)));
                let delay = jitter(backoff);
                backoff = (backoff * 2).min(max_backoff);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// `d` scaled by a pseudo-random factor in [0.5, 1.0], so gateways that lost
/// the broker together do not reconnect together.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.5 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}
