//! `outpost-aggregator`: the central half of Outpost.
//!
//! Data flow: the [`ingest::broker`] (rumqttd embedded in process, or a
//! client of an existing broker) delivers `outpost/v1/{device}/telemetry`
//! and `/status` messages; [`ingest`] decodes and validates them (the device
//! in the topic is the one that counts; bad payloads go to the dead-letter
//! table), drops readings at or below the device's high-water mark, hands
//! the new ones to a [`ingest::ReadingSink`] (the rules engine), persists
//! the marks and the device registry in [`state`] (SQLite), and only then
//! publishes `outpost/v1/{device}/ack`. [`api`] serves the registry, health
//! and metrics over HTTP.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod config;
pub mod ingest;
pub mod metrics;
pub mod rules;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::ingest::{IngestCore, ReadingSink};
use crate::metrics::Metrics;
use crate::state::Store;

/// Handles a running aggregator exposes (tests use them).
#[derive(Debug, Clone)]
pub struct Running {
    /// Address the HTTP API is served on.
    pub api_addr: SocketAddr,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
}

struct AggregatorHealth {
    ingest_alive: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<Metrics>,
}

impl api::Health for AggregatorHealth {
    fn report(&self) -> (bool, serde_json::Value) {
        let ok = self.ingest_alive.load(std::sync::atomic::Ordering::Relaxed);
        (
            ok,
            serde_json::json!({
                "status": if ok { "ok" } else { "ingest-stopped" },
                "devices_online": self.metrics.devices_online.get(),
            }),
        )
    }
}

/// Runs the aggregator with the rules engine (rules from `[rules] dir`,
/// alerts to the log) until `cancel`.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    ready: Option<oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    run_inner(config, None, cancel, ready).await
}

/// Runs the aggregator with `sink` instead of the rules engine (tests).
pub async fn run_with_sink(
    config: Config,
    sink: Box<dyn ReadingSink>,
    cancel: CancellationToken,
    ready: Option<oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    run_inner(config, Some(sink), cancel, ready).await
}

/// Runs the aggregator until `cancel`; then shuts down in order: ingest
/// stops taking messages -> what is queued is processed -> marks, alert
/// states and transitions committed and acks sent -> the delivery workers
/// send what is due (bounded by the grace period; the rest stays in the
/// outbox) -> broker stopped -> HTTP stopped.
async fn run_inner(
    config: Config,
    sink: Option<Box<dyn ReadingSink>>,
    cancel: CancellationToken,
    ready: Option<oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(&config.state.path)
        .with_context(|| format!("opening the state database {}", config.state.path.display()))?;
    let marks = store.load_marks().context("loading the high-water marks")?;
    info!(devices = marks.len(), "state loaded");
    let reader = store
        .reader()
        .context("opening a reader on the state database")?;
    let snapshot = store
        .load_kv(rules::runtime::SNAPSHOT_KEY)
        .context("loading the alert states")?;
    let wake = alerts::deliver::Wake::default();
    let outbox_reader = alerts::outbox::Outbox::open_reader(&config.state.path)
        .context("opening a reader on the state database")?;
    let history = outbox_reader
        .startup()
        .context("reading the alert history")?;
    let sinks_cancel = CancellationToken::new();
    let sinks = alerts::deliver::build_sinks(
        &config.alerts.sinks(),
        &config.broker.local_address(),
        &sinks_cancel,
    )?;
    let delivery_stop = CancellationToken::new();
    let workers = alerts::deliver::start(
        &config.state.path,
        sinks,
        metrics.clone(),
        &wake,
        delivery_stop.clone(),
        config.shutdown.grace,
    )
    .context("starting alert delivery")?;
    let alerts_api = alerts::api::AlertsApi {
        outbox: Arc::new(std::sync::Mutex::new(outbox_reader)),
        wake: wake.clone(),
        cancel: cancel.clone(),
    };
    let (sink, rules_rt): (Box<dyn ReadingSink>, Option<rules::runtime::Shared>) = match sink {
        Some(s) => (s, None),
        None => {
            let rt = rules::runtime::Runtime::start(
                &config.rules.dir,
                config.rules.lateness,
                metrics.clone(),
                alerts::route::Routes::new(&config.alerts),
                wake.clone(),
                snapshot.as_deref(),
                history,
            );
            (Box::new(rules::runtime::RulesSink(rt.clone())), Some(rt))
        }
    };
    let broker = ingest::broker::start(&config.broker)
        .await
        .context("starting the broker")?;
    let partition = config.broker.partition();
    let core = IngestCore::new(marks, partition, config.ingest.max_payload);

    let ingest_alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let health = Arc::new(AggregatorHealth {
        ingest_alive: ingest_alive.clone(),
        metrics: metrics.clone(),
    });
    let api_state = api::ApiState {
        reader: Arc::new(std::sync::Mutex::new(reader)),
        metrics: metrics.clone(),
        health,
        token: config.api.token.clone(),
    };
    let api_cancel = CancellationToken::new();
    let extra = rules_rt
        .clone()
        .map(rules::runtime::routes)
        .unwrap_or_default()
        .merge(alerts::api::routes(alerts_api));
    let (api_addr, api_task) = api::serve(
        config.api.listen,
        api::router_with(api_state, extra),
        api_cancel.clone(),
    )
    .await
    .with_context(|| format!("binding the HTTP API on {}", config.api.listen))?;

    let mut broker = broker;
    let (_placeholder_tx, placeholder) = tokio::sync::mpsc::channel(1);
    let inbound = std::mem::replace(&mut broker.inbound, placeholder);
    let outbound = broker.outbound.clone();
    let ingest_cancel = CancellationToken::new();
    let ingest_task = tokio::spawn(ingest::run(
        core,
        store,
        inbound,
        outbound,
        sink,
        metrics.clone(),
        config.ingest.flush_interval,
        config.ingest.flush_batches,
        config.shutdown.grace,
        ingest_cancel.clone(),
    ));
    let rules_cancel = CancellationToken::new();
    let rules_task =
        rules_rt.map(|rt| tokio::spawn(rules::runtime::run_background(rt, rules_cancel.clone())));
    notify::notify("READY=1");
    info!(api = %api_addr, "aggregator running");
    if let Some(ready) = ready {
        let _ = ready.send(Running {
            api_addr,
            metrics: metrics.clone(),
        });
    }
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

    cancel.cancelled().await;
    notify::notify("STOPPING=1");
    info!("shutting down: stopping ingest");
    rules_cancel.cancel();
    if let Some(t) = rules_task {
        let _ = t.await;
    }
    ingest_cancel.cancel();
    match ingest_task.await {
        Ok(_store) => {}
        Err(e) => warn!(error = %e, "ingest task failed"),
    }
    ingest_alive.store(false, std::sync::atomic::Ordering::Relaxed);
    info!("shutting down: delivering what is due from the outbox");
    delivery_stop.cancel();
    for w in workers {
        if let Err(e) = w.await {
            warn!(error = %e, "alert delivery worker failed");
        }
    }
    sinks_cancel.cancel();
    broker.shutdown().await;
    api_cancel.cancel();
    let _ = api_task.await;
    if let Some(w) = watchdog {
        w.abort();
    }
    info!("aggregator stopped");
    Ok(())
}

/// systemd notifications: the agent's implementation, shared by path (one
/// piece of code, no dependency between the two programs).
#[path = "../../agent/src/notify.rs"]
pub mod notify;

/// Loading TOML config files: the agent's file, shared by path.
#[path = "../../agent/src/config_file.rs"]
pub mod config_file;

/// Logging set-up and signal handling: the agent's file, shared by path.
#[path = "../../agent/src/process.rs"]
pub mod process;
