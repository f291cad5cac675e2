//! Cost per reading and memory of the rules engine alone (no IO).
//!
//! ```text
//! cargo run --release -p outpost-aggregator --example rules_bench [-- --quick] [-- --by-kind]
//! ```
//!
//! Workload: 10,000 rules over 10,000 devices. Mix: 70% threshold with
//! `for`, 10% sliding windows (avg/max), 5% each absence, count, rate and
//! sequence; sensors spread over 2,000 names (each reading matches about
//! five rules); selectors mostly `*`, some globs, some label matchers.
//! Each device has four sensors; readings go round-robin over the devices,
//! event time advances 1 s per device per reading, values random-walk in
//! [0, 100] (steps of up to 3 per reading) around the rules' limits so alerts do transition.
//!
//! Measurements:
//! 1. ns per reading, timed per batch of 100,000 readings; per run the
//!    median and p10/p90 over batches; the whole run repeated and the median
//!    of the medians quoted.
//! 2. The same feed against the same rules plus 10,000 rules on sensors no
//!    reading uses, interleaved with (1) in the same process: the ratio.
//! 3. RSS (VmRSS) before building the engine, after loading the rules, and
//!    after the feed created every series.
//!
//! `--per-device K`: K consecutive readings per device per engine call (as
//! ingest hands over a batch; default 1). `--quick`: 200,000 readings, one
//! repetition (CI smoke). `--by-kind`:
//! also times 10,000 rules of a single kind each, to show where time goes.
//! Prints figures; asserts nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use outpost_aggregator::rules::compile::definition_hash;
use outpost_aggregator::rules::eval::Engine;
use outpost_aggregator::rules::model::{
    AbsenceScope, Agg, Cmp, Correlate, Hysteresis, Kind, Op, Origin, Piece, Rule, Selector,
    Severity, Step, WindowMode,
};

const DEVICES: usize = 10_000;
const SENSOR_NAMES: usize = 2_000;
/// Sensors per device: device `d` reads sensors `4d .. 4d+3` (mod 2,000),
/// so every sensor name is read by 20 devices.
const SLOTS: usize = 4;
const RULES: usize = 10_000;
const BATCH: usize = 100_000;
/// Label `site` takes this many values.
const SITES: usize = 20;
const T0_MS: i64 = 1_700_000_000_000;

/// splitmix64: small, fast, deterministic.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// The realistic mix.
    Realistic,
    Threshold,
    Window,
    Absence,
    Count,
    Rate,
    Sequence,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Mix::Realistic => "realistic mix",
            Mix::Threshold => "threshold only",
            Mix::Window => "sliding window only",
            Mix::Absence => "absence only",
            Mix::Count => "count only",
            Mix::Rate => "rate only",
            Mix::Sequence => "sequence only",
        }
    }
}

/// What a rule's selector is, in a form the bench can evaluate itself to
/// count series.
#[derive(Debug, Clone, Copy)]
enum Sel {
    All,
    /// `dev-0{digit}*`: 1,000 of the devices.
    Glob(usize),
    /// `site = site-{n}`: 500 of the devices.
    Site(usize),
}

impl Sel {
    fn matches(self, dev: usize) -> bool {
        match self {
            Sel::All => true,
            Sel::Glob(digit) => dev / 1_000 == digit,
            Sel::Site(n) => dev % SITES == n,
        }
    }
    fn selector(self) -> Selector {
        match self {
            Sel::All => Selector {
                device_glob: Some("*".into()),
                ..Selector::default()
            },
            Sel::Glob(digit) => Selector {
                device_glob: Some(format!("dev-0{digit}*")),
                ..Selector::default()
            },
            Sel::Site(n) => Selector {
                labels: BTreeMap::from([("site".into(), format!("site-{n}"))]),
                ..Selector::default()
            },
        }
    }
}

fn sensor_name(i: usize) -> String {
    format!("s{i:04}")
}

fn device_name(i: usize) -> String {
    format!("dev-{i:05}")
}

fn hyst(rng: &mut Rng, for_s: &[u64]) -> Hysteresis {
    let for_ = Duration::from_secs(for_s[rng.below(for_s.len())]);
    if rng.unit() < 0.8 {
        let limit = rng.range(70.0, 95.0).round();
        Hysteresis {
            fire: Cmp { op: Op::Gt, limit },
            for_,
            clear: Cmp {
                op: Op::Lt,
                limit: limit - 5.0,
            },
            clear_for: Duration::from_secs(if rng.unit() < 0.5 { 0 } else { 10 }),
        }
    } else {
        let limit = rng.range(5.0, 30.0).round();
        Hysteresis {
            fire: Cmp { op: Op::Lt, limit },
            for_,
            clear: Cmp {
                op: Op::Gt,
                limit: limit + 5.0,
            },
            clear_for: Duration::ZERO,
        }
    }
}

/// One rule: `idx` names it, `sensor` is its (first) sensor index, or a
/// sensor no reading uses when `unused`.
fn make_rule(idx: usize, mix: Mix, unused: bool, rng: &mut Rng) -> (Rule, Sel) {
    let kind_pick = match mix {
        Mix::Realistic => {
            let p = rng.unit();
            if p < 0.70 {
                Mix::Threshold
            } else if p < 0.80 {
                Mix::Window
            } else if p < 0.85 {
                Mix::Absence
            } else if p < 0.90 {
                Mix::Count
            } else if p < 0.95 {
                Mix::Rate
            } else {
                Mix::Sequence
            }
        }
        other => other,
    };
    let p = rng.unit();
    let sel = if p < 0.8 {
        Sel::All
    } else if p < 0.9 {
        Sel::Glob(rng.below(10))
    } else {
        Sel::Site(rng.below(SITES))
    };
    let s = idx % SENSOR_NAMES;
    let name_of = |i: usize| {
        if unused {
            format!("unused{i:05}")
        } else {
            sensor_name(i)
        }
    };
    let uniq = if unused { idx + SENSOR_NAMES * 100 } else { s };
    let mut sensors = vec![name_of(uniq)];
    let kind = match kind_pick {
        Mix::Threshold => Kind::Threshold(hyst(rng, &[10, 30, 60])),
        Mix::Window => Kind::Window {
            agg: if rng.unit() < 0.5 { Agg::Avg } else { Agg::Max },
            size: Duration::from_secs(60),
            mode: WindowMode::Sliding,
            limits: hyst(rng, &[0, 30]),
        },
        Mix::Absence => Kind::Absence {
            after: Duration::from_secs(300),
            scope: AbsenceScope::Series,
        },
        Mix::Count => Kind::Count {
            cond: Cmp {
                op: Op::Gt,
                limit: rng.range(70.0, 90.0).round(),
            },
            n: 5,
            within: Duration::from_secs(60),
        },
        Mix::Rate => Kind::Rate {
            window: Duration::from_secs(30),
            per: Duration::from_secs(60),
            limits: Hysteresis {
                fire: Cmp {
                    op: Op::Gt,
                    limit: 30.0,
                },
                for_: Duration::from_secs(10),
                clear: Cmp {
                    op: Op::Lt,
                    limit: 15.0,
                },
                clear_for: Duration::ZERO,
            },
        },
        Mix::Sequence | Mix::Realistic => {
            // Both steps on sensors of the same devices: s and s+1 within a
            // device's block of four.
            let first = if unused {
                uniq
            } else {
                s - usize::from(s % 4 == 3)
            };
            let then = first + 1;
            sensors = vec![name_of(first), name_of(then)];
            Kind::Sequence {
                first: Step {
                    sensor: name_of(first),
                    cond: Cmp {
                        op: Op::Gt,
                        limit: 85.0,
                    },
                },
                then: Step {
                    sensor: name_of(then),
                    cond: Cmp {
                        op: Op::Gt,
                        limit: 85.0,
                    },
                },
                within: Duration::from_secs(30),
                negate: rng.unit() < 0.3,
                correlate: if rng.unit() < 0.2 {
                    Correlate::Label("site".into())
                } else {
                    Correlate::SameDevice
                },
            }
        }
    };
    let mut rule = Rule {
        name: format!("rule-{}{idx:05}", if unused { "u" } else { "" }),
        description: String::new(),
        selector: sel.selector(),
        sensors,
        kind,
        severity: Severity::Warning,
        labels: BTreeMap::from([("team".into(), "ops".into())]),
        summary: vec![
            Piece::Field("device".into()),
            Piece::Text(": ".into()),
            Piece::Field("sensor".into()),
            Piece::Text(" is ".into()),
            Piece::Field("value".into()),
        ],
        origin: Origin::default(),
        definition_hash: 0,
    };
    rule.definition_hash = definition_hash(&rule);
    (rule, sel)
}

/// The rules and, for the used ones, (sensor indices, selector) to count
/// series.
struct RuleSet {
    rules: Vec<Rule>,
    shape: Vec<(Vec<usize>, Sel)>,
}

fn rule_set(mix: Mix, used: usize, unused: usize) -> RuleSet {
    let mut rng = Rng(42);
    let mut rules = Vec::with_capacity(used + unused);
    let mut shape = Vec::with_capacity(used);
    for i in 0..used {
        let (r, sel) = make_rule(i, mix, false, &mut rng);
        let idxs = r
            .sensors
            .iter()
            .filter_map(|s| s.strip_prefix('s').and_then(|n| n.parse().ok()))
            .collect();
        shape.push((idxs, sel));
        rules.push(r);
    }
    // Independent stream so the used rules are identical with or without
    // the unused ones.
    let mut rng2 = Rng(4242);
    for i in 0..unused {
        rules.push(make_rule(i, mix, true, &mut rng2).0);
    }
    RuleSet { rules, shape }
}

/// The devices: names and labels, built once.
struct Fleet {
    names: Vec<String>,
    labels: Vec<BTreeMap<String, String>>,
    sensors: Vec<String>,
}

fn fleet() -> Fleet {
    Fleet {
        names: (0..DEVICES).map(device_name).collect(),
        labels: (0..DEVICES)
            .map(|d| {
                BTreeMap::from([
                    ("site".into(), format!("site-{}", d % SITES)),
                    ("model".into(), format!("m{}", d % 3)),
                ])
            })
            .collect(),
        sensors: (0..SENSOR_NAMES).map(sensor_name).collect(),
    }
}

/// One reading of the feed.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    dev: u32,
    sensor: u32,
    time_ms: i64,
    value: f64,
}

/// The deterministic feed: round-robin over devices, each device cycling
/// over its four sensors, 1 s of event time per device per reading.
struct Feed {
    rng: Rng,
    walk: Vec<f64>,
    next: usize,
    /// Consecutive readings per device (a batch, as an agent sends them).
    per_device: usize,
}

impl Feed {
    fn new(per_device: usize) -> Feed {
        let mut rng = Rng(7);
        let walk = (0..DEVICES * SLOTS)
            .map(|_| rng.range(0.0, 100.0))
            .collect();
        Feed {
            rng,
            walk,
            next: 0,
            per_device: per_device.max(1),
        }
    }

    fn fill(&mut self, buf: &mut [Reading]) {
        for r in buf.iter_mut() {
            let k = self.next;
            self.next += 1;
            let (group, within) = (k / self.per_device, k % self.per_device);
            let dev = group % DEVICES;
            let round = (group / DEVICES) * self.per_device + within;
            let slot = round % SLOTS;
            let w = &mut self.walk[dev * SLOTS + slot];
            let mut v = *w + self.rng.range(-3.0, 3.0);
            if v < 0.0 {
                v = -v;
            }
            if v > 100.0 {
                v = 200.0 - v;
            }
            *w = v;
            *r = Reading {
                dev: dev as u32,
                sensor: ((dev * SLOTS + slot) % SENSOR_NAMES) as u32,
                time_ms: T0_MS + round as i64 * 1_000,
                value: v,
            };
        }
    }
}

struct RunResult {
    batch_ns: Vec<f64>,
    evals_per_reading: f64,
    transitions: u64,
    late: u64,
}

/// Feeds `total` readings to `engine`, timing each batch.
fn run(
    engine: &mut Engine,
    fleet: &Fleet,
    total: usize,
    buf: &mut [Reading],
    per_device: usize,
) -> RunResult {
    let mut feed = Feed::new(per_device);
    let mut batch_ns = Vec::new();
    let mut transitions = 0u64;
    let mut done = 0;
    while done < total {
        let n = BATCH.min(total - done);
        let batch = &mut buf[..n];
        feed.fill(batch);
        let start = Instant::now();
        // Consecutive readings of one device go in as one call, as
        // ingest hands over a batch.
        for group in batch.chunk_by(|a, b| a.dev == b.dev) {
            let d = group[0].dev as usize;
            let out = engine.device_readings(
                &fleet.names[d],
                &fleet.labels[d],
                group.iter().map(|r| {
                    (
                        fleet.sensors[r.sensor as usize].as_str(),
                        r.time_ms,
                        r.value,
                    )
                }),
                group[group.len() - 1].time_ms,
            );
            transitions += out.len() as u64;
        }
        batch_ns.push(start.elapsed().as_nanos() as f64 / n as f64);
        done += n;
    }
    let st = engine.stats();
    RunResult {
        batch_ns,
        evals_per_reading: st.evaluations as f64 / st.readings.max(1) as f64,
        transitions,
        late: st.late_dropped,
    }
}

fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

fn median(xs: &[f64]) -> f64 {
    quantile(xs, 0.5)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (rule, device, sensor) series the feed creates: for every (device,
/// sensor) pair read, the rules on that sensor that select the device.
/// Sequence rules count one per (device, step sensor) like the others
/// (they keep state per correlation key; their alert series only on a
/// match).
fn count_series(set: &RuleSet, readings: usize) -> u64 {
    let rounds = readings.div_ceil(DEVICES);
    let slots_seen = rounds.min(SLOTS);
    let mut by_sensor: Vec<Vec<usize>> = vec![Vec::new(); SENSOR_NAMES];
    for (ri, (idxs, _)) in set.shape.iter().enumerate() {
        for &s in idxs {
            by_sensor[s].push(ri);
        }
    }
    let mut n = 0u64;
    for dev in 0..DEVICES {
        for slot in 0..slots_seen {
            let s = (dev * SLOTS + slot) % SENSOR_NAMES;
            n += by_sensor[s]
                .iter()
                .filter(|&&ri| set.shape[ri].1.matches(dev))
                .count() as u64;
        }
    }
    n
}

fn summary_line(label: &str, r: &RunResult) -> String {
    format!(
        "{label}: median {:.0} ns/reading (p10 {:.0}, p90 {:.0}, min {:.0}, max {:.0}; {} batches), \
         {:.2} evaluations/reading, {} transitions, {} late",
        median(&r.batch_ns),
        quantile(&r.batch_ns, 0.1),
        quantile(&r.batch_ns, 0.9),
        quantile(&r.batch_ns, 0.0),
        quantile(&r.batch_ns, 1.0),
        r.batch_ns.len(),
        r.evals_per_reading,
        r.transitions,
        r.late,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let by_kind = args.iter().any(|a| a == "--by-kind");
    // `--per-device K`: K consecutive readings per device, handed over as
    // one batch (ingest's path); 1 = every reading a different device.
    let per_device: usize = args
        .iter()
        .position(|a| a == "--per-device")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1);
    let (total, reps) = if quick { (200_000, 1) } else { (2_000_000, 5) };
    println!("readings per device per call: {per_device}");

    println!(
        "rules_bench: {RULES} rules, {DEVICES} devices, {SENSOR_NAMES} sensor names, \
         {total} readings per run in batches of {BATCH}, {reps} repetition(s)"
    );

    // Everything the feed needs exists before the first RSS sample.
    let fleet = fleet();
    let mut buf = vec![Reading::default(); BATCH];
    let base = rule_set(Mix::Realistic, RULES, 0);
    let series = count_series(&base, total);
    drop(base);

    // 3. Memory, on a fresh heap.
    let rss0 = rss_kib();
    let set = rule_set(Mix::Realistic, RULES, 0);
    let mut engine = Engine::new(set.rules);
    let rss1 = rss_kib();
    let first = run(&mut engine, &fleet, total, &mut buf, per_device);
    let rss2 = rss_kib();
    println!(
        "memory: VmRSS {rss0} KiB before, {rss1} KiB with {RULES} rules loaded, \
         {rss2} KiB after the feed ({series} series)"
    );
    println!(
        "memory: {:.0} bytes per loaded rule, {:.0} bytes per active series",
        (rss1.saturating_sub(rss0) * 1024) as f64 / RULES as f64,
        (rss2.saturating_sub(rss1) * 1024) as f64 / series.max(1) as f64
    );
    println!("{}", summary_line("warm-up run (memory)", &first));
    drop(engine);

    // 1 and 2, interleaved (order alternates to cancel drift).
    let mut med_plain = Vec::new();
    let mut med_extra = Vec::new();
    for rep in 0..reps {
        for which in [rep % 2 == 1, rep % 2 == 0] {
            let set = if which {
                rule_set(Mix::Realistic, RULES, RULES)
            } else {
                rule_set(Mix::Realistic, RULES, 0)
            };
            let mut engine = Engine::new(set.rules);
            let r = run(&mut engine, &fleet, total, &mut buf, per_device);
            let label = if which {
                format!("rep {}: {RULES} rules + {RULES} unmatched", rep + 1)
            } else {
                format!("rep {}: {RULES} rules", rep + 1)
            };
            println!("{}", summary_line(&label, &r));
            if which {
                med_extra.push(median(&r.batch_ns));
            } else {
                med_plain.push(median(&r.batch_ns));
            }
        }
    }
    let plain = median(&med_plain);
    let extra = median(&med_extra);
    println!(
        "RESULT {RULES} rules: median of medians {plain:.0} ns/reading (runs: {})",
        fmt_list(&med_plain)
    );
    println!(
        "RESULT +{RULES} unmatched rules: median of medians {extra:.0} ns/reading (runs: {}), \
         ratio {:.3}",
        fmt_list(&med_extra),
        extra / plain
    );
    let ratios: Vec<f64> = med_plain
        .iter()
        .zip(&med_extra)
        .map(|(a, b)| b / a)
        .collect();
    println!("RESULT per-repetition ratios: {}", fmt_ratios(&ratios));

    if by_kind {
        let total = total.min(1_000_000);
        println!("by kind: {RULES} rules of one kind, {total} readings, 1 run each");
        for mix in [
            Mix::Threshold,
            Mix::Window,
            Mix::Absence,
            Mix::Count,
            Mix::Rate,
            Mix::Sequence,
        ] {
            let set = rule_set(mix, RULES, 0);
            let mut engine = Engine::new(set.rules);
            let r = run(&mut engine, &fleet, total, &mut buf, per_device);
            println!("{}", summary_line(mix.name(), &r));
        }
        let mut engine = Engine::new(Vec::new());
        let r = run(&mut engine, &fleet, total, &mut buf, per_device);
        println!("{}", summary_line("no rules", &r));
        let mut engine = Engine::new(rule_set(Mix::Realistic, 0, RULES).rules);
        let r = run(&mut engine, &fleet, total, &mut buf, per_device);
        println!("{}", summary_line("only 10000 unmatched rules", &r));
    }
}

fn fmt_list(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_ratios(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}
