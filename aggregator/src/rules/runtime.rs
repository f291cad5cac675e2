//! The rules engine at work inside the aggregator.
//!
//! * [`RulesSink`] is the ingest's [`ReadingSink`]: every new reading
//!   (numeric; bools as 0/1) goes through the pure [`Engine`], and every
//!   alert transition is counted, routed to its sinks
//!   ([`crate::alerts::route`]) and queued as an [`AlertRecord`] for the
//!   next commit, which writes it to the alert history and the outbox
//!   together with the marks and the engine snapshot. No sink sees a
//!   transition before that commit; after it the delivery workers are
//!   woken ([`crate::alerts`]).
//! * The engine's alert states are snapshotted into the state database in
//!   the same transaction as the marks of the readings that produced them
//!   ([`ReadingSink::checkpoint`]), so after a crash or restart a firing
//!   alert stays firing (no resolve/fire pair) and pending timers resume.
//! * [`run_background`] ticks the engine once per [`TICK`] (absence,
//!   offline, `for` timers that expire without new readings) and reloads the
//!   rule directory when a file changes (checked every [`WATCH_INTERVAL`])
//!   or on SIGHUP. A reload builds the whole new set first; if any file has
//!   an error, the old set stays active and the errors are logged and shown
//!   at `GET /api/v1/rules`. Unchanged rules keep their state.
//!
//! The engine sits behind one mutex shared by ingest, the background task
//! and the API; ingest holds it for one batch at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use outpost_proto::batch::{ReadingRef, ValueRef};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::compile;
use super::eval::{Engine, EngineSnapshot};
use super::model::{AlertState, Kind, Rule, Transition};
use crate::alerts::deliver::Wake;
use crate::alerts::outbox::StartupHistory;
use crate::alerts::route::Routes;
use crate::alerts::{severity_name, state_name};
use crate::api::ApiState;
use crate::ingest::{now_ms, ReadingSink};
use crate::metrics::Metrics;
use crate::state::{AlertRecord, Flush};

/// Key of the engine snapshot in the state database.
pub const SNAPSHOT_KEY: &str = "rules";
/// How often the engine is ticked (processing-time checks).
pub const TICK: Duration = Duration::from_secs(1);
/// How often the rule directory is checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// One loaded rule as `GET /api/v1/rules` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleInfo {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: &'static str,
    /// Severity.
    pub severity: super::model::Severity,
    /// Sensors read.
    pub sensors: Vec<String>,
    /// `file:line` of the definition.
    pub origin: String,
}

/// What `GET /api/v1/rules` answers.
#[derive(Debug, Clone, Serialize)]
pub struct RulesStatus {
    /// Rule directory.
    pub dir: String,
    /// Active rules.
    pub rules: Vec<RuleInfo>,
    /// Unix ms of the last reload attempt.
    pub last_reload_ms: i64,
    /// Whether that attempt was applied.
    pub last_reload_ok: bool,
    /// Errors of the last attempt (`file:line:column: message`); when not
    /// empty, the previous rule set is still active.
    pub errors: Vec<String>,
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Threshold(_) => "threshold",
        Kind::Window { .. } => "window",
        Kind::Rate { .. } => "rate",
        Kind::Absence { .. } => "absence",
        Kind::Offline { .. } => "offline",
        Kind::Count { .. } => "count",
        Kind::Sequence { .. } => "sequence",
    }
}

fn infos(rules: &[Rule]) -> Vec<RuleInfo> {
    rules
        .iter()
        .map(|r| RuleInfo {
            name: r.name.clone(),
            kind: kind_name(&r.kind),
            severity: r.severity,
            sensors: r.sensors.clone(),
            origin: format!("{}:{}", r.origin.file, r.origin.line),
        })
        .collect()
}

/// Fingerprint of the rule directory's `*.toml` files (name, size, mtime).
fn dir_stamp(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .map(|p| {
                    let m = std::fs::metadata(&p).ok();
                    (
                        p,
                        m.as_ref().map_or(0, |m| m.len()),
                        m.and_then(|m| m.modified().ok()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The engine and what surrounds it; shared behind [`Shared`].
pub struct Runtime {
    engine: Engine,
    dir: PathBuf,
    status: RulesStatus,
    stamp: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    routes: Routes,
    /// Transitions not committed yet, in order.
    queued: Vec<AlertRecord>,
    /// Whether the flush being committed carries transitions.
    committing_alerts: bool,
    wake: Wake,
    /// Highest transition number per fingerprint, recorded or queued: a
    /// transition numbered at or below it (the engine forgets the numbers
    /// of inactive alerts across restarts) is renumbered above it, so an
    /// idempotency key is never reused.
    numbers: HashMap<String, u64>,
    dirty: bool,
    labels: HashMap<String, BTreeMap<String, String>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("dir", &self.dir)
            .field("rules", &self.status.rules.len())
            .finish()
    }
}

/// The runtime shared by ingest, the background task and the API.
pub type Shared = Arc<Mutex<Runtime>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Runtime> {
    // A panic while holding the lock would be a bug; the state is still the
    // best we have, so keep going with it.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runtime {
    /// Loads the rule directory (files with errors are skipped and
    /// reported; the others run), restores the alert states from
    /// `snapshot` (the bytes stored under [`SNAPSHOT_KEY`]).
    pub fn start(
        dir: &Path,
        lateness: Duration,
        metrics: Arc<Metrics>,
        routes: Routes,
        wake: Wake,
        snapshot: Option<&[u8]>,
        history: StartupHistory,
    ) -> Shared {
        let stamp = dir_stamp(dir);
        let (rules, errors) = compile::load_dir(dir);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for e in &errors {
            error!("rule error: {e}");
        }
        info!(dir = %dir.display(), rules = rules.len(), errors = errors.len(), "rules loaded");
        let status = RulesStatus {
            dir: dir.display().to_string(),
            rules: infos(&rules),
            last_reload_ms: now_ms(),
            last_reload_ok: errors.is_empty(),
            errors,
        };
        metrics.rules_loaded.set(rules.len() as i64);
        let mut engine = Engine::new(rules);
        engine.set_lateness(i64::try_from(lateness.as_millis()).unwrap_or(i64::MAX));
        if let Some(bytes) = snapshot {
            match serde_json::from_slice::<EngineSnapshot>(bytes) {
                Ok(s) => {
                    engine.restore(s);
                    info!(alerts = engine.firing().len(), "alert states restored");
                }
                Err(e) => {
                    warn!(error = %e, "stored alert states unreadable; starting without them")
                }
            }
        }
        metrics.alerts_firing.set(
            engine
                .firing()
                .iter()
                .filter(|t| t.state == AlertState::Firing)
                .count() as i64,
        );
        // Alerts the history says are firing but the restored engine does not
        // have (their rule changed or went away while we were stopped, or
        // the snapshot was unreadable) are resolved, so no receiver keeps a
        // firing alert nobody will ever resolve.
        let active: std::collections::HashSet<String> =
            engine.firing().into_iter().map(|t| t.fingerprint).collect();
        let now = now_ms();
        let ghosts: Vec<Transition> = history
            .firing
            .into_iter()
            .filter(|t| !active.contains(&t.fingerprint))
            .map(|mut t| {
                t.state = AlertState::Resolved;
                t.event_time_ms = now;
                t.processing_time_ms = now;
                t.value = None;
                t.threshold = None;
                t.summary = format!(
                    "{} (resolved: its rule changed or was removed while the aggregator was stopped)",
                    t.summary
                );
                t
            })
            .collect();
        if !ghosts.is_empty() {
            warn!(
                alerts = ghosts.len(),
                "alerts firing before the restart are gone from the rules; resolving them"
            );
        }
        let shared = Arc::new(Mutex::new(Runtime {
            engine,
            dir: dir.to_owned(),
            status,
            stamp,
            routes,
            queued: Vec::new(),
            committing_alerts: false,
            wake,
            numbers: history.numbers,
            dirty: false,
            labels: HashMap::new(),
            metrics,
        }));
        lock(&shared).emit(ghosts);
        shared
    }

    fn emit(&mut self, mut transitions: Vec<Transition>) {
        if transitions.is_empty() {
            return;
        }
        self.dirty = true;
        for t in &mut transitions {
            let last = self.numbers.entry(t.fingerprint.clone()).or_insert(0);
            if t.number <= *last {
                t.number = *last + 1;
            }
            *last = t.number;
        }
        for t in &transitions {
            self.metrics.alert_transition(t.state);
            if t.state == AlertState::Pending {
                debug!(rule = %t.rule, device = %t.device, sensor = %t.sensor, "alert pending");
            }
            let body = match serde_json::to_string(t) {
                Ok(b) => b,
                Err(e) => {
                    // Only a non-finite number could do this; serde_json
                    // writes those as null, so this is not expected.
                    error!(rule = %t.rule, device = %t.device, error = %e, "alert transition not serialisable; not recorded");
                    continue;
                }
            };
            self.queued.push(AlertRecord {
                fingerprint: t.fingerprint.clone(),
                number: t.number,
                rule: t.rule.clone(),
                device: t.device.clone(),
                sensor: t.sensor.clone(),
                severity: severity_name(t.severity).to_owned(),
                state: state_name(t.state).to_owned(),
                event_time_ms: t.event_time_ms,
                processing_time_ms: t.processing_time_ms,
                body,
                sinks: self.routes.sinks_for(t),
                follow_firing: crate::alerts::is_notified(t) && t.state == AlertState::Resolved,
                skip_sinks: self.routes.no_resolved(),
            });
        }
        let firing = self
            .engine
            .firing()
            .iter()
            .filter(|t| t.state == AlertState::Firing)
            .count();
        self.metrics.alerts_firing.set(firing as i64);
    }

    /// Reloads the directory: applies the new set only if every file is
    /// valid. Returns whether it was applied.
    pub fn reload(&mut self) -> bool {
        self.stamp = dir_stamp(&self.dir);
        let (rules, errors) = compile::load_dir(&self.dir);
        self.status.last_reload_ms = now_ms();
        if !errors.is_empty() {
            self.status.last_reload_ok = false;
            self.status.errors = errors.iter().map(ToString::to_string).collect();
            self.metrics.rule_reload_failures.inc();
            for e in &self.status.errors {
                error!("rule error (previous rules stay active): {e}");
            }
            return false;
        }
        self.status.last_reload_ok = true;
        self.status.errors.clear();
        self.status.rules = infos(&rules);
        self.metrics.rules_loaded.set(rules.len() as i64);
        info!(rules = rules.len(), "rules reloaded");
        let ts = self.engine.replace_rules(rules, now_ms());
        self.emit(ts);
        true
    }

    /// Processing-time checks.
    pub fn tick(&mut self, now: i64) {
        let ts = self.engine.tick(now);
        self.emit(ts);
    }

    /// Current rule set status.
    pub fn status(&self) -> RulesStatus {
        self.status.clone()
    }

    /// Alerts pending or firing now.
    pub fn alerts(&self) -> Vec<Transition> {
        self.engine.firing()
    }
}

/// The ingest sink that runs the rules.
#[derive(Debug, Clone)]
pub struct RulesSink(pub Shared);

impl ReadingSink for RulesSink {
    fn readings(
        &mut self,
        device: &str,
        labels: &BTreeMap<String, String>,
        readings: &[ReadingRef<'_>],
    ) {
        let mut rt = lock(&self.0);
        if !labels.is_empty() {
            rt.labels.insert(device.to_owned(), labels.clone());
        }
        let now = now_ms();
        let numeric = readings.iter().filter_map(|r| {
            let v = match r.value {
                ValueRef::F32(x) => f64::from(x),
                ValueRef::F64(x) => x,
                ValueRef::Int(x) => x as f64,
                ValueRef::Bool(b) => f64::from(u8::from(b)),
                ValueRef::Str(_) => return None,
            };
            Some((r.sensor, r.time_ms, v))
        });
        let out = rt.engine.device_readings(device, labels, numeric, now);
        rt.emit(out);
    }

    fn device_status(&mut self, device: &str, online: bool, time_ms: i64) {
        let mut rt = lock(&self.0);
        let labels = rt.labels.get(device).cloned().unwrap_or_default();
        let ts = rt
            .engine
            .device_status(device, &labels, online, time_ms, now_ms());
        rt.emit(ts);
    }

    fn checkpoint(&mut self, flush: &mut Flush) {
        let mut rt = lock(&self.0);
        let queued = std::mem::take(&mut rt.queued);
        flush.alerts.extend(queued);
        // Also true for alerts put back by a failed commit and retried now.
        rt.committing_alerts = !flush.alerts.is_empty();
        if !rt.dirty {
            return;
        }
        rt.dirty = false;
        match serde_json::to_vec(&rt.engine.snapshot()) {
            Ok(bytes) => flush.kv.push((SNAPSHOT_KEY.to_owned(), bytes)),
            Err(e) => error!(error = %e, "cannot serialise alert states"),
        }
    }

    fn committed(&mut self) {
        let mut rt = lock(&self.0);
        if std::mem::take(&mut rt.committing_alerts) {
            rt.wake.notify();
        }
    }
}

/// Ticks the engine and reloads rules on file change or SIGHUP, until `cancel`.
pub async fn run_background(shared: Shared, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; rules reload on file change only");
            None
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || lock(&s).tick(now_ms())).await;
            }
            _ = watch.tick() => {
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let mut rt = lock(&s);
                    if dir_stamp(&rt.dir) != rt.stamp {
                        info!("rule files changed; reloading");
                        rt.reload();
                    }
                })
                .await;
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                info!("SIGHUP: reloading rules");
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || lock(&s).reload()).await;
            }
        }
    }
}

/// `GET /api/v1/alerts` and `GET /api/v1/rules`, to merge with
/// [`crate::api::router_with`] (which adds auth and JSON errors).
pub fn routes(shared: Shared) -> Router<ApiState> {
    Router::new()
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/rules", get(rules))
        .with_state(shared)
}

async fn alerts(State(shared): State<Shared>) -> Json<serde_json::Value> {
    let alerts = lock(&shared).alerts();
    Json(serde_json::json!({ "alerts": alerts }))
}

async fn rules(State(shared): State<Shared>) -> Json<RulesStatus> {
    Json(lock(&shared).status())
}
