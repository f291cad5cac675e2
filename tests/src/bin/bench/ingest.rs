//! Scenarios `ingest` and `latency`: the real `outpost-aggregator` (release
//! build, child process, its own state, 1,000 rules) under a load of
//! simulated agents publishing protobuf batches over MQTT.
//!
//! `ingest` ramps the offered rate in steps and measures, per step, the
//! processed readings/s (`outpost_aggregator_readings_total`), whether
//! every sequence number was processed exactly once, the aggregator's CPU
//! and RSS and the generator's own CPU (it shares the machine's cores).
//! Before the ramp a self-check injects a lost batch, a duplicated batch and
//! a skipped sequence number at a low rate and shows that the checks see
//! each one: a bench that cannot see loss would be worthless.
//!
//! `latency` measures, per alert transition of a rule that fires and
//! resolves every second on a few devices, (a) reading timestamp -> rule
//! evaluation (`processing_time_ms - event_time_ms` from the alert history)
//! and (b) reading timestamp -> a webhook receiver in the bench got the
//! notification, split into where the time goes (ingest, commit wait,
//! delivery).
//!
//! How loss is seen: the generator numbers each device's readings 1, 2, 3
//! ... and sets `prev_seq`/`acked_seq` like the agent. After a step the
//! generator stops, waits until every device's ack covers its last
//! published sequence number, and compares with the aggregator: the
//! readings counter must have grown by exactly the number of readings
//! published (resends not counted twice), no gap accepted, and every
//! device's registry entry must show `mark` = last published and
//! `readings_total` = the number of distinct sequence numbers published.
//! A batch lost in transit shows as `out_of_order_batches` (held back) and
//! an ack timeout (resend); without resends as a mark that stays behind.

#[path = "ingest_env.rs"]
mod env;
#[path = "ingest_load.rs"]
mod load;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use self::env::{Aggregator, Broker, HookReceiver, Mosquitto, Scrape};
use self::load::{Inject, Load, LoadSpec, Pace, Totals};
use crate::stats::{cpu_percent, proc_sample, summarize, ProcSample};

/// A step counts as sustained when the processed rate reaches this share
/// of the offered rate (and nothing was lost, doubled or left behind).
pub const SUSTAINED_SHARE: f64 = 0.95;
/// Longest wait for every published reading to be acknowledged after a
/// step (the aggregator works off what is in flight).
pub const ACK_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for the devices to connect and register.
pub const CONNECT_WAIT: Duration = Duration::from_secs(60);
/// The 1,000,000 readings/s target of the ingest issue.
pub const TARGET_RATE: f64 = 1_000_000.0;
/// The latency target: p99 of (b) at 100k readings/s.
pub const TARGET_P99_MS: f64 = 10.0;

/// Options shared by both scenarios.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Simulated agents (one MQTT connection each).
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// Sensors per device (readings cycle over them).
    #[arg(long, default_value_t = 20)]
    pub sensors: usize,
    /// Distinct sensor names over all devices (the rules read these).
    #[arg(long, default_value_t = 200)]
    pub sensor_pool: usize,
    /// Rules loaded (generated mix, see docs/benchmarks.md).
    #[arg(long, default_value_t = 1000)]
    pub rules: usize,
    /// Batches in flight per device (the agent's max-inflight-batches).
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Ack timeout after which a device resends from its last ack, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub ack_timeout_secs: f64,
    /// Each (device, sensor) series spikes above every limit this often, s.
    #[arg(long, default_value_t = 120.0)]
    pub spike_every_secs: f64,
    /// ... for this long, s.
    #[arg(long, default_value_t = 3.0)]
    pub spike_len_secs: f64,
    /// Worker threads of the generator's tokio runtime.
    #[arg(long, default_value_t = 2)]
    pub load_threads: usize,
    /// The aggregator binary (default: the workspace's, built in this
    /// profile). For profiling, a build with symbols.
    #[arg(long)]
    pub aggregator: Option<PathBuf>,
    /// Keep the working directory (configs, state, logs) and print it.
    #[arg(long)]
    pub keep_dir: bool,
}

/// `ingest` options.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub common: Common,
    /// Readings per batch.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Offered rates of the ramp, readings/s.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "50000,100000,200000,400000,700000,1000000,1200000,1500000,2000000"
    )]
    pub rates: Vec<f64>,
    /// Measured seconds per step (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub step_secs: f64,
    /// Warm-up seconds per step (at the step's rate, not measured).
    #[arg(long, default_value_t = 3.0)]
    pub warmup_secs: f64,
    /// After a step, the generator's backlog must be published within this
    /// many seconds for the step to count as sustained (the rest is
    /// discarded unpublished, so the next step starts clean).
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// Repetitions of the whole ramp (fresh aggregator each).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// `[ingest] flush-interval` of the aggregator.
    #[arg(long, default_value = "50ms")]
    pub flush_interval: String,
    /// Go through an external Mosquitto instead of the embedded broker.
    #[arg(long)]
    pub mosquitto: bool,
    /// Skip the self-check of the loss detection.
    #[arg(long)]
    pub no_self_check: bool,
    /// Run the self-check only.
    #[arg(long)]
    pub self_check_only: bool,
    /// Record the aggregator with `perf record -g` during the measured
    /// window of the step at this rate (first run only; that step's
    /// figures then include perf's own cost).
    #[arg(long)]
    pub perf_rate: Option<f64>,
    /// Where the perf data goes.
    #[arg(long, default_value = "/tmp/outpost-bench-perf.data")]
    pub perf_out: PathBuf,
}

/// `latency` options.
#[derive(Debug, clap::Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub common: Common,
    /// Offered rates, readings/s.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub rates: Vec<f64>,
    /// `[ingest] flush-interval` values to compare.
    #[arg(long, value_delimiter = ',', default_value = "50ms,5ms")]
    pub flush_interval: Vec<String>,
    /// Each device publishes a batch this often, ms (its size follows
    /// from the rate).
    #[arg(long, default_value_t = 100)]
    pub batch_every_ms: u64,
    /// Devices whose flip sensor alternates (the latency rule watches it).
    #[arg(long, default_value_t = 10)]
    pub flip_devices: usize,
    /// The flip sensor changes state this often, ms: one transition per
    /// flip device and half period.
    #[arg(long, default_value_t = 1000)]
    pub flip_half_ms: u64,
    /// Measured seconds per (rate, flush interval).
    #[arg(long, default_value_t = 40.0)]
    pub secs: f64,
    /// Warm-up seconds (transitions before are not counted).
    #[arg(long, default_value_t = 5.0)]
    pub warmup_secs: f64,
}

// ---------------------------------------------------------------------------
// Shared pieces

/// Where the bench works: a temp dir removed at the end, unless kept.
struct WorkDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn new(keep: bool) -> anyhow::Result<WorkDir> {
        let dir = tempfile::Builder::new()
            .prefix("outpost-bench-ingest-")
            .tempdir()?;
        Ok(WorkDir {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            keep,
        })
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let (true, Some(dir)) = (self.keep, self.dir.take()) {
            let path = dir.keep();
            println!("# working directory kept: {}", path.display());
        }
    }
}

fn spec(c: &Common, host_port: u16, flip_devices: usize, flip_half: Duration) -> LoadSpec {
    LoadSpec {
        host: "127.0.0.1".into(),
        port: host_port,
        devices: c.devices,
        sensors: c.sensors,
        sensor_pool: c.sensor_pool,
        window: c.window,
        ack_timeout: Some(Duration::from_secs_f64(c.ack_timeout_secs)),
        spike_every: Duration::from_secs_f64(c.spike_every_secs),
        spike_len: Duration::from_secs_f64(c.spike_len_secs),
        flip_devices,
        flip_half,
    }
}

/// Everything measured at one moment.
#[derive(Debug, Clone)]
struct Snap {
    at: Instant,
    scrape: Scrape,
    gen: Totals,
    agg: ProcSample,
    me: ProcSample,
    broker: Option<ProcSample>,
    threads: BTreeMap<String, u64>,
    machine: (u64, u64),
}

/// CPU used on the machine by everything but the aggregator, this
/// process and the broker, % of one core.
fn others_cpu(s1: &Snap, s2: &Snap) -> f64 {
    let wall = s2.at - s1.at;
    let mine = cpu_percent(&s1.agg, &s2.agg, wall)
        + cpu_percent(&s1.me, &s2.me, wall)
        + match (s1.broker, s2.broker) {
            (Some(x), Some(y)) => cpu_percent(&x, &y, wall),
            _ => 0.0,
        };
    (env::machine_cpu(s1.machine, s2.machine) - mine).max(0.0)
}

fn snap(agg: &Aggregator, load: &Load, broker: Option<u32>) -> anyhow::Result<Snap> {
    let text = agg
        .metrics()
        .context("the aggregator's /metrics did not answer")?;
    Ok(Snap {
        at: Instant::now(),
        scrape: Scrape::parse(&text),
        gen: load.totals(),
        agg: proc_sample(agg.pid()).context("the aggregator is gone")?,
        me: proc_sample(std::process::id()).unwrap_or_default(),
        broker: broker.and_then(proc_sample),
        threads: env::thread_ticks(agg.pid()),
        machine: env::machine_ticks(),
    })
}

/// Waits until every device is connected and registered by the aggregator.
fn wait_connected(agg: &Aggregator, load: &Load) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        let connected = load.totals().connected as usize;
        let registered = env::devices(agg).map_or(0, |d| d.len());
        if connected == load.names.len() && registered >= load.names.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {connected} of {} devices connected and {registered} registered after {CONNECT_WAIT:?}; aggregator log:\n{}",
                load.names.len(),
                agg.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every published reading is acknowledged; the time it took,
/// or None at `limit`.
fn wait_acked(load: &Load, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let t = load.totals();
        if t.unacked == 0 && t.backlog == 0 {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the generator's backlog is published; None at `limit`.
fn wait_backlog(load: &Load, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if load.totals().backlog == 0 {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The exactly-once verdict between two moments (the second after the
/// in-flight readings were acknowledged, or the wait gave up).
#[derive(Debug, Clone, Default)]
struct Exactness {
    /// Distinct readings published in between.
    published: u64,
    /// Readings the aggregator processed in between.
    processed: u64,
    /// Sequence numbers the aggregator accepted as gaps.
    gaps: u64,
    /// Gaps the generator made on purpose.
    skipped: u64,
    /// Readings dropped as duplicates.
    duplicates: u64,
    /// Batches held back (an earlier batch lost in transit).
    out_of_order: u64,
    /// Ack timeouts (resends) of the generator.
    resends: u64,
    /// Readings resent.
    resent: u64,
    /// Connection losses.
    disconnects: u64,
    /// Dead letters.
    dead_letters: u64,
    /// Devices whose registry entry disagrees with what was published:
    /// (device, mark, last published, readings_total, distinct published).
    wrong_devices: Vec<(String, u64, u64, u64, u64)>,
}

impl Exactness {
    fn of(before: &Snap, after: &Snap, agg: &Aggregator, load: &Load) -> Exactness {
        let d = |f: fn(&Scrape) -> f64| (f(&after.scrape) - f(&before.scrape)).max(0.0) as u64;
        let registry = env::devices(agg).unwrap_or_default();
        let mut wrong = Vec::new();
        for (i, name) in load.names.iter().enumerate() {
            let s = &load.stats[i];
            let last = s.max_published.load(std::sync::atomic::Ordering::SeqCst);
            let skipped = s.skipped.load(std::sync::atomic::Ordering::SeqCst);
            let distinct = last.saturating_sub(skipped);
            let row = registry.get(name).cloned().unwrap_or_default();
            if row.mark != last || row.readings != distinct || row.gap_readings != skipped {
                wrong.push((name.clone(), row.mark, last, row.readings, distinct));
            }
        }
        Exactness {
            published: after.gen.published_unique - before.gen.published_unique,
            processed: d(|s| s.readings),
            gaps: d(|s| s.gap_readings),
            skipped: after.gen.skipped - before.gen.skipped,
            duplicates: d(|s| s.duplicates),
            out_of_order: d(|s| s.out_of_order),
            resends: after.gen.resends - before.gen.resends,
            resent: after.gen.resent - before.gen.resent,
            disconnects: after.gen.disconnects - before.gen.disconnects,
            dead_letters: d(|s| s.dead_letters),
            wrong_devices: wrong,
        }
    }

    /// Every published reading processed once, no gap but those made on
    /// purpose, the registry agreeing device by device.
    fn exact(&self) -> bool {
        self.processed == self.published
            && self.gaps == self.skipped
            && self.wrong_devices.is_empty()
            && self.dead_letters == 0
    }

    /// Nothing lost on the way either (no resend was needed).
    fn clean(&self) -> bool {
        self.exact() && self.out_of_order == 0 && self.resends == 0 && self.disconnects == 0
    }

    fn lost(&self) -> u64 {
        self.published.saturating_sub(self.processed)
    }

    fn doubled(&self) -> u64 {
        self.processed.saturating_sub(self.published)
    }

    /// One cell: `0`, or what went wrong.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.lost() > 0 {
            parts.push(format!("**LOST {}**", self.lost()));
        }
        if self.doubled() > 0 {
            parts.push(format!("**DOUBLED {}**", self.doubled()));
        }
        if self.gaps != self.skipped {
            parts.push(format!("**gap {} (made {})**", self.gaps, self.skipped));
        } else if self.skipped > 0 {
            parts.push(format!(
                "gap of {} sequence number(s), made on purpose and accepted as such",
                self.skipped
            ));
        }
        if self.duplicates > 0 && self.out_of_order == 0 && self.resends == 0 {
            parts.push(format!("{} duplicates dropped", self.duplicates));
        }
        if !self.wrong_devices.is_empty() {
            parts.push(format!(
                "**{} devices off** (e.g. {} mark {} of {}, readings {} of {})",
                self.wrong_devices.len(),
                self.wrong_devices[0].0,
                self.wrong_devices[0].1,
                self.wrong_devices[0].2,
                self.wrong_devices[0].3,
                self.wrong_devices[0].4
            ));
        }
        if self.dead_letters > 0 {
            parts.push(format!("**{} dead letters**", self.dead_letters));
        }
        if self.out_of_order > 0 || self.resends > 0 {
            parts.push(format!(
                "in transit: {} batches held back, {} resends ({} readings resent, {} duplicates dropped)",
                self.out_of_order, self.resends, self.resent, self.duplicates
            ));
        }
        if self.disconnects > 0 {
            parts.push(format!("{} disconnects", self.disconnects));
        }
        if parts.is_empty() {
            "0".into()
        } else {
            parts.join("; ")
        }
    }
}

fn fmt_rate(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn fmt_ms(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// `median (min–max)` of a sample, each through `f`.
fn spread(v: &[f64], f: fn(f64) -> String) -> String {
    let s = summarize(v);
    if s.n == 0 {
        return "-".into();
    }
    if s.n == 1 || (s.min == s.max) {
        return f(s.median);
    }
    format!("{} ({}–{})", f(s.median), f(s.min), f(s.max))
}

fn print_intro(aggregator: &Path) {
    println!(
        "# aggregator: {} (--aggregator to change)",
        aggregator.display()
    );
    println!(
        "# the load generator runs in this process on the same {} cores as the aggregator; its CPU is reported (gen CPU%)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

// ---------------------------------------------------------------------------
// ingest

/// One measured step.
#[derive(Debug, Clone)]
struct Step {
    offered: f64,
    achieved: f64,
    sent: f64,
    agg_cpu: f64,
    agg_rss_mb: f64,
    gen_cpu: f64,
    broker_cpu: Option<f64>,
    lat_p50: f64,
    lat_p99: f64,
    transitions: f64,
    commits: f64,
    backlog_end: u64,
    drain_secs: Option<f64>,
    discarded: u64,
    exact: Exactness,
    sustained: bool,
    threads: Vec<(String, f64)>,
    /// CPU of everything else on the machine (other users), % of a core.
    others_cpu: f64,
    loadavg: f64,
}

pub fn run_ingest(a: IngestArgs) -> anyhow::Result<()> {
    let bin = env::aggregator_binary(a.common.aggregator.as_ref());
    print_intro(&bin);
    let work = WorkDir::new(a.common.keep_dir)?;
    let rules_dir = work.path().join("rules");
    let mix = env::write_rules(&rules_dir, a.common.rules, a.common.sensor_pool, false)?;
    let checked = env::check_rules(&bin, &rules_dir)?;
    println!(
        "# rules: {} generated ({}); `rules check`: {checked}",
        a.common.rules,
        mix.describe()
    );
    let probe = spec(&a.common, 0, 0, Duration::from_secs(1));
    let (fast, slow, bytes) = load::encoder_check(&probe, a.batch)?;
    println!(
        "# generator: a batch of {} readings is {bytes} bytes; encoding it costs {fast:.1} µs (BatchBuilder + encode: {slow:.1} µs); checked equal to BatchBuilder's",
        a.batch
    );
    println!(
        "# load: {} devices x {} sensors ({} sensor names), batches of {}, window {} batches, ack timeout {} s, QoS 1; broker: {}; flush-interval {}",
        a.common.devices,
        a.common.sensors,
        a.common.sensor_pool,
        a.batch,
        a.common.window,
        a.common.ack_timeout_secs,
        if a.mosquitto { "Mosquitto (aggregator in external mode)" } else { "embedded rumqttd" },
        a.flush_interval
    );
    println!(
        "# steps: warm-up {} s, measured {} s, backlog must drain within {} s; sustained = processed >= {:.0}% of offered, every reading exactly once, nothing resent, backlog drained",
        a.warmup_secs,
        a.step_secs,
        a.drain_secs,
        SUSTAINED_SHARE * 100.0
    );
    if a.mosquitto {
        println!(
            "# mosquitto.conf: {}",
            env::mosquitto_conf(0).replace('\n', "; ")
        );
    }

    if !a.no_self_check || a.self_check_only {
        self_check(&a, &bin, &rules_dir, work.path())?;
        if a.self_check_only {
            return Ok(());
        }
    }

    let mut all: Vec<Vec<Step>> = Vec::new();
    for run in 0..a.runs {
        println!("# run {} of {}", run + 1, a.runs);
        let steps = ingest_run(
            &a,
            &bin,
            &rules_dir,
            &work.path().join(format!("run{run}")),
            run,
        )?;
        all.push(steps);
    }
    report_ingest(&a, &all);
    Ok(())
}

struct Setup {
    _mosquitto: Option<Mosquitto>,
    broker_pid: Option<u32>,
    agg: Aggregator,
}

fn start_setup(
    mosquitto: bool,
    bin: &Path,
    dir: &Path,
    flush: &str,
    rules: &Path,
    extra: &str,
) -> anyhow::Result<Setup> {
    let (mosq, broker) = if mosquitto {
        let m = Mosquitto::start(&dir.join("mosquitto"))?;
        let port = m.port;
        (Some(m), Broker::External(port))
    } else {
        (None, Broker::Embedded(outpost_tests::free_port()))
    };
    let agg = Aggregator::start(bin, dir, broker, flush, rules, extra)?;
    Ok(Setup {
        broker_pid: mosq.as_ref().map(|m| m.child.id()),
        _mosquitto: mosq,
        agg,
    })
}

fn ingest_run(
    a: &IngestArgs,
    bin: &Path,
    rules: &Path,
    dir: &Path,
    run: usize,
) -> anyhow::Result<Vec<Step>> {
    let setup = start_setup(a.mosquitto, bin, dir, &a.flush_interval, rules, "")?;
    let agg = &setup.agg;
    let load = Load::start(
        &spec(&a.common, agg.mqtt, 0, Duration::from_secs(1)),
        a.common.load_threads,
    )?;
    wait_connected(agg, &load)?;
    let mut steps = Vec::new();
    for &rate in &a.rates {
        let perf = (run == 0 && a.perf_rate == Some(rate))
            .then(|| (a.perf_out.clone(), a.step_secs.ceil() as u64));
        let step = ingest_step(a, agg, &load, setup.broker_pid, rate, perf)?;
        println!(
            "#   {:>6} offered: processed {:>7}/s, sent {:>7}/s, agg CPU {:.0}%, RSS {:.0} MB, gen CPU {:.0}%{}, ingest latency p50 <= {} ms p99 <= {} ms, {:.0} transitions/s, {:.1} commits/s, backlog {} at end, drain {}; loss: {}; {}",
            fmt_rate(rate),
            fmt_rate(step.achieved),
            fmt_rate(step.sent),
            step.agg_cpu,
            step.agg_rss_mb,
            step.gen_cpu,
            step.broker_cpu.map_or(String::new(), |c| format!(", broker CPU {c:.0}%")),
            fmt_ms(step.lat_p50),
            fmt_ms(step.lat_p99),
            step.transitions,
            step.commits,
            step.backlog_end,
            step.drain_secs.map_or("no (discarded)".into(), |s| format!("{s:.1} s")),
            step.exact.describe(),
            if step.sustained { "sustained" } else { "not sustained" }
        );
        println!(
            "#          other processes on the machine: {:.0}% CPU, loadavg {:.1}; aggregator threads: {}",
            step.others_cpu,
            step.loadavg,
            step.threads
                .iter()
                .map(|(n, c)| format!("{n} {c:.0}%"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        steps.push(step);
    }
    let jumps = agg.log_count("cursor jumped");
    if jumps > 0 {
        println!("#   the embedded broker logged {jumps} \"cursor jumped\" warnings (messages dropped for a slow consumer)");
    }
    load.stop();
    Ok(steps)
}

fn ingest_step(
    a: &IngestArgs,
    agg: &Aggregator,
    load: &Load,
    broker: Option<u32>,
    rate: f64,
    perf: Option<(PathBuf, u64)>,
) -> anyhow::Result<Step> {
    let s0 = snap(agg, load, broker)?;
    load.set_pace(Pace::rate(rate, a.common.devices, a.batch));
    std::thread::sleep(Duration::from_secs_f64(a.warmup_secs));
    let mut perf_child = perf
        .as_ref()
        .and_then(|(out, secs)| env::start_perf(agg.pid(), *secs, out));
    let s1 = snap(agg, load, broker)?;
    std::thread::sleep(Duration::from_secs_f64(a.step_secs));
    let s2 = snap(agg, load, broker)?;
    if let (Some(child), Some((out, _))) = (perf_child.as_mut(), perf.as_ref()) {
        child.wait_exit(Duration::from_secs(120));
        println!(
            "#   perf data of this step: {0} (perf report -i {0} --no-children --sort symbol)",
            out.display()
        );
    }
    // Stop generating; the backlog may still go out for drain_secs.
    load.set_pace(Pace {
        generating: false,
        ..Pace::rate(rate, a.common.devices, a.batch)
    });
    let backlog_end = load.totals().backlog;
    let drained = wait_backlog(load, Duration::from_secs_f64(a.drain_secs));
    let before_discard = load.totals().discarded;
    if drained.is_none() {
        load.set_pace(Pace {
            discard: true,
            ..Pace::IDLE
        });
    }
    let acked = wait_acked(load, ACK_WAIT);
    let drain_secs = match (drained, acked) {
        (Some(_), Some(_)) => Some(s2.at.elapsed().as_secs_f64()),
        _ => None,
    };
    // Let the commit that covered the last acks reach the registry reader.
    std::thread::sleep(Duration::from_millis(200));
    let s3 = snap(agg, load, broker)?;
    let exact = Exactness::of(&s0, &s3, agg, load);
    let wall = s2.at - s1.at;
    let secs = wall.as_secs_f64();
    let d = |f: fn(&Scrape) -> f64| (f(&s2.scrape) - f(&s1.scrape)) / secs;
    let achieved = d(|s| s.readings);
    let q = env::hist_quantiles(
        &s1.scrape.ingest_latency,
        &s2.scrape.ingest_latency,
        &[0.5, 0.99],
    );
    let discarded = load.totals().discarded - before_discard;
    let sustained = achieved >= SUSTAINED_SHARE * rate
        && exact.clean()
        && drain_secs.is_some()
        && drained.is_some();
    Ok(Step {
        offered: rate,
        achieved,
        sent: (s2.gen.published_unique - s1.gen.published_unique) as f64 / secs,
        agg_cpu: cpu_percent(&s1.agg, &s2.agg, wall),
        agg_rss_mb: s2.agg.rss as f64 / 1048576.0,
        gen_cpu: cpu_percent(&s1.me, &s2.me, wall),
        broker_cpu: match (s1.broker, s2.broker) {
            (Some(x), Some(y)) => Some(cpu_percent(&x, &y, wall)),
            _ => None,
        },
        lat_p50: q.as_ref().map_or(f64::NAN, |(_, v)| v[0]),
        lat_p99: q.as_ref().map_or(f64::NAN, |(_, v)| v[1]),
        transitions: d(|s| s.transitions),
        commits: d(|s| s.commits),
        backlog_end,
        drain_secs,
        discarded,
        exact,
        sustained,
        threads: env::thread_cpu(&s1.threads, &s2.threads, secs),
        others_cpu: others_cpu(&s1, &s2),
        loadavg: env::loadavg(),
    })
}

fn report_ingest(a: &IngestArgs, all: &[Vec<Step>]) {
    println!();
    println!(
        "## ingest: {} devices, batches of {}, {} rules, {}, flush-interval {} ({} runs; median (min–max) over runs)",
        a.common.devices,
        a.batch,
        a.common.rules,
        if a.mosquitto { "through Mosquitto" } else { "embedded broker" },
        a.flush_interval,
        all.len()
    );
    println!();
    let mosq = a.mosquitto;
    println!(
        "| offered/s | processed/s | processed/offered | sent by generator/s | loss (every run) | sustained in | aggregator CPU% | aggregator RSS MB | generator CPU%{} | ingest latency p50 / p99 (ms, bucket bound) | transitions/s | commits/s | other processes CPU% |",
        if mosq { " | Mosquitto CPU%" } else { "" }
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|{}",
        if mosq { "---|" } else { "" }
    );
    for (i, &rate) in a.rates.iter().enumerate() {
        let steps: Vec<&Step> = all.iter().filter_map(|r| r.get(i)).collect();
        let col = |f: fn(&Step) -> f64| steps.iter().map(|s| f(s)).collect::<Vec<f64>>();
        let losses: Vec<String> = steps.iter().map(|s| s.exact.describe()).collect();
        let loss = if losses.iter().all(|l| l == "0") {
            "0".to_owned()
        } else {
            losses
                .iter()
                .enumerate()
                .map(|(r, l)| format!("run {}: {l}", r + 1))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let sustained = steps.iter().filter(|s| s.sustained).count();
        let not_drained: Vec<String> = steps
            .iter()
            .filter(|s| s.drain_secs.is_none())
            .map(|s| format!("backlog {} discarded", fmt_rate(s.discarded as f64)))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {}/{}{} | {} | {} | {}{} | {} / {} | {} | {} | {} |",
            fmt_rate(rate),
            spread(&col(|s| s.achieved), fmt_rate),
            spread(&col(|s| s.achieved / s.offered * 100.0), |x| format!(
                "{x:.0}%"
            )),
            spread(&col(|s| s.sent), fmt_rate),
            loss,
            sustained,
            steps.len(),
            if not_drained.is_empty() {
                String::new()
            } else {
                format!(" ({})", not_drained.join(", "))
            },
            spread(&col(|s| s.agg_cpu), |x| format!("{x:.0}")),
            spread(&col(|s| s.agg_rss_mb), |x| format!("{x:.0}")),
            spread(&col(|s| s.gen_cpu), |x| format!("{x:.0}")),
            if mosq {
                format!(
                    " | {}",
                    spread(&col(|s| s.broker_cpu.unwrap_or(f64::NAN)), |x| format!(
                        "{x:.0}"
                    ))
                )
            } else {
                String::new()
            },
            spread(&col(|s| s.lat_p50), fmt_ms),
            spread(&col(|s| s.lat_p99), fmt_ms),
            spread(&col(|s| s.transitions), |x| format!("{x:.0}")),
            spread(&col(|s| s.commits), |x| format!("{x:.1}")),
            spread(&col(|s| s.others_cpu), |x| format!("{x:.0}")),
        );
    }
    println!();
    // Highest sustained per run.
    let best: Vec<f64> = all
        .iter()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| s.sustained)
                .map(|s| s.offered)
                .fold(0.0, f64::max)
        })
        .collect();
    let peak: Vec<f64> = all
        .iter()
        .map(|steps| steps.iter().map(|s| s.achieved).fold(0.0, f64::max))
        .collect();
    let s = summarize(&best);
    println!(
        "highest sustained offered rate with zero loss: {} readings/s (per run: {}); target {} readings/s: {}",
        fmt_rate(s.median),
        best.iter().map(|b| fmt_rate(*b)).collect::<Vec<_>>().join(", "),
        fmt_rate(TARGET_RATE),
        if s.median >= TARGET_RATE {
            "met".to_owned()
        } else {
            format!("missed by {:.1}x", TARGET_RATE / s.median.max(1.0))
        }
    );
    println!(
        "highest processed rate in any step (saturation): {} readings/s (per run: {})",
        spread(&peak, fmt_rate),
        peak.iter()
            .map(|b| fmt_rate(*b))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let any_loss = all.iter().flatten().any(|s| !s.exact.exact());
    println!(
        "exactly-once over every step of every run: {}",
        if any_loss {
            "**VIOLATED** (see the loss column)"
        } else {
            "held (every published reading processed once, registry agrees per device)"
        }
    );
}

// ---------------------------------------------------------------------------
// self-check

/// Shows that the checks see a lost batch, a duplicated batch and a gap:
/// first without resends (the loss must stay visible), then with them (the
/// loss must be seen in transit and repaired).
fn self_check(a: &IngestArgs, bin: &Path, rules: &Path, dir: &Path) -> anyhow::Result<()> {
    println!("# self-check of the loss detection (low rate, faults injected on purpose)");
    let rate = 5_000.0;
    let batch = 100;
    let mut ok = true;
    for (phase, resend) in [("no resends", false), ("with resends", true)] {
        let setup = start_setup(
            a.mosquitto,
            bin,
            &dir.join(format!("selfcheck-{}", u8::from(resend))),
            &a.flush_interval,
            rules,
            "",
        )?;
        let agg = &setup.agg;
        let mut sp = spec(&a.common, agg.mqtt, 0, Duration::from_secs(1));
        sp.ack_timeout = resend.then_some(Duration::from_secs(2));
        let load = Load::start(&sp, a.common.load_threads)?;
        wait_connected(agg, &load)?;
        let s0 = snap(agg, &load, None)?;
        load.set_pace(Pace::rate(rate, a.common.devices, batch));
        std::thread::sleep(Duration::from_secs(2));
        load.inject(0, Inject::Drop);
        if !resend {
            load.inject(1, Inject::Duplicate);
            load.inject(2, Inject::SkipSeq);
        }
        std::thread::sleep(Duration::from_secs(if resend { 4 } else { 2 }));
        load.set_pace(Pace::IDLE);
        let acked = wait_acked(&load, Duration::from_secs(if resend { 20 } else { 5 }));
        std::thread::sleep(Duration::from_millis(200));
        let s1 = snap(agg, &load, None)?;
        let e = Exactness::of(&s0, &s1, agg, &load);
        println!(
            "#   {phase}: published {}, processed {}; the check reports: {}",
            e.published,
            e.processed,
            e.describe()
        );
        let saw = if resend {
            // The drop must be seen in transit and repaired.
            e.exact() && e.out_of_order > 0 && e.resends > 0 && acked.is_some()
        } else {
            let dev0 = e.wrong_devices.iter().any(|w| w.0 == load.names[0]);
            let dev1 = !e.wrong_devices.iter().any(|w| w.0 == load.names[1]);
            let dev2_gap = e.gaps == 1 && e.skipped == 1;
            e.lost() > 0
                && dev0
                && dev1
                && e.duplicates >= batch as u64
                && dev2_gap
                && e.out_of_order > 0
                && acked.is_none()
        };
        println!(
            "#   {phase}: {}",
            if saw {
                if resend {
                    "PASS: the dropped batch was seen (held back, resent after the ack timeout) and every reading was processed once"
                } else {
                    "PASS: the dropped batch shows as loss on dev-000 (mark stays behind), the duplicated batch as duplicates only, the skipped number as a gap"
                }
            } else {
                "FAIL: the check did not report the injected faults as expected"
            }
        );
        ok &= saw;
        load.stop();
    }
    if !ok {
        bail!("the self-check failed: the bench cannot be trusted to see loss");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// latency

/// One notification's timeline, ms.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    event: f64,
    processing: f64,
    committed: f64,
    received: f64,
}

struct LatencyResult {
    rate: f64,
    flush: String,
    batch: usize,
    /// processing - event of every firing/resolved transition.
    eval: Vec<f64>,
    /// received - event of every notification.
    hook: Vec<f64>,
    timelines: Vec<Timeline>,
    transitions: usize,
    hist_ingest: Option<(f64, Vec<f64>)>,
    hist_notify: Option<(f64, Vec<f64>)>,
    agg_cpu: f64,
    gen_cpu: f64,
    others_cpu: f64,
    commits: f64,
    all_transitions: f64,
    exact: Exactness,
}

pub fn run_latency(a: LatencyArgs) -> anyhow::Result<()> {
    let bin = env::aggregator_binary(a.common.aggregator.as_ref());
    print_intro(&bin);
    let work = WorkDir::new(a.common.keep_dir)?;
    let rules_dir = work.path().join("rules");
    let mix = env::write_rules(&rules_dir, a.common.rules, a.common.sensor_pool, true)?;
    let checked = env::check_rules(&bin, &rules_dir)?;
    println!(
        "# rules: {} background ({}), plus `{}` (threshold above 50 on sensor `{}`, routed to a webhook); `rules check`: {checked}",
        a.common.rules,
        mix.describe(),
        env::FLIP_RULE,
        env::FLIP_SENSOR
    );
    println!(
        "# load: {} devices x {} sensors, one batch per device every {} ms, flip sensor on {} devices changing every {} ms (staggered); background alerts go to the log sink",
        a.common.devices, a.common.sensors, a.batch_every_ms, a.flip_devices, a.flip_half_ms
    );
    let mut results = Vec::new();
    for flush in &a.flush_interval {
        for &rate in &a.rates {
            let dir = work.path().join(format!("lat-{flush}-{rate}"));
            let r = latency_one(&a, &bin, &rules_dir, &dir, rate, flush)?;
            results.push(r);
        }
    }
    report_latency(&a, &results);
    Ok(())
}

fn latency_one(
    a: &LatencyArgs,
    bin: &Path,
    rules: &Path,
    dir: &Path,
    rate: f64,
    flush: &str,
) -> anyhow::Result<LatencyResult> {
    let hook = HookReceiver::start()?;
    let extra = format!(
        "[alerts]\ndefault-sinks = [\"log\"]\n\
         [[alerts.sink]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"{}\"\n\
         [[alerts.route]]\nrule = [\"{}\"]\nsinks = [\"hook\"]\n",
        hook.url,
        env::FLIP_RULE
    );
    let setup = start_setup(false, bin, dir, flush, rules, &extra)?;
    let agg = &setup.agg;
    let load = Load::start(
        &spec(
            &a.common,
            agg.mqtt,
            a.flip_devices,
            Duration::from_millis(a.flip_half_ms),
        ),
        a.common.load_threads,
    )?;
    wait_connected(agg, &load)?;
    let period = Duration::from_millis(a.batch_every_ms);
    let batch = ((rate * period.as_secs_f64() / a.common.devices as f64).round() as usize).max(1);
    let offered = batch as f64 * a.common.devices as f64 / period.as_secs_f64();
    let s0 = snap(agg, &load, None)?;
    load.set_pace(Pace {
        generating: true,
        batch,
        period,
        discard: false,
    });
    std::thread::sleep(Duration::from_secs_f64(a.warmup_secs));
    let t_start = env::now_ms();
    let s1 = snap(agg, &load, None)?;
    std::thread::sleep(Duration::from_secs_f64(a.secs));
    let s2 = snap(agg, &load, None)?;
    let t_end = env::now_ms();
    load.set_pace(Pace::IDLE);
    wait_acked(&load, ACK_WAIT);
    // The last notifications of the window.
    std::thread::sleep(Duration::from_secs(3));
    let s3 = snap(agg, &load, None)?;
    let exact = Exactness::of(&s0, &s3, agg, &load);

    // (a) from the history.
    let mut history = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut path = format!(
            "/api/v1/alerts/history?rule={}&since={t_start}&limit=1000",
            env::FLIP_RULE
        );
        if let Some(b) = before {
            let _ = write!(path, "&before={b}");
        }
        let v = agg.get_json(&path).with_context(|| format!("GET {path}"))?;
        let list = v
            .get("transitions")
            .and_then(|t| t.as_array())
            .cloned()
            .unwrap_or_default();
        if list.is_empty() {
            break;
        }
        before = list
            .last()
            .and_then(|t| t.get("id"))
            .and_then(serde_json::Value::as_i64);
        history.extend(list);
        if before.is_none() {
            break;
        }
    }
    let f = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let in_window = |e: f64| e >= t_start as f64 && e < t_end as f64;
    let notified = |v: &serde_json::Value| {
        matches!(
            v.get("state").and_then(|s| s.as_str()),
            Some("firing" | "resolved")
        )
    };
    let transitions: Vec<&serde_json::Value> = history
        .iter()
        .filter(|t| notified(t) && in_window(f(t, "event_time_ms")))
        .collect();
    let eval: Vec<f64> = transitions
        .iter()
        .map(|t| f(t, "processing_time_ms") - f(t, "event_time_ms"))
        .collect();
    let committed: BTreeMap<(String, i64), f64> = transitions
        .iter()
        .filter_map(|t| {
            Some((
                (
                    t.get("fingerprint")?.as_str()?.to_owned(),
                    t.get("number")?.as_i64()?,
                ),
                f(t, "committed_ms"),
            ))
        })
        .collect();
    // (b) from the receiver.
    let mut timelines = Vec::new();
    let mut hook_lat = Vec::new();
    for h in hook.all() {
        let b = &h.body;
        if b.get("rule").and_then(|r| r.as_str()) != Some(env::FLIP_RULE)
            || b.get("repeat").and_then(serde_json::Value::as_u64) != Some(0)
        {
            continue;
        }
        let event = f(b, "event_time_ms");
        if !in_window(event) {
            continue;
        }
        hook_lat.push(h.received_ms - event);
        let key = (
            b.get("fingerprint")
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_owned(),
            b.get("number")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(-1),
        );
        timelines.push(Timeline {
            event,
            processing: f(b, "processing_time_ms"),
            committed: committed
                .get(&key)
                .copied()
                .unwrap_or_else(|| f(b, "queued_ms")),
            received: h.received_ms,
        });
    }
    let wall = s2.at - s1.at;
    let secs = wall.as_secs_f64();
    let res = LatencyResult {
        rate: offered,
        flush: flush.to_owned(),
        batch,
        eval,
        hook: hook_lat,
        timelines,
        transitions: transitions.len(),
        hist_ingest: env::hist_quantiles(
            &s1.scrape.ingest_latency,
            &s2.scrape.ingest_latency,
            &[0.5, 0.95, 0.99],
        ),
        hist_notify: s2
            .scrape
            .notification_latency
            .get("hook")
            .and_then(|after| {
                let empty = Vec::new();
                let before = s1.scrape.notification_latency.get("hook").unwrap_or(&empty);
                env::hist_quantiles(before, after, &[0.5, 0.95, 0.99])
            }),
        agg_cpu: cpu_percent(&s1.agg, &s2.agg, wall),
        gen_cpu: cpu_percent(&s1.me, &s2.me, wall),
        others_cpu: others_cpu(&s1, &s2),
        commits: (s2.scrape.commits - s1.scrape.commits) / secs,
        all_transitions: (s2.scrape.transitions - s1.scrape.transitions) / secs,
        exact,
    };
    println!(
        "#   rate {} (batch {} every {} ms), flush {}: {} transitions of {}, {} notifications received; (a) p50 {} ms p99 {} ms; (b) p50 {} ms p99 {} ms; agg CPU {:.0}%, gen CPU {:.0}%, {:.0} commits/s; loss: {}",
        fmt_rate(res.rate),
        batch,
        a.batch_every_ms,
        flush,
        res.transitions,
        env::FLIP_RULE,
        res.hook.len(),
        fmt_ms(summarize(&res.eval).median),
        fmt_ms(summarize(&res.eval).p99),
        fmt_ms(summarize(&res.hook).median),
        fmt_ms(summarize(&res.hook).p99),
        res.agg_cpu,
        res.gen_cpu,
        res.commits,
        res.exact.describe()
    );
    load.stop();
    Ok(res)
}

fn pcts(v: &[f64]) -> String {
    let s = summarize(v);
    if s.n == 0 {
        return "- | - | -".into();
    }
    format!(
        "{} | {} | {}",
        fmt_ms(s.median),
        fmt_ms(s.p95),
        fmt_ms(s.p99)
    )
}

fn hist_cell(h: &Option<(f64, Vec<f64>)>) -> String {
    match h {
        Some((_, q)) => q
            .iter()
            .map(|x| format!("≤{}", fmt_ms(*x)))
            .collect::<Vec<_>>()
            .join(" / "),
        None => "-".into(),
    }
}

fn report_latency(a: &LatencyArgs, results: &[LatencyResult]) {
    println!();
    println!(
        "## latency: reading timestamp -> rule evaluation (a) and -> webhook received (b), ms ({} devices, {} rules + `{}`)",
        a.common.devices,
        a.common.rules,
        env::FLIP_RULE
    );
    println!();
    println!("| offered/s | flush-interval | transitions (a) | (a) p50 | (a) p95 | (a) p99 | notifications (b) | (b) p50 | (b) p95 | (b) p99 | (b) p99 vs 10 ms | aggregator CPU% | generator CPU% | other processes CPU% | commits/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let b = summarize(&r.hook);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            fmt_rate(r.rate),
            r.flush,
            r.transitions,
            pcts(&r.eval),
            r.hook.len(),
            pcts(&r.hook),
            if b.n == 0 {
                "-".to_owned()
            } else if b.p99 < TARGET_P99_MS {
                "met".to_owned()
            } else {
                format!("missed ({:.1}x)", b.p99 / TARGET_P99_MS)
            },
            r.agg_cpu,
            r.gen_cpu,
            r.others_cpu,
            r.commits
        );
    }
    println!();
    println!("Where the time of (b) goes, per notification (ms, p50 / p95 / p99):");
    println!();
    println!("| offered/s | flush-interval | ingest: event -> evaluated | flush wait: evaluated -> written in the commit | written -> received (fsync, worker wake-up, outbox read, HTTP) | histogram ingest_latency p50/p95/p99 | histogram notification_latency{{hook}} p50/p95/p99 | transitions/s (all rules) | batch |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let ing: Vec<f64> = r.timelines.iter().map(|t| t.processing - t.event).collect();
        let com: Vec<f64> = r
            .timelines
            .iter()
            .map(|t| t.committed - t.processing)
            .collect();
        let del: Vec<f64> = r
            .timelines
            .iter()
            .map(|t| t.received - t.committed)
            .collect();
        let three = |v: &[f64]| {
            let s = summarize(v);
            format!(
                "{} / {} / {}",
                fmt_ms(s.median),
                fmt_ms(s.p95),
                fmt_ms(s.p99)
            )
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            fmt_rate(r.rate),
            r.flush,
            three(&ing),
            three(&com),
            three(&del),
            hist_cell(&r.hist_ingest),
            hist_cell(&r.hist_notify),
            r.all_transitions,
            r.batch
        );
    }
    println!();
    println!("`written` is the history's `committed_ms`, stamped inside the ingest transaction before its fsync.");
    println!("Times are the aggregator's and the bench's clocks (same machine); event and processing times are whole ms, so each figure carries up to 1 ms of truncation.");
    let p99_100k: Vec<String> = results
        .iter()
        .filter(|r| (r.rate - 100_000.0).abs() < 1.0)
        .map(|r| format!("{}: p99 {} ms", r.flush, fmt_ms(summarize(&r.hook).p99)))
        .collect();
    if !p99_100k.is_empty() {
        println!(
            "target p99 < {TARGET_P99_MS} ms for (b) at 100k readings/s: {}",
            p99_100k.join(", ")
        );
    }
}
