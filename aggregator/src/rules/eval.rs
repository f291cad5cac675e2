//! The rule evaluator: a sans-IO engine that turns readings, device status
//! changes and clock ticks into alert [`Transition`]s. No IO, no async, no
//! clock of its own: every call carries `now_ms` (the aggregator's clock,
//! "processing time"), readings carry their own timestamp ("event time").
//!
//! # Data layout and cost
//! - Rules are indexed by sensor name (`by_sensor`: sensor -> rule indices),
//!   so a reading only touches the rules that read its sensor; rules without
//!   sensors (offline, device-scoped absence) are kept apart and only run on
//!   device status changes, on [`Engine::tick`], and (to resolve) on
//!   readings from a device that has such an alert active.
//! - Devices are interned (`DevId`); each rule caches its selector verdict
//!   per device, keyed by the device's label generation (a label change
//!   bumps the generation and so invalidates the verdict).
//! - State is per (rule, device, sensor) *series*; sequence rules keep their
//!   correlation state per key (device, or the value of the correlation
//!   label) and their alerts in series as well.
//!
//! # Time
//! - Each series has an event-time clock: the largest reading time applied.
//!   A reading older than the clock by more than the lateness
//!   ([`DEFAULT_LATENESS_MS`], [`Engine::set_lateness`]) is counted
//!   ([`EngineStats::late_dropped`]) and skipped. A reading within the
//!   lateness but behind the clock is applied *as of the clock*: its value
//!   counts, its timestamp is clamped to the clock. Clocks, windows and timers
//!   therefore never move backwards; the price is up to `lateness` of skew
//!   in window membership for such readings.
//! - Between readings a series' value is taken to persist (a step function).
//!   Before a reading at `t` is applied, timers that ran out before `t` under
//!   that assumption take effect, with their own event time (a `for` of 10s
//!   started at 0 fires at 10s even if the next reading comes at 20s). So a
//!   backlog replayed after an outage gives the same transitions as live data.
//! - [`Engine::tick`] advances those same timers without readings, using the
//!   series' event-time estimate `clock + (now - processing time of the last
//!   reading)`: event time never runs ahead of the processing time actually
//!   elapsed since the last reading, so a replayed backlog is not
//!   outrun by ticks. Absence and offline silence use processing time only.
//!
//! # Alerts
//! Each alert is a state machine ([`alert::Phase`]): inactive -> pending ->
//! firing -> resolved (-> inactive). Only changes are reported: `Pending`
//! (the fire condition holds, `for` is running), `Firing`, `Resolved`. A
//! pending alert whose condition stops holding reports `Resolved` with
//! `active_since_ms: None` (it never fired). `number` counts the transitions
//! of one alert over its whole life (idempotency key with the fingerprint).
//! The fingerprint is FNV-1a 64 (hex) of rule name, device, sensor and the
//! sorted labels (device labels overlaid by rule labels) taken when the
//! episode starts, so a label change mid-episode does not change identity.
//!
//! # Kinds
//! - threshold: fire condition (held `for`) -> firing; clear condition (held
//!   `clear_for`) -> resolved. A value between the two keeps the state; a
//!   pending alert is dropped as soon as the fire condition fails.
//! - window: the aggregate is computed incrementally ([`window`]). Sliding:
//!   the readings in `(t - size, t]`, evaluated at every reading. Tumbling:
//!   windows `[k*size, (k+1)*size)` from the epoch, evaluated at the window's
//!   end when a reading of a later window arrives, or on `tick` once the
//!   estimated event time is past the end plus the lateness (readings for a
//!   window closed that way count as late). A gap of empty windows is
//!   evaluated once, at the end of the gap, for `count`/`sum` (as 0); other
//!   aggregates of an empty window have no value and are not evaluated.
//! - rate: `(last - first) / (t_last - t_first) * per` over the readings in
//!   `(t - window, t]`; needs two readings at different times.
//! - count: matching readings in `(t - within, t]`; fires at `n`, resolves
//!   when a match leaves the window and the count drops below `n` (at that
//!   exact event time, found on the next reading or on `tick`).
//! - absence: processing time only. Series scope: a series seen once (or
//!   a device named in `selector.devices`, from the moment the rule is
//!   loaded) with no reading for `after` fires; device scope: no reading from
//!   the device on any sensor. A reading resolves it.
//! - offline: `device_status(false)` fires; `silent_for` (processing time,
//!   readings and online status both count as signs of life) fires on
//!   `tick`; an online status, or a reading not older than the offline
//!   status, resolves it.
//! - sequence: per correlation key. Positive: a B within `within` after the
//!   latest unconsumed A fires (alert on B's device and sensor); each A
//!   matches one B; the alert resolves `within` after the last match.
//!   Negated: the first unmatched A starts a timer; a B clears it; when the
//!   key's event time passes `A + within` (next reading of either step for
//!   that key, or `tick`'s estimate) the alert fires on A's device and
//!   sensor with event time `A + within`; the next B resolves it. A B at
//!   exactly `A + within` is in time.
//!
//! # Selectors
//! Every condition must hold: the glob on the device id, the label matchers
//! (`*` = present), and, if `selector.devices` is not empty, membership in
//! it. A named device never seen yet has no known labels and matches on
//! its name alone.
//!
//! # Reload and restart
//! [`Engine::replace_rules`] keeps the whole state of rules whose
//! `definition_hash` is unchanged; removed or changed rules report one
//! `Resolved` per active alert. A changed rule with the same name starts
//! over but keeps its alerts' transition numbers. [`Engine::snapshot`] /
//! [`Engine::restore`] carry alert phases, timers, numbers and series clocks
//! (not window contents): a firing alert stays firing with no transition,
//! a pending `for` timer resumes (its processing-time estimate restarts at
//! the first tick after the restore, so downtime does not count).
//!
//! Invariants: a series' `clock` never decreases; a series in `Pending` or
//! `Firing` has an `episode` (fingerprint + labels); `maybe_device_alerts`
//! is true whenever a device-level alert of that device is active.

mod alert;
mod window;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

use self::alert::{
    change, hysteresis_advance, hysteresis_step, is_silent, ms, transition, Alert, Episode, Phase,
    Subject,
};
use self::window::WindowAgg;
use crate::rules::model::{
    AbsenceScope, AlertState, Cmp, Correlate, Hysteresis, Kind, Op, Rule, Selector, Transition,
    WindowMode,
};

/// FxHash (rustc's multiply-rotate hash): several times cheaper than the
/// default SipHash for the small keys of the per-reading path (device ids,
/// `(device, sensor)` pairs, sensor names). Not DoS-resistant, so it is
/// used only for maps whose keys are ids assigned here or names from the
/// rule files (a reading's sensor name is only looked up, never inserted).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A `HashMap` with [`FxHasher`].
pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// How far behind a series' clock a reading may be and still count.
pub const DEFAULT_LATENESS_MS: i64 = 5_000;

/// Sensor index of device-level alerts (offline, device-scoped absence).
const NO_SENSOR: u32 = u32::MAX;

type DevId = u32;

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Readings handed to [`Engine::reading`].
    pub readings: u64,
    /// (rule, reading) pairs looked at: grows only with rules that read the
    /// reading's sensor.
    pub evaluations: u64,
    /// Readings skipped for being later than the lateness.
    pub late_dropped: u64,
    /// Readings skipped for being NaN or infinite.
    pub non_finite: u64,
}

#[derive(Debug, Clone)]
struct Device {
    name: String,
    labels: BTreeMap<String, String>,
    /// Labels reported by the device itself (false for a named device
    /// never seen).
    known: bool,
    /// Bumped on every label change; keys the selector caches.
    generation: u64,
    first_seen_proc: i64,
    last_reading_proc: Option<i64>,
    /// Last reading or online status.
    last_alive_proc: Option<i64>,
    /// Event time of the last offline status, until it comes back.
    offline_at: Option<i64>,
    maybe_device_alerts: bool,
}

/// Kind-specific state of a series.
#[derive(Debug, Clone)]
enum Data {
    /// Threshold, offline, sequence alerts: nothing beyond the alert.
    Plain,
    Sliding(WindowAgg),
    Tumbling {
        agg: WindowAgg,
        index: Option<i64>,
        closed_through: i64,
    },
    Rate(WindowAgg),
    Count(VecDeque<i64>),
    Absence {
        last_seen: Option<i64>,
    },
}

#[derive(Debug, Clone)]
struct Series {
    alert: Alert,
    /// Event-time clock (for sequence alerts: the last match).
    clock: Option<i64>,
    /// Processing time of the last reading; None after a restore until the
    /// first tick.
    last_proc: Option<i64>,
    /// Last evaluated value and whether fire / clear held for it.
    last_value: Option<f64>,
    fire: bool,
    clear: bool,
    data: Data,
}

impl Series {
    fn new(kind: &Kind) -> Series {
        let data = match kind {
            Kind::Window {
                agg,
                mode: WindowMode::Sliding,
                ..
            } => Data::Sliding(WindowAgg::new(*agg)),
            Kind::Window {
                agg,
                mode: WindowMode::Tumbling,
                ..
            } => Data::Tumbling {
                agg: WindowAgg::new(*agg),
                index: None,
                closed_through: i64::MIN,
            },
            Kind::Rate { .. } => Data::Rate(WindowAgg::new(crate::rules::model::Agg::Count)),
            Kind::Count { .. } => Data::Count(VecDeque::new()),
            Kind::Absence { .. } => Data::Absence { last_seen: None },
            Kind::Threshold(_) | Kind::Offline { .. } | Kind::Sequence { .. } => Data::Plain,
        };
        Series {
            alert: Alert::default(),
            clock: None,
            last_proc: None,
            last_value: None,
            fire: false,
            clear: false,
            data,
        }
    }
}

/// Correlation state of a sequence rule for one key.
#[derive(Debug, Clone, Default)]
struct SeqKey {
    clock: Option<i64>,
    last_proc: Option<i64>,
    /// Latest A not yet matched (positive sequences).
    last_a: Option<(i64, DevId)>,
    /// Oldest A not yet followed by B (negated sequences).
    unmatched_a: Option<(i64, DevId)>,
    /// Devices whose alert of this key may be active.
    alerts: Vec<DevId>,
}

#[derive(Debug)]
struct RuleState {
    rule: Rule,
    /// `rule.sensors` plus sequence step sensors, deduplicated.
    sensors: Vec<String>,
    matches: FxMap<DevId, (u64, bool)>,
    series: FxMap<(DevId, u32), Series>,
    seq: HashMap<String, SeqKey>,
    /// Named devices given their absence series.
    seeded: bool,
}

impl RuleState {
    fn new(rule: Rule) -> RuleState {
        let mut sensors: Vec<String> = Vec::new();
        let steps = match &rule.kind {
            Kind::Sequence { first, then, .. } => vec![first.sensor.clone(), then.sensor.clone()],
            _ => Vec::new(),
        };
        let device_level = is_device_level(&rule.kind);
        for s in rule.sensors.iter().chain(steps.iter()) {
            if !device_level && !sensors.contains(s) {
                sensors.push(s.clone());
            }
        }
        RuleState {
            rule,
            sensors,
            matches: FxMap::default(),
            series: FxMap::default(),
            seq: HashMap::new(),
            seeded: false,
        }
    }

    fn sensor_index(&self, sensor: &str) -> Option<u32> {
        if sensor.is_empty() {
            return Some(NO_SENSOR);
        }
        self.sensors
            .iter()
            .position(|s| s == sensor)
            .and_then(|i| u32::try_from(i).ok())
    }
}

fn sensor_name(sensors: &[String], idx: u32) -> &str {
    if idx == NO_SENSOR {
        return "";
    }
    sensors.get(idx as usize).map(String::as_str).unwrap_or("")
}

fn is_device_level(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Offline { .. }
            | Kind::Absence {
                scope: AbsenceScope::Device,
                ..
            }
    )
}

/// The fire/clear limits of kinds that compare a value.
fn limits(kind: &Kind) -> Option<Hysteresis> {
    match kind {
        Kind::Threshold(h) => Some(*h),
        Kind::Window { limits, .. } | Kind::Rate { limits, .. } => Some(*limits),
        Kind::Count { n, .. } => Some(Hysteresis {
            fire: Cmp {
                op: Op::Ge,
                limit: f64::from(*n),
            },
            for_: std::time::Duration::ZERO,
            clear: Cmp {
                op: Op::Lt,
                limit: f64::from(*n),
            },
            clear_for: std::time::Duration::ZERO,
        }),
        _ => None,
    }
}

/// Snapshot of the engine's alert state, for persistence across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineSnapshot {
    /// Format version ([`SNAPSHOT_VERSION`]).
    pub version: u32,
    /// Every alert that has reported at least one transition.
    pub alerts: Vec<AlertSnapshot>,
}

/// Current snapshot format.
pub const SNAPSHOT_VERSION: u32 = 1;

/// One alert in a [`EngineSnapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertSnapshot {
    /// `Rule::definition_hash` of its rule.
    pub rule_hash: u64,
    /// Rule name (for people reading the snapshot).
    pub rule: String,
    /// Device.
    pub device: String,
    /// Sensor ("" for device-level alerts).
    pub sensor: String,
    /// Pending or firing; None when inactive (kept for its number).
    pub state: Option<AlertState>,
    /// Number of its last transition.
    pub number: u64,
    /// Pending since / firing since (event time).
    pub since_ms: Option<i64>,
    /// Clear condition holding since (firing only).
    pub clearing_since_ms: Option<i64>,
    /// Fingerprint of the active episode.
    pub fingerprint: Option<String>,
    /// Labels of the active episode.
    pub labels: BTreeMap<String, String>,
    /// Last reported value.
    pub value: Option<f64>,
    /// Last reported threshold.
    pub threshold: Option<f64>,
    /// Last reported count.
    pub count: Option<u64>,
    /// Event time of the last transition.
    pub event_time_ms: i64,
    /// Processing time of the last transition.
    pub processing_time_ms: i64,
    /// Series clock (event time).
    pub clock_ms: Option<i64>,
    /// Last evaluated value.
    pub last_value: Option<f64>,
    /// Whether the fire condition held at the last evaluation.
    pub fire_holds: bool,
    /// Whether the clear condition held at the last evaluation.
    pub clear_holds: bool,
    /// Correlation key (sequence rules).
    pub correlation_key: Option<String>,
}

/// The rules engine. See the module documentation for the semantics.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<RuleState>,
    /// Some rule has not been seeded yet (set when rules are loaded): the
    /// per-reading check stays O(1) instead of scanning every rule.
    needs_seed: bool,
    by_sensor: FxMap<String, Vec<usize>>,
    device_level: Vec<usize>,
    devices: Vec<Device>,
    device_ids: HashMap<String, DevId>,
    next_generation: u64,
    lateness_ms: i64,
    stats: EngineStats,
}

/// Everything one call needs besides the rule it is working on.
struct Cx<'a> {
    devices: &'a [Device],
    lateness_ms: i64,
    now: i64,
    out: &'a mut Vec<Transition>,
    late: &'a mut u64,
}

impl Engine {
    /// An engine running `rules`.
    pub fn new(rules: Vec<Rule>) -> Engine {
        let mut e = Engine {
            rules: rules.into_iter().map(RuleState::new).collect(),
            needs_seed: true,
            by_sensor: FxMap::default(),
            device_level: Vec::new(),
            devices: Vec::new(),
            device_ids: HashMap::new(),
            next_generation: 0,
            lateness_ms: DEFAULT_LATENESS_MS,
            stats: EngineStats::default(),
        };
        e.reindex();
        e
    }

    /// Sets the lateness (ms) beyond which a reading behind its series'
    /// clock is dropped.
    pub fn set_lateness(&mut self, lateness_ms: i64) {
        self.lateness_ms = lateness_ms.max(0);
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// The loaded rules.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|r| &r.rule)
    }

    fn reindex(&mut self) {
        self.needs_seed = true;
        self.by_sensor.clear();
        self.device_level.clear();
        for (i, rs) in self.rules.iter().enumerate() {
            if is_device_level(&rs.rule.kind) {
                self.device_level.push(i);
            }
            for s in &rs.sensors {
                self.by_sensor.entry(s.clone()).or_default().push(i);
            }
        }
    }

    /// Interns `name`; `labels` (when given) are the device's current ones.
    fn device(&mut self, name: &str, labels: Option<&BTreeMap<String, String>>, now: i64) -> DevId {
        let id = match self.device_ids.get(name) {
            Some(&id) => id,
            None => {
                let id = DevId::try_from(self.devices.len()).unwrap_or(DevId::MAX);
                self.next_generation += 1;
                self.devices.push(Device {
                    name: name.to_string(),
                    labels: BTreeMap::new(),
                    known: false,
                    generation: self.next_generation,
                    first_seen_proc: now,
                    last_reading_proc: None,
                    last_alive_proc: None,
                    offline_at: None,
                    maybe_device_alerts: false,
                });
                self.device_ids.insert(name.to_string(), id);
                id
            }
        };
        if let (Some(labels), Some(d)) = (labels, self.devices.get_mut(id as usize)) {
            if !d.known || d.labels != *labels {
                d.labels = labels.clone();
                d.known = true;
                self.next_generation += 1;
                d.generation = self.next_generation;
            }
        }
        id
    }

    /// Gives absence rules their series for explicitly named devices.
    fn seed(&mut self, now: i64) {
        if !self.needs_seed {
            return;
        }
        self.needs_seed = false;
        for ri in 0..self.rules.len() {
            let Some(rs) = self.rules.get(ri) else {
                continue;
            };
            if rs.seeded {
                continue;
            }
            let names = rs.rule.selector.devices.clone();
            let series_scope = matches!(
                rs.rule.kind,
                Kind::Absence {
                    scope: AbsenceScope::Series,
                    ..
                }
            );
            let ids: Vec<DevId> = names.iter().map(|n| self.device(n, None, now)).collect();
            let Some(rs) = self.rules.get_mut(ri) else {
                continue;
            };
            rs.seeded = true;
            if !series_scope {
                continue;
            }
            for id in ids {
                for si in 0..rs.sensors.len() {
                    let si = u32::try_from(si).unwrap_or(NO_SENSOR);
                    let kind = &rs.rule.kind;
                    rs.series.entry((id, si)).or_insert_with(|| {
                        let mut s = Series::new(kind);
                        s.data = Data::Absence {
                            last_seen: Some(now),
                        };
                        s
                    });
                }
            }
        }
    }

    /// One reading of `device` (whose labels are `labels`) at event time
    /// `time_ms`; `now_ms` is processing time. Returns the transitions it
    /// caused. See [`Engine::device_readings`] for several of one device.
    pub fn reading(
        &mut self,
        device: &str,
        labels: &BTreeMap<String, String>,
        sensor: &str,
        time_ms: i64,
        value: f64,
        now_ms: i64,
    ) -> Vec<Transition> {
        self.device_readings(device, labels, [(sensor, time_ms, value)], now_ms)
    }

    /// Readings `(sensor, event time, value)` of one device, in order, as
    /// ingest hands them over (a batch): the device and its labels are
    /// looked up once, not per reading.
    pub fn device_readings<'r>(
        &mut self,
        device: &str,
        labels: &BTreeMap<String, String>,
        readings: impl IntoIterator<Item = (&'r str, i64, f64)>,
        now_ms: i64,
    ) -> Vec<Transition> {
        self.seed(now_ms);
        let mut out = Vec::new();
        let dev = self.device(device, Some(labels), now_ms);
        let mut first = true;
        for (sensor, time_ms, value) in readings {
            self.stats.readings += 1;
            if !value.is_finite() {
                self.stats.non_finite += 1;
                continue;
            }
            if first {
                first = false;
                if let Some(d) = self.devices.get_mut(dev as usize) {
                    d.last_reading_proc = Some(now_ms);
                    d.last_alive_proc = Some(now_ms);
                }
                if self
                    .devices
                    .get(dev as usize)
                    .is_some_and(|d| d.maybe_device_alerts)
                {
                    self.resolve_device_level(dev, time_ms, now_ms, false, &mut out);
                }
            }
            let Engine {
                rules,
                by_sensor,
                devices,
                lateness_ms,
                stats,
                ..
            } = self;
            let Some(idxs) = by_sensor.get(sensor) else {
                continue;
            };
            let Some(d) = devices.get(dev as usize) else {
                continue;
            };
            let mut cx = Cx {
                devices,
                lateness_ms: *lateness_ms,
                now: now_ms,
                out: &mut out,
                late: &mut stats.late_dropped,
            };
            for &ri in idxs {
                stats.evaluations += 1;
                let Some(rs) = rules.get_mut(ri) else {
                    continue;
                };
                if !selected(rs, dev, d) {
                    continue;
                }
                let Some(si) = rs.sensor_index(sensor) else {
                    continue;
                };
                on_reading(rs, dev, si, sensor, time_ms, value, &mut cx);
            }
        }
        out
    }

    /// A device's status changed (online, or offline by last will).
    pub fn device_status(
        &mut self,
        device: &str,
        labels: &BTreeMap<String, String>,
        online: bool,
        time_ms: i64,
        now_ms: i64,
    ) -> Vec<Transition> {
        self.seed(now_ms);
        let mut out = Vec::new();
        let dev = self.device(device, Some(labels), now_ms);
        if online {
            if let Some(d) = self.devices.get_mut(dev as usize) {
                d.offline_at = None;
                d.last_alive_proc = Some(now_ms);
            }
            self.resolve_device_level(dev, time_ms, now_ms, true, &mut out);
            return out;
        }
        let Engine {
            rules,
            device_level,
            devices,
            ..
        } = self;
        let Some(d) = devices.get_mut(dev as usize) else {
            return out;
        };
        d.offline_at = Some(time_ms);
        for &ri in device_level.iter() {
            let Some(rs) = rules.get_mut(ri) else {
                continue;
            };
            if !matches!(rs.rule.kind, Kind::Offline { .. }) || !selected(rs, dev, d) {
                continue;
            }
            let s = rs
                .series
                .entry((dev, NO_SENSOR))
                .or_insert_with(|| Series::new(&rs.rule.kind));
            if !s.alert.is_active() {
                let sub = subject(&rs.rule, d, "", now_ms);
                out.push(change(
                    &mut s.alert,
                    Phase::Firing {
                        since: time_ms,
                        clearing: None,
                    },
                    time_ms,
                    Default::default(),
                    sub,
                ));
                d.maybe_device_alerts = true;
            }
        }
        out
    }

    /// Resolves the device-level alerts of `dev` that a sign of life at
    /// event time `t` ends (`status`: an online status, else a reading).
    fn resolve_device_level(
        &mut self,
        dev: DevId,
        t: i64,
        now: i64,
        status: bool,
        out: &mut Vec<Transition>,
    ) {
        let Engine {
            rules,
            device_level,
            devices,
            ..
        } = self;
        let Some(d) = devices.get_mut(dev as usize) else {
            return;
        };
        let mut still = false;
        for &ri in device_level.iter() {
            let Some(rs) = rules.get_mut(ri) else {
                continue;
            };
            let Some(s) = rs.series.get_mut(&(dev, NO_SENSOR)) else {
                continue;
            };
            if !s.alert.is_active() {
                continue;
            }
            let ends = match rs.rule.kind {
                Kind::Absence { .. } => !status,
                Kind::Offline { .. } => status || d.offline_at.is_none_or(|o| t >= o),
                _ => false,
            };
            if ends {
                let sub = subject(&rs.rule, d, "", now);
                out.push(change(
                    &mut s.alert,
                    Phase::Inactive,
                    t,
                    Default::default(),
                    sub,
                ));
            } else {
                still = true;
            }
        }
        d.maybe_device_alerts = still;
        if !status && d.offline_at.is_some_and(|o| t >= o) {
            d.offline_at = None;
        }
    }

    /// Processing-time checks and timers that run out without readings.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Transition> {
        self.seed(now_ms);
        let mut out = Vec::new();
        let Engine {
            rules,
            devices,
            lateness_ms,
            stats,
            ..
        } = self;
        let mut cx = Cx {
            devices,
            lateness_ms: *lateness_ms,
            now: now_ms,
            out: &mut out,
            late: &mut stats.late_dropped,
        };
        for rs in rules.iter_mut() {
            if is_device_level(&rs.rule.kind) {
                continue;
            }
            tick_rule(rs, &mut cx);
        }
        self.tick_device_level(now_ms, &mut out);
        sort_transitions(&mut out);
        out
    }

    fn tick_device_level(&mut self, now: i64, out: &mut Vec<Transition>) {
        let Engine {
            rules,
            device_level,
            devices,
            ..
        } = self;
        for &ri in device_level.iter() {
            let Some(rs) = rules.get_mut(ri) else {
                continue;
            };
            let silence = match rs.rule.kind {
                Kind::Absence { after, .. } => ms(after),
                Kind::Offline {
                    silent_for: Some(s),
                } => ms(s),
                _ => continue,
            };
            let absence = matches!(rs.rule.kind, Kind::Absence { .. });
            for (i, d) in devices.iter_mut().enumerate() {
                let dev = DevId::try_from(i).unwrap_or(DevId::MAX);
                if !selected(rs, dev, d) {
                    continue;
                }
                let last = if absence {
                    d.last_reading_proc
                } else {
                    d.last_alive_proc
                }
                .unwrap_or(d.first_seen_proc);
                if now.saturating_sub(last) < silence {
                    continue;
                }
                let s = rs
                    .series
                    .entry((dev, NO_SENSOR))
                    .or_insert_with(|| Series::new(&rs.rule.kind));
                if s.alert.is_active() {
                    continue;
                }
                let at = last.saturating_add(silence);
                let sub = subject(&rs.rule, d, "", now);
                out.push(change(
                    &mut s.alert,
                    Phase::Firing {
                        since: at,
                        clearing: None,
                    },
                    at,
                    Default::default(),
                    sub,
                ));
                d.maybe_device_alerts = true;
            }
        }
    }

    /// Hot reload: keeps the state of rules whose `definition_hash` is
    /// unchanged; resolves the active alerts of removed or changed rules.
    pub fn replace_rules(&mut self, rules: Vec<Rule>, now_ms: i64) -> Vec<Transition> {
        let mut old: HashMap<u64, RuleState> = self
            .rules
            .drain(..)
            .map(|r| (r.rule.definition_hash, r))
            .collect();
        let mut fresh_names: HashMap<String, usize> = HashMap::new();
        for rule in rules {
            let st = match old.remove(&rule.definition_hash) {
                Some(mut st) => {
                    st.rule = rule;
                    st
                }
                None => {
                    fresh_names.insert(rule.name.clone(), self.rules.len());
                    RuleState::new(rule)
                }
            };
            self.rules.push(st);
        }
        let mut out = Vec::new();
        let mut gone: Vec<RuleState> = old.into_values().collect();
        gone.sort_by(|a, b| a.rule.name.cmp(&b.rule.name));
        for mut rs in gone {
            let carry = fresh_names.get(&rs.rule.name).copied();
            for (&(dev, si), s) in rs.series.iter_mut() {
                let Some(d) = self.devices.get(dev as usize) else {
                    continue;
                };
                if s.alert.is_active() {
                    let sub = subject(&rs.rule, d, sensor_name(&rs.sensors, si), now_ms);
                    out.push(change(
                        &mut s.alert,
                        Phase::Inactive,
                        now_ms,
                        Default::default(),
                        sub,
                    ));
                }
                // Keep numbers increasing for a rule that was only changed.
                let Some(new) = carry.and_then(|i| self.rules.get_mut(i)) else {
                    continue;
                };
                let sensor = sensor_name(&rs.sensors, si);
                let Some(nsi) = new.sensor_index(sensor) else {
                    continue;
                };
                let kind = &new.rule.kind;
                let ns = new
                    .series
                    .entry((dev, nsi))
                    .or_insert_with(|| Series::new(kind));
                ns.alert.number = ns.alert.number.max(s.alert.number);
            }
        }
        for d in &mut self.devices {
            d.maybe_device_alerts = true; // recomputed at the next reading
        }
        self.reindex();
        self.seed(now_ms);
        sort_transitions(&mut out);
        out
    }

    /// The active (pending or firing) alerts with their current fields.
    pub fn firing(&self) -> Vec<Transition> {
        let mut out = Vec::new();
        for rs in &self.rules {
            for (&(dev, si), s) in &rs.series {
                let (Some(state), Some(d)) = (s.alert.state(), self.devices.get(dev as usize))
                else {
                    continue;
                };
                out.push(transition(
                    &s.alert,
                    &rs.rule,
                    &d.name,
                    sensor_name(&rs.sensors, si),
                    state,
                ));
            }
        }
        sort_transitions(&mut out);
        out
    }

    /// The alert state to persist (window contents are not included).
    pub fn snapshot(&self) -> EngineSnapshot {
        let mut alerts = Vec::new();
        for rs in &self.rules {
            let mut keys: HashMap<DevId, &str> = HashMap::new();
            for (k, sk) in &rs.seq {
                for &dev in &sk.alerts {
                    keys.insert(dev, k);
                }
            }
            for (&(dev, si), s) in &rs.series {
                let Some(d) = self.devices.get(dev as usize) else {
                    continue;
                };
                if s.alert.number == 0 {
                    continue;
                }
                let a = &s.alert;
                let (since, clearing) = match a.phase {
                    Phase::Inactive => (None, None),
                    Phase::Pending { since } => (Some(since), None),
                    Phase::Firing { since, clearing } => (Some(since), clearing),
                };
                alerts.push(AlertSnapshot {
                    rule_hash: rs.rule.definition_hash,
                    rule: rs.rule.name.clone(),
                    device: d.name.clone(),
                    sensor: sensor_name(&rs.sensors, si).to_string(),
                    state: a.state(),
                    number: a.number,
                    since_ms: since,
                    clearing_since_ms: clearing,
                    fingerprint: a.episode.as_ref().map(|e| e.fingerprint.clone()),
                    labels: a
                        .episode
                        .as_ref()
                        .map(|e| e.labels.clone())
                        .unwrap_or_default(),
                    value: a.value,
                    threshold: a.threshold,
                    count: a.count,
                    event_time_ms: a.event_time_ms,
                    processing_time_ms: a.processing_time_ms,
                    clock_ms: s.clock,
                    last_value: s.last_value,
                    fire_holds: s.fire,
                    clear_holds: s.clear,
                    correlation_key: keys.get(&dev).map(|k| k.to_string()),
                });
            }
        }
        alerts
            .sort_by(|a, b| (&a.rule, &a.device, &a.sensor).cmp(&(&b.rule, &b.device, &b.sensor)));
        EngineSnapshot {
            version: SNAPSHOT_VERSION,
            alerts,
        }
    }

    /// Restores a snapshot taken by [`Engine::snapshot`] into an engine with
    /// the same rules; entries of rules no longer loaded are ignored, and so
    /// is a snapshot of another format version (the engine starts clean).
    pub fn restore(&mut self, snap: EngineSnapshot) {
        if snap.version != SNAPSHOT_VERSION {
            return;
        }
        let by_hash: HashMap<u64, usize> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.rule.definition_hash, i))
            .collect();
        for a in snap.alerts {
            let Some(&ri) = by_hash.get(&a.rule_hash) else {
                continue;
            };
            let now = a.processing_time_ms;
            let dev = self.device(&a.device, None, now);
            let Some(rs) = self.rules.get_mut(ri) else {
                continue;
            };
            let Some(si) = rs.sensor_index(&a.sensor) else {
                continue;
            };
            let kind = &rs.rule.kind;
            let s = rs
                .series
                .entry((dev, si))
                .or_insert_with(|| Series::new(kind));
            s.alert = Alert {
                phase: match (a.state, a.since_ms) {
                    (Some(AlertState::Pending), Some(since)) => Phase::Pending { since },
                    (Some(AlertState::Firing), Some(since)) => Phase::Firing {
                        since,
                        clearing: a.clearing_since_ms,
                    },
                    _ => Phase::Inactive,
                },
                number: a.number,
                episode: a.fingerprint.map(|fingerprint| Episode {
                    fingerprint,
                    labels: a.labels,
                }),
                value: a.value,
                threshold: a.threshold,
                count: a.count,
                event_time_ms: a.event_time_ms,
                processing_time_ms: a.processing_time_ms,
            };
            if s.alert.is_active() && s.alert.episode.is_none() {
                s.alert.phase = Phase::Inactive; // invariant: active => episode
            }
            s.clock = a.clock_ms;
            s.last_proc = None;
            s.last_value = a.last_value;
            s.fire = a.fire_holds;
            s.clear = a.clear_holds;
            let active = s.alert.is_active();
            if let (Some(key), true) = (a.correlation_key, active) {
                let sk = rs.seq.entry(key).or_default();
                if !sk.alerts.contains(&dev) {
                    sk.alerts.push(dev);
                }
                sk.clock = sk.clock.max(a.clock_ms);
            }
            if si == NO_SENSOR && active {
                if let Some(d) = self.devices.get_mut(dev as usize) {
                    d.maybe_device_alerts = true;
                }
            }
        }
    }
}

fn sort_transitions(out: &mut [Transition]) {
    out.sort_by(|a, b| {
        (a.event_time_ms, &a.rule, &a.device, &a.sensor, a.number).cmp(&(
            b.event_time_ms,
            &b.rule,
            &b.device,
            &b.sensor,
            b.number,
        ))
    });
}

fn subject<'a>(rule: &'a Rule, d: &'a Device, sensor: &'a str, now: i64) -> Subject<'a> {
    Subject {
        rule,
        device: &d.name,
        device_labels: &d.labels,
        sensor,
        now_ms: now,
    }
}

/// Whether the rule selects the device (cached per label generation).
fn selected(rs: &mut RuleState, dev: DevId, d: &Device) -> bool {
    if let Some(&(generation, m)) = rs.matches.get(&dev) {
        if generation == d.generation {
            return m;
        }
    }
    let m = selector_matches(&rs.rule.selector, d);
    rs.matches.insert(dev, (d.generation, m));
    m
}

fn selector_matches(sel: &Selector, d: &Device) -> bool {
    if !sel.devices.is_empty() && !sel.devices.contains(&d.name) {
        return false;
    }
    if let Some(g) = &sel.device_glob {
        if !glob_match(g, &d.name) {
            return false;
        }
    }
    if !d.known {
        return !sel.devices.is_empty();
    }
    sel.labels
        .iter()
        .all(|(k, v)| d.labels.get(k).is_some_and(|have| v == "*" || have == v))
}

/// `*` matches any run of characters, `?` exactly one.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == '*'))
}

/// Applies a phase change computed by the hysteresis machine.
fn apply(
    s: &mut Series,
    to: Phase,
    t: i64,
    h: &Hysteresis,
    count: Option<u64>,
    sub: Subject<'_>,
    out: &mut Vec<Transition>,
) {
    let from = s.alert.phase;
    if is_silent(from, to) {
        s.alert.phase = to;
        return;
    }
    let at = match (from, to) {
        (Phase::Pending { .. }, Phase::Firing { since, .. }) => since,
        _ => t,
    };
    let threshold = match (from, to) {
        (Phase::Firing { .. }, Phase::Inactive) => h.clear.limit,
        _ => h.fire.limit,
    };
    let m = alert::Measure {
        value: s.last_value,
        threshold: Some(threshold),
        count,
    };
    out.push(change(&mut s.alert, to, at, m, sub));
}

/// Evaluates `value` at event time `t` against the limits.
fn evaluate(
    s: &mut Series,
    h: &Hysteresis,
    t: i64,
    value: f64,
    count: Option<u64>,
    sub: Subject<'_>,
    out: &mut Vec<Transition>,
) {
    s.last_value = Some(value);
    s.fire = h.fire.holds(value);
    s.clear = h.clear.holds(value);
    if let Some(to) = hysteresis_step(s.alert.phase, h, t, s.fire, s.clear) {
        apply(s, to, t, h, count, sub, out);
    }
}

/// Runs the timers that expire by event time `t` (value assumed unchanged).
/// Before a reading at `t` this is called with `t - 1`: a reading at exactly
/// the due time is applied first (if the condition still holds, the step
/// fires or resolves with the same event time).
fn advance(
    s: &mut Series,
    h: &Hysteresis,
    t: i64,
    count: Option<u64>,
    sub: Subject<'_>,
    out: &mut Vec<Transition>,
) {
    if let Some((to, at)) = hysteresis_advance(s.alert.phase, h, t, s.fire, s.clear) {
        apply(s, to, at, h, count, sub, out);
    }
}

/// Count rules: drops matches that leave the window by `t`, resolving at
/// the exact time the count fell below `n`.
fn count_expire(
    s: &mut Series,
    h: &Hysteresis,
    within: i64,
    n: u32,
    t: i64,
    sub: Subject<'_>,
    out: &mut Vec<Transition>,
) {
    loop {
        let Data::Count(q) = &mut s.data else { return };
        let Some(&front) = q.front() else { return };
        let at = front.saturating_add(within);
        if at > t {
            return;
        }
        q.pop_front();
        let len = q.len() as u64;
        let fire = len >= u64::from(n);
        s.fire = fire;
        s.clear = !fire;
        s.last_value = Some(len as f64);
        if let Some(to) = hysteresis_step(s.alert.phase, h, at, fire, !fire) {
            apply(s, to, at, h, Some(len), sub, out);
        }
    }
}

/// Tumbling windows: closes the current window (evaluating it at its end).
fn tumbling_close(
    s: &mut Series,
    h: &Hysteresis,
    size: i64,
    next_index: Option<i64>,
    sub: Subject<'_>,
    out: &mut Vec<Transition>,
) {
    let Data::Tumbling {
        agg,
        index: Some(cur),
        ..
    } = &mut s.data
    else {
        return;
    };
    let cur = *cur;
    let end = cur.saturating_add(1).saturating_mul(size);
    let value = agg.value();
    let n = agg.len() as u64;
    let empty_gap = agg.value_of_empty();
    agg.clear();
    if let Data::Tumbling {
        index,
        closed_through,
        ..
    } = &mut s.data
    {
        *index = None;
        *closed_through = end;
    }
    advance(s, h, end.saturating_sub(1), None, sub, out);
    if let Some(v) = value {
        evaluate(s, h, end, v, Some(n), sub, out);
    }
    if let (Some(next), Some(zero)) = (next_index, empty_gap) {
        if next > cur.saturating_add(1) {
            let gap_end = next.saturating_mul(size);
            advance(s, h, gap_end.saturating_sub(1), None, sub, out);
            evaluate(s, h, gap_end, zero, Some(0), sub, out);
            if let Data::Tumbling { closed_through, .. } = &mut s.data {
                *closed_through = gap_end;
            }
        }
    }
}

/// A reading for a rule that selected its device.
fn on_reading(
    rs: &mut RuleState,
    dev: DevId,
    si: u32,
    sensor: &str,
    t: i64,
    v: f64,
    cx: &mut Cx<'_>,
) {
    if let Kind::Sequence { .. } = rs.rule.kind {
        seq_reading(rs, dev, sensor, t, v, cx);
        return;
    }
    let RuleState { rule, series, .. } = rs;
    let Some(d) = cx.devices.get(dev as usize) else {
        return;
    };
    let sub = subject(rule, d, sensor, cx.now);
    let s = series
        .entry((dev, si))
        .or_insert_with(|| Series::new(&rule.kind));
    if let Kind::Absence { .. } = rule.kind {
        s.data = Data::Absence {
            last_seen: Some(cx.now),
        };
        s.clock = Some(s.clock.map_or(t, |c| c.max(t)));
        if s.alert.is_active() {
            s.last_value = Some(v);
            let m = alert::Measure {
                value: Some(v),
                ..Default::default()
            };
            cx.out
                .push(change(&mut s.alert, Phase::Inactive, t, m, sub));
        }
        return;
    }
    let Some(h) = limits(&rule.kind) else { return };
    // Lateness: drop, or clamp to the clock.
    let t = match s.clock {
        Some(c) if t < c.saturating_sub(cx.lateness_ms) => {
            *cx.late += 1;
            return;
        }
        Some(c) => t.max(c),
        None => t,
    };
    if let Data::Tumbling { closed_through, .. } = &s.data {
        if t < *closed_through {
            *cx.late += 1;
            return;
        }
    }
    s.clock = Some(t);
    s.last_proc = Some(cx.now);
    let out = &mut *cx.out;
    match &rule.kind {
        Kind::Threshold(_) => {
            advance(s, &h, t.saturating_sub(1), None, sub, out);
            evaluate(s, &h, t, v, None, sub, out);
        }
        Kind::Window {
            size,
            mode: WindowMode::Sliding,
            ..
        } => {
            advance(s, &h, t.saturating_sub(1), None, sub, out);
            if let Data::Sliding(w) = &mut s.data {
                w.push(t, v);
                w.evict_through(t.saturating_sub(ms(*size)));
                let n = w.len() as u64;
                if let Some(a) = w.value() {
                    evaluate(s, &h, t, a, Some(n), sub, out);
                }
            }
        }
        Kind::Window {
            size,
            mode: WindowMode::Tumbling,
            ..
        } => {
            let size = ms(*size).max(1);
            let idx = t.div_euclid(size);
            if let Data::Tumbling {
                index: Some(cur), ..
            } = &s.data
            {
                if idx > *cur {
                    tumbling_close(s, &h, size, Some(idx), sub, out);
                }
            }
            advance(s, &h, t.saturating_sub(1), None, sub, out);
            if let Data::Tumbling { agg, index, .. } = &mut s.data {
                *index = Some(idx);
                agg.push(t, v);
            }
        }
        Kind::Rate { window, per, .. } => {
            advance(s, &h, t.saturating_sub(1), None, sub, out);
            if let Data::Rate(w) = &mut s.data {
                w.push(t, v);
                w.evict_through(t.saturating_sub(ms(*window)));
                if let Some(((t0, v0), (t1, v1))) = w.ends() {
                    if t1 > t0 {
                        let rate = (v1 - v0) / (t1 - t0) as f64 * ms(*per) as f64;
                        evaluate(s, &h, t, rate, None, sub, out);
                    }
                }
            }
        }
        Kind::Count { cond, n, within } => {
            count_expire(s, &h, ms(*within), *n, t, sub, out);
            advance(s, &h, t.saturating_sub(1), None, sub, out);
            if let Data::Count(q) = &mut s.data {
                if cond.holds(v) {
                    q.push_back(t);
                }
                let len = q.len() as u64;
                evaluate(s, &h, t, len as f64, Some(len), sub, out);
            }
        }
        Kind::Absence { .. } | Kind::Offline { .. } | Kind::Sequence { .. } => {}
    }
}

/// Timers and processing-time checks of one (non-device-level) rule.
fn tick_rule(rs: &mut RuleState, cx: &mut Cx<'_>) {
    if let Kind::Sequence { .. } = rs.rule.kind {
        seq_tick(rs, cx);
        return;
    }
    let RuleState {
        rule,
        series,
        sensors,
        ..
    } = rs;
    let h = limits(&rule.kind);
    for (&(dev, si), s) in series.iter_mut() {
        let Some(d) = cx.devices.get(dev as usize) else {
            continue;
        };
        let sub = subject(rule, d, sensor_name(sensors, si), cx.now);
        if let (Kind::Absence { after, .. }, Data::Absence { last_seen }) =
            (&rule.kind, &mut s.data)
        {
            let last = *last_seen.get_or_insert(cx.now);
            let at = last.saturating_add(ms(*after));
            if !s.alert.is_active() && cx.now >= at {
                cx.out.push(change(
                    &mut s.alert,
                    Phase::Firing {
                        since: at,
                        clearing: None,
                    },
                    at,
                    Default::default(),
                    sub,
                ));
            }
            continue;
        }
        let Some(h) = h.as_ref() else { continue };
        let (Some(clock), Some(p)) = (s.clock, s.last_proc) else {
            s.last_proc = Some(cx.now);
            continue;
        };
        let est = clock.saturating_add(cx.now.saturating_sub(p).max(0));
        match &rule.kind {
            Kind::Window {
                size,
                mode: WindowMode::Tumbling,
                ..
            } => {
                let size = ms(*size).max(1);
                if let Data::Tumbling {
                    index: Some(cur), ..
                } = &s.data
                {
                    let end = cur.saturating_add(1).saturating_mul(size);
                    if est >= end.saturating_add(cx.lateness_ms) {
                        tumbling_close(s, h, size, None, sub, cx.out);
                    }
                }
            }
            Kind::Count { n, within, .. } => count_expire(s, h, ms(*within), *n, est, sub, cx.out),
            _ => {}
        }
        advance(s, h, est, None, sub, cx.out);
    }
}

struct SeqParams<'a> {
    first: &'a crate::rules::model::Step,
    then: &'a crate::rules::model::Step,
    within: i64,
    negate: bool,
    first_idx: u32,
    then_idx: u32,
}

fn seq_params<'a>(rule: &'a Rule, sensors: &[String]) -> Option<SeqParams<'a>> {
    let Kind::Sequence {
        first,
        then,
        within,
        negate,
        ..
    } = &rule.kind
    else {
        return None;
    };
    let index = |name: &str| {
        sensors
            .iter()
            .position(|s| s == name)
            .and_then(|i| u32::try_from(i).ok())
    };
    Some(SeqParams {
        first,
        then,
        within: ms(*within),
        negate: *negate,
        first_idx: index(&first.sensor)?,
        then_idx: index(&then.sensor)?,
    })
}

/// Sequence timers that run out by event time `t` for one key.
fn seq_advance(
    rule: &Rule,
    sensors: &[String],
    p: &SeqParams<'_>,
    series: &mut FxMap<(DevId, u32), Series>,
    sk: &mut SeqKey,
    t: i64,
    cx: &mut Cx<'_>,
) {
    if p.negate {
        if let Some((a, adev)) = sk.unmatched_a {
            let due = a.saturating_add(p.within);
            if t > due {
                sk.unmatched_a = None;
                if let Some(d) = cx.devices.get(adev as usize) {
                    let s = series
                        .entry((adev, p.first_idx))
                        .or_insert_with(|| Series::new(&rule.kind));
                    if !s.alert.is_active() {
                        let sub = subject(rule, d, sensor_name(sensors, p.first_idx), cx.now);
                        s.clock = Some(due);
                        cx.out.push(change(
                            &mut s.alert,
                            Phase::Firing {
                                since: due,
                                clearing: None,
                            },
                            due,
                            Default::default(),
                            sub,
                        ));
                        if !sk.alerts.contains(&adev) {
                            sk.alerts.push(adev);
                        }
                    }
                }
            }
        }
        return;
    }
    sk.alerts.retain(|&dev| {
        let Some(s) = series.get_mut(&(dev, p.then_idx)) else {
            return false;
        };
        let Some(d) = cx.devices.get(dev as usize) else {
            return false;
        };
        let due = s.clock.unwrap_or(i64::MIN).saturating_add(p.within);
        if s.alert.is_active() && t > due {
            let sub = subject(rule, d, sensor_name(sensors, p.then_idx), cx.now);
            cx.out.push(change(
                &mut s.alert,
                Phase::Inactive,
                due,
                Default::default(),
                sub,
            ));
        }
        s.alert.is_active()
    });
}

fn seq_reading(rs: &mut RuleState, dev: DevId, sensor: &str, t: i64, v: f64, cx: &mut Cx<'_>) {
    let RuleState {
        rule,
        sensors,
        series,
        seq,
        ..
    } = rs;
    let Some(p) = seq_params(rule, sensors) else {
        return;
    };
    let Some(d) = cx.devices.get(dev as usize) else {
        return;
    };
    let key = match &rule.kind {
        Kind::Sequence {
            correlate: Correlate::Label(l),
            ..
        } => match d.labels.get(l) {
            Some(k) => k.as_str(),
            None => return,
        },
        _ => d.name.as_str(),
    };
    let is_b = sensor == p.then.sensor && p.then.cond.holds(v);
    let is_a = sensor == p.first.sensor && p.first.cond.holds(v);
    if !seq.contains_key(key) {
        seq.insert(key.to_string(), SeqKey::default());
    }
    let Some(sk) = seq.get_mut(key) else { return };
    let t = match sk.clock {
        Some(c) if t < c.saturating_sub(cx.lateness_ms) => {
            *cx.late += 1;
            return;
        }
        Some(c) => t.max(c),
        None => t,
    };
    sk.clock = Some(t);
    sk.last_proc = Some(cx.now);
    seq_advance(rule, sensors, &p, series, sk, t, cx);
    if p.negate {
        if is_b {
            sk.unmatched_a = None;
            for adev in std::mem::take(&mut sk.alerts) {
                let (Some(s), Some(ad)) = (
                    series.get_mut(&(adev, p.first_idx)),
                    cx.devices.get(adev as usize),
                ) else {
                    continue;
                };
                if s.alert.is_active() {
                    let sub = subject(rule, ad, sensor_name(sensors, p.first_idx), cx.now);
                    let m = alert::Measure {
                        value: Some(v),
                        ..Default::default()
                    };
                    cx.out
                        .push(change(&mut s.alert, Phase::Inactive, t, m, sub));
                }
            }
        }
        if is_a && sk.unmatched_a.is_none() {
            sk.unmatched_a = Some((t, dev));
        }
        return;
    }
    if is_b {
        if let Some((a, _)) = sk.last_a {
            if t.saturating_sub(a) <= p.within {
                sk.last_a = None;
                let s = series
                    .entry((dev, p.then_idx))
                    .or_insert_with(|| Series::new(&rule.kind));
                s.clock = Some(t);
                s.last_value = Some(v);
                if !s.alert.is_active() {
                    let sub = subject(rule, d, sensor_name(sensors, p.then_idx), cx.now);
                    let m = alert::Measure {
                        value: Some(v),
                        ..Default::default()
                    };
                    cx.out.push(change(
                        &mut s.alert,
                        Phase::Firing {
                            since: t,
                            clearing: None,
                        },
                        t,
                        m,
                        sub,
                    ));
                }
                if !sk.alerts.contains(&dev) {
                    sk.alerts.push(dev);
                }
            }
        }
    }
    if is_a {
        sk.last_a = Some((t, dev));
    }
}

fn seq_tick(rs: &mut RuleState, cx: &mut Cx<'_>) {
    let RuleState {
        rule,
        sensors,
        series,
        seq,
        ..
    } = rs;
    let Some(p) = seq_params(rule, sensors) else {
        return;
    };
    for sk in seq.values_mut() {
        let (Some(clock), Some(lp)) = (sk.clock, sk.last_proc) else {
            sk.last_proc = Some(cx.now);
            continue;
        };
        let est = clock.saturating_add(cx.now.saturating_sub(lp).max(0));
        seq_advance(rule, sensors, &p, series, sk, est, cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("pump-*", "pump-12"));
        assert!(glob_match("*", ""));
        assert!(glob_match("p?mp-*-x", "pump-1-x"));
        assert!(!glob_match("pump-*", "valve-1"));
        assert!(!glob_match("p?mp", "pmp"));
        assert!(glob_match("*a*b", "xxaxxb"));
        assert!(!glob_match("*a*b", "xxaxxbc"));
    }
}
