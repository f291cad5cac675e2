//! Deadband: per-sensor report by exception, sans-IO (the clock is the
//! readings' own `time_ms`).
//!
//! For a sensor with a rule (`[deadband.<sensor>]`), a reading is admitted
//! when any of these holds, and then becomes the "last sent" reading:
//! * it is the sensor's first reading;
//! * numeric (F32, F64, Int): it differs from the last sent value by more
//!   than `delta` (a value within +/-`delta` is skipped); NaN counts as a
//!   change from a number and back, not from NaN to NaN;
//! * Bool: it differs from the last sent value (`delta` is not used);
//! * its value type or its quality differs from the last sent reading's;
//! * `max-interval` or more has passed since the last sent reading, or its
//!   time is before it (a clock set back: start again from this one).
//!
//! Str values and sensors without a rule always pass. State is kept only
//! for sensors with a rule, so memory is bounded by the configuration.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use crate::reading::{Quality, Reading, Value};

/// Default `max-interval`: a value that does not move is still sent every
/// 5 minutes, so "quiet" and "dead" can be told apart.
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(300);

fn default_max_interval() -> Duration {
    DEFAULT_MAX_INTERVAL
}

/// `[deadband.<sensor>]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeadbandConfig {
    /// Skip a value within +/- this of the last value sent (finite, >= 0).
    pub delta: f64,
    /// Send at least this often even without a change (default 5 min).
    #[serde(default = "default_max_interval", with = "humantime_serde")]
    pub max_interval: Duration,
}

/// What was last sent for a sensor.
#[derive(Debug, Clone, Copy)]
struct Sent {
    value: Kept,
    quality: Quality,
    time_ms: i64,
}

#[derive(Debug, Clone, Copy)]
enum Kept {
    Number(f64),
    Bool(bool),
}

/// Deadband filter over all sensors; see the module documentation.
#[derive(Debug, Default)]
pub struct Deadband {
    rules: HashMap<String, DeadbandConfig>,
    last: HashMap<String, Sent>,
}

impl Deadband {
    /// A filter applying `rules` (sensor name -> rule).
    pub fn new(rules: HashMap<String, DeadbandConfig>) -> Self {
        Deadband {
            rules,
            last: HashMap::new(),
        }
    }

    /// True when `r` must be sent; false when it is within the deadband.
    pub fn admit(&mut self, r: &Reading) -> bool {
        let Some(rule) = self.rules.get(&r.sensor) else {
            return true;
        };
        let value = match &r.value {
            Value::Str(_) => return true,
            Value::Bool(b) => Kept::Bool(*b),
            Value::F32(x) => Kept::Number(f64::from(*x)),
            Value::F64(x) => Kept::Number(*x),
            Value::Int(i) => Kept::Number(*i as f64),
        };
        let now = Sent {
            value,
            quality: r.quality,
            time_ms: r.time_ms,
        };
        let send = match self.last.get(&r.sensor) {
            None => true,
            Some(prev) => {
                prev.quality != now.quality
                    || changed(prev.value, now.value, rule.delta)
                    || due(prev.time_ms, now.time_ms, rule.max_interval)
            }
        };
        if send {
            match self.last.get_mut(&r.sensor) {
                Some(prev) => *prev = now,
                None => {
                    self.last.insert(r.sensor.clone(), now);
                }
            }
        }
        send
    }
}

fn changed(prev: Kept, now: Kept, delta: f64) -> bool {
    match (prev, now) {
        (Kept::Number(a), Kept::Number(b)) => {
            if a.is_nan() || b.is_nan() {
                a.is_nan() != b.is_nan()
            } else {
                (b - a).abs() > delta
            }
        }
        (Kept::Bool(a), Kept::Bool(b)) => a != b,
        _ => true,
    }
}

fn due(prev_ms: i64, now_ms: i64, max_interval: Duration) -> bool {
    let elapsed = now_ms.saturating_sub(prev_ms);
    elapsed < 0 || elapsed as u128 >= max_interval.as_millis()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn filter() -> Deadband {
        let rule = |delta: f64, secs: u64| DeadbandConfig {
            delta,
            max_interval: Duration::from_secs(secs),
        };
        Deadband::new(HashMap::from([
            ("level".to_owned(), rule(0.5, 60)),
            ("door".to_owned(), rule(0.0, 60)),
        ]))
    }

    fn r(sensor: &str, t_s: i64, value: Value) -> Reading {
        Reading::new(sensor, t_s * 1000, value)
    }

    #[test]
    fn within_the_band_is_skipped_outside_is_sent() {
        let mut d = filter();
        let got: Vec<bool> = [
            (0, 10.0),
            (1, 10.4),
            (2, 9.6),
            (3, 10.6),
            (4, 10.2),
            (5, 11.2),
            (6, 11.0),
        ]
        .iter()
        .map(|&(t, v)| d.admit(&r("level", t, Value::F64(v))))
        .collect();
        // Compared with the last SENT value (10.0, then 10.6, then 11.2).
        assert_eq!(got, [true, false, false, true, false, true, false]);
    }

    #[test]
    fn numeric_types_compare_as_numbers() {
        let mut d = filter();
        assert!(d.admit(&r("level", 0, Value::Int(10))));
        assert!(!d.admit(&r("level", 1, Value::F32(10.25))));
        assert!(d.admit(&r("level", 2, Value::F32(11.0))));
    }

    #[test]
    fn max_interval_forces_a_send() {
        let mut d = filter();
        assert!(d.admit(&r("level", 0, Value::F64(1.0))));
        assert!(!d.admit(&r("level", 59, Value::F64(1.0))));
        assert!(d.admit(&r("level", 60, Value::F64(1.0))));
        assert!(!d.admit(&r("level", 100, Value::F64(1.0))));
        assert!(d.admit(&r("level", 50, Value::F64(1.0))), "time went back");
    }

    #[test]
    fn bools_pass_on_change() {
        let mut d = filter();
        let got: Vec<bool> = [
            (0, false),
            (1, false),
            (2, true),
            (3, true),
            (4, false),
            (70, false),
        ]
        .iter()
        .map(|&(t, v)| d.admit(&r("door", t, Value::Bool(v))))
        .collect();
        assert_eq!(got, [true, false, true, false, true, true]);
    }

    #[test]
    fn quality_change_nan_strings_and_unruled_sensors_pass() {
        let mut d = filter();
        assert!(d.admit(&r("level", 0, Value::F64(1.0))));
        let mut bad = r("level", 1, Value::F64(1.0));
        bad.quality = Quality::Bad;
        assert!(d.admit(&bad), "quality changed");
        assert!(
            d.admit(&r("level", 2, Value::F64(1.0))),
            "quality back to good"
        );
        assert!(d.admit(&r("level", 3, Value::F64(f64::NAN))));
        assert!(!d.admit(&r("level", 4, Value::F64(f64::NAN))));
        assert!(d.admit(&r("level", 5, Value::F64(1.0))));
        assert!(d.admit(&r("level", 6, Value::Str("x".into()))));
        assert!(d.admit(&r("level", 7, Value::Bool(true))), "type changed");
        for t in 0..3 {
            assert!(d.admit(&r("other", t, Value::F64(1.0))));
        }
    }

    #[test]
    fn config_parses_with_default_interval_and_rejects_unknown_keys() {
        let c: DeadbandConfig = toml::from_str("delta = 0.01").unwrap();
        assert_eq!(c.max_interval, DEFAULT_MAX_INTERVAL);
        let c: DeadbandConfig = toml::from_str("delta = 1\nmax-interval = \"5m\"").unwrap();
        assert_eq!(c.max_interval, Duration::from_secs(300));
        assert!(toml::from_str::<DeadbandConfig>("delta = 1\nmax_interval = \"5m\"").is_err());
    }
}
