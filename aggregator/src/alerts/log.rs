//! The `log` sink: a firing alert at WARN, a resolve at INFO, through
//! `tracing` (journald when run under systemd). It is delivered from the
//! outbox like every sink, so a line appears once the transition is
//! committed (within one ingest flush interval).

use tracing::{info, warn};

use super::{AlertSink, Notification, SendFuture};
use crate::rules::model::AlertState;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct LogSink {
    name: String,
}

impl LogSink {
    /// A log sink called `name`.
    pub fn new(name: &str) -> LogSink {
        LogSink {
            name: name.to_owned(),
        }
    }
}

impl AlertSink for LogSink {
    fn send<'a>(&'a self, n: &'a Notification) -> SendFuture<'a> {
        let late_ms = n.processing_time_ms - n.event_time_ms;
        match n.state {
            AlertState::Firing => warn!(
                sink = %self.name, id = %n.id, rule = %n.rule, device = %n.device, sensor = %n.sensor,
                severity = n.severity_name(), value = ?n.value, event_time_ms = n.event_time_ms,
                late_ms, repeat = n.repeat,
                "ALERT FIRING: {}", n.summary
            ),
            _ => info!(
                sink = %self.name, id = %n.id, rule = %n.rule, device = %n.device, sensor = %n.sensor,
                value = ?n.value, event_time_ms = n.event_time_ms, late_ms,
                "alert resolved: {}", n.summary
            ),
        }
        Box::pin(async { Ok(()) })
    }
}
