//! Prometheus metrics of the aggregator, served at `/metrics`. Names are
//! constants here; every stage updates its own families on the one shared
//! [`Metrics`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Prefix of every aggregator metric.
pub const PREFIX: &str = "outpost_aggregator";

/// Metric names (without prefix; counters get `_total`).
pub mod names {
    /// Readings processed (new, not duplicates).
    pub const READINGS: &str = "readings";
    /// Telemetry batches received (any outcome).
    pub const BATCHES: &str = "batches";
    /// Payload bytes received on telemetry topics.
    pub const BYTES: &str = "bytes";
    /// Readings dropped as duplicates (at or below the device's mark).
    pub const DUPLICATES: &str = "duplicates";
    /// Sequence numbers skipped by agents (gaps accepted).
    pub const GAP_READINGS: &str = "gap_readings";
    /// Batches held back because an earlier batch of the device is missing
    /// (lost in transit); the agent resends.
    pub const OUT_OF_ORDER_BATCHES: &str = "out_of_order_batches";
    /// Messages rejected into the dead-letter table, by reason.
    pub const DEAD_LETTERS: &str = "dead_letters";
    /// Messages ignored because the device belongs to another partition.
    pub const FOREIGN_PARTITION: &str = "foreign_partition_messages";
    /// Acks published.
    pub const ACKS: &str = "acks";
    /// SQLite commits of the ingest state.
    pub const STATE_COMMITS: &str = "state_commits";
    /// Devices currently online.
    pub const DEVICES_ONLINE: &str = "devices_online";
    /// Devices known.
    pub const DEVICES: &str = "devices";
    /// Seconds from a reading's timestamp to its processing.
    pub const INGEST_LATENCY: &str = "ingest_latency_seconds";
    /// Alert transitions, by new state.
    pub const ALERT_TRANSITIONS: &str = "alert_transitions";
    /// Alerts firing now.
    pub const ALERTS_FIRING: &str = "alerts_firing";
    /// Rules loaded.
    pub const RULES_LOADED: &str = "rules_loaded";
    /// Rule reloads refused because a file had errors.
    pub const RULE_RELOAD_FAILURES: &str = "rule_reload_failures";
    /// Notifications a sink's receiver confirmed, by sink.
    pub const NOTIFICATIONS_SENT: &str = "notifications_sent";
    /// Delivery attempts that failed (each is retried until max age), by sink.
    pub const NOTIFICATIONS_FAILED: &str = "notifications_failed";
    /// Delivery attempts that were retries of an earlier failure, by sink.
    pub const NOTIFICATIONS_RETRIED: &str = "notifications_retried";
    /// Notifications given up (max age, or sink removed), by sink.
    pub const NOTIFICATIONS_DEAD: &str = "notifications_dead_lettered";
    /// Repeat notifications queued for alerts that stay firing, by sink.
    pub const NOTIFICATIONS_REPEATED: &str = "notifications_repeated";
    /// Notifications waiting in the outbox, by sink.
    pub const OUTBOX_PENDING: &str = "outbox_pending";
    /// Age in seconds of the oldest notification waiting, by sink (0 when none).
    pub const OUTBOX_OLDEST_AGE: &str = "outbox_oldest_age_seconds";
    /// Seconds from a transition's computation to its confirmed delivery, by sink.
    pub const NOTIFICATION_LATENCY: &str = "notification_latency_seconds";
}

/// Label set with a sink name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// The sink's configured name.
    pub sink: String,
}

/// Label set with an alert state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `pending`, `firing` or `resolved`.
    pub state: String,
}

/// Label set with a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why (e.g. `malformed`, `device-mismatch`, `oversize`, `bad-topic`).
    pub reason: String,
}

/// Every metric of the aggregator.
#[derive(Debug)]
pub struct Metrics {
    /// [`names::READINGS`]
    pub readings: Counter,
    /// [`names::BATCHES`]
    pub batches: Counter,
    /// [`names::BYTES`]
    pub bytes: Counter,
    /// [`names::DUPLICATES`]
    pub duplicates: Counter,
    /// [`names::GAP_READINGS`]
    pub gap_readings: Counter,
    /// [`names::OUT_OF_ORDER_BATCHES`]
    pub out_of_order_batches: Counter,
    /// [`names::DEAD_LETTERS`]
    pub dead_letters: Family<ReasonLabels, Counter>,
    /// [`names::FOREIGN_PARTITION`]
    pub foreign_partition: Counter,
    /// [`names::ACKS`]
    pub acks: Counter,
    /// [`names::STATE_COMMITS`]
    pub state_commits: Counter,
    /// [`names::DEVICES_ONLINE`]
    pub devices_online: Gauge,
    /// [`names::DEVICES`]
    pub devices: Gauge,
    /// [`names::INGEST_LATENCY`]
    pub ingest_latency: Histogram,
    /// [`names::ALERT_TRANSITIONS`]
    pub alert_transitions: Family<StateLabels, Counter>,
    /// [`names::ALERTS_FIRING`]
    pub alerts_firing: Gauge,
    /// [`names::RULES_LOADED`]
    pub rules_loaded: Gauge,
    /// [`names::RULE_RELOAD_FAILURES`]
    pub rule_reload_failures: Counter,
    /// [`names::NOTIFICATIONS_SENT`]
    pub notifications_sent: Family<SinkLabels, Counter>,
    /// [`names::NOTIFICATIONS_FAILED`]
    pub notifications_failed: Family<SinkLabels, Counter>,
    /// [`names::NOTIFICATIONS_RETRIED`]
    pub notifications_retried: Family<SinkLabels, Counter>,
    /// [`names::NOTIFICATIONS_DEAD`]
    pub notifications_dead: Family<SinkLabels, Counter>,
    /// [`names::NOTIFICATIONS_REPEATED`]
    pub notifications_repeated: Family<SinkLabels, Counter>,
    /// [`names::OUTBOX_PENDING`]
    pub outbox_pending: Family<SinkLabels, Gauge>,
    /// [`names::OUTBOX_OLDEST_AGE`]
    pub outbox_oldest_age: Family<SinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// [`names::NOTIFICATION_LATENCY`]
    pub notification_latency: Family<SinkLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            readings: Counter::default(),
            batches: Counter::default(),
            bytes: Counter::default(),
            duplicates: Counter::default(),
            gap_readings: Counter::default(),
            out_of_order_batches: Counter::default(),
            dead_letters: Family::default(),
            foreign_partition: Counter::default(),
            acks: Counter::default(),
            state_commits: Counter::default(),
            devices_online: Gauge::default(),
            devices: Gauge::default(),
            // 1 ms .. ~65 s, doubling; a backlog replay lands in the top buckets.
            alert_transitions: Family::default(),
            alerts_firing: Gauge::default(),
            rules_loaded: Gauge::default(),
            rule_reload_failures: Counter::default(),
            notifications_sent: Family::default(),
            notifications_failed: Family::default(),
            notifications_retried: Family::default(),
            notifications_dead: Family::default(),
            notifications_repeated: Family::default(),
            outbox_pending: Family::default(),
            outbox_oldest_age: Family::default(),
            // 1 ms .. ~35 min, doubling: an hour-long outage lands in +Inf.
            notification_latency: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.001, 2.0, 22,
                ))
            }),
            ingest_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
            ),
        }
    }
}

impl Metrics {
    /// The label set of sink `name`.
    pub fn sink(name: &str) -> SinkLabels {
        SinkLabels {
            sink: name.to_owned(),
        }
    }

    /// Counts one dead letter for `reason`.
    pub fn dead_letter(&self, reason: &str) {
        self.dead_letters
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one alert transition.
    pub fn alert_transition(&self, state: crate::rules::model::AlertState) {
        let state = match state {
            crate::rules::model::AlertState::Pending => "pending",
            crate::rules::model::AlertState::Firing => "firing",
            crate::rules::model::AlertState::Resolved => "resolved",
        };
        self.alert_transitions
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .inc();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        use names::*;
        let mut r = Registry::with_prefix(PREFIX);
        r.register(READINGS, "Readings processed", self.readings.clone());
        r.register(BATCHES, "Telemetry batches received", self.batches.clone());
        r.register(
            BYTES,
            "Telemetry payload bytes received",
            self.bytes.clone(),
        );
        r.register(
            DUPLICATES,
            "Readings dropped as duplicates",
            self.duplicates.clone(),
        );
        r.register(
            GAP_READINGS,
            "Sequence numbers skipped by agents",
            self.gap_readings.clone(),
        );
        r.register(
            OUT_OF_ORDER_BATCHES,
            "Batches held back because an earlier one is missing",
            self.out_of_order_batches.clone(),
        );
        r.register(
            DEAD_LETTERS,
            "Messages rejected into the dead-letter table",
            self.dead_letters.clone(),
        );
        r.register(
            FOREIGN_PARTITION,
            "Messages for devices of another partition",
            self.foreign_partition.clone(),
        );
        r.register(ACKS, "Acks published", self.acks.clone());
        r.register(
            STATE_COMMITS,
            "SQLite commits of the ingest state",
            self.state_commits.clone(),
        );
        r.register(
            DEVICES_ONLINE,
            "Devices online",
            self.devices_online.clone(),
        );
        r.register(DEVICES, "Devices known", self.devices.clone());
        r.register(
            INGEST_LATENCY,
            "Seconds from reading timestamp to processing",
            self.ingest_latency.clone(),
        );
        r.register(
            ALERT_TRANSITIONS,
            "Alert transitions by new state",
            self.alert_transitions.clone(),
        );
        r.register(
            ALERTS_FIRING,
            "Alerts firing now",
            self.alerts_firing.clone(),
        );
        r.register(RULES_LOADED, "Rules loaded", self.rules_loaded.clone());
        r.register(
            RULE_RELOAD_FAILURES,
            "Rule reloads refused because of errors",
            self.rule_reload_failures.clone(),
        );
        r.register(
            NOTIFICATIONS_SENT,
            "Notifications confirmed by the receiver, by sink",
            self.notifications_sent.clone(),
        );
        r.register(
            NOTIFICATIONS_FAILED,
            "Failed delivery attempts (retried until max age), by sink",
            self.notifications_failed.clone(),
        );
        r.register(
            NOTIFICATIONS_RETRIED,
            "Delivery attempts that retried an earlier failure, by sink",
            self.notifications_retried.clone(),
        );
        r.register(
            NOTIFICATIONS_DEAD,
            "Notifications given up (max age or sink removed), by sink",
            self.notifications_dead.clone(),
        );
        r.register(
            NOTIFICATIONS_REPEATED,
            "Repeat notifications queued for alerts still firing, by sink",
            self.notifications_repeated.clone(),
        );
        r.register(
            OUTBOX_PENDING,
            "Notifications waiting in the outbox, by sink",
            self.outbox_pending.clone(),
        );
        r.register(
            OUTBOX_OLDEST_AGE,
            "Age of the oldest waiting notification in seconds, by sink",
            self.outbox_oldest_age.clone(),
        );
        r.register(
            NOTIFICATION_LATENCY,
            "Seconds from a transition's computation to its confirmed delivery, by sink",
            self.notification_latency.clone(),
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }
}
