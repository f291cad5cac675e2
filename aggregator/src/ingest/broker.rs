//! Where the aggregator's MQTT messages come from and where its acks go.
//!
//! [`start`] gives a [`BrokerHandle`]: a bounded [`Inbound`] channel of
//! messages on `outpost/v1/+/telemetry` and `outpost/v1/+/status`, and an
//! [`Outbound`] to publish acks (and later alerts) back. Two modes
//! ([`BrokerConfig`]):
//!
//! * **Embedded** (default, [`embedded`]): rumqttd in process. Agents connect
//!   to its listener; the aggregator reads through a *local link* (an
//!   in-process connection to rumqttd's router, no TCP).
//! * **External** ([`external`]): a rumqttc client of an existing broker
//!   (Mosquitto, EMQX, HiveMQ), for sites with several aggregators. Devices
//!   are split between aggregators by [`partition_of`]; ingest drops the
//!   devices of other partitions.
//!
//! # Delivery and backpressure
//! The inbound channel holds [`INBOUND_CAPACITY`] messages. When it is full
//! the broker side **waits** (backpressure); nothing is dropped here:
//! * embedded: the local link stops taking messages from rumqttd's router,
//!   which keeps them in its per-filter in-memory log. Past
//!   `max-segment-size x max-segment-count` bytes behind, rumqttd drops the
//!   oldest segment (a WARN "cursor jumped" is the only sign);
//! * external: the event loop stops polling; the broker queues for our
//!   persistent session (Mosquitto drops past `max_queued_messages`), and a
//!   wait longer than 1.5 x keep-alive makes the broker drop the connection
//!   (we reconnect as soon as ingest catches up).
//!
//! Both losses are covered end to end: an agent deletes a reading only when
//! the aggregator's application ack covers it, and resends otherwise. A
//! broker's PUBACK proves nothing (see DESIGN.md, "Delivery").
//!
//! [`Outbound::publish`] never blocks: it queues (at most
//! [`OUTBOUND_CAPACITY`] messages) or fails with
//! [`BrokerError::OutboundFull`]. Acks are cumulative and retained, so a lost
//! ack is superseded by the next one, and a reconnecting agent learns its
//! mark from the retained ack at once.
//!
//! # Shutdown
//! [`BrokerHandle::shutdown`] stops consuming and drops what was not yet
//! taken from the inbound channel (agents resend it). Embedded: the
//! listener's runtime is dropped, which closes every client connection and
//! releases the port; the local-link thread ends. rumqttd has **no shutdown
//! API**: its router thread stays blocked until the process exits, with its
//! memory (segments, retained messages, sessions). External: a clean MQTT
//! DISCONNECT after the queued acks, so the broker keeps our session.

mod config;
pub mod embedded;
pub mod external;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use self::config::*;

/// Capacity of the inbound channel (messages). When full, the broker side
/// waits: see the module comment.
pub const INBOUND_CAPACITY: usize = 1024;
/// Capacity of the outbound queue (messages waiting to be published).
pub const OUTBOUND_CAPACITY: usize = 1024;
/// How long [`BrokerHandle::shutdown`] waits for each broker thread or task
/// to finish before leaving it behind (and saying so).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Offset basis of 64-bit FNV-1a.
pub const FNV1A64_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// Prime of 64-bit FNV-1a.
pub const FNV1A64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One message from a device topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The topic it was published on (`outpost/v1/{device}/{kind}`).
    pub topic: String,
    /// The payload, untouched.
    pub payload: Bytes,
    /// True when the broker delivered it as a retained message (on
    /// subscribing), false for a live message.
    pub retained: bool,
}

/// A message waiting in an [`Outbound`] queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retain flag.
    pub retain: bool,
}

/// Why the broker could not be started or a message not published.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration has problems (one entry each, with its key path).
    #[error("invalid broker configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// TLS on the embedded listener needs rumqttd's "use-rustls" feature,
    /// which this build leaves out.
    #[error(
        "the embedded broker's TLS listener is not built into this version \
         (rumqttd feature \"use-rustls\"); terminate TLS in front of it or use mode = \"external\""
    )]
    TlsNotBuilt,
    /// The embedded broker could not listen.
    #[error("embedded broker cannot listen on {addr}: {reason}")]
    Listen {
        /// Listener address.
        addr: std::net::SocketAddr,
        /// Cause, as rumqttd reported it.
        reason: String,
    },
    /// A thread or runtime for the embedded broker could not be created.
    #[error("cannot start the embedded broker's {what}: {source}")]
    Runtime {
        /// Which thread or runtime.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The local link to rumqttd's router could not be set up.
    #[error("cannot attach to the embedded broker's router: {0}")]
    Link(String),
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    TlsFile {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The outbound queue is full; the message was not published.
    #[error("outbound queue is full ({OUTBOUND_CAPACITY} messages); message not published")]
    OutboundFull,
    /// The broker connection was shut down (or its task ended).
    #[error("the broker connection is shut down")]
    Closed,
    /// Not a topic one can publish to (empty, wildcards, NUL, too long).
    #[error("invalid topic for publishing: {0:?}")]
    InvalidTopic(String),
}

/// Publishes acks (and later alerts) through the broker. Cheap to clone;
/// [`Outbound::publish`] never blocks.
#[derive(Debug, Clone)]
pub struct Outbound {
    inner: OutboundInner,
}

#[derive(Debug, Clone)]
enum OutboundInner {
    /// A queue drained by the local-link thread (embedded), or by a test.
    Queue(mpsc::Sender<OutboundMessage>),
    /// rumqttc's request channel (external). `stopped` is set when the event
    /// loop ends: rumqttc's channel cannot tell "closed" from "full".
    Client {
        client: rumqttc::AsyncClient,
        stopped: Arc<AtomicBool>,
    },
}

impl Outbound {
    /// An `Outbound` attached to no broker: what is published arrives on the
    /// returned receiver. For tests of the stages that publish.
    pub fn detached(capacity: usize) -> (Outbound, mpsc::Receiver<OutboundMessage>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Outbound {
                inner: OutboundInner::Queue(tx),
            },
            rx,
        )
    }

    /// Queues `payload` for `topic` (QoS 1 on an external broker; the
    /// embedded broker's local link publishes at QoS 0 into the router, which
    /// cannot lose it). `retain` makes the broker keep it for later
    /// subscribers. Never blocks.
    pub fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), BrokerError> {
        if !valid_publish_topic(&topic) {
            return Err(BrokerError::InvalidTopic(topic));
        }
        match &self.inner {
            OutboundInner::Queue(tx) => tx
                .try_send(OutboundMessage {
                    topic,
                    payload,
                    retain,
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => BrokerError::OutboundFull,
                    mpsc::error::TrySendError::Closed(_) => BrokerError::Closed,
                }),
            OutboundInner::Client { client, stopped } => {
                if stopped.load(Ordering::Acquire) {
                    return Err(BrokerError::Closed);
                }
                client
                    .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                    .map_err(|_| BrokerError::OutboundFull)
            }
        }
    }
}

/// A topic one can publish to: 1..=65535 bytes, no wildcard, no NUL.
fn valid_publish_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

/// A running broker connection: take messages from `inbound`, publish with
/// `outbound`, and call [`BrokerHandle::shutdown`] at the end. Dropping the
/// handle without `shutdown` still stops the listener and the tasks, but
/// waits for nothing.
#[derive(Debug)]
pub struct BrokerHandle {
    /// Messages on the device topics, in broker order.
    pub inbound: mpsc::Receiver<Inbound>,
    /// Publishing side.
    pub outbound: Outbound,
    stop: Stop,
}

#[derive(Debug)]
enum Stop {
    Embedded(embedded::Stop),
    External(external::Stop),
}

impl BrokerHandle {
    /// Stops consuming and waits (bounded by [`SHUTDOWN_TIMEOUT`] per
    /// thread) for the broker side to end. Messages still in `inbound` are
    /// dropped; publishes after this fail with [`BrokerError::Closed`].
    ///
    /// * Embedded: stops the listener (every client is disconnected, the
    ///   port is released) and the local-link thread. rumqttd's router
    ///   thread cannot be stopped: it stays idle until the process exits.
    /// * External: sends what is queued in `outbound`, then a clean
    ///   DISCONNECT (the broker keeps our session), then ends the event loop.
    pub async fn shutdown(self) {
        let BrokerHandle {
            inbound,
            outbound,
            stop,
        } = self;
        drop(outbound);
        drop(inbound);
        match stop {
            Stop::Embedded(s) => s.shutdown().await,
            Stop::External(s) => s.shutdown().await,
        }
    }
}

/// Starts the broker side described by `cfg` (validated first: an invalid
/// config is an error, never a panic inside rumqttd). Must run inside a
/// tokio runtime.
pub async fn start(cfg: &BrokerConfig) -> Result<BrokerHandle, BrokerError> {
    let mut problems = Vec::new();
    cfg.validate("broker", &mut problems);
    match cfg {
        BrokerConfig::Embedded(c) => {
            if c.tls.is_some() && problems.len() == 1 {
                // Only the "not built" problem: say exactly that.
                return Err(BrokerError::TlsNotBuilt);
            }
            if !problems.is_empty() {
                return Err(BrokerError::Config(problems));
            }
            embedded::start(c).await
        }
        BrokerConfig::External(c) => {
            if !problems.is_empty() {
                return Err(BrokerError::Config(problems));
            }
            external::start(c)
        }
    }
}

/// The partition that owns `device` among `count` aggregators: 64-bit
/// FNV-1a of the id's bytes (offset basis [`FNV1A64_OFFSET_BASIS`] =
/// 0xcbf29ce484222325, prime [`FNV1A64_PRIME`] = 0x100000001b3; per byte:
/// `hash ^= byte; hash *= prime`, wrapping), modulo `count`. Stable across
/// versions, platforms and languages. A `count` of 0 is treated as 1.
///
/// Why not the broker's shared subscriptions: Mosquitto's `$share/` is
/// round-robin per message, which would spread one device over several
/// aggregators (dedup marks, acks and rule state are per device). EMQX's
/// `hash_topic` strategy keeps a topic on one member and would save the
/// bandwidth every aggregator now spends on other partitions' messages; see
/// `docs/aggregator.md` (Broker modes).
pub fn partition_of(device: &str, count: u32) -> u32 {
    let hash = device.bytes().fold(FNV1A64_OFFSET_BASIS, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV1A64_PRIME)
    });
    // The remainder is below `count`, so it fits in u32.
    u32::try_from(hash % u64::from(count.max(1))).unwrap_or(0)
}

/// `d` scaled by a pseudo-random factor in [0.5, 1.0], so aggregators that
/// lost the broker together do not reconnect together.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.5 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_reference_vectors() {
        // From the FNV reference test suite (Fowler/Noll/Vo).
        let fnv = |s: &str| {
            s.bytes().fold(FNV1A64_OFFSET_BASIS, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(FNV1A64_PRIME)
            })
        };
        assert_eq!(fnv(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv("foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            partition_of("", u32::MAX),
            (0xcbf2_9ce4_8422_2325u64 % u64::from(u32::MAX)) as u32
        );
        assert_eq!(
            partition_of("a", 1_000_000),
            (0xaf63_dc4c_8601_ec8c_u64 % 1_000_000) as u32
        );
    }

    #[test]
    fn partition_of_known_values() {
        // 0xaf63dc4c8601ec8c = 12638187200555641996; 0x85944171f73967e8 =
        // 9625390261332436968.
        assert_eq!(partition_of("a", 2), 0);
        assert_eq!(partition_of("a", 3), 1);
        assert_eq!(partition_of("a", 7), 5);
        assert_eq!(partition_of("foobar", 10), 8);
        assert_eq!(partition_of("foobar", 3), 0);
        assert_eq!(partition_of("gw-1", 4), 1);
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0);
    }

    #[test]
    fn partitions_spread_devices() {
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[partition_of(&format!("gw-{i}"), 4) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn detached_outbound_queues_and_reports_full_and_closed() {
        let (out, mut rx) = Outbound::detached(1);
        out.publish("outpost/v1/gw/ack".into(), vec![1], true)
            .unwrap();
        assert!(matches!(
            out.publish("outpost/v1/gw/ack".into(), vec![2], true),
            Err(BrokerError::OutboundFull)
        ));
        assert_eq!(
            rx.try_recv().unwrap(),
            OutboundMessage {
                topic: "outpost/v1/gw/ack".into(),
                payload: vec![1],
                retain: true
            }
        );
        for bad in ["", "outpost/v1/+/ack", "outpost/#", "a\0b"] {
            assert!(matches!(
                out.publish(bad.into(), vec![], false),
                Err(BrokerError::InvalidTopic(_))
            ));
        }
        drop(rx);
        assert!(matches!(
            out.publish("outpost/v1/gw/ack".into(), vec![3], true),
            Err(BrokerError::Closed)
        ));
    }
}
