//! The publisher: oldest unacknowledged readings from the buffer -> protobuf
//! batches -> MQTT (`outpost/v1/{device}/telemetry`, QoS 1); aggregator acks
//! (`outpost/v1/{device}/ack`) -> rows deleted from the buffer.
//!
//! The delivery rules live in [`core::PublisherCore`] (pure, unit tested).
//! This module is the IO loop around it: it reads the buffer, builds
//! batches, publishes through a [`Transport`] (rumqttc in production, an
//! in-tree fake in tests), and reacts to link and ack changes that arrive
//! on `watch` channels (never blocking the MQTT event loop that feeds them).
//!
//! Shutdown: on cancellation the publisher keeps going for up to the grace
//! period while batches are in flight or committed readings are unsent, so
//! a clean stop usually leaves the buffer empty; then it publishes the
//! retained "offline" status and asks the transport to disconnect.

pub mod acks;
pub mod core;
pub mod mqtt;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_proto::batch::BatchBuilder;
use outpost_proto::pb::{DeviceState, DeviceStatus, SourceStatus};
use outpost_proto::topics;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::core::{AckOutcome, PublisherCore};
use crate::buffer::{BufferError, BufferHandle};
use crate::metrics::Metrics;
use crate::reading::{now_ms, StoredReading};
use crate::status::StatusBoard;

/// How often the publisher checks the ack timeout.
pub const TICK: Duration = Duration::from_millis(250);
/// Pause after a buffer error before trying again.
pub const BUFFER_RETRY: Duration = Duration::from_secs(1);

/// Why a publish did not reach the MQTT client.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The client's request queue is closed (event loop gone).
    #[error("MQTT client closed: {0}")]
    Closed(String),
}

/// What the publisher needs from MQTT: enqueue a QoS 1 publish.
pub trait Transport: Send + Sync + 'static {
    /// Publishes `payload` on `topic` with QoS 1. Resolves when the client
    /// accepted it (backpressure when its queue is full), not when a broker
    /// acknowledged it: that proves nothing here.
    fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Sends an MQTT DISCONNECT (a clean one: the broker does not publish
    /// the last will, so the publisher sends "offline" itself first).
    fn disconnect(&self) -> impl Future<Output = ()> + Send;
}

/// Connection state published by the MQTT driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkState {
    /// Incremented on every successful CONNACK.
    pub generation: u64,
    /// True while connected.
    pub up: bool,
}

/// Settings of the publisher (from the config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Device id (validated).
    pub device: String,
    /// Labels for the status message.
    pub labels: BTreeMap<String, String>,
    /// Readings per batch at most.
    pub max_batch: usize,
    /// How long a partial batch waits for more readings.
    pub linger: Duration,
    /// Batches in flight at most.
    pub window: usize,
    /// Resend when acks stall this long.
    pub ack_timeout: Duration,
    /// Periodic status interval.
    pub status_interval: Duration,
    /// How long to keep delivering after shutdown was requested.
    pub grace: Duration,
}

/// Builds the device status message (birth, periodic, offline, last will).
pub fn status_message(
    settings: &Settings,
    state: DeviceState,
    stats: Option<&crate::buffer::BufferStats>,
    board: &StatusBoard,
) -> Vec<u8> {
    let sources = board
        .snapshot()
        .into_iter()
        .map(|(name, r)| SourceStatus {
            name,
            state: r.state as i32,
            last_error: r.last_error,
            readings_total: r.readings,
            errors_total: r.errors,
        })
        .collect();
    DeviceStatus {
        device_id: settings.device.clone(),
        state: state as i32,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        labels: settings.labels.clone().into_iter().collect(),
        buffer_rows: stats.map_or(0, |s| s.rows),
        dropped_total: stats.map_or(0, |s| s.dropped_total),
        time_ms: now_ms(),
        last_seq: stats.map_or(0, |s| s.next_seq.saturating_sub(1)),
        sources,
    }
    .encode_to_vec()
}

/// The publisher task. Returns when cancelled (after the grace period) or
/// when the buffer is closed.
#[allow(clippy::too_many_arguments)]
pub async fn run<T: Transport>(
    settings: Settings,
    transport: T,
    mut link: watch::Receiver<LinkState>,
    mut acks: watch::Receiver<u64>,
    buffer: BufferHandle,
    metrics: Arc<Metrics>,
    board: StatusBoard,
    cancel: CancellationToken,
) {
    let telemetry_topic = match topics::telemetry(&settings.device) {
        Ok(t) => t,
        Err(e) => {
            warn!(device = %settings.device, error = %e, "invalid device id; publisher not started");
            return;
        }
    };
    let status_topic = topics::status(&settings.device).unwrap_or_default();
    let start_acked = match buffer.stats().await {
        Ok(s) => s.acked_seq,
        Err(e) => {
            warn!(error = %e, "buffer unavailable; publisher not started");
            return;
        }
    };
    let mut core = PublisherCore::new(
        start_acked,
        settings.window,
        settings.ack_timeout,
        Instant::now(),
    );
    let mut committed = buffer.committed();
    let mut generation = 0u64;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_status = Instant::now() + settings.status_interval;
    let mut partial_since: Option<Instant> = None;
    let mut drain_deadline: Option<Instant> = None;
    // Highest sequence number ever published, to count resends.
    let mut max_published = start_acked;
    loop {
        // 1. Publish as much as the window and the buffer allow.
        while let Some(after) = core.next_after() {
            let rows = match buffer.read_after(after, settings.max_batch).await {
                Ok(rows) => rows,
                Err(BufferError::Closed) => return,
                Err(e) => {
                    warn!(error = %e, "reading the buffer failed; retrying");
                    tokio::time::sleep(BUFFER_RETRY).await;
                    break;
                }
            };
            if rows.is_empty() {
                partial_since = None;
                break;
            }
            if rows.len() < settings.max_batch && drain_deadline.is_none() {
                let since = *partial_since.get_or_insert_with(Instant::now);
                if since.elapsed() < settings.linger {
                    break; // wait for more readings, up to the linger time
                }
            }
            partial_since = None;
            let Some((first, last, payload)) =
                build_batch(&settings.device, after, core.acked(), &rows)
            else {
                break;
            };
            let resent = rows.iter().filter(|r| r.seq <= max_published).count();
            if let Err(e) = transport
                .publish(telemetry_topic.clone(), payload, false)
                .await
            {
                warn!(error = %e, "publish failed");
                break;
            }
            core.on_published(first, last, Instant::now());
            max_published = max_published.max(last);
            metrics.published_batches.inc();
            metrics.published_readings.inc_by(rows.len() as u64);
            metrics.resent_readings.inc_by(resent as u64);
            debug!(first, last, readings = rows.len(), "batch published");
        }

        // 2. Shutdown: finished when nothing is in flight and nothing unsent.
        if let Some(deadline) = drain_deadline {
            let unsent = *committed.borrow() > core.sent();
            let down = !link.borrow().up;
            if (core.inflight() == 0 && !unsent) || Instant::now() >= deadline || down {
                if core.inflight() > 0 || unsent {
                    info!(
                        acked = core.acked(),
                        sent = core.sent(),
                        "grace period over; unacknowledged readings stay buffered"
                    );
                }
                let stats = buffer.stats().await.ok();
                let offline =
                    status_message(&settings, DeviceState::Offline, stats.as_ref(), &board);
                if link.borrow().up {
                    let _ = transport.publish(status_topic.clone(), offline, true).await;
                }
                transport.disconnect().await;
                return;
            }
        }

        // 3. Wait for something to change.
        let linger_wake = partial_since.map(|s| s + settings.linger);
        tokio::select! {
            _ = cancel.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + settings.grace);
                info!(grace = ?settings.grace, inflight = core.inflight(), "shutting down publisher");
            }
            changed = link.changed() => {
                if changed.is_err() { return; }
                let state = *link.borrow_and_update();
                if state.up && state.generation != generation {
                    generation = state.generation;
                    core.on_connected(Instant::now());
                    metrics.mqtt_connected.set(1);
                    let stats = buffer.stats().await.ok();
                    let birth = status_message(&settings, DeviceState::Online, stats.as_ref(), &board);
                    if let Err(e) = transport.publish(status_topic.clone(), birth, true).await {
                        warn!(error = %e, "birth status publish failed");
                    }
                    next_status = Instant::now() + settings.status_interval;
                    info!(acked = core.acked(), "connected; resuming from the last acknowledged reading");
                } else if !state.up && core.link() == core::Link::Up {
                    core.on_disconnected();
                    metrics.mqtt_connected.set(0);
                }
            }
            changed = acks.changed() => {
                if changed.is_err() { return; }
                let seq = *acks.borrow_and_update();
                if let AckOutcome::Delete(upto) = core.on_ack(seq, Instant::now()) {
                    metrics.acked_seq.set(i64::try_from(upto).unwrap_or(i64::MAX));
                    if let Err(e) = buffer.ack(upto).await {
                        // The rows stay; the next ack deletes them too.
                        warn!(seq = upto, error = %e, "deleting acknowledged rows failed");
                    }
                }
            }
            changed = committed.changed() => {
                if changed.is_err() { return; }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if core.on_tick(now) {
                    warn!(acked = core.acked(), timeout = ?settings.ack_timeout, "no ack from the aggregator; resending from the last acknowledged reading");
                }
                if core.link() == core::Link::Up && now >= next_status {
                    next_status = now + settings.status_interval;
                    let stats = buffer.stats().await.ok();
                    let msg = status_message(&settings, DeviceState::Online, stats.as_ref(), &board);
                    if let Err(e) = transport.publish(status_topic.clone(), msg, true).await {
                        warn!(error = %e, "status publish failed");
                    }
                }
            }
            _ = sleep_until_opt(linger_wake) => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Packs rows (oldest first, strictly increasing seq) into an encoded
/// batch. Rows the builder rejects (cannot happen for rows our own sources
/// produced and the buffer stored) are skipped with a warning rather than
/// blocking the buffer forever.
pub fn build_batch(
    device: &str,
    after: u64,
    acked: u64,
    rows: &[StoredReading],
) -> Option<(u64, u64, Vec<u8>)> {
    let mut b = match BatchBuilder::new(device) {
        Ok(mut b) => {
            // Lets the aggregator tell a gap made on purpose (readings the
            // buffer dropped) from a batch lost in transit.
            b.set_prev_seq(after);
            b.set_acked_seq(acked);
            b
        }
        Err(e) => {
            warn!(error = %e, "cannot build batch");
            return None;
        }
    };
    let mut first = None;
    for row in rows {
        let r = &row.reading;
        match b.push(row.seq, r.time_ms, &r.sensor, &r.value, r.quality) {
            Ok(()) => {
                first.get_or_insert(row.seq);
            }
            Err(e) => {
                warn!(seq = row.seq, sensor = %r.sensor, error = %e, "reading cannot be published; skipped")
            }
        }
    }
    let last = b.last_seq()?;
    Some((first?, last, b.encode()))
}
