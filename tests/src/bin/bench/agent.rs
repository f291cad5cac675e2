//! Scenarios `agent` and `drain`: the real release `outpost-agent` between
//! its input and a broker that acks every batch like the aggregator.
//!
//! ```text
//! agent:  outpost-sim --pty --rate R --channels C  ->  pty  ->  outpost-agent
//! drain:  a buffer file preloaded with the agent's own buffer code ->  outpost-agent
//!            outpost-agent --MQTT/TCP-->  embedded rumqttd (the aggregator's)
//!                           <--ack----   ack responder on its local link (this process)
//! ```
//!
//! # `agent`
//! A ramp of offered rates (readings/s), each step a fresh agent (buffer in
//! a temp dir, default settings unless `--durability`, `--commit-interval`,
//! ... say otherwise) and a fresh simulator at `--tick-hz` ticks/s (100)
//! with rate / tick-hz channels, so every step writes 100 chunks a second.
//! The simulator is stopped (SIGSTOP) as soon as it has printed its pty
//! path and let go (SIGCONT) once the agent's source is up and its MQTT link
//! connected, after more than the simulator's 1 s catch-up limit, so it
//! skips the ticks it missed instead of writing them in a burst: nothing is
//! written while nobody reads. (`dropped_no_reader` also counts ticks the
//! simulator's own 8-tick writer queue could not hold: with few channels
//! and thousands of ticks a second that queue spans a few ms, which a
//! loaded machine overruns; hence the fixed tick rate.)
//!
//! After `--warmup-secs`, a window of `--step-secs` is measured from the
//! agent's `/metrics` (polled every 250 ms) and `/proc/PID` of the agent,
//! the simulator and this process (the broker and responder). A step is
//! **sustained** when, in its window, the acked readings/s reach 95% of the
//! offered rate; the buffer does not grow: the mean of the last fifth of the
//! window's `buffer_rows` samples minus the mean of the first fifth is at
//! most 5% of the readings offered in the window; and nothing was lost from
//! agent start to the end of the window: no `lost_frames` nor damaged frames
//! in the agent's metrics, no `dropped_no_reader` in the simulator's summary
//! (taken when it is stopped right after the window), nothing dropped by
//! the buffer.
//!
//! Then a steady phase at `--steady-rate` (1,000 readings/s) for
//! `--steady-secs`: RSS (VmRSS max over the window, VmHWM), CPU, bytes
//! written to storage per reading (`/proc/PID/io` `write_bytes`) and commits
//! per second; then, in the first run, on the same agent, a separate window
//! of `--fsync-secs` under `strace -f -c -e trace=fsync,fdatasync` counts fsyncs (strace stops
//! the agent at every system call, so nothing else is measured in it).
//!
//! # `drain`
//! A buffer file is filled with `--readings` readings (3.6 M: an hour at
//! 1,000/s, 10 sensors, f32 values, timestamps one ms apart ending now)
//! through `outpost_agent::buffer::SqliteBuffer`, the agent's own code, so
//! the file is what the agent would have written. Then the agent starts
//! with the broker up; `/metrics` is polled every 100 ms until
//! `buffer_rows` is 0 (after it was seen non-zero). The drain time runs from
//! the agent's spawn. The responder's sequence-number set then proves the
//! delivery: every preloaded number arrived (no gap, lowest and highest as
//! preloaded), the agent's acked total and acked seq match, duplicates
//! (resends) are counted. `--sweep` first tries a grid of batch sizes,
//! in-flight windows and commit intervals once each, then repeats the
//! fastest `--runs` times next to the default config.
//!
//! Every child is killed and reaped on drop, and every run removes its
//! temp dir.

#[path = "agent_broker.rs"]
mod broker;
#[path = "agent_proc.rs"]
mod procs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outpost_agent::buffer::{BufferConfig, SqliteBuffer, MAX_PENDING};
use outpost_agent::reading::{now_ms, Reading, Value};

use self::broker::AckBroker;
use self::procs::{count_fsyncs, Agent, AgentMetrics, PerfRecord, Sim, Tuning};
use crate::stats::{cpu_percent, proc_sample, summarize, ProcSample};

/// Polling period of `/metrics` and `/proc` during a measured window.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Polling period of `/metrics` during a drain.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// Most channels `outpost-sim` takes.
const MAX_SIM_CHANNELS: u32 = 1024;
/// A step keeps up when acked readings/s reach this share of the offered rate.
const KEEPS_UP: f64 = 0.95;
/// Largest buffer growth over a window, as a share of the readings offered
/// in it, still called bounded.
const MAX_GROWTH: f64 = 0.05;

/// `agent` options.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Offered readings per second, one step each (simulator rate x channels).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,5000,10000,20000,50000,100000"
    )]
    rates: Vec<u64>,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10)]
    step_secs: u64,
    /// Seconds between the simulator's start and the measured window.
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    /// Simulator ticks per second; each step uses rate / tick-hz channels
    /// (readings per tick, at most 1,024), so every step writes the same
    /// number of chunks per second. See `--channels`.
    #[arg(long, default_value_t = 100.0)]
    tick_hz: f64,
    /// Fixed number of simulator channels for every step instead (the tick
    /// rate then grows with the offered rate). The simulator's writer queue
    /// holds 8 ticks: at 2,000 ticks/s that is 4 ms, which a loaded machine
    /// overruns, and the simulator counts it as `dropped_no_reader`.
    #[arg(long)]
    channels: Option<u32>,
    /// Repetitions of the whole ramp (and of the steady phase).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Readings/s of the steady phase.
    #[arg(long, default_value_t = 1000)]
    steady_rate: u64,
    /// Measured seconds of the steady phase; 0 skips it.
    #[arg(long, default_value_t = 60)]
    steady_secs: u64,
    /// Seconds of the strace window counting fsyncs after the steady
    /// window of the first run (at 1,000 readings/s a WAL checkpoint, the
    /// only fsync with durability "normal", comes about every 80 s); 0
    /// skips it.
    #[arg(long, default_value_t = 120)]
    fsync_secs: u64,
    /// Skip the ramp (steady phase only).
    #[arg(long)]
    no_ramp: bool,
    #[command(flatten)]
    tuning: Tuning,
    /// Agent binary to run instead of the release build (e.g. one with
    /// symbols for --perf-record).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// `perf record -g` the agent during every ramp window, into FILE.<rate>.
    #[arg(long, value_name = "FILE")]
    perf_record: Option<PathBuf>,
    /// Print every sample of the measured windows to stderr (time, read,
    /// lost, appended, rows, commits, acked): where a loss happens.
    #[arg(long)]
    timeline: bool,
}

/// `drain` options.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Readings preloaded into the buffer.
    #[arg(long, default_value_t = 3_600_000)]
    readings: u64,
    /// Distinct sensors of the preloaded readings.
    #[arg(long, default_value_t = 10)]
    sensors: u32,
    /// Runs per config.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Try a grid of settings once each first, then run the fastest
    /// `--runs` times next to the default config.
    #[arg(long)]
    sweep: bool,
    /// Give up on a drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Settings of a config to run next to the default (when any is given).
    #[command(flatten)]
    tuning: Tuning,
    /// Agent binary to run instead of the release build.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// `perf record -g` the agent during every drain, into FILE.<n>.
    #[arg(long, value_name = "FILE")]
    perf_record: Option<PathBuf>,
}

// ---------------------------------------------------------------- agent --

/// What one measured window of a live agent gave.
#[derive(Debug, Clone, Default)]
struct Live {
    offered: f64,
    /// Simulator channels x ticks/s.
    channels: u32,
    tick_hz: f64,
    secs: f64,
    /// Readings/s the agent's source produced in the window.
    read: f64,
    /// Readings/s acknowledged (and deleted) in the window.
    acked: f64,
    rows_max: f64,
    rows_growth: f64,
    /// lost_frames + damaged frames, from agent start to the window's end.
    lost: f64,
    /// Of which in the measured window.
    lost_window: f64,
    dropped_no_reader: u64,
    buffer_dropped: f64,
    agent_cpu: f64,
    /// Highest VmRSS seen in the window, bytes.
    rss_max: u64,
    /// VmHWM at the window's end, bytes.
    hwm: u64,
    sim_cpu: f64,
    bench_cpu: f64,
    /// Simulator readings/s from SIGCONT to its stop (its own summary).
    sim_rate: f64,
    sim_summary_found: bool,
    write_bytes: u64,
    appended: f64,
    commits: f64,
    resent: f64,
    /// From the responder, over the agent's life: duplicates and gaps.
    duplicates: u64,
    gaps: u64,
    clean_exit: bool,
    fsync: Option<Fsync>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Fsync {
    secs: f64,
    fsync: u64,
    fdatasync: u64,
    acked: f64,
    commits: f64,
}

impl Live {
    fn sustained(&self) -> bool {
        self.acked >= KEEPS_UP * self.offered
            && self.rows_growth <= MAX_GROWTH * self.offered * self.secs
            && self.lost == 0.0
            && self.dropped_no_reader == 0
            && self.buffer_dropped == 0.0
            && self.sim_summary_found
    }
}

/// Everything a live run shares.
struct Ctx<'a> {
    broker: &'a AckBroker,
    tuning: &'a Tuning,
    agent_bin: Option<&'a Path>,
    channels: Option<u32>,
    tick_hz: f64,
    warmup: Duration,
    timeline: bool,
}

/// Runs sim -> agent -> broker at `offered` readings/s and measures a
/// window of `window`; then, if asked, an fsync-counting window.
fn live(
    ctx: &Ctx<'_>,
    device: &str,
    offered: u64,
    window: Duration,
    fsync_window: Option<Duration>,
    perf: Option<&Path>,
) -> anyhow::Result<Live> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-bench-agent")
        .tempdir()
        .context("cannot create a temp dir")?;
    let channels = ctx.channels.unwrap_or_else(|| {
        ((offered as f64 / ctx.tick_hz).round() as u32).clamp(1, MAX_SIM_CHANNELS)
    });
    let rate_hz = offered as f64 / f64::from(channels);
    let mut sim = Sim::start_stopped(rate_hz, channels)?;
    let mut agent = Agent::spawn(
        ctx.agent_bin,
        dir.path(),
        device,
        ctx.broker.port,
        &dir.path().join("buffer.sqlite"),
        Some(&sim.pty),
        ctx.tuning,
    )?;
    agent.wait_ready(true)?;
    sim.resume();
    std::thread::sleep(ctx.warmup);

    let me = std::process::id();
    let (apid, spid) = (agent.child.id(), sim.child.id());
    let snap = || -> anyhow::Result<(AgentMetrics, ProcSample, ProcSample, ProcSample, Instant)> {
        let m = agent
            .metrics()
            .context("the agent's /metrics did not answer")?;
        let t = Instant::now();
        let a = proc_sample(apid).context("the agent is gone")?;
        let s = proc_sample(spid).context("the simulator is gone")?;
        let b = proc_sample(me).unwrap_or_default();
        Ok((m, a, s, b, t))
    };
    let perf = perf.map(|p| PerfRecord::start(apid, p));
    let (m0, a0, s0, b0, t0) = snap()?;
    let mut rows = vec![m0.rows];
    let mut rss_max = a0.rss;
    while t0.elapsed() < window {
        std::thread::sleep(SAMPLE_EVERY.min(window.saturating_sub(t0.elapsed())));
        if let Some(m) = agent.metrics() {
            rows.push(m.rows);
            if ctx.timeline {
                eprintln!(
                    "{device} t={:.2} read={:.0} lost={:.0} appended={:.0} rows={:.0} commits={:.0} acked={:.0}",
                    t0.elapsed().as_secs_f64(),
                    m.readings,
                    m.lost_frames + m.bad_frames,
                    m.appended,
                    m.rows,
                    m.commits,
                    m.acked
                );
            }
        }
        if let Some(a) = proc_sample(apid) {
            rss_max = rss_max.max(a.rss);
        }
    }
    let (m1, a1, s1, b1, t1) = snap()?;
    if let Some(p) = perf {
        p.finish();
    }
    rows.push(m1.rows);
    rss_max = rss_max.max(a1.rss);
    let wall = t1 - t0;
    let secs = wall.as_secs_f64();

    let fsync = match fsync_window {
        Some(w) => {
            let before = agent.metrics().unwrap_or_default();
            let t = Instant::now();
            let (fsync, fdatasync) = count_fsyncs(apid, w, dir.path())?;
            let after = agent.metrics().unwrap_or_default();
            let secs = t.elapsed().as_secs_f64();
            Some(Fsync {
                secs,
                fsync,
                fdatasync,
                acked: (after.acked - before.acked) / secs,
                commits: (after.commits - before.commits) / secs,
            })
        }
        None => None,
    };

    let resumed = sim.resumed.unwrap_or(t0);
    let summary = sim.finish();
    let sim_secs = resumed.elapsed().as_secs_f64();
    let clean_exit = agent.stop();
    let log = ctx.broker.device(device);
    ctx.broker.forget(device);

    let k = (rows.len() / 5).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let rows_growth = mean(&rows[rows.len() - k..]) - mean(&rows[..k]);
    Ok(Live {
        offered: offered as f64,
        channels,
        tick_hz: rate_hz,
        secs,
        read: (m1.readings - m0.readings) / secs,
        acked: (m1.acked - m0.acked) / secs,
        rows_max: rows.iter().copied().fold(0.0, f64::max),
        rows_growth,
        lost: 0.0 + m1.lost_frames + m1.bad_frames,
        lost_window: 0.0 + (m1.lost_frames + m1.bad_frames) - (m0.lost_frames + m0.bad_frames),
        dropped_no_reader: summary.dropped_no_reader,
        buffer_dropped: m1.dropped,
        agent_cpu: cpu_percent(&a0, &a1, wall),
        rss_max,
        hwm: a1.hwm,
        sim_cpu: cpu_percent(&s0, &s1, wall),
        bench_cpu: cpu_percent(&b0, &b1, wall),
        sim_rate: summary.readings as f64 / sim_secs,
        sim_summary_found: summary.found,
        write_bytes: a1.write_bytes.saturating_sub(a0.write_bytes),
        appended: m1.appended - m0.appended,
        commits: m1.commits - m0.commits,
        resent: m1.resent,
        duplicates: log.duplicates,
        gaps: log.gaps(),
        clean_exit,
        fsync,
    })
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `median [min-max]` of `v` with `prec` decimals.
fn spread(v: &[f64], prec: usize) -> String {
    let s = summarize(v);
    if s.n == 0 {
        return "n/a".into();
    }
    if s.n == 1 || s.min == s.max {
        return format!("{:.prec$}", s.median);
    }
    format!("{:.prec$} [{:.prec$}-{:.prec$}]", s.median, s.min, s.max)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn run_agent(a: AgentArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.channels != Some(0) && a.tick_hz > 0.0 && a.runs > 0,
        "--channels, --tick-hz and --runs must be > 0"
    );
    let broker = AckBroker::start()?;
    let ctx = Ctx {
        broker: &broker,
        tuning: &a.tuning,
        agent_bin: a.agent_bin.as_deref(),
        channels: a.channels,
        tick_hz: a.tick_hz,
        warmup: Duration::from_secs_f64(a.warmup_secs),
        timeline: a.timeline,
    };
    println!(
        "# agent: sim ({}) -> pty -> outpost-agent ({}) -> embedded rumqttd + ack responder; \
         steps {:?} readings/s, {} s each after {} s warm-up; {} run(s)",
        a.channels.map_or_else(
            || format!("{} ticks/s, rate/{} channels", a.tick_hz, a.tick_hz),
            |c| format!("{c} channels")
        ),
        a.tuning.label(),
        a.rates,
        a.step_secs,
        a.warmup_secs,
        a.runs
    );
    let mut ramp: Vec<Vec<Live>> = vec![Vec::new(); a.rates.len()];
    let mut steady: Vec<Live> = Vec::new();
    for run in 1..=a.runs {
        if !a.no_ramp {
            println!("\n## run {run}: ramp (loadavg {})\n", loadavg());
            println!(
                "| offered/s | sim ch x Hz | sim/s | read/s | acked/s | acked % | buffer max | growth | lost (in window) | dropped_no_reader | agent CPU % | agent RSS MB (max/HWM) | sim CPU % | broker CPU % | resent | dup | gaps | sustained |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            for (i, &rate) in a.rates.iter().enumerate() {
                let device = format!("bench-agent-{}-r{run}-{rate}", std::process::id());
                let perf = a
                    .perf_record
                    .as_ref()
                    .map(|p| PathBuf::from(format!("{}.{rate}", p.display())));
                let l = live(
                    &ctx,
                    &device,
                    rate,
                    Duration::from_secs(a.step_secs),
                    None,
                    perf.as_deref(),
                )
                .with_context(|| format!("run {run}, step {rate}/s"))?;
                println!(
                    "| {:.0} | {}x{:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:+.0} | {:.0} ({:.0}) | {} | {:.1} | {:.1}/{:.1} | {:.1} | {:.1} | {:.0} | {} | {} | {}{} |",
                    l.offered,
                    l.channels,
                    l.tick_hz,
                    l.sim_rate,
                    l.read,
                    l.acked,
                    100.0 * l.acked / l.offered,
                    l.rows_max,
                    l.rows_growth,
                    l.lost,
                    l.lost_window,
                    l.dropped_no_reader,
                    l.agent_cpu,
                    mb(l.rss_max),
                    mb(l.hwm),
                    l.sim_cpu,
                    l.bench_cpu,
                    l.resent,
                    l.duplicates,
                    l.gaps,
                    if l.sustained() { "yes" } else { "no" },
                    if l.clean_exit { "" } else { " (agent exit not clean)" },
                );
                ramp[i].push(l);
            }
        }
        if a.steady_secs > 0 {
            let device = format!("bench-agent-{}-r{run}-steady", std::process::id());
            let fsync = (a.fsync_secs > 0 && run == 1).then(|| Duration::from_secs(a.fsync_secs));
            let l = live(
                &ctx,
                &device,
                a.steady_rate,
                Duration::from_secs(a.steady_secs),
                fsync,
                None,
            )
            .with_context(|| format!("run {run}, steady phase"))?;
            print_steady_run(run, &l);
            steady.push(l);
        }
    }
    if !a.no_ramp {
        print_ramp_summary(&a.rates, &ramp);
    }
    if !steady.is_empty() {
        print_steady_summary(a.steady_rate, &steady);
    }
    Ok(())
}

fn print_steady_run(run: usize, l: &Live) {
    println!(
        "\n## run {run}: steady {:.0} readings/s for {:.0} s (loadavg {})\n\n\
         acked {:.0}/s; agent CPU {:.2} %, VmRSS max {:.2} MB, VmHWM {:.2} MB; sim CPU {:.2} %, broker CPU {:.2} %; \
         write_bytes {} over {:.0} readings = {:.1} B/reading; {:.2} commits/s ({:.0} B/commit); lost {:.0}, dropped_no_reader {}",
        l.offered,
        l.secs,
        loadavg(),
        l.acked,
        l.agent_cpu,
        mb(l.rss_max),
        mb(l.hwm),
        l.sim_cpu,
        l.bench_cpu,
        l.write_bytes,
        l.appended,
        l.write_bytes as f64 / l.appended.max(1.0),
        l.commits / l.secs,
        l.write_bytes as f64 / l.commits.max(1.0),
        l.lost,
        l.dropped_no_reader,
    );
    if let Some(f) = l.fsync {
        println!(
            "fsync window (strace attached, {:.0} s): fsync {} + fdatasync {} = {:.3}/s; acked {:.0}/s, {:.2} commits/s under strace",
            f.secs,
            f.fsync,
            f.fdatasync,
            (f.fsync + f.fdatasync) as f64 / f.secs,
            f.acked,
            f.commits,
        );
    }
}

fn print_ramp_summary(rates: &[u64], ramp: &[Vec<Live>]) {
    let runs = ramp.first().map_or(0, Vec::len);
    println!("\n## ramp summary: median [min-max] over {runs} run(s)\n");
    println!(
        "| offered/s | acked/s | acked % | buffer max rows | lost frames (per run) | dropped_no_reader (per run) | agent CPU % | agent RSS MB (max) | sim CPU % | broker CPU % | sustained |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let col = |ls: &[Live], f: &dyn Fn(&Live) -> f64, p: usize| {
        spread(&ls.iter().map(f).collect::<Vec<_>>(), p)
    };
    for (rate, ls) in rates.iter().zip(ramp) {
        println!(
            "| {rate} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |",
            col(ls, &|l| l.acked, 0),
            col(ls, &|l| 100.0 * l.acked / l.offered, 1),
            col(ls, &|l| l.rows_max, 0),
            ls.iter()
                .map(|l| format!("{:.0}", l.lost))
                .collect::<Vec<_>>()
                .join(", "),
            ls.iter()
                .map(|l| l.dropped_no_reader.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            col(ls, &|l| l.agent_cpu, 1),
            col(ls, &|l| mb(l.rss_max), 1),
            col(ls, &|l| l.sim_cpu, 1),
            col(ls, &|l| l.bench_cpu, 1),
            ls.iter().filter(|l| l.sustained()).count(),
            ls.len(),
        );
    }
    let per_run: Vec<f64> = (0..runs)
        .map(|r| {
            rates
                .iter()
                .zip(ramp)
                .filter(|(_, ls)| ls.get(r).is_some_and(Live::sustained))
                .map(|(rate, _)| *rate as f64)
                .fold(0.0, f64::max)
        })
        .collect();
    println!(
        "\nhighest sustained rate (acked >= {:.0}% of offered, buffer growth <= {:.0}% of the window's readings, nothing lost): \
         median {} readings/s; per run: {}",
        KEEPS_UP * 100.0,
        MAX_GROWTH * 100.0,
        spread(&per_run, 0),
        per_run
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn print_steady_summary(rate: u64, ls: &[Live]) {
    let col = |f: &dyn Fn(&Live) -> f64, p: usize| spread(&ls.iter().map(f).collect::<Vec<_>>(), p);
    println!(
        "\n## steady {rate} readings/s: median [min-max] over {} run(s)\n",
        ls.len()
    );
    println!("| figure | value | target |\n|---|---|---|");
    println!("| acked readings/s | {} | {rate} |", col(&|l| l.acked, 0));
    println!(
        "| agent VmRSS, max over the window (MB) | {} | <= 10 MB |",
        col(&|l| mb(l.rss_max), 2)
    );
    println!(
        "| agent VmHWM (MB) | {} | <= 10 MB |",
        col(&|l| mb(l.hwm), 2)
    );
    println!(
        "| agent CPU % (of one core) | {} | report |",
        col(&|l| l.agent_cpu, 2)
    );
    println!("| sim CPU % | {} | report |", col(&|l| l.sim_cpu, 2));
    println!(
        "| broker + responder CPU % | {} | report |",
        col(&|l| l.bench_cpu, 2)
    );
    println!(
        "| bytes written to storage per reading | {} | report |",
        col(&|l| l.write_bytes as f64 / l.appended.max(1.0), 1)
    );
    println!(
        "| commits/s | {} | report |",
        col(&|l| l.commits / l.secs, 2)
    );
    println!(
        "| bytes written per commit | {} | report |",
        col(&|l| l.write_bytes as f64 / l.commits.max(1.0), 0)
    );
    let f: Vec<Fsync> = ls.iter().filter_map(|l| l.fsync).collect();
    if !f.is_empty() {
        let v =
            |g: &dyn Fn(&Fsync) -> f64, p: usize| spread(&f.iter().map(g).collect::<Vec<_>>(), p);
        println!(
            "| fsync + fdatasync per s (strace window, {:.0} s) | {} (fsync {}, fdatasync {}) | report |",
            f[0].secs,
            v(&|x| (x.fsync + x.fdatasync) as f64 / x.secs, 3),
            v(&|x| x.fsync as f64, 0),
            v(&|x| x.fdatasync as f64, 0),
        );
        println!(
            "| acked readings/s under strace | {} | {rate} |",
            v(&|x| x.acked, 0)
        );
    }
    println!(
        "| lost frames / dropped_no_reader | {} / {} | 0 |",
        ls.iter().map(|l| l.lost).sum::<f64>(),
        ls.iter().map(|l| l.dropped_no_reader).sum::<u64>()
    );
}

// ---------------------------------------------------------------- drain --

/// One drain.
#[derive(Debug, Clone, Default)]
struct Drain {
    label: String,
    preload_secs: f64,
    /// Spawn -> first `/metrics` answer showing the preloaded rows.
    open_secs: f64,
    /// Spawn -> `buffer_rows` == 0.
    secs: f64,
    /// Readings/s between 10% and 90% acked.
    mid_rate: f64,
    agent_cpu: f64,
    rss_max: u64,
    hwm: u64,
    bench_cpu: f64,
    published: f64,
    resent: f64,
    batches: f64,
    verdict: String,
    ok: bool,
}

/// Fills a new buffer file at `path` with `n` readings through the agent's
/// own buffer code; returns the first and last sequence numbers.
fn preload(path: &Path, n: u64, sensors: u32) -> anyhow::Result<(u64, u64)> {
    let cfg = BufferConfig {
        path: path.to_path_buf(),
        ..BufferConfig::default()
    };
    let (mut b, _) = SqliteBuffer::open(&cfg).context("cannot create the buffer")?;
    let first = b.stats()?.next_seq;
    let names: Vec<String> = (0..sensors.max(1))
        .map(|i| format!("pump-{i:02}/pressure"))
        .collect();
    // An hour at 1,000 readings/s ends now: one reading per ms.
    let start_ms = now_ms() - i64::try_from(n).unwrap_or(i64::MAX);
    let mut i = 0u64;
    while i < n {
        let end = (i + MAX_PENDING as u64).min(n);
        let chunk: Vec<Reading> = (i..end)
            .map(|k| {
                let sensor = &names[(k % names.len() as u64) as usize];
                // A slow wave plus a little deterministic noise.
                let noise = (k.wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0;
                let v = 3.0 + ((k / 1000) as f32 / 60.0).sin() + noise * 0.05;
                Reading::new(sensor.clone(), start_ms + k as i64, Value::F32(v))
            })
            .collect();
        b.append_vec(chunk)?;
        b.commit()?;
        i = end;
    }
    let s = b.stats()?;
    anyhow::ensure!(
        s.rows == n && s.last_committed_seq == first + n - 1,
        "preload: {} rows, seqs {first}..={} (expected {n})",
        s.rows,
        s.last_committed_seq
    );
    b.close()?;
    Ok((first, s.last_committed_seq))
}

fn drain_once(
    broker: &AckBroker,
    a: &DrainArgs,
    t: &Tuning,
    n_run: usize,
) -> anyhow::Result<Drain> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-bench-drain")
        .tempdir()
        .context("cannot create a temp dir")?;
    let buffer = dir.path().join("buffer.sqlite");
    let t_pre = Instant::now();
    let (first, last) = preload(&buffer, a.readings, a.sensors)?;
    let preload_secs = t_pre.elapsed().as_secs_f64();
    let n = a.readings as f64;

    let device = format!("bench-drain-{}-{n_run}", std::process::id());
    let agent = Agent::spawn(
        a.agent_bin.as_deref(),
        dir.path(),
        &device,
        broker.port,
        &buffer,
        None,
        t,
    )?;
    let pid = agent.child.id();
    let spawned = agent.started;
    let me = std::process::id();
    let a0 = proc_sample(pid).unwrap_or_default();
    let b0 = proc_sample(me).unwrap_or_default();
    let perf = a
        .perf_record
        .as_ref()
        .map(|p| PerfRecord::start(pid, &PathBuf::from(format!("{}.{n_run}", p.display()))));
    let deadline = spawned + Duration::from_secs(a.timeout_secs);
    let mut open_at = None;
    let mut seen_rows = false;
    let mut samples: Vec<(Instant, f64)> = Vec::new();
    let mut rss_max = 0;
    let mut last_a = a0;
    let mut done: Option<(Instant, AgentMetrics)> = None;
    while Instant::now() < deadline {
        if let Some(m) = agent.metrics() {
            let now = Instant::now();
            if m.rows > 0.0 {
                seen_rows = true;
                open_at.get_or_insert(now);
            }
            samples.push((now, m.acked));
            if let Some(s) = proc_sample(pid) {
                rss_max = rss_max.max(s.rss);
                last_a = s;
            }
            if m.rows == 0.0 && (seen_rows || m.acked >= n) {
                done = Some((now, m));
                break;
            }
        }
        if agent
            .child
            .stderr
            .lines()
            .iter()
            .any(|l| l.contains("panicked"))
        {
            break;
        }
        std::thread::sleep(DRAIN_POLL);
    }
    let b1 = proc_sample(me).unwrap_or_default();
    if let Some(p) = perf {
        p.finish();
    }
    let log_wait = Instant::now();
    // The last ack may still be on its way to the responder's log: settle.
    while broker.device(&device).max_seq < last && log_wait.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = broker.device(&device);
    broker.forget(&device);
    let clean = agent.stop();

    let Some((t_done, m)) = done else {
        return Ok(Drain {
            label: t.label(),
            preload_secs,
            secs: f64::NAN,
            verdict: format!("not drained within {} s", a.timeout_secs),
            ..Drain::default()
        });
    };
    let wall = t_done - spawned;
    let secs = wall.as_secs_f64();
    let cross = |share: f64| {
        samples
            .iter()
            .find(|(_, acked)| *acked >= share * n)
            .map(|s| s.0)
    };
    let mid_rate = match (cross(0.1), cross(0.9)) {
        (Some(t1), Some(t9)) if t9 > t1 => 0.8 * n / (t9 - t1).as_secs_f64(),
        _ => f64::NAN,
    };
    let checks = [
        ("distinct seqs", log.distinct() == a.readings),
        ("no gap", log.gaps() == 0),
        ("lowest seq", log.min_seq == Some(first)),
        ("highest seq", log.max_seq == last),
        ("agent acked total", m.acked == n),
        ("agent acked seq", m.acked_seq as u64 == last),
        ("no bad batch", log.bad_batches == 0),
        ("clean exit", clean),
    ];
    let failed: Vec<&str> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
    let verdict = format!(
        "{}: {} distinct of {} preloaded, seqs {}..={} (preloaded {first}..={last}), gaps {}, duplicates {}, \
         agent acked_readings_total {:.0}, acked_seq {}",
        if failed.is_empty() {
            "OK".to_owned()
        } else {
            format!("FAILED ({})", failed.join(", "))
        },
        log.distinct(),
        a.readings,
        log.min_seq.unwrap_or(0),
        log.max_seq,
        log.gaps(),
        log.duplicates,
        m.acked,
        m.acked_seq as u64,
    );
    Ok(Drain {
        label: t.label(),
        preload_secs,
        open_secs: open_at.map_or(f64::NAN, |o| (o - spawned).as_secs_f64()),
        secs,
        mid_rate,
        agent_cpu: cpu_percent(&a0, &last_a, wall),
        rss_max,
        hwm: last_a.hwm,
        bench_cpu: cpu_percent(&b0, &b1, wall),
        published: m.published,
        resent: m.resent,
        batches: m.batches,
        ok: failed.is_empty(),
        verdict,
    })
}

/// Settings tried by `--sweep`, once each.
fn sweep_grid() -> Vec<Tuning> {
    let t =
        |max_readings: Option<usize>, max_inflight: Option<usize>, commit: Option<&str>| Tuning {
            max_readings,
            max_inflight,
            commit_interval: commit.map(str::to_owned),
            ..Tuning::default()
        };
    vec![
        t(Some(2000), None, None),
        t(Some(10_000), None, None),
        t(None, Some(32), None),
        t(Some(2000), Some(32), None),
        t(Some(10_000), Some(32), None),
        t(Some(10_000), Some(32), Some("100ms")),
        t(None, None, Some("100ms")),
    ]
}

fn print_drain_run(n_run: usize, d: &Drain) {
    println!(
        "| {n_run} | {} | {:.1} | {:.2} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1}/{:.1} | {:.1} | {:.0} | {:.0} | {} |",
        d.label,
        d.preload_secs,
        d.open_secs,
        d.secs,
        d.mid_rate,
        d.published / d.batches.max(1.0),
        d.agent_cpu,
        mb(d.rss_max),
        mb(d.hwm),
        d.bench_cpu,
        d.published,
        d.resent,
        d.verdict,
    );
}

pub fn run_drain(a: DrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.readings > 0 && a.runs > 0,
        "--readings and --runs must be > 0"
    );
    let broker = AckBroker::start()?;
    println!(
        "# drain: {} readings preloaded ({} sensors, f32, 1 ms apart ending now) with outpost_agent::buffer::SqliteBuffer, \
         then outpost-agent -> embedded rumqttd + ack responder; {} run(s) per config",
        a.readings, a.sensors, a.runs
    );
    println!(
        "\n| # | config | preload s | open s | drain s | readings/s 10-90% | readings/batch | agent CPU % | agent RSS MB (max/HWM) | broker CPU % | published | resent | verification |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut n_run = 0;
    let mut configs = vec![Tuning::default()];
    if a.tuning.label() != "default" {
        configs.push(a.tuning.clone());
    }
    if a.sweep {
        let mut best: Option<(f64, Tuning)> = None;
        for t in sweep_grid() {
            n_run += 1;
            let d = drain_once(&broker, &a, &t, n_run)?;
            print_drain_run(n_run, &d);
            if d.ok && best.as_ref().is_none_or(|b| d.secs < b.0) {
                best = Some((d.secs, t));
            }
        }
        if let Some((_, t)) = best {
            if !configs.iter().any(|c| c.label() == t.label()) {
                configs.push(t);
            }
        }
    }
    let mut results: Vec<Vec<Drain>> = vec![Vec::new(); configs.len()];
    for _ in 0..a.runs {
        for (i, t) in configs.iter().enumerate() {
            n_run += 1;
            let d = drain_once(&broker, &a, t, n_run)?;
            print_drain_run(n_run, &d);
            results[i].push(d);
        }
    }
    println!(
        "\n## drain summary: median [min-max] over {} run(s) per config (target <= 30 s)\n",
        a.runs
    );
    println!("| config | drain s | readings/s (whole drain) | readings/s 10-90% | agent CPU % | agent RSS MB (max) | verified runs | target |");
    println!("|---|---|---|---|---|---|---|---|");
    for (t, ds) in configs.iter().zip(&results) {
        let col =
            |f: &dyn Fn(&Drain) -> f64, p: usize| spread(&ds.iter().map(f).collect::<Vec<_>>(), p);
        let med = summarize(&ds.iter().map(|d| d.secs).collect::<Vec<_>>()).median;
        println!(
            "| {} | {} | {} | {} | {} | {} | {}/{} | {} |",
            t.label(),
            col(&|d| d.secs, 1),
            col(&|d| a.readings as f64 / d.secs, 0),
            col(&|d| d.mid_rate, 0),
            col(&|d| d.agent_cpu, 1),
            col(&|d| mb(d.rss_max), 1),
            ds.iter().filter(|d| d.ok).count(),
            ds.len(),
            if med <= 30.0 { "met" } else { "missed" },
        );
    }
    Ok(())
}
