//! Prometheus metrics of the agent, served at `/metrics`.
//!
//! Every metric name is a constant here; every stage gets the one shared
//! [`Metrics`] (an `Arc`) and updates its own families. Updates are atomic
//! increments, cheap enough for the per-reading path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Prefix of every agent metric.
pub const PREFIX: &str = "outpost_agent";

/// Metric names (without the prefix and the `_total` suffix that counters get).
pub mod names {
    /// Readings produced by each source.
    pub const READINGS: &str = "readings";
    /// Errors per source and kind (crc, framing, oversize, body, lost_frames, malformed_line, io, open).
    pub const SOURCE_ERRORS: &str = "source_errors";
    /// 1 while a source is running, 0 while it retries (port missing...).
    pub const SOURCE_UP: &str = "source_up";
    /// Times a source re-opened its device after a failure.
    pub const SOURCE_RECONNECTS: &str = "source_reconnects";
    /// Readings skipped by the deadband filter.
    pub const DEADBAND_SUPPRESSED: &str = "deadband_suppressed";
    /// Readings appended to the buffer.
    pub const BUFFER_APPENDED: &str = "buffer_appended";
    /// Rows in the buffer (unacknowledged readings).
    pub const BUFFER_ROWS: &str = "buffer_rows";
    /// Bytes the buffer's rows occupy in the database.
    pub const BUFFER_BYTES: &str = "buffer_bytes";
    /// Age in seconds of the oldest buffered reading.
    pub const BUFFER_OLDEST_AGE_SECONDS: &str = "buffer_oldest_age_seconds";
    /// Readings dropped because the buffer was full.
    pub const BUFFER_DROPPED: &str = "buffer_dropped";
    /// SQLite commits (each one an fsync with durability full).
    pub const BUFFER_COMMITS: &str = "buffer_commits";
    /// Telemetry batches published.
    pub const PUBLISHED_BATCHES: &str = "published_batches";
    /// Readings published (resends included).
    pub const PUBLISHED_READINGS: &str = "published_readings";
    /// Readings re-published after a reconnect or an ack timeout.
    pub const RESENT_READINGS: &str = "resent_readings";
    /// Readings acknowledged by the aggregator and deleted from the buffer.
    pub const ACKED_READINGS: &str = "acked_readings";
    /// Highest sequence number the aggregator acknowledged.
    pub const ACKED_SEQ: &str = "acked_seq";
    /// MQTT (re)connections established.
    pub const MQTT_CONNECTS: &str = "mqtt_connects";
    /// 1 while connected to the broker.
    pub const MQTT_CONNECTED: &str = "mqtt_connected";
}

/// Label set of per-source metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Source name from the config.
    pub source: String,
}

/// Label set of per-source error metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceErrorLabels {
    /// Source name from the config.
    pub source: String,
    /// Error kind.
    pub kind: String,
}

/// Every metric of the agent.
#[derive(Debug, Default)]
pub struct Metrics {
    /// [`names::READINGS`]
    pub readings: Family<SourceLabels, Counter>,
    /// [`names::SOURCE_ERRORS`]
    pub source_errors: Family<SourceErrorLabels, Counter>,
    /// [`names::SOURCE_UP`]
    pub source_up: Family<SourceLabels, Gauge>,
    /// [`names::SOURCE_RECONNECTS`]
    pub source_reconnects: Family<SourceLabels, Counter>,
    /// [`names::DEADBAND_SUPPRESSED`]
    pub deadband_suppressed: Counter,
    /// [`names::BUFFER_APPENDED`]
    pub buffer_appended: Counter,
    /// [`names::BUFFER_ROWS`]
    pub buffer_rows: Gauge,
    /// [`names::BUFFER_BYTES`]
    pub buffer_bytes: Gauge,
    /// [`names::BUFFER_OLDEST_AGE_SECONDS`]
    pub buffer_oldest_age_seconds: Gauge<f64, AtomicU64>,
    /// [`names::BUFFER_DROPPED`]
    pub buffer_dropped: Counter,
    /// [`names::BUFFER_COMMITS`]
    pub buffer_commits: Counter,
    /// [`names::PUBLISHED_BATCHES`]
    pub published_batches: Counter,
    /// [`names::PUBLISHED_READINGS`]
    pub published_readings: Counter,
    /// [`names::RESENT_READINGS`]
    pub resent_readings: Counter,
    /// [`names::ACKED_READINGS`]
    pub acked_readings: Counter,
    /// [`names::ACKED_SEQ`]
    pub acked_seq: Gauge,
    /// [`names::MQTT_CONNECTS`]
    pub mqtt_connects: Counter,
    /// [`names::MQTT_CONNECTED`]
    pub mqtt_connected: Gauge,
}

impl Metrics {
    /// Increments the error counter of `source` for `kind` by `n`.
    pub fn source_error(&self, source: &str, kind: &str, n: u64) {
        self.source_errors
            .get_or_create(&SourceErrorLabels {
                source: source.to_owned(),
                kind: kind.to_owned(),
            })
            .inc_by(n);
    }

    /// Counter of readings produced by `source`.
    pub fn source_readings(&self, source: &str) -> Counter {
        self.readings
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .clone()
    }

    /// Marks `source` as running (true) or retrying (false).
    pub fn set_source_up(&self, source: &str, up: bool) {
        self.source_up
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut r = Registry::with_prefix(PREFIX);
        use names::*;
        r.register(
            READINGS,
            "Readings produced by each source",
            self.readings.clone(),
        );
        r.register(
            SOURCE_ERRORS,
            "Source errors by kind",
            self.source_errors.clone(),
        );
        r.register(
            SOURCE_UP,
            "1 while the source runs, 0 while it retries",
            self.source_up.clone(),
        );
        r.register(
            SOURCE_RECONNECTS,
            "Source device re-opens after a failure",
            self.source_reconnects.clone(),
        );
        r.register(
            DEADBAND_SUPPRESSED,
            "Readings skipped by the deadband filter",
            self.deadband_suppressed.clone(),
        );
        r.register(
            BUFFER_APPENDED,
            "Readings appended to the buffer",
            self.buffer_appended.clone(),
        );
        r.register(
            BUFFER_ROWS,
            "Unacknowledged readings in the buffer",
            self.buffer_rows.clone(),
        );
        r.register(
            BUFFER_BYTES,
            "Bytes used by buffered readings",
            self.buffer_bytes.clone(),
        );
        r.register(
            BUFFER_OLDEST_AGE_SECONDS,
            "Age of the oldest buffered reading",
            self.buffer_oldest_age_seconds.clone(),
        );
        r.register(
            BUFFER_DROPPED,
            "Readings dropped because the buffer was full",
            self.buffer_dropped.clone(),
        );
        r.register(
            BUFFER_COMMITS,
            "SQLite commits of the buffer",
            self.buffer_commits.clone(),
        );
        r.register(
            PUBLISHED_BATCHES,
            "Telemetry batches published",
            self.published_batches.clone(),
        );
        r.register(
            PUBLISHED_READINGS,
            "Readings published, resends included",
            self.published_readings.clone(),
        );
        r.register(
            RESENT_READINGS,
            "Readings re-published after reconnect or ack timeout",
            self.resent_readings.clone(),
        );
        r.register(
            ACKED_READINGS,
            "Readings acknowledged by the aggregator",
            self.acked_readings.clone(),
        );
        r.register(
            ACKED_SEQ,
            "Highest acknowledged sequence number",
            self.acked_seq.clone(),
        );
        r.register(
            MQTT_CONNECTS,
            "MQTT connections established",
            self.mqtt_connects.clone(),
        );
        r.register(
            MQTT_CONNECTED,
            "1 while connected to the broker",
            self.mqtt_connected.clone(),
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }
}
