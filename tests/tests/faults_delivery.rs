//! Fault injection with the real programs: `outpost-sim` streams frames into
//! a pty, `outpost-agent` buffers them and publishes to the embedded broker
//! of `outpost-aggregator`, and each test breaks something on the way:
//!
//! * `aggregator_killed_for_30s_...`: the aggregator is SIGKILLed and stays
//!   down 30 s while the agent buffers, then comes back on the same state;
//! * `aggregator_killed_five_times_...`: the same, five times at random
//!   moments, restarted at once (the crash windows between processing,
//!   commit and ack);
//! * `agent_killed_ten_times_...`: the agent is SIGKILLed at random moments
//!   and restarted on the same buffer;
//! * `full_buffer_drops_oldest_...`: a tiny buffer (`max-rows`) with
//!   `drop-oldest` overflows while the aggregator is down;
//! * `disk_really_full_...`: the buffer's file system fills up (ENOSPC on a
//!   small tmpfs; root only, skipped otherwise);
//! * `network_cut_...`: the agent runs in its own network namespace and its
//!   link to the aggregator goes down for 10 s (root only; skipped otherwise).
//!
//! Random kill moments come from a seed printed with the results;
//! `OUTPOST_FAULT_SEED=N` replays them.
//!
//! "Delivered exactly once" is checked from the wire, not only from the
//! aggregator's counters: a [`WireTap`] subscribes to
//! `outpost/v1/+/telemetry` on the embedded broker and decodes every batch
//! the agent published (resends included). Distinct sequence numbers on the
//! wire must be contiguous (nothing lost between agent and broker), the
//! aggregator's `readings_total` must equal their number (each processed
//! once: resends were dropped as duplicates), its mark must equal the highest
//! one, and the agent's buffer must end empty.
//!
//! rumqttd keeps no sessions across an aggregator restart and a new
//! subscription starts at the end of its log: a batch the agent published
//! before the tap had subscribed again would be invisible to it. So around
//! each aggregator restart the agent is paused (SIGSTOP, about a second at
//! the end of the outage) until the tap has resubscribed; its reconnect loop
//! just finds the broker a moment later. The sim keeps writing meanwhile.
//!
//! Each test prints one grep-able line starting with `FAULT <name>:`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::topics::{self, DeviceTopic};
use outpost_tests::{
    binary, free_port, http_get, metric_value, start_sim_pty, wait_until, AgentProc,
    AggregatorProc, Child,
};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// Deadline for anything that should happen "soon" on a loaded 2-core box.
const LONG: Duration = Duration::from_secs(60);
/// Simulator settings shared by the tests: 50 ticks/s x 2 channels = 100
/// readings/s, until stopped.
const SIM_ARGS: &[&str] = &["--rate", "50", "--channels", "2", "--scenario", "ramp"];
/// Readings per simulator tick (`--channels 2`, the ramp reports both).
const PER_TICK: u64 = 2;

/// Starts the simulator for exactly `seconds` of ticks (`--count`), then
/// keeps the pty open (`--linger`) until [`finish_counted_sim`], so the
/// agent can read every frame: the number sent is known exactly.
fn start_counted_sim(seconds: u64) -> (Child, String, u64) {
    let ticks = (50 * seconds).to_string();
    let mut args = SIM_ARGS.to_vec();
    args.extend(["--count", &ticks, "--linger", "600"]);
    let (sim, pty) = start_sim_pty(&args);
    (sim, pty, 50 * seconds * PER_TICK)
}

/// Waits until the agent has appended all `total` readings of a counted
/// simulator, then stops it; checks it sent exactly `total` and dropped no
/// frame for want of a reader. Returns its summary's counts.
fn finish_counted_sim(sim: &mut Child, agent: &AgentProc, total: u64) -> BTreeMap<String, u64> {
    wait_until(
        Duration::from_secs(90),
        "the simulator to finish and the agent to append every reading",
        || (agent.metric("outpost_agent_buffer_appended_total")? as u64 >= total).then_some(()),
    );
    let counts = stop_sim(sim);
    assert_eq!(counts["readings"], total, "{counts:?}");
    assert_eq!(counts["dropped_no_reader"], 0, "{counts:?}");
    counts
}

// ---------------------------------------------------------------------------
// The wire tap: every telemetry batch on the broker, decoded.

/// What the tap saw of one device.
#[derive(Debug, Default, Clone)]
struct DeviceWire {
    /// How many times each sequence number was published (resends > 1).
    seqs: BTreeMap<u64, u32>,
    /// Tap subscription generation in which each sequence number was last
    /// seen (see [`WireTap::generation`]).
    last_seen_gen: BTreeMap<u64, u64>,
    batches: u64,
    readings: u64,
}

impl DeviceWire {
    fn distinct(&self) -> u64 {
        self.seqs.len() as u64
    }
    fn min(&self) -> u64 {
        *self.seqs.keys().next().expect("something was published")
    }
    fn max(&self) -> u64 {
        *self
            .seqs
            .keys()
            .next_back()
            .expect("something was published")
    }
    /// Sequence numbers in `min..=max` that never appeared, as ranges.
    fn holes(&self) -> Vec<(u64, u64)> {
        let mut holes = Vec::new();
        let mut prev: Option<u64> = None;
        for &s in self.seqs.keys() {
            if let Some(p) = prev {
                if s > p + 1 {
                    holes.push((p + 1, s - 1));
                }
            }
            prev = Some(s);
        }
        holes
    }
}

#[derive(Debug, Default)]
struct TapState {
    devices: Mutex<BTreeMap<String, DeviceWire>>,
    /// Incremented at every SUBACK: the subscription is (again) in place.
    subscribed: AtomicU64,
    undecodable: AtomicU64,
    stop: AtomicBool,
}

/// An MQTT subscriber on `outpost/v1/+/telemetry` that records every
/// (device, seq) published, on its own thread; reconnects and resubscribes
/// when the broker restarts. Stops when dropped.
#[derive(Debug)]
struct WireTap {
    state: Arc<TapState>,
}

impl WireTap {
    /// Connects to the broker at `host:port` and returns once subscribed.
    fn start(host: &str, port: u16) -> WireTap {
        let state = Arc::new(TapState::default());
        let mut opts = MqttOptions::new(
            format!("faults-wire-tap-{}-{port}", std::process::id()),
            host,
            port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(opts, 64);
        let st = state.clone();
        std::thread::spawn(move || {
            let filter = topics::all_devices(DeviceTopic::Telemetry);
            while !st.stop.load(Ordering::SeqCst) {
                match connection.recv_timeout(Duration::from_millis(200)) {
                    Err(rumqttc::RecvTimeoutError::Timeout) => {}
                    Err(rumqttc::RecvTimeoutError::Disconnected) => break,
                    Ok(Err(_)) => std::thread::sleep(Duration::from_millis(20)),
                    Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        // Clean session: subscribe again on every connection.
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                        st.subscribed.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => st.record(&p.topic, &p.payload),
                    Ok(Ok(_)) => {}
                }
            }
            let _ = client.try_disconnect();
        });
        let tap = WireTap { state };
        tap.wait_subscribed(0);
        tap
    }

    /// Subscriptions made so far.
    fn generation(&self) -> u64 {
        self.state.subscribed.load(Ordering::SeqCst)
    }

    /// Waits until the tap has subscribed more than `after` times.
    fn wait_subscribed(&self, after: u64) {
        wait_until(LONG, "the wire tap to subscribe", || {
            (self.generation() > after).then_some(())
        });
    }

    fn device(&self, device: &str) -> DeviceWire {
        self.state
            .devices
            .lock()
            .unwrap()
            .get(device)
            .cloned()
            .unwrap_or_default()
    }

    fn max_seq(&self, device: &str) -> Option<u64> {
        let devices = self.state.devices.lock().unwrap();
        devices.get(device)?.seqs.keys().next_back().copied()
    }
}

impl TapState {
    fn record(&self, topic: &str, payload: &[u8]) {
        let Ok((device, DeviceTopic::Telemetry)) = topics::parse_device_topic(topic) else {
            return;
        };
        let batch = match outpost_proto::batch::decode(payload) {
            Ok(b) => b,
            Err(_) => {
                self.undecodable.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        let Ok(readings) = outpost_proto::batch::readings(&batch) else {
            self.undecodable.fetch_add(1, Ordering::SeqCst);
            return;
        };
        let generation = self.subscribed.load(Ordering::SeqCst);
        let mut devices = self.devices.lock().unwrap();
        let d = devices.entry(device.to_owned()).or_default();
        d.batches += 1;
        for r in readings {
            d.readings += 1;
            *d.seqs.entry(r.seq).or_default() += 1;
            d.last_seen_gen.insert(r.seq, generation);
        }
    }
}

impl Drop for WireTap {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Programs.

/// The agent's config: `device` publishing to `host:mqtt`, one serial-frames
/// source on `pty`, metrics on `metrics` (`ip:port`), the buffer in `dir`
/// committing every 200 ms, then extra `[mqtt]` and `[buffer]` keys.
fn write_agent_config(
    dir: &Path,
    device: &str,
    (host, mqtt): (&str, u16),
    pty: &str,
    metrics: &str,
    mqtt_extra: &str,
    buffer_extra: &str,
) -> PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{device}\"\n\
             [mqtt]\nhost = \"{host}\"\nport = {mqtt}\nmax-reconnect-backoff = \"500ms\"\n{mqtt_extra}\n\
             [buffer]\npath = \"{}\"\ncommit-interval = \"200ms\"\n{buffer_extra}\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [[sources]]\ntype = \"serial-frames\"\nname = \"sim\"\npath = \"{pty}\"\n",
            dir.join("buffer.sqlite").display()
        ),
    )
    .unwrap();
    config
}

/// Starts the agent on `config` (inside network namespace `netns` if
/// given); its metrics are at `http`. [`AgentProc::restart`] works on it when
/// `http` is on 127.0.0.1.
fn spawn_agent(config: PathBuf, http: String, netns: Option<&str>) -> AgentProc {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(binary("outpost-agent"));
            c
        }
        None => Command::new(binary("outpost-agent")),
    };
    cmd.arg("--config").arg(&config);
    AgentProc {
        child: Child::spawn("outpost-agent", cmd),
        http,
        config,
    }
}

/// Starts an aggregator whose embedded broker listens on `mqtt_listen`
/// (`ip:port`), API on 127.0.0.1:`api`, state in `dir`.
fn start_aggregator_on(dir: &Path, mqtt_listen: &str, mqtt: u16, api: u16) -> AggregatorProc {
    let config = dir.join("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"{mqtt_listen}\"\n\
             [state]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\n",
            dir.join("state.sqlite").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(binary("outpost-aggregator"));
    cmd.arg("--config").arg(&config);
    let child = Child::spawn("outpost-aggregator", cmd);
    let api = format!("127.0.0.1:{api}");
    wait_until(LONG, "the aggregator's /healthz", || {
        http_get(&api, "/healthz").map(|_| ())
    });
    AggregatorProc {
        child,
        mqtt,
        api,
        config,
    }
}

/// One metric of the agent, waiting until it answers.
fn agent_metric(agent: &AgentProc, name: &str) -> u64 {
    wait_until(LONG, &format!("agent metric {name}"), || agent.metric(name)) as u64
}

/// A numeric field of the aggregator's registry entry for `device`.
fn field(device: &serde_json::Value, name: &str) -> u64 {
    device[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {device}"))
}

/// The registry entry once `cond` holds for it.
fn device_when(
    agg: &AggregatorProc,
    device: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_until(LONG, what, || agg.device(device).filter(|d| cond(d)))
}

/// Stops the simulator with SIGTERM and returns its summary's counts
/// (`readings`, `frames`, `dropped_no_reader`, ...).
fn stop_sim(sim: &mut Child) -> BTreeMap<String, u64> {
    sim.signal("TERM");
    let status = sim.wait_exit(LONG);
    assert!(status.success(), "outpost-sim exit: {status}");
    let line = wait_until(Duration::from_secs(10), "outpost-sim's summary", || {
        sim.stderr
            .lines()
            .into_iter()
            .find(|l| l.starts_with("outpost-sim: ticks="))
    });
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Waits until everything the agent published is processed and acknowledged:
/// the agent's buffer is empty and the aggregator's mark and the agent's
/// acked seq are the highest seq on the wire. Returns the registry entry.
fn settle(
    agg: &AggregatorProc,
    agent: &AgentProc,
    tap: &WireTap,
    device: &str,
) -> serde_json::Value {
    wait_until(
        Duration::from_secs(90),
        "the agent's buffer to empty and the aggregator's mark to reach the wire's highest seq",
        || {
            let (_, m) = http_get(&agent.http, "/metrics")?;
            let rows = metric_value(&m, "outpost_agent_buffer_rows")?;
            let acked = metric_value(&m, "outpost_agent_acked_seq")? as u64;
            let top = tap.max_seq(device)?;
            let d = agg.device(device)?;
            (rows == 0.0 && acked == top && d["mark"].as_u64()? == top).then_some(d)
        },
    )
}

/// The delivery checks every no-loss test shares; returns the counts.
#[derive(Debug)]
struct Delivery {
    /// Readings on the wire, resends included.
    published: u64,
    /// Distinct sequence numbers on the wire.
    distinct: u64,
    /// `readings_total` at the aggregator.
    processed: u64,
    /// `duplicates_total` at the aggregator.
    duplicates: u64,
    /// Sequence numbers missing on the wire between the first and the last.
    lost: u64,
}

fn check_exactly_once(wire: &DeviceWire, reg: &serde_json::Value, tap: &WireTap) -> Delivery {
    let holes = wire.holes();
    let lost: u64 = holes.iter().map(|(a, b)| b - a + 1).sum();
    let d = Delivery {
        published: wire.readings,
        distinct: wire.distinct(),
        processed: field(reg, "readings_total"),
        duplicates: field(reg, "duplicates_total"),
        lost,
    };
    assert_eq!(
        tap.state.undecodable.load(Ordering::SeqCst),
        0,
        "undecodable batches on the wire"
    );
    assert!(
        holes.is_empty(),
        "sequence numbers never published: {holes:?} ({d:?})"
    );
    assert_eq!(d.distinct, wire.max() - wire.min() + 1);
    assert_eq!(
        d.processed, d.distinct,
        "each published reading processed once: {d:?}\n{reg}"
    );
    assert_eq!(field(reg, "gap_readings_total"), 0, "no gap: {reg}");
    assert_eq!(field(reg, "mark"), wire.max(), "{reg}");
    assert_eq!(field(reg, "last_seq"), wire.max(), "{reg}");
    // Resends the aggregator saw were dropped; it cannot have dropped more
    // readings than were published again.
    assert!(
        d.duplicates <= d.published - d.distinct,
        "more duplicates than resends: {d:?}"
    );
    d
}

// ---------------------------------------------------------------------------
// 1. Outage

/// The aggregator is SIGKILLed while the agent streams, stays down 30 s
/// (the agent buffers), and comes back on the same state: every reading is
/// processed once, the resends are dropped as duplicates, the buffer empties.
#[test]
fn aggregator_killed_for_30s_everything_is_delivered_exactly_once_afterwards() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let dev = "fault-outage";
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api) = (free_port(), free_port());
    let mut agg = AggregatorProc::start(dir.path(), mqtt, api, "");
    let tap = WireTap::start("127.0.0.1", mqtt);
    // 55 s of readings: some before, 30 s during and some after the outage.
    let (mut sim, pty, total) = start_counted_sim(55);
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = write_agent_config(dir.path(), dev, ("127.0.0.1", mqtt), &pty, &http, "", "");
    let agent = spawn_agent(cfg, http, None);

    let before = device_when(&agg, dev, "200 readings processed", |d| {
        d["readings_total"].as_u64().is_some_and(|n| n >= 200)
    });

    // SIGKILL: no drain, no clean disconnect, no last ack.
    agg.child.kill();
    let killed = Instant::now();
    wait_until(LONG, "the agent to notice the broker is gone", || {
        (agent.metric("outpost_agent_mqtt_connected")? == 0.0).then_some(())
    });
    let rows_early = agent_metric(&agent, "outpost_agent_buffer_rows");
    // The outage's length is the point of the test: this sleep defines it.
    std::thread::sleep(OUTAGE.saturating_sub(killed.elapsed()));
    let rows_peak = agent_metric(&agent, "outpost_agent_buffer_rows");
    assert!(
        rows_peak > rows_early + 1000,
        "the agent buffers during the outage ({rows_early} -> {rows_peak} rows)"
    );

    // Back on the same state, with the tap subscribed before the agent
    // can publish again.
    let tap_gen = tap.generation();
    agent.child.signal("STOP");
    agg = AggregatorProc::start(dir.path(), mqtt, api, "");
    let outage = killed.elapsed();
    tap.wait_subscribed(tap_gen);
    agent.child.signal("CONT");

    // Readings after the outage arrive too: the sensor is still streaming.
    let appended_at_restart = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    assert!(
        appended_at_restart < total,
        "the simulator finished before the outage ended; give it a longer --count"
    );
    let sim_counts = finish_counted_sim(&mut sim, &agent, total);
    let reg = settle(&agg, &agent, &tap, dev);
    let wire = tap.device(dev);
    let d = check_exactly_once(&wire, &reg, &tap);

    // The agent was never restarted: its own count of appended readings is
    // one more independent view.
    let appended = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    let resent = agent_metric(&agent, "outpost_agent_resent_readings_total");
    assert_eq!(appended, d.processed, "appended by the agent == processed");
    assert_eq!(
        sim_counts["readings"], d.processed,
        "sent by the sensor == processed"
    );
    assert!(field(&before, "readings_total") < d.processed);
    println!(
        "FAULT outage: sent={} appended={appended} appended_at_restart={appended_at_restart} \
         buffered_peak={rows_peak} published={} distinct={} processed={} duplicates_dropped={} \
         resent_by_agent={resent} lost={} outage_s={:.1} test_s={:.1}",
        sim_counts["readings"],
        d.published,
        d.distinct,
        d.processed,
        d.duplicates,
        d.lost,
        outage.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 2. Crash loop

/// A small xorshift generator: the test prints its seed, and
/// `OUTPOST_FAULT_SEED` replays a run.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn from_env_or_clock() -> (XorShift, u64) {
        let seed = std::env::var("OUTPOST_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        (XorShift(seed.max(1)), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// The agent is SIGKILLed ten times at random moments while the sensor
/// streams, and restarted each time on the same buffer: the processed
/// sequence numbers have no gap and no duplicate.
#[test]
fn agent_killed_ten_times_at_random_moments_no_gap_no_duplicate() {
    const KILLS: u64 = 10;
    let started = Instant::now();
    let dev = "fault-crashloop";
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api) = (free_port(), free_port());
    let agg = AggregatorProc::start(dir.path(), mqtt, api, "");
    let tap = WireTap::start("127.0.0.1", mqtt);
    let (mut sim, pty) = start_sim_pty(SIM_ARGS);
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = write_agent_config(dir.path(), dev, ("127.0.0.1", mqtt), &pty, &http, "", "");
    let mut agent = spawn_agent(cfg, http, None);
    device_when(&agg, dev, "100 readings processed", |d| {
        d["readings_total"].as_u64().is_some_and(|n| n >= 100)
    });

    let (mut rng, seed) = XorShift::from_env_or_clock();
    let mut delays = Vec::new();
    for _ in 0..KILLS {
        let delay = rng.millis(300, 2000);
        delays.push(delay.as_millis());
        // The delay is the fault's timing, not a synchronisation.
        std::thread::sleep(delay);
        agent.restart(); // SIGKILL, reap, start again on the same buffer
    }
    println!("FAULT crashloop: seed={seed} kill_delays_ms={delays:?}");

    // The last agent runs on: readings keep coming after the crash loop.
    let after_loop = agg.device(dev).map_or(0, |d| field(&d, "readings_total"));
    device_when(&agg, dev, "readings after the crash loop", |d| {
        d["readings_total"]
            .as_u64()
            .is_some_and(|n| n > after_loop + 200)
    });
    let sim_counts = stop_sim(&mut sim);
    let reg = settle(&agg, &agent, &tap, dev);
    let wire = tap.device(dev);
    let d = check_exactly_once(&wire, &reg, &tap);
    let resent_on_wire = d.published - d.distinct;
    // Readings the sim sent that never got a sequence number: read but not
    // yet committed when the agent was killed, or dropped by the sim while
    // no agent had the port open. Never part of the delivery guarantee.
    let not_committed = sim_counts["readings"].saturating_sub(d.distinct);
    // A kill loses at most what was read but not yet committed: about one
    // commit-interval (200 ms = 20 readings here). Allow 1 s per kill for a
    // loaded machine; more would mean a kill loses committed readings.
    assert!(
        not_committed <= KILLS * 100,
        "{not_committed} readings lost to {KILLS} kills"
    );
    println!(
        "FAULT crashloop: kills={KILLS} seed={seed} sent={} committed={} published={} distinct={} \
         processed={} duplicates_dropped={} resent_on_wire={resent_on_wire} lost={} \
         not_committed_at_kill_or_no_reader={not_committed} sim_frames_dropped_no_reader={} \
         test_s={:.1}",
        sim_counts["readings"],
        wire.max() - wire.min() + 1,
        d.published,
        d.distinct,
        d.processed,
        d.duplicates,
        d.lost,
        sim_counts["dropped_no_reader"],
        started.elapsed().as_secs_f64()
    );
}

/// The aggregator is SIGKILLed five times at random moments while the agent
/// streams and restarted at once on the same state: whatever was processed
/// but not committed, or committed but not acknowledged, at each kill is
/// processed exactly once in the end.
#[test]
fn aggregator_killed_five_times_at_random_moments_everything_processed_once() {
    const KILLS: u64 = 5;
    let started = Instant::now();
    let dev = "fault-aggloop";
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api) = (free_port(), free_port());
    let mut agg = AggregatorProc::start(dir.path(), mqtt, api, "");
    let tap = WireTap::start("127.0.0.1", mqtt);
    let (mut sim, pty, total) = start_counted_sim(40);
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = write_agent_config(dir.path(), dev, ("127.0.0.1", mqtt), &pty, &http, "", "");
    let agent = spawn_agent(cfg, http, None);
    device_when(&agg, dev, "100 readings processed", |d| {
        d["readings_total"].as_u64().is_some_and(|n| n >= 100)
    });

    let (mut rng, seed) = XorShift::from_env_or_clock();
    let mut delays = Vec::new();
    for _ in 0..KILLS {
        let delay = rng.millis(500, 3000);
        delays.push(delay.as_millis());
        // The delay is the fault's timing, not a synchronisation.
        std::thread::sleep(delay);
        agg.child.kill();
        // Paused while the tap resubscribes (see the module comment).
        let tap_gen = tap.generation();
        agent.child.signal("STOP");
        agg = AggregatorProc::start(dir.path(), mqtt, api, "");
        tap.wait_subscribed(tap_gen);
        agent.child.signal("CONT");
    }
    println!("FAULT aggloop: seed={seed} kill_delays_ms={delays:?}");
    let appended_after_loop = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    assert!(
        appended_after_loop < total,
        "the simulator finished before the last restart; give it a longer --count"
    );

    let sim_counts = finish_counted_sim(&mut sim, &agent, total);
    let reg = settle(&agg, &agent, &tap, dev);
    let wire = tap.device(dev);
    let d = check_exactly_once(&wire, &reg, &tap);
    let appended = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    let resent = agent_metric(&agent, "outpost_agent_resent_readings_total");
    assert_eq!(appended, d.processed, "appended by the agent == processed");
    assert_eq!(
        sim_counts["readings"], d.processed,
        "sent by the sensor == processed"
    );
    println!(
        "FAULT aggloop: kills={KILLS} seed={seed} sent={} appended={appended} published={} \
         distinct={} processed={} duplicates_dropped={} resent_by_agent={resent} lost={} \
         test_s={:.1}",
        sim_counts["readings"],
        d.published,
        d.distinct,
        d.processed,
        d.duplicates,
        d.lost,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 3. Disk full

/// A buffer capped at 300 rows with `drop-oldest` overflows while the
/// aggregator is down: the oldest readings are dropped and counted, the
/// agent stays healthy, delivery resumes when the aggregator returns, and
/// what was dropped shows up at the aggregator exactly as the recorded gap.
#[test]
fn full_buffer_drops_oldest_counts_them_and_delivery_resumes_with_the_exact_gap() {
    const MAX_ROWS: u64 = 300;
    const OUTAGE: Duration = Duration::from_secs(15);
    let started = Instant::now();
    let dev = "fault-diskfull";
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api) = (free_port(), free_port());
    let mut agg = AggregatorProc::start(dir.path(), mqtt, api, "");
    let tap = WireTap::start("127.0.0.1", mqtt);
    let (mut sim, pty) = start_sim_pty(SIM_ARGS);
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = write_agent_config(
        dir.path(),
        dev,
        ("127.0.0.1", mqtt),
        &pty,
        &http,
        "status-interval = \"1s\"",
        &format!("max-rows = {MAX_ROWS}\noverflow = \"drop-oldest\""),
    );
    let agent = spawn_agent(cfg, http, None);
    device_when(&agg, dev, "100 readings processed", |d| {
        d["readings_total"].as_u64().is_some_and(|n| n >= 100)
    });

    agg.child.kill();
    let killed = Instant::now();
    wait_until(LONG, "the agent to notice the broker is gone", || {
        (agent.metric("outpost_agent_mqtt_connected")? == 0.0).then_some(())
    });
    // No ack can arrive any more: everything above this is unacknowledged.
    let acked_at_kill = agent_metric(&agent, "outpost_agent_acked_seq");
    wait_until(LONG, "the full buffer to drop readings", || {
        (agent.metric("outpost_agent_buffer_dropped_total")? > 0.0).then_some(())
    });
    std::thread::sleep(OUTAGE.saturating_sub(killed.elapsed()));
    let (status, health) = http_get(&agent.http, "/healthz").expect("the agent answers");
    assert_eq!(
        status, 200,
        "the agent stays healthy with a full buffer: {health}"
    );
    let rows = agent_metric(&agent, "outpost_agent_buffer_rows");
    assert!(rows <= MAX_ROWS, "{rows} rows held, cap {MAX_ROWS}");
    let dropped_in_outage = agent_metric(&agent, "outpost_agent_buffer_dropped_total");
    let appended_in_outage = agent_metric(&agent, "outpost_agent_buffer_appended_total");

    let tap_gen = tap.generation();
    agent.child.signal("STOP");
    agg = AggregatorProc::start(dir.path(), mqtt, api, "");
    tap.wait_subscribed(tap_gen);
    let restart_gen = tap.generation();
    // The mark the aggregator kept across its crash: what it had processed.
    let mark_at_restart = field(&agg.device(dev).expect("device in the registry"), "mark");
    agent.child.signal("CONT");

    device_when(&agg, dev, "readings from after the outage", |d| {
        d["mark"]
            .as_u64()
            .is_some_and(|m| m > acked_at_kill + dropped_in_outage + 200)
    });
    let sim_counts = stop_sim(&mut sim);
    let reg = settle(&agg, &agent, &tap, dev);
    let dropped = agent_metric(&agent, "outpost_agent_buffer_dropped_total");
    let appended = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    // The status message (every second) carries the count to the registry.
    let reg = device_when(
        &agg,
        dev,
        "the agent's dropped count in the registry",
        |d| d["dropped_total"].as_u64() == Some(dropped) && d["mark"] == reg["mark"],
    );
    let wire = tap.device(dev);
    let gaps: Vec<(u64, u64)> = reg["recent_gaps"]
        .as_array()
        .expect("recent_gaps")
        .iter()
        .map(|g| {
            (
                g["from_seq"].as_u64().unwrap(),
                g["to_seq"].as_u64().unwrap(),
            )
        })
        .rev()
        .collect();
    let in_gap = |s: u64| gaps.iter().any(|&(a, b)| (a..=b).contains(&s));
    let gap_readings: u64 = gaps.iter().map(|(a, b)| b - a + 1).sum();

    assert!(dropped > 0);
    assert_eq!(field(&reg, "gap_readings_total"), gap_readings, "{reg}");
    assert_eq!(field(&reg, "gaps_total"), gaps.len() as u64, "{reg}");
    assert!(
        gap_readings > 0,
        "the dropped readings show as a gap: {reg}"
    );
    assert!(
        gap_readings <= dropped,
        "gap {gap_readings} > dropped {dropped}"
    );
    assert!(
        gaps.iter().all(|&(a, _)| a > acked_at_kill),
        "nothing acknowledged is in a gap"
    );
    // Every seq between the first and the last is either processed (on the
    // wire, processed once) or in a recorded gap: nothing else is missing.
    let holes: Vec<(u64, u64)> = wire.holes();
    for (a, b) in &holes {
        assert!(
            (*a..=*b).all(in_gap),
            "{a}..={b} never published and not a recorded gap {gaps:?}"
        );
    }
    // What the agent published after the aggregator came back was all
    // processed: none of it is in a gap.
    let late: Vec<u64> = wire
        .last_seen_gen
        .iter()
        .filter(|&(_, &g)| g >= restart_gen)
        .map(|(&s, _)| s)
        .collect();
    assert!(
        late.iter().all(|&s| !in_gap(s)),
        "readings published after the restart counted as a gap"
    );
    let processed_expected = (wire.max() - wire.min() + 1) - gap_readings;
    assert_eq!(
        field(&reg, "readings_total"),
        processed_expected,
        "each seq outside the gap processed once: {reg}"
    );
    assert_eq!(field(&reg, "mark"), wire.max());
    // The agent was never restarted: every reading it appended got the
    // next seq, so its count covers the whole range, processed or gap.
    assert_eq!(
        appended,
        wire.max() - wire.min() + 1,
        "appended == processed + gap"
    );
    // The exact gap. Without acks the buffer held A+1.. (A = the ack at the
    // kill) and dropped the oldest. After the restart the agent resent from
    // A, so its first batch started at the oldest reading left, F: A+1..F-1
    // were dropped. Those up to the mark the aggregator had committed before
    // it died (M) were processed already; M+1..=F-1 is the gap, nothing else.
    // (Drops after that hit readings already published: processed, no gap.)
    let first_after = *late.first().expect("published after the restart");
    let from = acked_at_kill.max(mark_at_restart) + 1;
    assert!(
        first_after - 1 - acked_at_kill <= dropped,
        "only dropped readings skipped"
    );
    // (Empty when fewer were dropped than the aggregator had processed.)
    let expected: Vec<(u64, u64)> = (first_after > from)
        .then_some((from, first_after - 1))
        .into_iter()
        .collect();
    assert_eq!(
        gaps, expected,
        "the gap is exactly the dropped readings not yet processed"
    );
    println!(
        "FAULT diskfull: max_rows={MAX_ROWS} sent={} appended={appended} \
         appended_in_outage={appended_in_outage} buffered={rows} dropped={dropped} \
         dropped_in_outage={dropped_in_outage} dropped_at_aggregator={} gap_readings={gap_readings} \
         gaps={gaps:?} acked_at_kill={acked_at_kill} mark_at_restart={mark_at_restart} \
         first_after_restart={first_after} \
         published={} distinct={} delivered={} duplicates_dropped={} test_s={:.1}",
        sim_counts["readings"],
        field(&reg, "dropped_total"),
        wire.readings,
        wire.distinct(),
        field(&reg, "readings_total"),
        field(&reg, "duplicates_total"),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 4. Network cut

/// A network namespace joined to the host by a veth pair, named after this
/// process; the pair and the namespace are deleted on drop, even when the
/// test panics.
#[derive(Debug)]
struct NetNs {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

/// Runs `ip ARGS`; the error carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates the namespace and the link (10.200.X.Y/30: host side .1 of
    /// the /30, namespace side .2; X and Y from the pid). Err when `ip
    /// netns add` is refused (not root): the caller skips.
    fn create() -> Result<NetNs, String> {
        let pid = std::process::id();
        let base = (pid & 63) * 4;
        let net = format!("10.200.{}", (pid >> 6) & 0xff);
        let name = format!("outpost-faults-{pid}");
        let host_if = format!("opf{pid}h");
        // Leftovers of an earlier run with the same pid that was killed
        // before its guard could clean up (errors expected: usually none).
        let _ = ip(&["link", "del", &host_if]);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        // From here on the guard exists: a failure below cleans up and fails.
        let ns = NetNs {
            name,
            host_if,
            host_ip: format!("{net}.{}", base + 1),
            ns_ip: format!("{net}.{}", base + 2),
        };
        let ns_if = format!("opf{pid}n");
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.name.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        let setup = ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])
        .and_then(|()| ip(&["link", "set", &ns_if, "netns", &ns.name]))
        .and_then(|()| ip(&["addr", "add", &host_cidr, "dev", &ns.host_if]))
        .and_then(|()| ip(&["link", "set", &ns.host_if, "up"]))
        .and_then(|()| exec(&["addr", "add", &ns_cidr, "dev", &ns_if]))
        .and_then(|()| exec(&["link", "set", &ns_if, "up"]))
        .and_then(|()| exec(&["link", "set", "lo", "up"]));
        if let Err(e) = setup {
            panic!("network namespace set-up failed: {e}");
        }
        Ok(ns)
    }

    /// Takes the host side of the link down (`up = false`) or up again.
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.host_if, state]).unwrap();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        if let Err(e) = ip(&["link", "del", &self.host_if]) {
            eprintln!("cleanup: {e}");
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// The agent runs in its own network namespace, joined to the aggregator's
/// host by a veth pair; the link goes down for 10 s while the sensor streams,
/// then comes back: everything is delivered exactly once. Needs root (`ip
/// netns add`); skipped with a message otherwise.
#[test]
fn network_cut_for_10s_everything_is_delivered_exactly_once_afterwards() {
    const CUT: Duration = Duration::from_secs(10);
    let started = Instant::now();
    // First, so it is dropped last: after the agent running inside it.
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) => {
            println!("FAULT netcut: SKIPPED, cannot create a network namespace (needs root): {e}");
            return;
        }
    };
    let dev = "fault-netcut";
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api) = (free_port(), free_port());
    // The broker must be reachable from the namespace: listen everywhere.
    let agg = start_aggregator_on(dir.path(), &format!("0.0.0.0:{mqtt}"), mqtt, api);
    let tap = WireTap::start("127.0.0.1", mqtt);
    // 30 s of readings: before, during and after the cut.
    let (mut sim, pty, total) = start_counted_sim(30);
    let http = format!("{}:{}", ns.ns_ip, free_port());
    let cfg = write_agent_config(
        dir.path(),
        dev,
        (&ns.host_ip, mqtt),
        &pty,
        &http,
        "keep-alive = \"5s\"",
        "",
    );
    let agent = spawn_agent(cfg, http, Some(&ns.name));
    device_when(
        &agg,
        dev,
        "200 readings processed across the veth link",
        |d| d["readings_total"].as_u64().is_some_and(|n| n >= 200),
    );

    ns.set_link(false);
    let cut = Instant::now();
    // Whatever was in flight at the cut is processed within moments; after
    // that nothing gets through until the link is back.
    std::thread::sleep(Duration::from_secs(2));
    let during_early = field(&agg.device(dev).unwrap(), "readings_total");
    // The cut's length is the point of the test: this sleep defines it.
    std::thread::sleep(CUT.saturating_sub(cut.elapsed()));
    let during_late = field(&agg.device(dev).unwrap(), "readings_total");
    ns.set_link(true);
    let cut_len = cut.elapsed();
    assert_eq!(during_early, during_late, "nothing crosses a cut link");
    let rows_after_cut = agent_metric(&agent, "outpost_agent_buffer_rows");

    let appended_at_restore = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    assert!(
        appended_at_restore < total,
        "the simulator finished before the cut ended; give it a longer --count"
    );
    let sim_counts = finish_counted_sim(&mut sim, &agent, total);
    let reg = settle(&agg, &agent, &tap, dev);
    let wire = tap.device(dev);
    let d = check_exactly_once(&wire, &reg, &tap);
    let appended = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    let connects = agent_metric(&agent, "outpost_agent_mqtt_connects_total");
    let resent = agent_metric(&agent, "outpost_agent_resent_readings_total");
    assert_eq!(appended, d.processed, "appended by the agent == processed");
    assert_eq!(
        sim_counts["readings"], d.processed,
        "sent by the sensor == processed"
    );
    println!(
        "FAULT netcut: sent={} appended={appended} appended_at_restore={appended_at_restore} \
         buffered_after_cut={rows_after_cut} \
         processed_during_cut={} published={} distinct={} processed={} duplicates_dropped={} \
         resent_by_agent={resent} mqtt_connects={connects} lost={} cut_s={:.1} test_s={:.1}",
        sim_counts["readings"],
        during_late - during_early,
        d.published,
        d.distinct,
        d.processed,
        d.duplicates,
        d.lost,
        cut_len.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 5. A really full disk (ENOSPC)

/// A small tmpfs mounted on a directory of the test's; unmounted on drop,
/// even when the test panics.
#[derive(Debug)]
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (e.g. "16m") on `path`. Err when mounting
    /// is refused (not root): the caller skips.
    fn mount(path: &Path, size: &str) -> Result<TmpfsMount, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run `mount`: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`mount -t tmpfs` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            path: path.to_owned(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (a child still has a file open): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Fills the file system holding `dir` with `dir/filler` until it is full;
/// returns the bytes written.
fn fill_disk(dir: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // Smaller writes take the last partial pages too.
    while f.write(&[0xA5u8; 512]).is_ok_and(|n| n > 0) {
        written += 512;
    }
    let _ = f.sync_all();
    written
}

/// The agent's buffer lives on a file system that fills up (ENOSPC, not the
/// buffer's own cap) for 10 s while the sensor streams: commits fail and are
/// rolled back, the readings wait in memory (fewer than the 10,000
/// `MAX_PENDING`), the agent stays alive; once space is back everything is
/// committed and delivered exactly once, with no gap and nothing lost.
/// Needs root (`mount -t tmpfs`); skipped with a message otherwise.
#[test]
fn disk_really_full_for_10s_nothing_is_lost_once_space_is_back() {
    const FULL: Duration = Duration::from_secs(10);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mount = match TmpfsMount::mount(&dir.path().join("buf"), "16m") {
        Ok(m) => m,
        Err(e) => {
            println!("FAULT enospc: SKIPPED, cannot mount a small tmpfs (needs root): {e}");
            return;
        }
    };
    let dev = "fault-enospc";
    let (mqtt, api) = (free_port(), free_port());
    let agg = AggregatorProc::start(dir.path(), mqtt, api, "");
    let tap = WireTap::start("127.0.0.1", mqtt);
    // 30 s of readings: before, during and after the full disk.
    let (mut sim, pty, total) = start_counted_sim(30);
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = write_agent_config(&mount.path, dev, ("127.0.0.1", mqtt), &pty, &http, "", "");
    let agent = spawn_agent(cfg, http, None);
    device_when(&agg, dev, "200 readings processed", |d| {
        d["readings_total"].as_u64().is_some_and(|n| n >= 200)
    });

    let filler = fill_disk(&mount.path);
    let full_at = Instant::now();
    let commits_at_full = agent_metric(&agent, "outpost_agent_buffer_commits_total");
    std::thread::sleep(Duration::from_secs(2));
    let processed_early = field(&agg.device(dev).unwrap(), "readings_total");
    // The full disk's duration is the point of the test: this sleep defines it.
    std::thread::sleep(FULL.saturating_sub(full_at.elapsed()));
    let processed_late = field(&agg.device(dev).unwrap(), "readings_total");
    let commits_late = agent_metric(&agent, "outpost_agent_buffer_commits_total");
    let (status, health) = http_get(&agent.http, "/healthz").expect("the agent answers");
    let appended_full = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    std::fs::remove_file(mount.path.join("filler")).unwrap();
    let full_len = full_at.elapsed();
    assert!(
        agent.child.stderr.text().contains("buffer commit failed"),
        "the full disk made commits fail"
    );
    assert_eq!(
        status, 200,
        "the agent stays healthy on a full disk: {health}"
    );
    assert!(
        appended_full < total,
        "the simulator finished before the disk was freed; give it a longer --count"
    );

    let sim_counts = finish_counted_sim(&mut sim, &agent, total);
    let reg = settle(&agg, &agent, &tap, dev);
    let wire = tap.device(dev);
    let d = check_exactly_once(&wire, &reg, &tap);
    let appended = agent_metric(&agent, "outpost_agent_buffer_appended_total");
    let dropped = agent_metric(&agent, "outpost_agent_buffer_dropped_total");
    assert_eq!(dropped, 0, "fewer than MAX_PENDING waited: nothing dropped");
    assert_eq!(appended, d.processed, "appended by the agent == processed");
    assert_eq!(
        sim_counts["readings"], d.processed,
        "sent by the sensor == processed"
    );
    println!(
        "FAULT enospc: sent={} appended={appended} filler_bytes={filler} \
         commits_during_full={} processed_during_full={} published={} distinct={} processed={} \
         duplicates_dropped={} dropped={dropped} lost={} full_s={:.1} test_s={:.1}",
        sim_counts["readings"],
        commits_late - commits_at_full,
        processed_late - processed_early,
        d.published,
        d.distinct,
        d.processed,
        d.duplicates,
        d.lost,
        full_len.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
