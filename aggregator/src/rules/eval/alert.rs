//! One alert's state machine and the transitions it reports.
//!
//! States: `Inactive -> Pending -> Firing -> (Resolved) -> Inactive`.
//! `Resolved` is reported, not kept: after it the alert is `Inactive` again
//! and a later episode starts over (same fingerprint, higher number).
//! A pending alert whose condition stops holding before `for` elapses goes
//! back to `Inactive` and reports `Resolved` with `active_since_ms: None`
//! (it never fired; sinks that only notify on firing can skip it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::rules::compile;
use crate::rules::model::{AlertState, Hysteresis, Kind, Rule, Transition};

/// Where an alert is in its episode.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) enum Phase {
    /// Nothing to report.
    #[default]
    Inactive,
    /// The fire condition holds since `since` (event time); waiting for `for`.
    Pending { since: i64 },
    /// Firing since `since`; the clear condition holds since `clearing`
    /// (waiting for `clear_for`), if it does.
    Firing { since: i64, clearing: Option<i64> },
}

/// The fields of the alert's current episode (set while pending or firing).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Episode {
    pub(crate) fingerprint: String,
    pub(crate) labels: BTreeMap<String, String>,
}

/// One alert: state, transition counter and the last reported fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct Alert {
    pub(crate) phase: Phase,
    /// Number of the last transition reported (0: none yet).
    pub(crate) number: u64,
    pub(crate) episode: Option<Episode>,
    pub(crate) value: Option<f64>,
    pub(crate) threshold: Option<f64>,
    pub(crate) count: Option<u64>,
    pub(crate) event_time_ms: i64,
    pub(crate) processing_time_ms: i64,
}

impl Alert {
    /// Pending or firing.
    pub(crate) fn is_active(&self) -> bool {
        !matches!(self.phase, Phase::Inactive)
    }

    /// The reported state of an active alert.
    pub(crate) fn state(&self) -> Option<AlertState> {
        match self.phase {
            Phase::Inactive => None,
            Phase::Pending { .. } => Some(AlertState::Pending),
            Phase::Firing { .. } => Some(AlertState::Firing),
        }
    }

    fn active_since(&self) -> Option<i64> {
        match self.phase {
            Phase::Firing { since, .. } => Some(since),
            _ => None,
        }
    }
}

/// What identifies the alert and fills its transitions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subject<'a> {
    pub(crate) rule: &'a Rule,
    pub(crate) device: &'a str,
    pub(crate) device_labels: &'a BTreeMap<String, String>,
    pub(crate) sensor: &'a str,
    pub(crate) now_ms: i64,
}

/// The measured value behind a transition.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Measure {
    pub(crate) value: Option<f64>,
    pub(crate) threshold: Option<f64>,
    pub(crate) count: Option<u64>,
}

/// Moves `alert` to `to` at event time `at` and returns the transition.
/// `to` is the new phase; `Phase::Inactive` reports `Resolved`.
pub(crate) fn change(
    alert: &mut Alert,
    to: Phase,
    at: i64,
    m: Measure,
    s: Subject<'_>,
) -> Transition {
    let resolved_since = alert.active_since();
    if !alert.is_active() || alert.episode.is_none() {
        let labels = merged_labels(s.rule, s.device_labels);
        alert.episode = Some(Episode {
            fingerprint: fingerprint(&s.rule.name, s.device, s.sensor, &labels),
            labels,
        });
    }
    alert.phase = to;
    alert.number += 1;
    if m.value.is_some() {
        alert.value = m.value;
    }
    if m.threshold.is_some() {
        alert.threshold = m.threshold;
    }
    if m.count.is_some() {
        alert.count = m.count;
    }
    alert.event_time_ms = at;
    alert.processing_time_ms = s.now_ms;
    let state = alert.state().unwrap_or(AlertState::Resolved);
    let mut t = transition(alert, s.rule, s.device, s.sensor, state);
    if state == AlertState::Resolved {
        t.active_since_ms = resolved_since;
        alert.episode = None;
    }
    t
}

/// The transition describing `alert` as it stands, in `state`.
pub(crate) fn transition(
    alert: &Alert,
    rule: &Rule,
    device: &str,
    sensor: &str,
    state: AlertState,
) -> Transition {
    let (fingerprint, labels) = match &alert.episode {
        Some(e) => (e.fingerprint.clone(), e.labels.clone()),
        None => {
            let labels = rule.labels.clone();
            (fingerprint(&rule.name, device, sensor, &labels), labels)
        }
    };
    let mut t = Transition {
        fingerprint,
        number: alert.number,
        rule: rule.name.clone(),
        device: device.to_string(),
        sensor: sensor.to_string(),
        severity: rule.severity,
        state,
        labels,
        summary: String::new(),
        value: alert.value,
        threshold: alert.threshold,
        event_time_ms: alert.event_time_ms,
        processing_time_ms: alert.processing_time_ms,
        active_since_ms: alert.active_since(),
    };
    t.summary = render(rule, &t, alert.count);
    t
}

/// Rule labels over device labels (a rule label wins a clash).
pub(crate) fn merged_labels(
    rule: &Rule,
    device_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut l = device_labels.clone();
    l.extend(rule.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    l
}

/// FNV-1a 64 of rule name, device, sensor and the sorted labels, each part
/// followed by a 0xff byte (never in UTF-8) so parts cannot run together;
/// 16 lowercase hex digits.
pub(crate) fn fingerprint(
    rule: &str,
    device: &str,
    sensor: &str,
    labels: &BTreeMap<String, String>,
) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    feed(rule.as_bytes());
    feed(device.as_bytes());
    feed(sensor.as_bytes());
    for (k, v) in labels {
        feed(k.as_bytes());
        feed(v.as_bytes());
    }
    format!("{h:016x}")
}

/// The hysteresis machine on one evaluation at event time `t`: `fire` and
/// `clear` say whether the rule's conditions hold for the current value.
/// Returns the new phase when it changes (to report).
pub(crate) fn hysteresis_step(
    phase: Phase,
    h: &Hysteresis,
    t: i64,
    fire: bool,
    clear: bool,
) -> Option<Phase> {
    match phase {
        Phase::Inactive => on_inactive(h, t, fire),
        Phase::Pending { since } => on_pending(h, t, since, fire),
        Phase::Firing { since, clearing } => on_firing(h, t, since, clearing, clear),
    }
}

fn on_inactive(h: &Hysteresis, t: i64, fire: bool) -> Option<Phase> {
    if !fire {
        None
    } else if h.for_.is_zero() {
        Some(Phase::Firing {
            since: t,
            clearing: None,
        })
    } else {
        Some(Phase::Pending { since: t })
    }
}

fn on_pending(h: &Hysteresis, t: i64, since: i64, fire: bool) -> Option<Phase> {
    if !fire {
        Some(Phase::Inactive)
    } else if t.saturating_sub(since) >= ms(h.for_) {
        Some(Phase::Firing {
            since: since.saturating_add(ms(h.for_)),
            clearing: None,
        })
    } else {
        None
    }
}

fn on_firing(
    h: &Hysteresis,
    t: i64,
    since: i64,
    clearing: Option<i64>,
    clear: bool,
) -> Option<Phase> {
    match (clear, clearing) {
        (false, None) => None,
        (false, Some(_)) => Some(Phase::Firing {
            since,
            clearing: None,
        }),
        (true, c) => {
            let from = c.unwrap_or(t);
            if t.saturating_sub(from) >= ms(h.clear_for) {
                Some(Phase::Inactive)
            } else if c.is_none() {
                Some(Phase::Firing {
                    since,
                    clearing: Some(from),
                })
            } else {
                None
            }
        }
    }
}

/// Timers that run out by event time `t` when the last evaluation (`fire`,
/// `clear`) still stands: the value is taken to persist until the next
/// reading. Returns the new phase and the event time it took effect.
pub(crate) fn hysteresis_advance(
    phase: Phase,
    h: &Hysteresis,
    t: i64,
    fire: bool,
    clear: bool,
) -> Option<(Phase, i64)> {
    match phase {
        Phase::Pending { since } if fire => {
            let due = since.saturating_add(ms(h.for_));
            (t >= due).then_some((
                Phase::Firing {
                    since: due,
                    clearing: None,
                },
                due,
            ))
        }
        Phase::Firing {
            clearing: Some(c), ..
        } if clear => {
            let due = c.saturating_add(ms(h.clear_for));
            (t >= due).then_some((Phase::Inactive, due))
        }
        _ => None,
    }
}

/// Whether a phase change is only internal bookkeeping (the clear timer
/// starting or stopping) rather than a state change to report.
pub(crate) fn is_silent(from: Phase, to: Phase) -> bool {
    matches!((from, to), (Phase::Firing { .. }, Phase::Firing { .. }))
}

/// A duration in milliseconds, saturating.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `1h30m`, `5m`, `30s`, `250ms`.
pub(crate) fn humanize(d: Duration) -> String {
    let total_ms = d.as_millis();
    if total_ms == 0 {
        return "0s".to_string();
    }
    if total_ms % 1000 != 0 {
        return format!("{total_ms}ms");
    }
    let mut s = total_ms / 1000;
    let mut out = String::new();
    for (unit, len) in [("d", 86_400u128), ("h", 3600), ("m", 60), ("s", 1)] {
        if s >= len {
            let _ = write!(out, "{}{unit}", s / len);
            s %= len;
        }
    }
    out
}

/// A value for humans: integers without decimals, others with up to three.
pub(crate) fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The duration a rule's summary shows: its for/window/after/within.
fn rule_duration(rule: &Rule) -> Option<Duration> {
    match &rule.kind {
        Kind::Threshold(h) => Some(h.for_),
        Kind::Window { size, .. } => Some(*size),
        Kind::Rate { window, .. } => Some(*window),
        Kind::Absence { after, .. } => Some(*after),
        Kind::Offline { silent_for } => *silent_for,
        Kind::Count { within, .. } => Some(*within),
        Kind::Sequence { within, .. } => Some(*within),
    }
}

/// Renders the rule's summary template for a transition with
/// [`compile::render`]. Unknown fields (the checker rejects them) and
/// missing values render as "".
pub(crate) fn render(rule: &Rule, t: &Transition, count: Option<u64>) -> String {
    compile::render(&rule.summary, &|field: &str| match field {
        "rule" => Some(t.rule.clone()),
        "device" => Some(t.device.clone()),
        "sensor" => Some(t.sensor.clone()),
        "value" => t.value.map(format_value),
        "threshold" => t.threshold.map(format_value),
        "duration" => rule_duration(rule).map(humanize),
        "severity" => Some(severity_name(t).to_string()),
        "state" => Some(state_name(t.state).to_string()),
        "count" => count.map(|c| c.to_string()),
        other => other
            .strip_prefix("labels.")
            .and_then(|k| t.labels.get(k))
            .cloned(),
    })
}

fn severity_name(t: &Transition) -> &'static str {
    match t.severity {
        crate::rules::model::Severity::Info => "info",
        crate::rules::model::Severity::Warning => "warning",
        crate::rules::model::Severity::Critical => "critical",
    }
}

fn state_name(s: AlertState) -> &'static str {
    match s {
        AlertState::Pending => "pending",
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanize_durations() {
        assert_eq!(humanize(Duration::from_secs(30)), "30s");
        assert_eq!(humanize(Duration::from_secs(300)), "5m");
        assert_eq!(humanize(Duration::from_secs(5400)), "1h30m");
        assert_eq!(humanize(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn fingerprint_is_stable_and_separates_parts() {
        let l = BTreeMap::new();
        assert_eq!(
            fingerprint("r", "d", "s", &l),
            fingerprint("r", "d", "s", &l)
        );
        assert_ne!(
            fingerprint("ab", "c", "s", &l),
            fingerprint("a", "bc", "s", &l)
        );
        assert_eq!(fingerprint("r", "d", "s", &l).len(), 16);
    }

    #[test]
    fn values_for_humans() {
        assert_eq!(format_value(81.0), "81");
        assert_eq!(format_value(81.25), "81.25");
        assert_eq!(format_value(1.0 / 3.0), "0.333");
    }
}
