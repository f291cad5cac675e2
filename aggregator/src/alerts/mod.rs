//! Alert delivery: every alert transition reaches the operators, once, even
//! when a receiver is down for an hour and the aggregator restarts meanwhile.
//!
//! # Design
//!
//! ```text
//! rules engine --transition--> route --(sink names)--> Flush.alerts
//!     --same SQLite transaction as the marks and the engine snapshot-->
//!     alert_history + outbox rows (one per sink)
//!     --commit, then wake--> one delivery worker per sink --> AlertSink::send
//! ```
//!
//! * **Written before it is sent.** The rules runtime never hands a
//!   transition to a sink. It routes it ([`route::Routes`]) and keeps it
//!   until the next ingest commit, which writes it to `alert_history` and
//!   one `outbox` row per routed sink in the same transaction as the marks
//!   of the readings that caused it and the engine snapshot that records the
//!   new alert state ([`crate::state::Flush::alerts`]). A crash before the
//!   commit loses the readings' acks too, so the agents resend them and the
//!   engine produces the transition again; a crash after it leaves the rows
//!   for the workers. Nothing is notified that is not recorded.
//! * **Delivered from the outbox** ([`deliver`]): one worker per sink reads
//!   its pending rows in id order. Per alert (fingerprint) only the oldest
//!   pending row may be sent, so the firing of an alert always arrives
//!   before its resolve; different alerts go out in parallel (up to the
//!   sink's `parallel`). A failure is retried with exponential backoff and
//!   full jitter (`retry-initial` doubling up to `retry-max`); a row still
//!   not delivered `max-age` after it was queued becomes `dead`: counted,
//!   logged at ERROR, kept and visible at `GET /api/v1/outbox`.
//! * **At least once, with an idempotency key.** A row is marked delivered
//!   after the receiver confirmed it (HTTP 2xx, MQTT PUBACK, SMTP 250). A
//!   crash between the two sends it again: every notification carries
//!   [`Notification::id`] (`{fingerprint}-{number}`, plus `-r{n}` for the
//!   n-th repeat) so the receiver can drop the duplicate.
//! * **Repeats** (`repeat-interval` of a sink): while an alert stays firing,
//!   the worker queues a repeat row when the last notification of that
//!   alert to that sink is older than the interval and none is pending, in
//!   one transaction with the check (so a resolve committed meanwhile is
//!   seen). The Alertmanager sink repeats every minute by default, because
//!   Alertmanager resolves an alert that is not re-posted.
//!
//! The sinks: [`log`], [`webhook`], [`mqtt`], [`alertmanager`], [`email`];
//! each implements [`AlertSink`] and knows nothing about the outbox.

pub mod alertmanager;
pub mod api;
pub mod config;
pub mod deliver;
pub mod email;
pub mod http;
pub mod log;
pub mod mqtt;
pub mod outbox;
pub mod route;
pub mod template;
pub mod webhook;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::rules::model::{AlertState, Severity, Transition};

/// Value of [`Notification::schema`].
pub const SCHEMA: &str = "outpost.alert.v1";

/// What every sink sends: one alert transition (or a repeat of a firing
/// one), as JSON for webhook and MQTT. Built from the outbox row, so every
/// attempt of one row sends the same body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Idempotency key: `{fingerprint}-{number}`, or
    /// `{fingerprint}-{number}-r{repeat}` for a repeat. Equal keys mean the
    /// same notification: drop the second.
    pub id: String,
    /// Stable identity of the alert (rule, device, sensor, labels).
    pub fingerprint: String,
    /// Transition number of this alert (grows with every transition).
    pub number: u64,
    /// 0 for the transition itself, n for its n-th repeat while firing.
    pub repeat: u32,
    /// `firing` or `resolved`.
    pub state: AlertState,
    /// Rule name.
    pub rule: String,
    /// Device id.
    pub device: String,
    /// Sensor ("" for device-level rules such as offline).
    pub sensor: String,
    /// `info`, `warning` or `critical`.
    pub severity: Severity,
    /// Rule labels plus device labels.
    pub labels: BTreeMap<String, String>,
    /// The rule's rendered summary.
    pub summary: String,
    /// The value that caused the transition, when there is one.
    pub value: Option<f64>,
    /// The limit it was compared against, when there is one.
    pub threshold: Option<f64>,
    /// Event time of the transition (Unix ms: the reading's timestamp).
    pub event_time_ms: i64,
    /// Aggregator clock when the transition was computed (Unix ms).
    pub processing_time_ms: i64,
    /// When the alert started firing (Unix ms).
    pub active_since_ms: Option<i64>,
    /// When this notification was queued in the outbox (Unix ms).
    pub queued_ms: i64,
    /// Id of the transition in the alert history (`GET
    /// /api/v1/alerts/history`, SSE event id).
    pub history_id: i64,
}

impl Notification {
    /// The notification for `t`, queued at `queued_ms` as history row
    /// `history_id`, `repeat` 0 for the transition itself.
    pub fn new(t: &Transition, history_id: i64, repeat: u32, queued_ms: i64) -> Notification {
        let id = if repeat == 0 {
            format!("{}-{}", t.fingerprint, t.number)
        } else {
            format!("{}-{}-r{}", t.fingerprint, t.number, repeat)
        };
        Notification {
            schema: SCHEMA.to_owned(),
            id,
            fingerprint: t.fingerprint.clone(),
            number: t.number,
            repeat,
            state: t.state,
            rule: t.rule.clone(),
            device: t.device.clone(),
            sensor: t.sensor.clone(),
            severity: t.severity,
            labels: t.labels.clone(),
            summary: t.summary.clone(),
            value: t.value.map(shortest),
            threshold: t.threshold.map(shortest),
            event_time_ms: t.event_time_ms,
            processing_time_ms: t.processing_time_ms,
            active_since_ms: t.active_since_ms,
            queued_ms,
            history_id,
        }
    }

    /// `firing` / `resolved`.
    pub fn state_name(&self) -> &'static str {
        state_name(self.state)
    }

    /// `info` / `warning` / `critical`.
    pub fn severity_name(&self) -> &'static str {
        severity_name(self.severity)
    }
}

/// A value that came from an `f32` reading, as the shortest decimal of
/// that `f32` (80.2, not 80.19999694824219); other values unchanged.
pub fn shortest(v: f64) -> f64 {
    let narrow = v as f32;
    if f64::from(narrow) == v {
        format!("{narrow}").parse().unwrap_or(v)
    } else {
        v
    }
}

/// `pending` / `firing` / `resolved`.
pub fn state_name(s: AlertState) -> &'static str {
    match s {
        AlertState::Pending => "pending",
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    }
}

/// `info` / `warning` / `critical`.
pub fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

/// Whether a transition is notified at all: firings, and resolves of alerts
/// that fired. A pending episode that never fired resolves silently.
pub fn is_notified(t: &Transition) -> bool {
    match t.state {
        AlertState::Firing => true,
        AlertState::Resolved => t.active_since_ms.is_some(),
        AlertState::Pending => false,
    }
}

/// Why one delivery attempt failed. Every failure is retried (with backoff)
/// until the row's max age: a receiver that answers 400 or 401 may be fixed
/// by its operator within the hour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SendError(pub String);

impl SendError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> SendError {
        SendError(msg.into())
    }
}

/// The future [`AlertSink::send`] returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>>;

/// A destination for notifications. `send` returns `Ok` only once the
/// receiver has confirmed the notification (HTTP 2xx, PUBACK, SMTP 250);
/// it is called again, with the same notification, after an error or a
/// timeout. It must not panic on any answer of the receiver and should
/// bound its own time (the worker also cuts it off at the sink's timeout).
pub trait AlertSink: Send + Sync + std::fmt::Debug {
    /// Sends one notification.
    fn send<'a>(&'a self, n: &'a Notification) -> SendFuture<'a>;
}

/// A sink that cannot be built from its configuration (bad URL, unreadable
/// CA file, ...): a start-up error, exit code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alert sink {sink:?}: {message}")]
pub struct BuildError {
    /// Sink name.
    pub sink: String,
    /// What is wrong.
    pub message: String,
}

impl BuildError {
    /// An error of sink `sink`.
    pub fn new(sink: &str, message: impl Into<String>) -> BuildError {
        BuildError {
            sink: sink.to_owned(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn f32_values_are_shown_as_their_shortest_decimal() {
        assert_eq!(super::shortest(f64::from(80.2f32)), 80.2);
        assert_eq!(super::shortest(0.1), 0.1);
        assert_eq!(super::shortest(1e300), 1e300);
        assert_eq!(super::shortest(85.0), 85.0);
    }
}
