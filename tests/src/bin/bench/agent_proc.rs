//! The processes of the agent benchmarks: the release `outpost-agent` with a
//! config written for the run, `outpost-sim` held stopped until the agent
//! reads its pty, and the observers (`strace` for fsyncs, `perf record`).
//! Every process is an [`outpost_tests::Child`]: killed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outpost_tests::{binary, free_port, http_get, metric_value, Child};

/// How long a started agent has to serve `/metrics` with its source and
/// MQTT link up.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping process (SIGTERM) has before it is killed. The
/// agent's default shutdown grace is 5 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The simulator's "catch up" limit (`outpost_firmware_shim::sim::MAX_LAG`):
/// a sim held stopped longer than this skips the missed ticks instead of
/// writing them in one burst when it resumes.
const SIM_SKIP_AFTER: Duration = Duration::from_millis(1_200);

/// Agent settings a run may change; `None` keeps the agent's default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Tuning {
    /// `buffer.durability` ("normal", "full", "off"); default: the agent's (normal).
    #[arg(long)]
    pub durability: Option<String>,
    /// `buffer.commit-interval` (e.g. "100ms"); default: the agent's (1s).
    #[arg(long)]
    pub commit_interval: Option<String>,
    /// `batch.max-readings`; default: the agent's (500).
    #[arg(long)]
    pub max_readings: Option<usize>,
    /// `mqtt.max-inflight-batches`; default: the agent's (8).
    #[arg(long)]
    pub max_inflight: Option<usize>,
    /// `batch.linger` (e.g. "50ms"); default: the agent's (200ms).
    #[arg(long)]
    pub linger: Option<String>,
}

impl Tuning {
    /// "default", or the keys set, e.g. "max-readings=10000 commit-interval=100ms".
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(v) = &self.durability {
            parts.push(format!("durability={v}"));
        }
        if let Some(v) = &self.commit_interval {
            parts.push(format!("commit-interval={v}"));
        }
        if let Some(v) = self.max_readings {
            parts.push(format!("max-readings={v}"));
        }
        if let Some(v) = self.max_inflight {
            parts.push(format!("max-inflight-batches={v}"));
        }
        if let Some(v) = &self.linger {
            parts.push(format!("linger={v}"));
        }
        if parts.is_empty() {
            "default".into()
        } else {
            parts.join(" ")
        }
    }
}

/// Writes `dir/agent.toml`: device `device`, broker on 127.0.0.1:`mqtt`,
/// buffer `buffer`, metrics on `http`, one serial-frames source on `pty`
/// (none without), plus the `tuning` keys. Everything else is the agent's
/// default.
pub fn write_config(
    dir: &Path,
    device: &str,
    mqtt: u16,
    http: u16,
    buffer: &Path,
    pty: Option<&str>,
    t: &Tuning,
) -> anyhow::Result<PathBuf> {
    let mut s = format!("[device]\nid = \"{device}\"\n[mqtt]\nport = {mqtt}\n");
    if let Some(v) = t.max_inflight {
        s += &format!("max-inflight-batches = {v}\n");
    }
    s += &format!("[buffer]\npath = \"{}\"\n", buffer.display());
    if let Some(v) = &t.durability {
        s += &format!("durability = \"{v}\"\n");
    }
    if let Some(v) = &t.commit_interval {
        s += &format!("commit-interval = \"{v}\"\n");
    }
    s += "[batch]\n";
    if let Some(v) = t.max_readings {
        s += &format!("max-readings = {v}\n");
    }
    if let Some(v) = &t.linger {
        s += &format!("linger = \"{v}\"\n");
    }
    s += &format!("[metrics]\nlisten = \"127.0.0.1:{http}\"\n");
    if let Some(pty) = pty {
        s += &format!("[[sources]]\ntype = \"serial-frames\"\nname = \"sim\"\npath = \"{pty}\"\n");
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, s).context("cannot write the agent config")?;
    Ok(path)
}

/// The agent's counters and gauges at one moment (`/metrics`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentMetrics {
    /// `readings_total`: readings the sources produced.
    pub readings: f64,
    /// `source_errors_total{kind="lost_frames"}`.
    pub lost_frames: f64,
    /// `source_errors_total` of kinds crc, framing, oversize, body.
    pub bad_frames: f64,
    /// `buffer_appended_total`.
    pub appended: f64,
    /// `buffer_rows`.
    pub rows: f64,
    /// `buffer_dropped_total`.
    pub dropped: f64,
    /// `buffer_commits_total`.
    pub commits: f64,
    /// `published_batches_total`.
    pub batches: f64,
    /// `published_readings_total`.
    pub published: f64,
    /// `resent_readings_total`.
    pub resent: f64,
    /// `acked_readings_total`.
    pub acked: f64,
    /// `acked_seq`.
    pub acked_seq: f64,
    /// `source_up` (summed over sources).
    pub source_up: f64,
    /// `mqtt_connected`.
    pub connected: f64,
}

/// Sum of `name`'s samples whose label set contains `kind="K"` for one of `kinds`.
fn by_kind(text: &str, name: &str, kinds: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| kinds.iter().any(|k| l.contains(&format!("kind=\"{k}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

impl AgentMetrics {
    /// Parses Prometheus text.
    pub fn parse(text: &str) -> AgentMetrics {
        let m = |n: &str| metric_value(text, &format!("outpost_agent_{n}")).unwrap_or(0.0);
        let errors = "outpost_agent_source_errors_total";
        AgentMetrics {
            readings: m("readings_total"),
            lost_frames: by_kind(text, errors, &["lost_frames"]),
            bad_frames: by_kind(text, errors, &["crc", "framing", "oversize", "body"]),
            appended: m("buffer_appended_total"),
            rows: m("buffer_rows"),
            dropped: m("buffer_dropped_total"),
            commits: m("buffer_commits_total"),
            batches: m("published_batches_total"),
            published: m("published_readings_total"),
            resent: m("resent_readings_total"),
            acked: m("acked_readings_total"),
            acked_seq: m("acked_seq"),
            source_up: m("source_up"),
            connected: m("mqtt_connected"),
        }
    }
}

/// A running `outpost-agent`.
pub struct Agent {
    /// The process.
    pub child: Child,
    /// `127.0.0.1:PORT` of `/metrics`.
    pub http: String,
    /// When it was spawned.
    pub started: Instant,
}

impl Agent {
    /// Writes the config (see [`write_config`]) and starts `bin` (the release
    /// agent unless given).
    pub fn spawn(
        bin: Option<&Path>,
        dir: &Path,
        device: &str,
        mqtt: u16,
        buffer: &Path,
        pty: Option<&str>,
        t: &Tuning,
    ) -> anyhow::Result<Agent> {
        let http = free_port();
        let config = write_config(dir, device, mqtt, http, buffer, pty, t)?;
        let bin = bin.map_or_else(|| binary("outpost-agent"), Path::to_path_buf);
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config);
        let started = Instant::now();
        Ok(Agent {
            child: Child::spawn("outpost-agent", cmd),
            http: format!("127.0.0.1:{http}"),
            started,
        })
    }

    /// The metrics, when `/metrics` answers.
    pub fn metrics(&self) -> Option<AgentMetrics> {
        let (status, body) = http_get(&self.http, "/metrics")?;
        (status == 200).then(|| AgentMetrics::parse(&body))
    }

    /// Waits until `/metrics` answers with the MQTT link up and, when
    /// `source` is set, the source running.
    pub fn wait_ready(&mut self, source: bool) -> anyhow::Result<AgentMetrics> {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait() {
                anyhow::bail!(
                    "outpost-agent exited ({status}) at start:\n{}",
                    self.child.stderr.text()
                );
            }
            if let Some(m) = self.metrics() {
                if m.connected >= 1.0 && (!source || m.source_up >= 1.0) {
                    return Ok(m);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "outpost-agent not ready after {AGENT_READY_TIMEOUT:?}:\n{}",
                self.child.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after [`STOP_TIMEOUT`]).
    /// True when it exited by itself with status 0.
    pub fn stop(mut self) -> bool {
        stop_child(&mut self.child)
    }
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], SIGKILL. True for a clean exit 0.
pub fn stop_child(child: &mut Child) -> bool {
    if child.try_wait().is_some() {
        return child.try_wait().is_some_and(|s| s.success());
    }
    child.signal("TERM");
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill();
    false
}

/// `outpost-sim --pty` at `rate` ticks/s of `channels` readings, stopped
/// (SIGSTOP) as soon as it printed its pty path, so nothing is written
/// before a reader is there. [`Sim::resume`] lets it go.
pub struct Sim {
    /// The process.
    pub child: Child,
    /// The pty slave path.
    pub pty: String,
    stopped_at: Instant,
    /// When it was let go.
    pub resumed: Option<Instant>,
}

/// The simulator's exit summary line, parsed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimSummary {
    /// Readings generated.
    pub readings: u64,
    /// Frames dropped because the port was full (nobody reading fast enough).
    pub dropped_no_reader: u64,
    /// True when the summary line was found.
    pub found: bool,
}

impl Sim {
    /// Starts the simulator and stops it at once (see the type).
    pub fn start_stopped(rate_hz: f64, channels: u32) -> anyhow::Result<Sim> {
        let mut cmd = Command::new(binary("outpost-sim"));
        cmd.args(["--pty", "--rate"])
            .arg(format!("{rate_hz}"))
            .arg("--channels")
            .arg(channels.to_string());
        let child = Child::spawn("outpost-sim", cmd);
        let out = child.stdout.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        let pty = loop {
            if let Some(l) = out.lines().first() {
                break l.clone();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "outpost-sim printed no pty path: {}",
                child.stderr.text()
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        child.signal("STOP");
        let stopped_at = Instant::now();
        anyhow::ensure!(
            pty.starts_with("/dev/"),
            "unexpected first line from outpost-sim: {pty}"
        );
        Ok(Sim {
            child,
            pty,
            stopped_at,
            resumed: None,
        })
    }

    /// Lets the simulator run. Waits first until it has been stopped for
    /// longer than its catch-up limit, so it skips the missed ticks instead
    /// of writing them in a burst.
    pub fn resume(&mut self) {
        let at = self.stopped_at + SIM_SKIP_AFTER;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        self.child.signal("CONT");
        self.resumed = Some(Instant::now());
    }

    /// SIGTERM (SIGCONT first, in case it is still stopped), waits for the
    /// exit and parses its summary line.
    pub fn finish(mut self) -> SimSummary {
        self.child.signal("CONT");
        stop_child(&mut self.child);
        // The collector thread may still hold the last line for a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let text = self.child.stderr.text();
            if let Some(line) = text.lines().find(|l| l.starts_with("outpost-sim: ticks=")) {
                return parse_sim_summary(line);
            }
            if Instant::now() >= deadline {
                return SimSummary::default();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Parses `outpost-sim: ticks=.. readings=.. frames=.. ... dropped_no_reader=..`.
pub fn parse_sim_summary(line: &str) -> SimSummary {
    let get = |key: &str| {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    SimSummary {
        readings: get("readings"),
        dropped_no_reader: get("dropped_no_reader"),
        found: true,
    }
}

/// `strace -f -c -e trace=fsync,fdatasync -p PID` for `window`: the number
/// of fsync and fdatasync calls. None when strace cannot run. strace stops
/// the traced threads at every system call, which slows the process down.
pub fn count_fsyncs(pid: u32, window: Duration, dir: &Path) -> anyhow::Result<(u64, u64)> {
    let out = dir.join("strace.txt");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-c", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&out)
        .arg("-p")
        .arg(pid.to_string());
    let mut strace = Child::spawn("strace", cmd);
    std::thread::sleep(window);
    strace.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while strace.try_wait().is_none() {
        anyhow::ensure!(Instant::now() < deadline, "strace did not detach");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&out).with_context(|| {
        format!(
            "strace wrote no summary (is it installed? apt-get install -y strace): {}",
            strace.stderr.text()
        )
    })?;
    Ok((
        strace_calls(&text, "fsync"),
        strace_calls(&text, "fdatasync"),
    ))
}

/// The `calls` column of `syscall`'s row in a `strace -c` table.
pub fn strace_calls(table: &str, syscall: &str) -> u64 {
    table
        .lines()
        .filter(|l| l.split_whitespace().last() == Some(syscall))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum()
}

/// `perf record -g` of `pid` until [`PerfRecord::finish`] (SIGINT).
pub struct PerfRecord {
    child: Child,
    /// The data file.
    pub out: PathBuf,
}

impl PerfRecord {
    /// Starts recording (999 Hz, call graphs) into `out`.
    pub fn start(pid: u32, out: &Path) -> PerfRecord {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-F", "999", "-g", "-o"])
            .arg(out)
            .arg("-p")
            .arg(pid.to_string());
        PerfRecord {
            child: Child::spawn("perf", cmd),
            out: out.to_path_buf(),
        }
    }

    /// Stops recording; the data file is complete once this returns.
    pub fn finish(mut self) {
        self.child.signal("INT");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "# perf: {} ({})",
            self.out.display(),
            self.child.stderr.text().replace('\n', " ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_summary_and_strace_tables_parse() {
        let s = parse_sim_summary(
            "outpost-sim: ticks=10 readings=100 frames=112 written=2000 garbage_events=0 \
             (bursts=0 bit_flips=0) dropped_no_reader=3",
        );
        assert_eq!((s.readings, s.dropped_no_reader), (100, 3));
        let table = "% time     seconds  usecs/call     calls    errors syscall\n\
                     ------ ----------- ----------- --------- --------- ----------------\n\
                     100.00    0.000120          40         3           fsync\n\
                     ------ ----------- ----------- --------- --------- ----------------\n\
                     100.00    0.000120          40         3           total\n";
        assert_eq!(strace_calls(table, "fsync"), 3);
        assert_eq!(strace_calls(table, "fdatasync"), 0);
        let text = "outpost_agent_source_errors_total{source=\"sim\",kind=\"lost_frames\"} 7\n\
                    outpost_agent_source_errors_total{source=\"sim\",kind=\"crc\"} 1\n\
                    outpost_agent_buffer_rows 12\n";
        let m = AgentMetrics::parse(text);
        assert_eq!((m.lost_frames, m.bad_frames, m.rows), (7.0, 1.0, 12.0));
    }
}
