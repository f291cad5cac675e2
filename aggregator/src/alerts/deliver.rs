//! The delivery workers: one task per sink, sending what the outbox holds.
//!
//! A round: queue repeats when due (sinks with `repeat-interval`), read
//! the oldest pending row of each alert, send the due ones
//! (`next_attempt_ms` reached), at most `parallel` at a time, each cut off
//! at the sink's `timeout`, and record each chunk's outcomes in one
//! transaction as soon as it is done. A row older than the sink's
//! `max-age` gets one last attempt when it is due; if that fails too it is
//! dead-lettered (so a wall clock that jumps forward does not kill
//! notifications a working receiver would take). A failed attempt is retried
//! after `min(retry-initial * 2^n, retry-max)`, drawn from the upper half
//! of that step (jitter, so alerts that failed together do not retry in
//! lockstep). Between rounds the worker sleeps until the earliest retry,
//! a commit of new transitions ([`Wake`]), or [`POLL_INTERVAL`].
//!
//! Shutdown: after the stop token, a worker keeps sending what is due for
//! at most the grace period, then leaves the rest in the outbox for the
//! next start. An attempt cut off by the deadline was not recorded: it is
//! sent again next time, with the same idempotency key.
//!
//! A database error is logged and the round retried after
//! [`DB_RETRY`]: the rows stay where they are.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::config::{Delivery, SinkConfig, SinkKind};
use super::outbox::{Outbox, Outcome, PendingRow};
use super::{AlertSink, BuildError, Notification};
use crate::ingest::now_ms;
use crate::metrics::Metrics;
use crate::rules::model::Transition;
use crate::state::StateError;

/// Longest sleep between two rounds when nothing wakes the worker.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Alerts looked at per round.
pub const SCAN_LIMIT: usize = 1000;
/// Wait after a database error.
pub const DB_RETRY: Duration = Duration::from_secs(1);
/// Longest time between two checks for due repeats.
pub const REPEAT_CHECK_MAX: Duration = Duration::from_secs(10);

/// Wakes the workers (and SSE streams) after a commit that recorded
/// transitions: a counter that only grows.
#[derive(Debug, Clone)]
pub struct Wake(Arc<watch::Sender<u64>>);

impl Default for Wake {
    fn default() -> Self {
        Wake(Arc::new(watch::channel(0).0))
    }
}

impl Wake {
    /// Tells every subscriber that new rows were committed.
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
    /// A receiver that sees every later [`Wake::notify`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// A built sink with its delivery options.
#[derive(Debug, Clone)]
pub struct SinkRuntime {
    /// Configured name.
    pub name: String,
    /// The sink.
    pub sink: Arc<dyn AlertSink>,
    /// Options.
    pub delivery: Delivery,
}

/// Where the aggregator's own broker can be reached (the MQTT sink's default).
pub type BrokerAddress = (String, u16);

/// Builds every configured sink (the implicit `log` included). `cancel`
/// stops the sinks' own background tasks (the MQTT client).
pub fn build_sinks(
    sinks: &[SinkConfig],
    broker: &BrokerAddress,
    cancel: &CancellationToken,
) -> Result<Vec<SinkRuntime>, BuildError> {
    sinks
        .iter()
        .map(|s| {
            let d = &s.delivery;
            let sink: Arc<dyn AlertSink> = match &s.kind {
                SinkKind::Log => Arc::new(super::log::LogSink::new(&s.name)),
                SinkKind::Webhook(c) => {
                    Arc::new(super::webhook::WebhookSink::new(&s.name, c, d.timeout)?)
                }
                SinkKind::Alertmanager(c) => Arc::new(super::alertmanager::AlertmanagerSink::new(
                    &s.name,
                    c,
                    d.timeout,
                    d.repeat_interval
                        .unwrap_or(super::config::DEFAULT_ALERTMANAGER_REPEAT),
                )?),
                SinkKind::Mqtt(c) => Arc::new(super::mqtt::MqttSink::new(
                    &s.name,
                    c,
                    broker.clone(),
                    d.timeout,
                    cancel.child_token(),
                )?),
                SinkKind::Email(c) => {
                    Arc::new(super::email::EmailSink::new(&s.name, c, d.timeout)?)
                }
            };
            Ok(SinkRuntime {
                name: s.name.clone(),
                sink,
                delivery: d.clone(),
            })
        })
        .collect()
}

/// Dead-letters what is pending for sinks no longer configured, then
/// starts one worker per sink. They run until `stop`, then drain for at
/// most `grace`. A worker that panics (a bug) is logged at ERROR and
/// started again after [`RESPAWN_DELAY`]; its rows stay in the outbox.
pub fn start(
    state_path: &Path,
    sinks: Vec<SinkRuntime>,
    metrics: Arc<Metrics>,
    wake: &Wake,
    stop: CancellationToken,
    grace: Duration,
) -> Result<Vec<JoinHandle<()>>, StateError> {
    let mut outbox = Outbox::open(state_path)?;
    let names: Vec<String> = sinks.iter().map(|s| s.name.clone()).collect();
    for (sink, n) in outbox.retire_unknown_sinks(&names, now_ms())? {
        error!(
            sink = %sink, notifications = n,
            "notifications pending for a sink that is no longer configured were dead-lettered (see GET /api/v1/outbox?status=dead)"
        );
        metrics
            .notifications_dead
            .get_or_create(&Metrics::sink(&sink))
            .inc_by(n);
    }
    let mut handles = Vec::new();
    for s in sinks {
        let outbox = Arc::new(Mutex::new(Outbox::open(state_path)?));
        let (metrics, wake, stop) = (metrics.clone(), wake.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let w = Worker {
                    rng: RandomState::new(),
                    draws: 0,
                    outbox: outbox.clone(),
                    metrics: metrics.clone(),
                    s: s.clone(),
                };
                let run = tokio::spawn(w.run(wake.subscribe(), stop.clone(), grace));
                match run.await {
                    Ok(()) => break,
                    Err(e) => {
                        error!(sink = %s.name, error = %e, "alert delivery worker failed; restarting it");
                        if stop.is_cancelled() {
                            break;
                        }
                        tokio::time::sleep(RESPAWN_DELAY).await;
                    }
                }
            }
        }));
    }
    Ok(handles)
}

/// Wait before a failed worker is started again.
pub const RESPAWN_DELAY: Duration = Duration::from_secs(1);

struct Worker {
    s: SinkRuntime,
    outbox: Arc<Mutex<Outbox>>,
    metrics: Arc<Metrics>,
    rng: RandomState,
    draws: u64,
}

/// The retry delay after the `attempts`-th failed attempt (1-based): from
/// the upper half of `min(initial * 2^(attempts-1), max)`.
pub fn retry_delay(d: &Delivery, attempts: u32, unit_random: f64) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(30))
        .unwrap_or(u32::MAX);
    let step = d.retry_initial.saturating_mul(factor).min(d.retry_max);
    let half = step / 2;
    half + half.mul_f64(unit_random.clamp(0.0, 1.0))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a row is due at `now`. A retry time further ahead than the
/// longest retry delay can only come from a wall clock that jumped back:
/// due at once instead of stalling for the size of the jump.
fn is_due(next_attempt_ms: i64, now: i64, d: &Delivery) -> bool {
    next_attempt_ms <= now || next_attempt_ms > now.saturating_add(ms(d.retry_max))
}

/// A notification ready to send.
struct Due {
    n: Notification,
    row: PendingRow,
    /// Older than max-age: a failure now dead-letters it.
    last_chance: bool,
}

/// What an attempt came to, with what to count once it is recorded.
enum Counted {
    Sent { latency_s: Option<f64> },
    Failed,
    Dead,
}

impl Worker {
    fn unit_random(&mut self) -> f64 {
        self.draws = self.draws.wrapping_add(1);
        (self.rng.hash_one(self.draws) >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Outbox) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || {
            let mut o = outbox.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut o)
        })
        .await
        .unwrap_or_else(|e| Err(StateError::Decode(format!("outbox task failed: {e}"))))
    }

    async fn run(
        mut self,
        mut wake: watch::Receiver<u64>,
        stop: CancellationToken,
        grace: Duration,
    ) {
        let name = self.s.name.clone();
        let labels = Metrics::sink(&name);
        let repeat_check = self
            .s
            .delivery
            .repeat_interval
            .map(|r| (r / 10).clamp(Duration::from_millis(100), REPEAT_CHECK_MAX));
        let mut next_repeat_check = Instant::now();
        let mut deadline: Option<Instant> = None;
        debug!(sink = %name, "delivery worker started");
        loop {
            if deadline.is_none() && stop.is_cancelled() {
                deadline = Some(Instant::now() + grace);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if let (Some(every), Some(interval)) = (repeat_check, self.s.delivery.repeat_interval) {
                if Instant::now() >= next_repeat_check && deadline.is_none() {
                    next_repeat_check = Instant::now() + every;
                    let now = now_ms();
                    let sink = name.clone();
                    match self
                        .db(move |o| o.queue_repeats(&sink, now - ms(interval), now))
                        .await
                    {
                        Ok(0) => {}
                        Ok(n) => {
                            debug!(sink = %name, n, "repeats queued");
                            self.metrics
                                .notifications_repeated
                                .get_or_create(&labels)
                                .inc_by(n as u64);
                        }
                        Err(e) => warn!(sink = %name, error = %e, "queueing repeats failed"),
                    }
                }
            }
            let sink = name.clone();
            let rows = match self.db(move |o| o.pending(&sink, SCAN_LIMIT)).await {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(sink = %name, error = %e, "reading the outbox failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(DB_RETRY) => {}
                        _ = stop.cancelled(), if deadline.is_none() => {}
                    }
                    continue;
                }
            };
            let worked = self.round(rows, &stop, &mut deadline, grace).await;
            self.update_gauges().await;
            if worked {
                continue;
            }
            if deadline.is_some() {
                break;
            }
            let wait = self.next_wait().await;
            tokio::select! {
                _ = stop.cancelled() => {}
                r = wake.changed() => {
                    if r.is_err() {
                        // Nobody can wake us any more: poll.
                        tokio::time::sleep(wait).await;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        debug!(sink = %name, "delivery worker stopped");
    }

    /// How long to sleep: until the earliest retry, at most [`POLL_INTERVAL`].
    async fn next_wait(&self) -> Duration {
        let sink = self.s.name.clone();
        match self.db(move |o| o.next_due(&sink)).await.ok().flatten() {
            Some(at) => {
                let ms = (at - now_ms()).clamp(0, ms(POLL_INTERVAL));
                Duration::from_millis(ms as u64)
            }
            None => POLL_INTERVAL,
        }
    }

    async fn update_gauges(&self) {
        let sink = self.s.name.clone();
        if let Ok(st) = self.db(move |o| o.stats(&sink)).await {
            let labels = Metrics::sink(&self.s.name);
            self.metrics
                .outbox_pending
                .get_or_create(&labels)
                .set(st.pending as i64);
            let age = st
                .oldest_pending_ms
                .map_or(0.0, |c| (now_ms() - c).max(0) as f64 / 1000.0);
            self.metrics
                .outbox_oldest_age
                .get_or_create(&labels)
                .set(age);
        }
    }

    /// Sends `n` with the sink's timeout; a panic in the sink is an error
    /// of this attempt, not the end of the worker.
    async fn attempt(
        sink: Arc<dyn AlertSink>,
        n: &Notification,
        timeout: Duration,
    ) -> Result<(), String> {
        use futures_util::FutureExt;
        let send = std::panic::AssertUnwindSafe(sink.send(n)).catch_unwind();
        match tokio::time::timeout(timeout, send).await {
            Ok(Ok(r)) => r.map_err(|e| e.0),
            Ok(Err(_)) => Err("the sink panicked (a bug; see the log)".to_owned()),
            Err(_) => Err(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        }
    }

    /// One round over the heads of the pending rows: sends the due ones,
    /// `parallel` at a time, recording each chunk's outcomes as soon as it
    /// is done. Returns whether it sent or retired anything (then the next
    /// round starts at once). Stopping during the round starts the grace
    /// period; what is still in flight when it ends is left pending.
    async fn round(
        &mut self,
        rows: Vec<PendingRow>,
        stop: &CancellationToken,
        deadline: &mut Option<Instant>,
        grace: Duration,
    ) -> bool {
        let now = now_ms();
        let d = self.s.delivery.clone();
        let mut seen = HashSet::new();
        let mut unreadable = Vec::new();
        let mut due = Vec::new();
        for r in rows {
            if !seen.insert(r.fingerprint.clone()) || !is_due(r.next_attempt_ms, now, &d) {
                continue;
            }
            // A creation time ahead of the clock (it jumped back) counts as new.
            let age = (now - r.created_ms).max(0);
            match serde_json::from_str::<Transition>(&r.body) {
                Ok(t) => due.push(Due {
                    n: Notification::new(&t, r.history_id, r.repeat, r.created_ms),
                    last_chance: age >= ms(d.max_age),
                    row: r,
                }),
                Err(e) => {
                    let error = format!("recorded transition is unreadable: {e}");
                    error!(sink = %self.s.name, outbox_id = r.id, "notification dead-lettered: {error}");
                    unreadable.push((Outcome::Dead { id: r.id, error }, Counted::Dead));
                }
            }
        }
        let worked = !unreadable.is_empty() || !due.is_empty();
        self.record(unreadable).await;
        for chunk in due.chunks(d.parallel.max(1)) {
            if deadline.is_none() && stop.is_cancelled() {
                *deadline = Some(Instant::now() + grace);
            }
            let attempts = chunk
                .iter()
                .map(|x| Self::attempt(self.s.sink.clone(), &x.n, d.timeout));
            let mut all = std::pin::pin!(futures_util::future::join_all(attempts));
            let results = loop {
                match *deadline {
                    Some(dl) => break tokio::time::timeout_at(dl, &mut all).await.ok(),
                    None => tokio::select! {
                        r = &mut all => break Some(r),
                        _ = stop.cancelled() => *deadline = Some(Instant::now() + grace),
                    },
                }
            };
            let Some(results) = results else {
                info!(sink = %self.s.name, "shutdown grace period over; the rest stays in the outbox");
                break;
            };
            let done = now_ms();
            let mut outcomes = Vec::with_capacity(chunk.len());
            for (x, res) in chunk.iter().zip(results) {
                let (n, r) = (&x.n, &x.row);
                let attempts = r.attempts + 1;
                match res {
                    Ok(()) => {
                        if r.attempts > 0 {
                            info!(sink = %self.s.name, id = %n.id, attempts, "notification delivered after retries");
                        } else {
                            debug!(sink = %self.s.name, id = %n.id, "notification delivered");
                        }
                        let latency_s = (n.repeat == 0)
                            .then(|| (done - n.processing_time_ms).max(0) as f64 / 1000.0);
                        outcomes
                            .push((Outcome::Delivered { id: r.id }, Counted::Sent { latency_s }));
                    }
                    Err(error) if x.last_chance => {
                        let error = format!(
                            "not delivered within max-age {} after {attempts} attempts (last error: {error})",
                            humantime::format_duration(d.max_age),
                        );
                        error!(sink = %self.s.name, id = %n.id, outbox_id = r.id, history_id = r.history_id, "notification dead-lettered: {error}");
                        outcomes.push((Outcome::Dead { id: r.id, error }, Counted::Dead));
                    }
                    Err(error) => {
                        let delay = retry_delay(&d, attempts, self.unit_random());
                        // WARN on the first failure and then at powers of two:
                        // an hour-long outage logs a dozen lines per alert.
                        if attempts.is_power_of_two() {
                            warn!(
                                sink = %self.s.name, id = %n.id, attempts, retry_in = %humantime::format_duration(delay),
                                error = %error, "notification not delivered; will retry"
                            );
                        } else {
                            debug!(sink = %self.s.name, id = %n.id, attempts, error = %error, "notification not delivered");
                        }
                        outcomes.push((
                            Outcome::Failed {
                                id: r.id,
                                next_attempt_ms: done.saturating_add(ms(delay)),
                                error,
                            },
                            Counted::Failed,
                        ));
                    }
                }
                if r.attempts > 0 {
                    self.metrics
                        .notifications_retried
                        .get_or_create(&Metrics::sink(&self.s.name))
                        .inc();
                }
            }
            self.record(outcomes).await;
        }
        worked
    }

    /// Writes outcomes in one transaction, then counts them. If the write
    /// fails nothing is counted: delivered ones are sent again (same key),
    /// failed ones retried at once, dead ones judged again.
    async fn record(&self, outcomes: Vec<(Outcome, Counted)>) {
        if outcomes.is_empty() {
            return;
        }
        let (rows, counts): (Vec<Outcome>, Vec<Counted>) = outcomes.into_iter().unzip();
        let now = now_ms();
        if let Err(e) = self.db(move |o| o.record(&rows, now)).await {
            warn!(sink = %self.s.name, error = %e, "recording delivery outcomes failed");
            tokio::time::sleep(DB_RETRY).await;
            return;
        }
        let labels = Metrics::sink(&self.s.name);
        for c in counts {
            match c {
                Counted::Sent { latency_s } => {
                    self.metrics.notifications_sent.get_or_create(&labels).inc();
                    if let Some(l) = latency_s {
                        self.metrics
                            .notification_latency
                            .get_or_create(&labels)
                            .observe(l);
                    }
                }
                Counted::Failed => {
                    self.metrics
                        .notifications_failed
                        .get_or_create(&labels)
                        .inc();
                }
                Counted::Dead => {
                    self.metrics.notifications_dead.get_or_create(&labels).inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_time_far_ahead_after_a_clock_jump_is_due_at_once() {
        let d = Delivery::default();
        assert!(is_due(1_000, 1_000, &d));
        assert!(!is_due(2_000, 1_000, &d));
        // Retry time a day ahead: the clock went back a day.
        assert!(is_due(1_000 + 86_400_000, 1_000, &d));
    }

    #[test]
    fn retry_delays_double_from_the_upper_half_and_stop_at_the_max() {
        let d = Delivery {
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ..Delivery::default()
        };
        assert_eq!(retry_delay(&d, 1, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(&d, 1, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(&d, 3, 1.0), Duration::from_secs(4));
        assert_eq!(retry_delay(&d, 3, 0.0), Duration::from_secs(2));
        assert_eq!(retry_delay(&d, 10, 1.0), Duration::from_secs(60));
        assert_eq!(retry_delay(&d, u32::MAX, 1.0), Duration::from_secs(60));
    }
}
