//! Scenario `size`: release binary sizes and start-up times.
//!
//! Sizes: each program is built the way it ships (docs/deploy.md,
//! `cargo deb`): alone, `cargo build --profile P -p PACKAGE`, so no other
//! package's features are unified into its dependencies. The agent is built
//! in every profile of `--profiles` (the workspace's `release` and the
//! gateway profile it ships with); the aggregator and the simulator only in
//! `release`, the profile they ship with. Every profile here strips symbols.
//!
//! Start-up, agent: the real aggregator (embedded broker; it also acks) is
//! started, a subscriber connects to its broker and subscribes to
//! `outpost/v1/+/telemetry`; then, per start, an `outpost-sim` pty is
//! already sending (4 channels at 100 Hz) when the agent is spawned with a
//! fresh buffer and its own device id. The figure is the time from just
//! before `spawn` (fork + exec) to the subscriber receiving the agent's first
//! telemetry message; the profiles take turns, one start each per round.
//! The agent commits its buffer every [`COMMIT_INTERVAL`] and does not
//! linger on a partial batch, so the figure is process start, config,
//! SQLite open, MQTT connect and serial open, not the deploy defaults' 1 s
//! commit interval and 200 ms linger (add those for a default config).
//! Resolution: the broker's forwarding delay, well under 1 ms on loopback.
//!
//! Start-up, aggregator: time from just before `spawn` to the first answer
//! of `/healthz` and to its first 200, with a fresh state file, polled every
//! [`POLL`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outpost_proto::topics::{self, DeviceTopic};
use outpost_tests::{free_port, http_get, wait_until, workspace_root, Child};

use crate::stats::{proc_sample, summarize};

/// The profile the agent ships with (root Cargo.toml, docs/deploy.md).
pub const AGENT_PROFILE: &str = "gateway";
/// Target size of the shipped agent, bytes (6 MB).
pub const AGENT_TARGET_BYTES: u64 = 6_000_000;
/// Agent buffer commit interval during the start-up runs.
const COMMIT_INTERVAL: &str = "10ms";
/// Poll interval of the aggregator's `/healthz`.
const POLL: Duration = Duration::from_millis(1);
/// Longest wait for one start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `size` options.
#[derive(Debug, clap::Args)]
pub struct SizeArgs {
    /// Profiles to build and start the agent in.
    #[arg(long, value_delimiter = ',', default_values_t = ["release".to_string(), AGENT_PROFILE.to_string()])]
    profiles: Vec<String>,
    /// Starts per measurement.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// Use the binaries as they are in the target directory (no cargo build).
    #[arg(long)]
    no_build: bool,
    /// Sizes only.
    #[arg(long)]
    no_startup: bool,
}

/// A program: binary name, package, features.
#[derive(Debug, Clone, Copy)]
struct Program {
    bin: &'static str,
    package: &'static str,
    features: &'static str,
}

const AGENT: Program = Program {
    bin: "outpost-agent",
    package: "outpost-agent",
    features: "",
};
const AGGREGATOR: Program = Program {
    bin: "outpost-aggregator",
    package: "outpost-aggregator",
    features: "",
};
const SIM: Program = Program {
    bin: "outpost-sim",
    package: "outpost-firmware-shim",
    features: "sim",
};

/// The target directory this bench was built in (`.../target/release/outpost-bench`).
fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("no target directory above the bench binary")
}

fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        p => p,
    }
}

/// Path of `p` built in `profile`, building it alone first unless `no_build`.
fn build(p: Program, profile: &str, no_build: bool) -> anyhow::Result<PathBuf> {
    let target = target_dir()?;
    if !no_build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--profile", profile, "-p", p.package])
            .args(["--bin", p.bin])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(workspace_root());
        if !p.features.is_empty() {
            cmd.args(["--features", p.features]);
        }
        let started = Instant::now();
        let status = cmd.status().context("running cargo build")?;
        anyhow::ensure!(
            status.success(),
            "cargo build --profile {profile} -p {} failed",
            p.package
        );
        let took = started.elapsed();
        if took > Duration::from_secs(5) {
            println!(
                "# built {} ({profile}) in {:.0} s",
                p.bin,
                took.as_secs_f64()
            );
        }
    }
    let path = target.join(profile_dir(profile)).join(p.bin);
    anyhow::ensure!(path.exists(), "{} is not built", path.display());
    Ok(path)
}

fn mb(bytes: u64) -> String {
    format!(
        "{:.2} MB ({:.2} MiB)",
        bytes as f64 / 1e6,
        bytes as f64 / (1 << 20) as f64
    )
}

pub fn run(a: SizeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!a.profiles.is_empty(), "--profiles: name one at least");
    println!("# size: programs built alone, as they ship (cargo build --profile P -p PACKAGE)");
    let mut agents = Vec::new();
    for profile in &a.profiles {
        agents.push((profile.clone(), build(AGENT, profile, a.no_build)?));
    }
    let aggregator = build(AGGREGATOR, "release", a.no_build)?;
    let sim = build(SIM, "release", a.no_build)?;

    println!();
    println!("| program | profile | bytes | size | target |");
    println!("|---|---|---:|---:|---|");
    for (profile, path) in &agents {
        let len = std::fs::metadata(path)?.len();
        let verdict = if len <= AGENT_TARGET_BYTES {
            "<= 6 MB: met"
        } else {
            "<= 6 MB: MISSED"
        };
        println!(
            "| outpost-agent | {profile} | {len} | {} | {verdict} |",
            mb(len)
        );
    }
    for (name, path) in [("outpost-aggregator", &aggregator), ("outpost-sim", &sim)] {
        let len = std::fs::metadata(path)?.len();
        println!("| {name} | release | {len} | {} | report |", mb(len));
    }
    if a.no_startup {
        return Ok(());
    }

    println!();
    let dir = tempfile::tempdir()?;
    let healthz = aggregator_starts(&aggregator, dir.path(), a.starts)?;
    let (ok, first) = (summarize(&healthz.0), summarize(&healthz.1));
    println!(
        "aggregator, spawn -> /healthz 200 ({} starts, polled every {POLL:?}): median {:.1} ms (min {:.1}, max {:.1}); first answer of any status: median {:.1} ms",
        ok.n, ok.median, ok.min, ok.max, first.median
    );
    let starts = agent_starts(&agents, &aggregator, &sim, dir.path(), a.starts)?;
    for ((profile, _), (times, rss)) in agents.iter().zip(&starts) {
        let s = summarize(times);
        let r = summarize(rss);
        println!(
            "agent ({profile}), spawn -> first telemetry message at a subscriber ({} starts): median {:.1} ms (min {:.1}, max {:.1}); RSS then: median {:.1} MB",
            s.n, s.median, s.min, s.max, r.median
        );
    }
    Ok(())
}

/// Writes an aggregator config (embedded broker on `mqtt`, API on `api`,
/// state under `dir`) and returns its path.
fn aggregator_config(dir: &Path, mqtt: u16, api: u16) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n\
             [state]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\n",
            dir.join("state.sqlite").display()
        ),
    )?;
    Ok(config)
}

/// Spawns the aggregator and waits for `/healthz` 200; returns the child,
/// the API address and (ms to the first answer, ms to the first 200).
fn start_aggregator(
    bin: &Path,
    dir: &Path,
    mqtt: u16,
) -> anyhow::Result<(Child, String, f64, f64)> {
    let api_port = free_port();
    let config = aggregator_config(dir, mqtt, api_port)?;
    let api = format!("127.0.0.1:{api_port}");
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&config);
    let t0 = Instant::now();
    let mut child = Child::spawn("outpost-aggregator", cmd);
    let mut first = None;
    loop {
        if let Some((status, _)) = http_get(&api, "/healthz") {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let first = *first.get_or_insert(ms);
            if status == 200 {
                return Ok((child, api, first, ms));
            }
        }
        if let Some(status) = child.try_wait() {
            anyhow::bail!("the aggregator exited ({status}): {}", child.stderr.text());
        }
        anyhow::ensure!(
            t0.elapsed() < START_TIMEOUT,
            "the aggregator's /healthz did not answer 200"
        );
        std::thread::sleep(POLL);
    }
}

/// `n` aggregator starts, each on fresh state: (ms to first answer, ms to 200).
fn aggregator_starts(bin: &Path, dir: &Path, n: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut first, mut ok) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (child, _, f, o) = start_aggregator(bin, &dir.join(format!("agg-{i}")), free_port())?;
        drop(child);
        first.push(f);
        ok.push(o);
    }
    Ok((first, ok))
}

/// Subscribes to every device's telemetry on the broker at `port`; sends
/// (topic, arrival) for each message. The thread ends when the receiver is
/// dropped.
fn subscriber(port: u16) -> anyhow::Result<mpsc::Receiver<(String, Instant)>> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new("bench-size-subscriber", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(opts, 64);
    client.subscribe(topics::all_devices(DeviceTopic::Telemetry), QoS::AtMostOnce)?;
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _client = client; // keeps the connection's request channel open
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic, Instant::now())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    ready_rx
        .recv_timeout(START_TIMEOUT)
        .context("the subscriber got no SUBACK")?;
    Ok(rx)
}

/// `n` rounds of agent starts against one aggregator, one start per agent
/// of `agents` in each round (interleaved, so load changes on the machine
/// hit every profile alike). Per agent: ms from spawn to the first
/// telemetry message, and its RSS (MB) right then.
fn agent_starts(
    agents: &[(String, PathBuf)],
    aggregator: &Path,
    sim: &Path,
    dir: &Path,
    n: usize,
) -> anyhow::Result<Vec<(Vec<f64>, Vec<f64>)>> {
    let mqtt = free_port();
    let (_aggregator, _, _, _) = start_aggregator(aggregator, &dir.join("agg-agents"), mqtt)?;
    let telemetry = subscriber(mqtt)?;
    let mut out = vec![(Vec::new(), Vec::new()); agents.len()];
    for i in 0..n {
        for (k, (profile, agent)) in agents.iter().enumerate() {
            let (ms, rss) = agent_start(
                agent,
                sim,
                &dir.join(format!("agent-{profile}-{i}")),
                mqtt,
                &telemetry,
            )?;
            out[k].0.push(ms);
            out[k].1.push(rss);
        }
    }
    Ok(out)
}

/// One agent start in `run` (a fresh buffer and device id) with a fresh
/// simulator: ms from spawn to its first telemetry message on `telemetry`,
/// and its RSS (MB) right then.
fn agent_start(
    agent: &Path,
    sim: &Path,
    run: &Path,
    mqtt: u16,
    telemetry: &mpsc::Receiver<(String, Instant)>,
) -> anyhow::Result<(f64, f64)> {
    std::fs::create_dir_all(run)?;
    let (_sim, pty) = start_sim(sim)?;
    let device = run
        .file_name()
        .and_then(|s| s.to_str())
        .context("run directory name")?
        .to_owned();
    let config = run.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{device}\"\n[mqtt]\nport = {mqtt}\n\
             [buffer]\npath = \"{}\"\ncommit-interval = \"{COMMIT_INTERVAL}\"\n\
             [batch]\nlinger = \"0s\"\n\
             [metrics]\nlisten = \"127.0.0.1:{}\"\n\
             [[sources]]\ntype = \"serial-frames\"\nname = \"sim\"\npath = \"{pty}\"\n",
            run.join("buffer.sqlite").display(),
            free_port()
        ),
    )?;
    while telemetry.try_recv().is_ok() {} // a previous agent's last messages
    let topic = topics::telemetry(&device)?;
    let mut cmd = Command::new(agent);
    cmd.arg("--config").arg(&config);
    let t0 = Instant::now();
    let mut child = Child::spawn("outpost-agent", cmd);
    let arrived = loop {
        match telemetry.recv_timeout(Duration::from_millis(100)) {
            Ok((t, at)) if t == topic => break at,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => anyhow::bail!("subscriber gone: {e}"),
        }
        if let Some(status) = child.try_wait() {
            anyhow::bail!("the agent exited ({status}): {}", child.stderr.text());
        }
        anyhow::ensure!(
            t0.elapsed() < START_TIMEOUT,
            "no telemetry from the agent within {START_TIMEOUT:?}: {}",
            child.stderr.text()
        );
    };
    let ms = arrived.duration_since(t0).as_secs_f64() * 1e3;
    let rss = proc_sample(child.id()).map_or(f64::NAN, |s| s.rss as f64 / 1e6);
    Ok((ms, rss))
}

/// Starts `outpost-sim` on a new pty (4 channels at 100 Hz) and returns it
/// with the pty's path. (`outpost_tests::start_sim_pty` would build the
/// programs together, unifying features into the agent measured here.)
fn start_sim(sim: &Path) -> anyhow::Result<(Child, String)> {
    let mut cmd = Command::new(sim);
    cmd.args(["--pty", "--rate", "100", "--channels", "4"]);
    let child = Child::spawn("outpost-sim", cmd);
    let out = child.stdout.clone();
    let path = wait_until(START_TIMEOUT, "outpost-sim to print its pty path", || {
        out.lines().first().cloned()
    });
    anyhow::ensure!(
        path.starts_with("/dev/"),
        "unexpected first line from outpost-sim: {path}"
    );
    Ok((child, path))
}
