//! `outpost-agent`: the program installers put on field gateways.
//!
//! Data flow: sources ([`sources`]: serial frames, serial text lines, GPIO)
//! send [`reading::Reading`]s into a bounded channel; the pipeline checks
//! them and drops values within a sensor's deadband; the [`buffer`] (SQLite,
//! WAL, batched commits) gives each reading the next per-device sequence
//! number and keeps it until the aggregator acknowledges it; the
//! [`publisher`] packs the oldest unacknowledged readings into protobuf
//! batches, publishes them over MQTT and deletes rows only when
//! `outpost/v1/{device}/ack` says the aggregator has processed them.
//! [`metrics`] and `/healthz` are served by [`http`]; [`monitor`] is a
//! wiring-check tool. [`run`] wires it all and owns the shutdown order.
#![forbid(unsafe_code)]

pub mod buffer;
pub mod config;
pub mod config_file;
pub mod http;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod process;
pub mod publisher;
pub mod reading;
pub mod sources;
pub mod status;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use outpost_proto::batch::{MAX_SENSOR_NAME_LEN, MAX_STRING_VALUE_LEN};
use outpost_proto::pb::DeviceState;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::buffer::{Buffer, BufferError, BufferHandle};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reading::{Reading, Value};
use crate::sources::deadband::Deadband;
use crate::sources::SourceContext;
use crate::status::StatusBoard;

/// Capacity of the channel from the sources to the buffer. Full means
/// backpressure: sources wait (a serial port's kernel buffer then fills and
/// the frame counters show any loss).
pub const SOURCE_CHANNEL: usize = 4096;
/// Readings handed to the buffer in one append at most.
pub const APPEND_CHUNK: usize = 1024;
/// Time the MQTT driver gets to send the final DISCONNECT.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Handles a running agent exposes (tests use them).
#[derive(Debug, Clone)]
pub struct Running {
    /// Address `/metrics` and `/healthz` are served on, if enabled.
    pub http_addr: Option<SocketAddr>,
}

struct AgentHealth {
    metrics: Arc<Metrics>,
    board: StatusBoard,
    buffer: BufferHandle,
}

impl http::Health for AgentHealth {
    fn report(&self) -> (bool, String) {
        let alive = !self.buffer.is_closed();
        let sources: serde_json::Map<String, serde_json::Value> = self
            .board
            .snapshot()
            .into_iter()
            .map(|(name, r)| {
                let state = r.state.as_str_name().trim_start_matches("SOURCE_STATE_").to_lowercase();
                (name, serde_json::json!({ "state": state, "last_error": r.last_error, "readings": r.readings, "errors": r.errors }))
            })
            .collect();
        let body = serde_json::json!({
            "status": if alive { "ok" } else { "buffer-stopped" },
            "buffer_rows": self.metrics.buffer_rows.get(),
            "mqtt_connected": self.metrics.mqtt_connected.get() == 1,
            "sources": sources,
        });
        (alive, body.to_string())
    }
}

/// Runs the agent until `cancel` fires, then shuts down in order: sources
/// stop -> pipeline drains -> buffer commits -> publisher waits for acks (up
/// to the grace period) and disconnects -> buffer closes. `ready` receives
/// the running handles once everything is started.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    ready: Option<oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let board = StatusBoard::default();
    let (buffer, buffer_thread) = Buffer::spawn(config.buffer.clone(), metrics.clone())
        .with_context(|| format!("opening the buffer {}", config.buffer.path.display()))?;

    let settings = publisher::Settings {
        device: config.device.id.clone(),
        labels: config.device.labels.clone(),
        max_batch: config.batch.max_readings,
        linger: config.batch.linger,
        window: config.mqtt.max_inflight_batches,
        ack_timeout: config.mqtt.ack_timeout,
        status_interval: config.mqtt.status_interval,
        grace: config.shutdown.grace,
    };
    let will = publisher::status_message(&settings, DeviceState::Offline, None, &board);
    let parts = publisher::mqtt::connect(&config, will).context("setting up MQTT")?;

    let http_cancel = CancellationToken::new();
    let http_addr = match config.metrics.addr() {
        Some(addr) => {
            let health = Arc::new(AgentHealth {
                metrics: metrics.clone(),
                board: board.clone(),
                buffer: buffer.clone(),
            });
            Some(
                http::serve(addr, metrics.clone(), health, http_cancel.clone())
                    .await
                    .with_context(|| format!("binding the metrics endpoint {addr}"))?,
            )
        }
        None => None,
    };

    // Sources -> pipeline -> buffer.
    let sources_cancel = CancellationToken::new();
    let (tx, rx) = mpsc::channel(SOURCE_CHANNEL);
    let mut source_tasks = Vec::new();
    for source in config.sources.clone() {
        info!(source = source.name(), "starting source");
        source_tasks.push(source.spawn(SourceContext {
            tx: tx.clone(),
            cancel: sources_cancel.clone(),
            metrics: metrics.clone(),
            status: board.clone(),
        }));
    }
    drop(tx);
    let deadband = Deadband::new(config.deadband.clone());
    let pipeline_task = tokio::spawn(pipeline(rx, buffer.clone(), deadband, metrics.clone()));

    // Publisher and its MQTT driver.
    let mqtt_stop = CancellationToken::new();
    let driver = tokio::spawn(publisher::mqtt::drive(
        parts.eventloop,
        parts.transport.clone(),
        config.device.id.clone(),
        parts.senders,
        config.mqtt.max_reconnect_backoff,
        metrics.clone(),
        mqtt_stop.clone(),
    ));
    let publisher_cancel = CancellationToken::new();
    let publisher_task = tokio::spawn(publisher::run(
        settings,
        parts.transport,
        parts.link,
        parts.acks,
        buffer.clone(),
        metrics.clone(),
        board.clone(),
        publisher_cancel.clone(),
    ));

    let watchdog = notify::watchdog_interval().map(|every| {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = t.tick() => notify::notify("WATCHDOG=1"),
                }
            }
        })
    });
    notify::notify("READY=1");
    info!(device = %config.device.id, sources = config.sources.len(), "agent running");
    if let Some(ready) = ready {
        let _ = ready.send(Running { http_addr });
    }

    cancel.cancelled().await;
    notify::notify("STOPPING=1");
    info!("shutting down: stopping sources");
    sources_cancel.cancel();
    for t in source_tasks {
        let _ = t.await;
    }
    let _ = pipeline_task.await;
    if let Err(e) = buffer.flush().await {
        error!(error = %e, "final buffer commit failed; readings since the last commit are lost");
    }
    publisher_cancel.cancel();
    let _ = publisher_task.await;
    if tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        while !driver.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_err()
    {
        warn!("MQTT disconnect did not complete in time");
    }
    mqtt_stop.cancel();
    if let Err(e) = buffer.close().await {
        warn!(error = %e, "closing the buffer");
    }
    let _ = tokio::task::spawn_blocking(move || buffer_thread.join()).await;
    http_cancel.cancel();
    if let Some(w) = watchdog {
        w.abort();
    }
    info!("agent stopped");
    Ok(())
}

/// Why a reading from a source is refused before the buffer.
fn invalid_reading(r: &Reading) -> Option<&'static str> {
    if r.sensor.is_empty() || r.sensor.len() > MAX_SENSOR_NAME_LEN {
        return Some("sensor name empty or too long");
    }
    if let Value::Str(s) = &r.value {
        if s.len() > MAX_STRING_VALUE_LEN {
            return Some("string value too long");
        }
    }
    None
}

/// Sources -> buffer: refuses readings that could never be published,
/// applies the deadband, and appends in chunks. Ends when every source has
/// dropped its sender and the channel is empty.
async fn pipeline(
    mut rx: mpsc::Receiver<Reading>,
    buffer: BufferHandle,
    mut deadband: Deadband,
    metrics: Arc<Metrics>,
) {
    let mut chunk = Vec::with_capacity(APPEND_CHUNK);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(r) = next.take() {
            if let Some(why) = invalid_reading(&r) {
                metrics.source_error("pipeline", "invalid_reading", 1);
                warn!(sensor = %r.sensor.chars().take(40).collect::<String>(), reason = why, "reading refused");
            } else if deadband.admit(&r) {
                chunk.push(r);
            } else {
                metrics.deadband_suppressed.inc();
            }
            if chunk.len() < APPEND_CHUNK {
                next = rx.try_recv().ok();
            }
        }
        if chunk.is_empty() {
            continue;
        }
        match buffer.append(std::mem::take(&mut chunk)).await {
            Ok(_) => {}
            Err(BufferError::Closed) => {
                error!("buffer stopped; readings can no longer be stored");
                return;
            }
            Err(e) => error!(error = %e, "appending to the buffer failed; readings lost"),
        }
    }
}
