//! The unit of data that flows from sources through the buffer to the
//! publisher.

pub use outpost_proto::batch::Value;
pub use outpost_proto::pb::Quality;

/// One reading as a source produces it: before it has a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Sensor name (after any config mapping/override).
    pub sensor: String,
    /// Unix time in ms, taken at read time (or derived from a firmware tick).
    pub time_ms: i64,
    /// The value.
    pub value: Value,
    /// Quality flag; `Good` unless the source knows better.
    pub quality: Quality,
}

impl Reading {
    /// A good-quality reading.
    pub fn new(sensor: impl Into<String>, time_ms: i64, value: Value) -> Self {
        Reading {
            sensor: sensor.into(),
            time_ms,
            value,
            quality: Quality::Good,
        }
    }
}

/// A reading stored in the buffer: it has its per-device sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// Per-device sequence number, only grows, survives restarts.
    pub seq: u64,
    /// The reading.
    pub reading: Reading,
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
