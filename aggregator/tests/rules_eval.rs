//! The rules evaluator under a virtual clock: every rule kind fires, holds,
//! resolves and ignores near misses; hysteresis, lateness, reload,
//! snapshot/restore and the sensor index. Rules are built directly as
//! `model::Rule` values (no parser involved).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use outpost_aggregator::rules::eval::{Engine, EngineSnapshot};
use outpost_aggregator::rules::model::{
    AbsenceScope, Agg, AlertState, Cmp, Correlate, Hysteresis, Kind, Op, Origin, Piece, Rule,
    Selector, Severity, Step, Transition, WindowMode,
};
use proptest::prelude::*;

const S: i64 = 1000;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn cmp(op: Op, limit: f64) -> Cmp {
    Cmp { op, limit }
}

fn hyst(fire: Cmp, for_s: u64, clear: Cmp, clear_for_s: u64) -> Hysteresis {
    Hysteresis {
        fire,
        for_: secs(for_s),
        clear,
        clear_for: secs(clear_for_s),
    }
}

/// A rule named `name` on `sensors` with an all-devices selector.
fn rule(name: &str, sensors: &[&str], kind: Kind) -> Rule {
    let mut r = Rule {
        name: name.to_string(),
        description: String::new(),
        selector: Selector::default(),
        sensors: sensors.iter().map(|s| s.to_string()).collect(),
        kind,
        severity: Severity::Warning,
        labels: BTreeMap::from([("team".to_string(), "ops".to_string())]),
        summary: vec![
            Piece::Field("device".into()),
            Piece::Text(" ".into()),
            Piece::Field("sensor".into()),
            Piece::Text(" = ".into()),
            Piece::Field("value".into()),
            Piece::Text(" (limit ".into()),
            Piece::Field("threshold".into()),
            Piece::Text(", ".into()),
            Piece::Field("duration".into()),
            Piece::Text(") ".into()),
            Piece::Field("state".into()),
        ],
        origin: Origin::default(),
        definition_hash: 0,
    };
    rehash(&mut r);
    r
}

/// The test's stand-in for the parser's definition hash.
fn rehash(r: &mut Rule) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        r.name, r.selector, r.sensors, r.kind, r.labels, r.summary
    )
    .hash(&mut h);
    r.definition_hash = h.finish();
}

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// Feeds readings with processing time = event time unless told otherwise.
struct Rig {
    e: Engine,
    labels: BTreeMap<String, String>,
}

impl Rig {
    fn new(rules: Vec<Rule>) -> Rig {
        Rig {
            e: Engine::new(rules),
            labels: no_labels(),
        }
    }
    fn read(&mut self, dev: &str, sensor: &str, t: i64, v: f64) -> Vec<Transition> {
        self.e.reading(dev, &self.labels, sensor, t, v, t)
    }
    fn read_at(&mut self, dev: &str, sensor: &str, t: i64, v: f64, now: i64) -> Vec<Transition> {
        self.e.reading(dev, &self.labels, sensor, t, v, now)
    }
    /// Feeds `(t, v)` pairs and collects every transition.
    fn series(&mut self, dev: &str, sensor: &str, pts: &[(i64, f64)]) -> Vec<Transition> {
        pts.iter()
            .flat_map(|&(t, v)| self.read(dev, sensor, t, v))
            .collect()
    }
}

fn states(ts: &[Transition]) -> Vec<(AlertState, i64)> {
    ts.iter().map(|t| (t.state, t.event_time_ms)).collect()
}

fn count(ts: &[Transition], s: AlertState) -> usize {
    ts.iter().filter(|t| t.state == s).count()
}

fn temp_rule(for_s: u64, clear_for_s: u64) -> Rule {
    rule(
        "hot",
        &["temp"],
        Kind::Threshold(hyst(
            cmp(Op::Gt, 80.0),
            for_s,
            cmp(Op::Lt, 75.0),
            clear_for_s,
        )),
    )
}

// ---------------------------------------------------------------- threshold

#[test]
fn threshold_fires_after_for_holds_and_resolves_after_clear_for() {
    let mut r = Rig::new(vec![temp_rule(10, 5)]);
    let mut out = Vec::new();
    for t in 0..=12 {
        out.extend(r.read("d1", "temp", t * S, 85.0));
    }
    assert_eq!(
        states(&out),
        vec![(AlertState::Pending, 0), (AlertState::Firing, 10 * S)]
    );
    let fire = &out[1];
    assert_eq!(fire.value, Some(85.0));
    assert_eq!(fire.threshold, Some(80.0));
    assert_eq!(fire.active_since_ms, Some(10 * S));
    assert_eq!(fire.summary, "d1 temp = 85 (limit 80, 10s) firing");
    assert_eq!(fire.labels.get("team").map(String::as_str), Some("ops"));
    assert_eq!(fire.number, 2);
    assert_eq!(r.e.firing().len(), 1);

    // Holds while between the limits and while clearing is shorter than clear_for.
    let mut out = r.series(
        "d1",
        "temp",
        &[
            (13 * S, 78.0),
            (14 * S, 70.0),
            (18 * S, 70.0),
            (19 * S, 77.0),
        ],
    );
    assert!(out.is_empty(), "{out:?}");
    out.extend(r.series(
        "d1",
        "temp",
        &[(20 * S, 70.0), (24 * S, 70.0), (25 * S, 70.0)],
    ));
    assert_eq!(states(&out), vec![(AlertState::Resolved, 25 * S)]);
    assert_eq!(out[0].threshold, Some(75.0));
    assert_eq!(out[0].active_since_ms, Some(10 * S));
    assert_eq!(out[0].number, 3);
    assert_eq!(out[0].fingerprint, fire.fingerprint);
    assert!(r.e.firing().is_empty());
}

#[test]
fn threshold_near_misses_do_not_fire() {
    let mut r = Rig::new(vec![temp_rule(10, 0)]);
    // At the limit (> is strict), and above it for 9.999 s only.
    let mut out = r.series("d1", "temp", &[(0, 80.0), (S, 80.0)]);
    out.extend(r.series(
        "d1",
        "temp",
        &[(2 * S, 81.0), (11 * S + 999, 81.0), (12 * S, 79.0)],
    ));
    assert_eq!(count(&out, AlertState::Firing), 0, "{out:?}");
    // The pending episode that did not make it reports a Resolved that never fired.
    assert_eq!(
        states(&out),
        vec![(AlertState::Pending, 2 * S), (AlertState::Resolved, 12 * S)]
    );
    assert_eq!(out[1].active_since_ms, None);
    assert!(r.e.tick(100 * S).is_empty());
}

#[test]
fn threshold_hysteresis_oscillating_signal_fires_once_and_resolves_once() {
    let mut r = Rig::new(vec![temp_rule(0, 0)]);
    let mut out = Vec::new();
    for i in 0..200 {
        let v = if i % 2 == 0 { 79.0 } else { 81.0 };
        out.extend(r.read("d1", "temp", i * S, v));
        out.extend(r.e.tick(i * S + 500));
    }
    out.extend(r.read("d1", "temp", 200 * S, 74.0));
    for i in 201..400 {
        let v = if i % 2 == 0 { 74.0 } else { 76.0 };
        out.extend(r.read("d1", "temp", i * S, v));
    }
    assert_eq!(count(&out, AlertState::Firing), 1, "{out:?}");
    assert_eq!(count(&out, AlertState::Resolved), 1, "{out:?}");
    assert_eq!(
        states(&out),
        vec![(AlertState::Firing, S), (AlertState::Resolved, 200 * S)]
    );
}

#[test]
fn threshold_for_runs_out_on_tick_without_new_readings() {
    let mut r = Rig::new(vec![temp_rule(10, 0)]);
    assert_eq!(
        states(&r.read("d1", "temp", 0, 90.0)),
        vec![(AlertState::Pending, 0)]
    );
    assert!(r.e.tick(9 * S).is_empty());
    let out = r.e.tick(10 * S + 300);
    assert_eq!(states(&out), vec![(AlertState::Firing, 10 * S)]);
    assert_eq!(out[0].processing_time_ms, 10 * S + 300);
    // A tick never runs event time ahead of the processing time elapsed
    // since the last reading: a replayed backlog (old timestamps arriving
    // now) is not outrun.
    let mut r = Rig::new(vec![temp_rule(10, 0)]);
    r.read_at("d1", "temp", 0, 90.0, 1_000 * S);
    assert!(r.e.tick(1_005 * S).is_empty());
    assert_eq!(
        states(&r.e.tick(1_010 * S)),
        vec![(AlertState::Firing, 10 * S)]
    );
}

#[test]
fn threshold_backlog_replay_fires_timers_between_readings() {
    // A `for` that ran out between two readings fires at its own event time,
    // then the next reading is applied (here it clears at once).
    let mut r = Rig::new(vec![temp_rule(10, 0)]);
    let mut out = r.read_at("d1", "temp", 0, 90.0, 500 * S);
    out.extend(r.read_at("d1", "temp", 20 * S, 70.0, 500 * S));
    assert_eq!(
        states(&out),
        vec![
            (AlertState::Pending, 0),
            (AlertState::Firing, 10 * S),
            (AlertState::Resolved, 20 * S)
        ]
    );
}

#[test]
fn late_readings_are_dropped_and_slightly_late_ones_are_clamped() {
    let mut r = Rig::new(vec![temp_rule(10, 0)]);
    r.read("d1", "temp", 100 * S, 50.0);
    // More than 5 s behind the series clock: counted, skipped.
    assert!(r.read_at("d1", "temp", 94 * S, 99.0, 101 * S).is_empty());
    assert_eq!(r.e.stats().late_dropped, 1);
    // Within the lateness: applied as of the clock (100 s), not 97 s.
    let out = r.read_at("d1", "temp", 97 * S, 99.0, 101 * S);
    assert_eq!(states(&out), vec![(AlertState::Pending, 100 * S)]);
    // So `for` counts from 100 s: 109 s does not fire, 110 s does.
    assert!(r.read("d1", "temp", 109 * S, 99.0).is_empty());
    assert_eq!(
        states(&r.read("d1", "temp", 110 * S, 99.0)),
        vec![(AlertState::Firing, 110 * S)]
    );
    assert_eq!(r.e.stats().late_dropped, 1);
}

#[test]
fn series_are_per_device_and_sensor_and_selectors_apply() {
    let mut only_pumps = temp_rule(0, 0);
    only_pumps.selector.device_glob = Some("pump-*".into());
    only_pumps
        .selector
        .labels
        .insert("site".into(), "north".into());
    rehash(&mut only_pumps);
    let mut r = Rig::new(vec![only_pumps]);
    r.labels.insert("site".into(), "north".into());
    assert_eq!(r.read("pump-1", "temp", 0, 90.0).len(), 1);
    assert!(r.read("valve-1", "temp", 0, 90.0).is_empty());
    assert!(r.read("pump-1", "pressure", 0, 90.0).is_empty());
    r.labels.insert("site".into(), "south".into());
    assert!(r.read("pump-2", "temp", 0, 90.0).is_empty());
    // A label change is seen (selector cache invalidated).
    r.labels.insert("site".into(), "north".into());
    assert_eq!(r.read("pump-2", "temp", S, 90.0).len(), 1);
    let fps: Vec<String> = r.e.firing().into_iter().map(|t| t.fingerprint).collect();
    assert_eq!(fps.len(), 2);
    assert_ne!(fps[0], fps[1]);
}

// ------------------------------------------------------------------- window

fn window_rule(agg: Agg, size_s: u64, mode: WindowMode, fire: Cmp, clear: Cmp) -> Rule {
    rule(
        "win",
        &["temp"],
        Kind::Window {
            agg,
            size: secs(size_s),
            mode,
            limits: hyst(fire, 0, clear, 0),
        },
    )
}

#[test]
fn sliding_avg_fires_holds_resolves_and_near_miss() {
    let r0 = window_rule(
        Agg::Avg,
        10,
        WindowMode::Sliding,
        cmp(Op::Gt, 50.0),
        cmp(Op::Le, 45.0),
    );
    let mut r = Rig::new(vec![r0]);
    // avg of the last 10 s: 40, 45, 50 (=50: not > 50, near miss)
    let out = r.series("d1", "temp", &[(0, 40.0), (S, 50.0), (2 * S, 60.0)]);
    assert!(out.is_empty(), "{out:?}");
    // avg (40+50+60+71)/4 = 55.25 fires
    let out = r.read("d1", "temp", 3 * S, 71.0);
    assert_eq!(states(&out), vec![(AlertState::Firing, 3 * S)]);
    assert_eq!(out[0].value, Some(55.25));
    // 0 s and 1 s leave the window at 10 s and 11 s: (60+71+40)/3 = 57 holds...
    assert!(r.read("d1", "temp", 11 * S, 40.0).is_empty());
    // ...(71+40+20)/3 = 43.67 <= 45 resolves.
    assert_eq!(
        states(&r.read("d1", "temp", 12 * S, 20.0)),
        vec![(AlertState::Resolved, 12 * S)]
    );
}

#[test]
fn sliding_min_max_sum_count_percentile() {
    let rules = vec![
        {
            let mut x = window_rule(
                Agg::Min,
                5,
                WindowMode::Sliding,
                cmp(Op::Gt, 10.0),
                cmp(Op::Le, 10.0),
            );
            x.name = "min".into();
            x
        },
        {
            let mut x = window_rule(
                Agg::Max,
                5,
                WindowMode::Sliding,
                cmp(Op::Ge, 100.0),
                cmp(Op::Lt, 100.0),
            );
            x.name = "max".into();
            x
        },
        {
            let mut x = window_rule(
                Agg::Sum,
                5,
                WindowMode::Sliding,
                cmp(Op::Gt, 200.0),
                cmp(Op::Le, 200.0),
            );
            x.name = "sum".into();
            x
        },
        {
            let mut x = window_rule(
                Agg::Count,
                5,
                WindowMode::Sliding,
                cmp(Op::Ge, 4.0),
                cmp(Op::Lt, 4.0),
            );
            x.name = "count".into();
            x
        },
        {
            let mut x = window_rule(
                Agg::Percentile(90.0),
                5,
                WindowMode::Sliding,
                cmp(Op::Gt, 95.0),
                cmp(Op::Le, 95.0),
            );
            x.name = "p90".into();
            x
        },
    ];
    let mut r = Rig::new(rules);
    let out = r.series(
        "d1",
        "temp",
        &[(0, 20.0), (S, 50.0), (2 * S, 99.0), (3 * S, 30.0)],
    );
    // min 20 > 10 fires at once; max 99 < 100 near miss; sum 199 near miss;
    // count 4 fires at 3 s; p90 of 4 values = 99 fires at 2 s (p90 of [20,50,99] = 99).
    let fired: Vec<(String, i64)> = out
        .iter()
        .map(|t| (t.rule.clone(), t.event_time_ms))
        .collect();
    assert_eq!(
        fired,
        vec![
            ("min".into(), 0),
            ("p90".into(), 2 * S),
            ("count".into(), 3 * S)
        ],
        "{out:?}"
    );
    // Sum 200 (not > 200), min 1 resolves.
    let out = r.read("d1", "temp", 4 * S, 1.0);
    assert_eq!(states(&out), vec![(AlertState::Resolved, 4 * S)]);
    assert_eq!(out[0].rule, "min");
}

#[test]
fn tumbling_window_evaluates_at_close_by_reading_or_tick() {
    let r0 = window_rule(
        Agg::Max,
        10,
        WindowMode::Tumbling,
        cmp(Op::Gt, 80.0),
        cmp(Op::Le, 80.0),
    );
    let mut r = Rig::new(vec![r0]);
    // Window [0,10): max 90, but nothing until it closes.
    assert!(r
        .series("d1", "temp", &[(S, 90.0), (5 * S, 70.0)])
        .is_empty());
    let out = r.read("d1", "temp", 12 * S, 10.0);
    assert_eq!(states(&out), vec![(AlertState::Firing, 10 * S)]);
    assert_eq!(out[0].value, Some(90.0));
    // Window [10,20): max 10 -> resolved at 20 s; closed by a tick once the
    // estimated event time is past 20 s + lateness (5 s).
    assert!(r.e.tick(24 * S).is_empty());
    assert_eq!(
        states(&r.e.tick(25 * S)),
        vec![(AlertState::Resolved, 20 * S)]
    );
    // A reading for the window closed by the tick is late.
    assert!(r.read_at("d1", "temp", 19 * S, 99.0, 26 * S).is_empty());
    assert_eq!(r.e.stats().late_dropped, 1);
    // Near miss: max exactly 80.
    assert!(r
        .series("d1", "temp", &[(31 * S, 80.0), (41 * S, 0.0)])
        .is_empty());
}

#[test]
fn tumbling_count_sees_empty_gap_as_zero() {
    let r0 = window_rule(
        Agg::Count,
        10,
        WindowMode::Tumbling,
        cmp(Op::Lt, 1.0),
        cmp(Op::Ge, 1.0),
    );
    let mut r = Rig::new(vec![r0]);
    r.read("d1", "temp", S, 1.0);
    // Windows [10,20) and [20,30) are empty: evaluated once at 30 s as 0.
    let out = r.read("d1", "temp", 35 * S, 1.0);
    assert_eq!(states(&out), vec![(AlertState::Firing, 30 * S)]);
    let out = r.read("d1", "temp", 41 * S, 1.0);
    assert_eq!(states(&out), vec![(AlertState::Resolved, 40 * S)]);
}

// --------------------------------------------------------------------- rate

#[test]
fn rate_rising_fires_and_resolves_near_miss_does_not() {
    let r0 = rule(
        "rising",
        &["level"],
        Kind::Rate {
            window: secs(60),
            per: secs(60),
            limits: hyst(cmp(Op::Gt, 10.0), 0, cmp(Op::Le, 5.0), 0),
        },
    );
    let mut r = Rig::new(vec![r0]);
    // The window is (t - 60 s, t]: at 59 s, (109.8 - 100) / 59 s = 9.97/min: near miss.
    let out = r.series(
        "d1",
        "level",
        &[(0, 100.0), (30 * S, 105.0), (59 * S, 109.8)],
    );
    assert!(out.is_empty(), "{out:?}");
    // At 90 s the window (30 s, 90 s] holds 59 s and 90 s: (125 - 109.8) / 31 s.
    let out = r.read("d1", "level", 90 * S, 125.0);
    assert_eq!(states(&out), vec![(AlertState::Firing, 90 * S)]);
    assert_eq!(out[0].value, Some((125.0 - 109.8) / 31.0 * 60.0));
    // 60..120 s: (130 - 125) / 30 s = 10/min, above the clear limit: holds.
    assert!(r
        .series("d1", "level", &[(100 * S, 130.0), (120 * S, 130.0)])
        .is_empty());
    // 90..150 s: flat, 0/min: resolves.
    let out = r.read("d1", "level", 150 * S, 130.0);
    assert_eq!(states(&out), vec![(AlertState::Resolved, 150 * S)]);
    assert!(r.e.firing().is_empty());
}

// ------------------------------------------------------------------ absence

#[test]
fn absence_series_fires_after_silence_and_resolves_on_reading() {
    let r0 = rule(
        "quiet",
        &["temp"],
        Kind::Absence {
            after: secs(60),
            scope: AbsenceScope::Series,
        },
    );
    let mut r = Rig::new(vec![r0]);
    r.read("d1", "temp", 0, 1.0);
    assert!(r.e.tick(59 * S + 999).is_empty(), "near miss");
    let out = r.e.tick(61 * S);
    assert_eq!(states(&out), vec![(AlertState::Firing, 60 * S)]);
    assert_eq!(out[0].sensor, "temp");
    assert!(r.e.tick(120 * S).is_empty(), "holds without repeating");
    // Event time of the reading does not matter: absence is processing time.
    let out = r.read_at("d1", "temp", 5 * S, 1.0, 121 * S);
    assert_eq!(states(&out), vec![(AlertState::Resolved, 5 * S)]);
    assert!(r.e.tick(150 * S).is_empty());
}

#[test]
fn absence_covers_named_devices_never_seen() {
    let mut r0 = rule(
        "quiet",
        &["temp"],
        Kind::Absence {
            after: secs(30),
            scope: AbsenceScope::Series,
        },
    );
    r0.selector.devices = vec!["ghost".into(), "d1".into()];
    rehash(&mut r0);
    let mut r = Rig::new(vec![r0]);
    assert!(r.e.tick(1_000 * S).is_empty()); // engine start
    r.read("d1", "temp", 1_010 * S, 1.0);
    r.read("other", "temp", 1_010 * S, 1.0); // not named: never alerts
    let out = r.e.tick(1_031 * S);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        (out[0].device.as_str(), out[0].event_time_ms),
        ("ghost", 1_030 * S)
    );
}

#[test]
fn absence_device_scope_counts_any_sensor() {
    let r0 = rule(
        "silent-device",
        &[],
        Kind::Absence {
            after: secs(30),
            scope: AbsenceScope::Device,
        },
    );
    let mut r = Rig::new(vec![r0]);
    r.read("d1", "temp", 0, 1.0);
    r.read("d1", "humidity", 20 * S, 1.0);
    assert!(r.e.tick(49 * S).is_empty());
    let out = r.e.tick(50 * S);
    assert_eq!(states(&out), vec![(AlertState::Firing, 50 * S)]);
    assert_eq!(out[0].sensor, "");
    let out = r.read("d1", "anything", 60 * S, 1.0);
    assert_eq!(states(&out), vec![(AlertState::Resolved, 60 * S)]);
}

// ------------------------------------------------------------------ offline

#[test]
fn offline_status_fires_online_resolves() {
    let r0 = rule("offline", &[], Kind::Offline { silent_for: None });
    let mut r = Rig::new(vec![r0]);
    let l = no_labels();
    assert!(r.e.device_status("d1", &l, true, 0, 0).is_empty());
    let out = r.e.device_status("d1", &l, false, 10 * S, 11 * S);
    assert_eq!(states(&out), vec![(AlertState::Firing, 10 * S)]);
    assert!(
        r.e.device_status("d1", &l, false, 12 * S, 12 * S)
            .is_empty(),
        "holds"
    );
    assert!(
        r.e.tick(1_000 * S).is_empty(),
        "no silent_for: tick does nothing"
    );
    // A stale reading from before the offline status does not resolve it.
    assert!(r.read_at("d1", "temp", 5 * S, 1.0, 1_001 * S).is_empty());
    let out = r.e.device_status("d1", &l, true, 1_002 * S, 1_002 * S);
    assert_eq!(states(&out), vec![(AlertState::Resolved, 1_002 * S)]);
}

#[test]
fn offline_by_silence_via_tick() {
    let r0 = rule(
        "offline",
        &[],
        Kind::Offline {
            silent_for: Some(secs(120)),
        },
    );
    let mut r = Rig::new(vec![r0]);
    r.read("d1", "temp", 0, 1.0);
    assert!(r.e.tick(119 * S).is_empty(), "near miss");
    assert_eq!(
        states(&r.e.tick(120 * S)),
        vec![(AlertState::Firing, 120 * S)]
    );
    assert_eq!(
        states(&r.read("d1", "temp", 130 * S, 1.0)),
        vec![(AlertState::Resolved, 130 * S)]
    );
}

// -------------------------------------------------------------------- count

#[test]
fn count_fires_at_n_within_and_resolves_when_a_match_leaves() {
    let r0 = rule(
        "spikes",
        &["current"],
        Kind::Count {
            cond: cmp(Op::Gt, 10.0),
            n: 3,
            within: secs(60),
        },
    );
    let mut r = Rig::new(vec![r0]);
    // Two matches and non-matching readings: near miss.
    let out = r.series(
        "d1",
        "current",
        &[(0, 11.0), (10 * S, 5.0), (20 * S, 12.0), (30 * S, 10.0)],
    );
    assert!(out.is_empty(), "{out:?}");
    // A third match after the first left the window (0 + 60 <= 61): still 2.
    assert!(r.read("d1", "current", 61 * S, 20.0).is_empty());
    let out = r.read("d1", "current", 70 * S, 20.0);
    assert_eq!(states(&out), vec![(AlertState::Firing, 70 * S)]);
    assert_eq!(out[0].value, Some(3.0));
    // The match at 20 s leaves at 80 s: resolved at exactly 80 s, on tick.
    assert!(r.e.tick(79 * S).is_empty());
    assert_eq!(
        states(&r.e.tick(81 * S)),
        vec![(AlertState::Resolved, 80 * S)]
    );
}

// ----------------------------------------------------------------- sequence

fn seq_rule(negate: bool, correlate: Correlate) -> Rule {
    rule(
        "door-then-alarm",
        &["door", "alarm"],
        Kind::Sequence {
            first: Step {
                sensor: "door".into(),
                cond: cmp(Op::Eq, 1.0),
            },
            then: Step {
                sensor: "alarm".into(),
                cond: cmp(Op::Eq, 1.0),
            },
            within: secs(30),
            negate,
            correlate,
        },
    )
}

#[test]
fn sequence_a_then_b_within_fires_and_resolves_later() {
    let mut r = Rig::new(vec![seq_rule(false, Correlate::SameDevice)]);
    // B without A, A then B too late, A on another device: near misses.
    let mut out = r.read("d1", "alarm", 0, 1.0);
    out.extend(r.read("d1", "door", 10 * S, 1.0));
    out.extend(r.read("d1", "alarm", 41 * S, 1.0));
    out.extend(r.read("d2", "door", 50 * S, 1.0));
    out.extend(r.read("d1", "alarm", 55 * S, 1.0));
    out.extend(r.read("d1", "door", 60 * S, 0.0)); // condition false: not an A
    out.extend(r.read("d1", "alarm", 61 * S, 1.0));
    assert!(out.is_empty(), "{out:?}");
    r.read("d1", "door", 100 * S, 1.0);
    let out = r.read("d1", "alarm", 130 * S, 1.0); // exactly within: counts
    assert_eq!(states(&out), vec![(AlertState::Firing, 130 * S)]);
    assert_eq!(
        (out[0].device.as_str(), out[0].sensor.as_str()),
        ("d1", "alarm")
    );
    assert!(r.e.tick(150 * S).is_empty(), "holds");
    assert_eq!(
        states(&r.e.tick(161 * S)),
        vec![(AlertState::Resolved, 160 * S)]
    );
}

#[test]
fn sequence_negated_fires_when_b_does_not_follow() {
    let mut r = Rig::new(vec![seq_rule(true, Correlate::SameDevice)]);
    // A followed by B in time: nothing.
    let mut out = r.read("d1", "door", 0, 1.0);
    out.extend(r.read("d1", "alarm", 30 * S, 1.0));
    out.extend(r.e.tick(100 * S));
    assert!(out.is_empty(), "{out:?}");
    // A, no B: fires at A + within, found by tick (processing time estimate).
    r.read("d1", "door", 200 * S, 1.0);
    assert!(r.e.tick(230 * S).is_empty());
    let out = r.e.tick(231 * S);
    assert_eq!(states(&out), vec![(AlertState::Firing, 230 * S)]);
    assert_eq!(out[0].sensor, "door");
    // The late B resolves it.
    assert_eq!(
        states(&r.read("d1", "alarm", 240 * S, 1.0)),
        vec![(AlertState::Resolved, 240 * S)]
    );
    // Found on the next reading of the key when replaying (no ticks).
    let mut r = Rig::new(vec![seq_rule(true, Correlate::SameDevice)]);
    r.read_at("d1", "door", 0, 1.0, 900 * S);
    let out = r.read_at("d1", "door", 45 * S, 0.0, 900 * S);
    assert_eq!(states(&out), vec![(AlertState::Firing, 30 * S)]);
}

#[test]
fn sequence_correlates_devices_by_label() {
    let mut r = Rig::new(vec![seq_rule(false, Correlate::Label("room".into()))]);
    let room = |v: &str| BTreeMap::from([("room".to_string(), v.to_string())]);
    let e = &mut r.e;
    assert!(e
        .reading("door-1", &room("a"), "door", 0, 1.0, 0)
        .is_empty());
    assert!(
        e.reading("siren-b", &room("b"), "alarm", S, 1.0, S)
            .is_empty(),
        "other room"
    );
    let out = e.reading("siren-a", &room("a"), "alarm", 2 * S, 1.0, 2 * S);
    assert_eq!(states(&out), vec![(AlertState::Firing, 2 * S)]);
    assert_eq!(out[0].device, "siren-a");
    // Devices without the label take no part.
    assert!(e
        .reading("loose", &no_labels(), "door", 3 * S, 1.0, 3 * S)
        .is_empty());
}

// ------------------------------------------------- model test for windows

proptest! {
    /// Engine-level model test: a sliding window rule fires and resolves
    /// exactly where a naive recomputation of the aggregate says it should,
    /// with the same values.
    #[test]
    fn sliding_window_rule_matches_reference(
        steps in proptest::collection::vec((0i64..4000, -50i32..50), 1..120),
        size_s in 1u64..20,
        agg_i in 0usize..5,
    ) {
        let agg = [Agg::Avg, Agg::Min, Agg::Max, Agg::Sum, Agg::Count][agg_i];
        let limit = 3.37;
        let r0 = window_rule(agg, size_s, WindowMode::Sliding, cmp(Op::Gt, limit), cmp(Op::Le, limit));
        let mut r = Rig::new(vec![r0]);
        let mut seen: Vec<(i64, f64)> = Vec::new();
        let mut want: Vec<(AlertState, i64, f64)> = Vec::new();
        let mut got: Vec<(AlertState, i64, f64)> = Vec::new();
        let mut firing = false;
        let mut t = 0i64;
        for (dt, v) in steps {
            t += dt;
            let v = f64::from(v);
            seen.push((t, v));
            let inside: Vec<f64> = seen
                .iter()
                .filter(|(ti, _)| *ti > t - size_s as i64 * S)
                .map(|(_, v)| *v)
                .collect();
            let a = match agg {
                Agg::Avg => inside.iter().sum::<f64>() / inside.len() as f64,
                Agg::Min => inside.iter().copied().fold(f64::INFINITY, f64::min),
                Agg::Max => inside.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                Agg::Sum => inside.iter().sum(),
                _ => inside.len() as f64,
            };
            if !firing && a > limit {
                firing = true;
                want.push((AlertState::Firing, t, a));
            } else if firing && a <= limit {
                firing = false;
                want.push((AlertState::Resolved, t, a));
            }
            for tr in r.read("d1", "temp", t, v) {
                got.push((tr.state, tr.event_time_ms, tr.value.unwrap_or(f64::NAN)));
            }
        }
        prop_assert_eq!(got.len(), want.len(), "got {:?} want {:?}", got, want);
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!((g.0, g.1), (w.0, w.1));
            prop_assert!((g.2 - w.2).abs() < 1e-9, "value {} vs {}", g.2, w.2);
        }
    }
}

// ----------------------------------------------------------------- reload

#[test]
fn reload_keeps_unchanged_rules_resolves_removed_restarts_changed() {
    let keep = temp_rule(10, 0);
    let mut gone = rule(
        "gone",
        &["temp"],
        Kind::Threshold(hyst(cmp(Op::Gt, 50.0), 0, cmp(Op::Le, 50.0), 0)),
    );
    gone.severity = Severity::Critical;
    rehash(&mut gone);
    let changed = rule(
        "changed",
        &["temp"],
        Kind::Threshold(hyst(cmp(Op::Gt, 60.0), 0, cmp(Op::Le, 60.0), 0)),
    );
    let mut r = Rig::new(vec![keep.clone(), gone.clone(), changed.clone()]);
    let out = r.read("d1", "temp", 0, 90.0);
    assert_eq!(out.len(), 3, "{out:?}"); // keep: pending; gone, changed: firing
    let changed_fire = out.iter().find(|t| t.rule == "changed").cloned();

    let mut changed2 = changed.clone();
    changed2.kind = Kind::Threshold(hyst(cmp(Op::Gt, 95.0), 0, cmp(Op::Le, 95.0), 0));
    rehash(&mut changed2);
    let mut keep_moved = keep.clone();
    keep_moved.origin = Origin {
        file: "elsewhere.toml".into(),
        line: 9,
    };
    let out = r.e.replace_rules(vec![keep_moved, changed2], 5 * S);
    let resolved: Vec<(&str, AlertState)> =
        out.iter().map(|t| (t.rule.as_str(), t.state)).collect();
    assert_eq!(
        resolved,
        vec![
            ("changed", AlertState::Resolved),
            ("gone", AlertState::Resolved)
        ]
    );
    assert_eq!(out[1].severity, Severity::Critical);
    // The unchanged rule's pending timer survived: fires at 10 s on tick.
    assert_eq!(
        states(&r.e.tick(10 * S)),
        vec![(AlertState::Firing, 10 * S)]
    );
    // The changed rule started over (90 is below its new limit) and its
    // numbers keep increasing for the same fingerprint.
    assert!(r.read("d1", "temp", 11 * S, 90.0).is_empty());
    let out = r.read("d1", "temp", 12 * S, 99.0);
    let c = out.iter().find(|t| t.rule == "changed").cloned();
    let (Some(c), Some(f)) = (c, changed_fire) else {
        panic!("no changed-rule transitions")
    };
    assert_eq!(c.fingerprint, f.fingerprint);
    assert_eq!(c.number, 3, "1 fire + 1 resolve by reload before");
    assert_eq!(r.e.rules().count(), 2);
}

// -------------------------------------------------------- snapshot/restore

#[test]
fn restart_keeps_firing_alert_firing_and_pending_timer_running() {
    let rules = vec![temp_rule(0, 0), {
        let mut p = temp_rule(60, 0);
        p.name = "hot-long".into();
        rehash(&mut p);
        p
    }];
    let mut r = Rig::new(rules.clone());
    let before = r.read("d1", "temp", 0, 90.0);
    assert_eq!(before.len(), 2);
    let firing_before = r.e.firing();
    let json = serde_json::to_string(&r.e.snapshot()).expect("serialize");

    // A new process.
    let snap: EngineSnapshot = serde_json::from_str(&json).expect("deserialize");
    let mut r2 = Rig::new(rules);
    r2.e.restore(snap);
    assert_eq!(r2.e.firing(), firing_before);
    let mut out = r2.e.tick(30 * S);
    // Still hot after the restart: no resolve/fire pair; the `for` of
    // hot-long (pending since 0) fires at 60 s.
    out.extend(r2.read("d1", "temp", 40 * S, 91.0));
    assert!(out.is_empty(), "{out:?}");
    let out = r2.read("d1", "temp", 61 * S, 91.0);
    assert_eq!(states(&out), vec![(AlertState::Firing, 60 * S)]);
    assert_eq!(out[0].rule, "hot-long");
    assert_eq!(out[0].number, 2);
    let out = r2.read("d1", "temp", 62 * S, 10.0);
    let hot = out.iter().find(|t| t.rule == "hot").cloned();
    let Some(hot) = hot else { panic!("{out:?}") };
    assert_eq!(
        (hot.state, hot.number, hot.active_since_ms),
        (AlertState::Resolved, 2, Some(0))
    );
    assert_eq!(hot.fingerprint, before[0].fingerprint);
}

// -------------------------------------------------------------------- index

#[test]
fn rules_on_other_sensors_cost_nothing_per_reading() {
    let mut rules: Vec<Rule> = (0..10_000)
        .map(|i| {
            let mut x = temp_rule(10, 0);
            x.name = format!("other-{i}");
            x.sensors = vec![format!("sensor-{i}")];
            rehash(&mut x);
            x
        })
        .collect();
    rules.push(temp_rule(0, 0));
    let mut r = Rig::new(rules);
    let before = r.e.stats().evaluations;
    let out = r.read("d1", "temp", 0, 90.0);
    assert_eq!(out.len(), 1);
    assert_eq!(
        r.e.stats().evaluations - before,
        1,
        "only the rule on `temp` was looked at"
    );
    assert!(r.read("d1", "unindexed", 0, 90.0).is_empty());
    assert_eq!(r.e.stats().evaluations - before, 1);
    assert_eq!(r.e.stats().readings, 2);
}

#[test]
fn non_finite_readings_are_skipped() {
    let mut r = Rig::new(vec![temp_rule(0, 0)]);
    assert!(r.read("d1", "temp", 0, f64::NAN).is_empty());
    assert!(r.read("d1", "temp", 0, f64::INFINITY).is_empty());
    assert_eq!(r.e.stats().non_finite, 2);
}

// ------------------------------------------------------- through the parser

#[test]
fn compiled_rule_fires_and_resolves_with_rendered_summary() {
    let text = r#"
[[rule]]
name = "boiler-overheat"
devices = "boiler-*"
sensor = "temperature"
kind = "threshold"
above = 80
for = "5s"
clear-below = 75
clear-for = "2s"
severity = "critical"
alert-labels = { team = "heating" }
summary = "{device}: {sensor} is {value} degC (above {threshold} for {duration}, {labels.team})"
"#;
    let (rules, errors) = outpost_aggregator::rules::compile::compile_str("boiler.toml", text);
    assert!(errors.is_empty(), "{errors:?}");
    let mut r = Rig::new(rules);
    // A ramp 20 -> 90 -> 20 sampled every second, twice: above 80 for 8 s each time.
    let ramp: Vec<f64> = (0..60)
        .map(|i| 90.0 - (f64::from(i) - 30.0).abs() * 70.0 / 30.0)
        .collect();
    let mut out = Vec::new();
    for (i, v) in ramp.iter().chain(ramp.iter()).enumerate() {
        out.extend(r.read("boiler-1", "temperature", i as i64 * S, *v));
        out.extend(r.read("pump-1", "temperature", i as i64 * S, *v));
    }
    let fired: Vec<&Transition> = out
        .iter()
        .filter(|t| t.state == AlertState::Firing)
        .collect();
    assert_eq!(fired.len(), 2, "{out:?}");
    assert_eq!(count(&out, AlertState::Resolved), 2);
    assert!(out.iter().all(|t| t.device == "boiler-1"));
    assert_eq!(
        fired[0].summary,
        "boiler-1: temperature is 87.667 degC (above 80 for 5s, heating)"
    );
}

#[test]
fn a_batch_of_one_device_gives_the_same_transitions_as_reading_by_reading() {
    let rules = vec![
        temp_rule(2, 1),
        window_rule(
            Agg::Avg,
            5,
            WindowMode::Sliding,
            cmp(Op::Gt, 50.0),
            cmp(Op::Lt, 40.0),
        ),
    ];
    let mut one = Engine::new(rules.clone());
    let mut batched = Engine::new(rules);
    let labels = no_labels();
    let values = [
        20.0,
        85.0,
        86.0,
        90.0,
        91.0,
        70.0,
        60.0,
        55.0,
        95.0,
        f64::NAN,
        10.0,
        5.0,
    ];
    let readings: Vec<(&str, i64, f64)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| ("temp", 1_000 * i as i64, *v))
        .collect();
    let mut a = Vec::new();
    for (s, t, v) in &readings {
        a.extend(one.reading("boiler-1", &labels, s, *t, *v, 20_000));
    }
    let mut b = Vec::new();
    for chunk in readings.chunks(5) {
        b.extend(batched.device_readings("boiler-1", &labels, chunk.iter().copied(), 20_000));
    }
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_eq!(one.stats().readings, batched.stats().readings);
}
