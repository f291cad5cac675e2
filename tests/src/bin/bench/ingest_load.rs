//! The load generator of `ingest` and `latency`: simulated agents, one
//! MQTT connection each, publishing protobuf batches at a paced rate.
//!
//! Each device behaves like `outpost-agent`'s publisher, with the agent's
//! own delivery state machine ([`PublisherCore`]): a virtual buffer is
//! filled by the pace (open loop: `batch` readings every `period`, whether
//! or not the link keeps up), batches leave it within a window of
//! in-flight batches, `prev_seq` and `acked_seq` are set as the agent sets
//! them, the aggregator's acks (`outpost/v1/{device}/ack`) open the window,
//! and when acks stall for the ack timeout everything unacknowledged is
//! sent again (optional: without resends a lost batch stays lost, which is
//! what the self-check wants to see). A reading's timestamp is the time its
//! batch was generated, which is its publish time unless the window held
//! it back.
//!
//! Values: every (device, sensor) series sits at `BASE_VALUE` +/- `NOISE`
//! and spikes to `SPIKE_VALUE` (above every generated limit) for
//! `spike_len` once per `spike_every`, at its own phase; so the rules see a
//! steady, time-based trickle of transitions whatever the rate. The flip
//! sensor alternates 100 / 0 every `flip_half` (latency scenario).
//!
//! Cost: batches are encoded straight from a reused `TelemetryBatch`
//! (columns rewritten in place), checked once against `BatchBuilder`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_agent::publisher::acks::decode_ack;
use outpost_agent::publisher::core::{Link, PublisherCore};
use outpost_proto::batch::{BatchBuilder, Value};
use outpost_proto::pb::{DeviceState, DeviceStatus, Quality, TelemetryBatch};
use outpost_proto::topics;
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::env::{
    device_name, device_sensors, now_ms, Rng, BASE_VALUE, FLIP_SENSOR, NOISE, SITES, SPIKE_VALUE,
};

/// Capacity of each client's request queue (publishes waiting for its
/// event loop): above the window plus a resend of it, so `try_publish`
/// never finds it full in normal operation.
pub const REQUEST_QUEUE: usize = 256;
/// Largest MQTT packet (a batch of 10,000 readings is ~100 KB).
pub const MAX_PACKET: usize = 1024 * 1024;
/// How often a device checks its ack timeout while nothing else wakes it.
pub const TICK: Duration = Duration::from_millis(50);
/// Delay before an event loop polls again after a connection error.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// Noise samples per device (cycled by sequence number).
const NOISE_LEN: usize = 97;

/// What the generator is told to do; every device follows the latest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// Generate new readings.
    pub generating: bool,
    /// Readings per batch.
    pub batch: usize,
    /// One batch per device every `period`.
    pub period: Duration,
    /// Throw away what was generated but never published (the step is
    /// over and the aggregator did not keep up).
    pub discard: bool,
}

impl Pace {
    /// Nothing generated.
    pub const IDLE: Pace = Pace {
        generating: false,
        batch: 1,
        period: Duration::from_secs(1),
        discard: false,
    };

    /// `rate` readings/s over `devices` devices in batches of `batch`.
    pub fn rate(rate: f64, devices: usize, batch: usize) -> Pace {
        let per_device = rate / devices.max(1) as f64;
        Pace {
            generating: true,
            batch: batch.max(1),
            period: Duration::from_secs_f64(batch.max(1) as f64 / per_device.max(1e-9)),
            discard: false,
        }
    }
}

/// Faults the self-check injects into one device's next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Inject {
    /// Nothing.
    None = 0,
    /// Count the batch as published but do not send it (lost in transit).
    Drop = 1,
    /// Send the batch twice.
    Duplicate = 2,
    /// Skip one sequence number before the batch (a gap the agent made).
    SkipSeq = 3,
}

/// Settings of the generator.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Simulated agents.
    pub devices: usize,
    /// Sensors per device.
    pub sensors: usize,
    /// Distinct sensor names over all devices.
    pub sensor_pool: usize,
    /// Batches in flight per device (the agent's `max-inflight-batches`).
    pub window: usize,
    /// Resend from the last ack after this silence; None: never resend.
    pub ack_timeout: Option<Duration>,
    /// One spike per series this often ...
    pub spike_every: Duration,
    /// ... lasting this long.
    pub spike_len: Duration,
    /// Devices `0..flip_devices` also report the flip sensor.
    pub flip_devices: usize,
    /// The flip sensor changes state this often.
    pub flip_half: Duration,
}

/// Counters of one device, shared with the bench's main thread.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Readings generated (sequence numbers handed out).
    pub generated: AtomicU64,
    /// Readings generated but thrown away unpublished ([`Pace::discard`]).
    pub discarded: AtomicU64,
    /// Highest sequence number generated.
    pub last_generated: AtomicU64,
    /// Highest sequence number published.
    pub max_published: AtomicU64,
    /// Highest sequence number acknowledged by the aggregator.
    pub acked: AtomicU64,
    /// Readings handed to the MQTT client (resends included).
    pub published_readings: AtomicU64,
    /// Readings published again (resends).
    pub resent_readings: AtomicU64,
    /// Ack timeouts that made the device resend.
    pub resends: AtomicU64,
    /// Batches the client's queue refused (retried later).
    pub queue_full: AtomicU64,
    /// Connection losses.
    pub disconnects: AtomicU64,
    /// Connected now.
    pub connected: AtomicBool,
    /// The next batch's fault ([`Inject`] as u8), taken once.
    pub inject: AtomicU8,
    /// Sequence numbers skipped on purpose ([`Inject::SkipSeq`]).
    pub skipped: AtomicU64,
}

/// Sums over all devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Readings generated.
    pub generated: u64,
    /// Readings discarded unpublished.
    pub discarded: u64,
    /// Readings published at least once (sum of the max published seq
    /// minus skipped numbers: sequence numbers start at 1).
    pub published_unique: u64,
    /// Readings handed to MQTT, resends included.
    pub published: u64,
    /// Readings resent.
    pub resent: u64,
    /// Ack timeouts.
    pub resends: u64,
    /// Client queue refusals.
    pub queue_full: u64,
    /// Connection losses.
    pub disconnects: u64,
    /// Generated, not yet published.
    pub backlog: u64,
    /// Published, not yet acknowledged.
    pub unacked: u64,
    /// Sequence numbers skipped on purpose.
    pub skipped: u64,
    /// Devices connected now.
    pub connected: u64,
}

/// The running generator: a tokio runtime with one publisher task and one
/// MQTT event-loop task per device.
pub struct Load {
    rt: Option<tokio::runtime::Runtime>,
    pace: watch::Sender<Pace>,
    /// Per-device counters, by device index.
    pub stats: Vec<Arc<DeviceStats>>,
    /// Device ids, by index.
    pub names: Vec<String>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Load")
            .field("devices", &self.names.len())
            .finish()
    }
}

impl Load {
    /// Connects every device (idle until [`Load::set_pace`]).
    pub fn start(spec: &LoadSpec, worker_threads: usize) -> anyhow::Result<Load> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .enable_all()
            .thread_name("bench-load")
            .build()?;
        let (pace, _) = watch::channel(Pace::IDLE);
        let cancel = CancellationToken::new();
        let mut stats = Vec::new();
        let mut names = Vec::new();
        for d in 0..spec.devices {
            let st = Arc::new(DeviceStats::default());
            let dev = Device::new(spec, d, st.clone());
            names.push(dev.name.clone());
            stats.push(st);
            let pace_rx = pace.subscribe();
            let cancel = cancel.clone();
            let spec = spec.clone();
            rt.spawn(async move { dev.run(&spec, pace_rx, cancel).await });
        }
        Ok(Load {
            rt: Some(rt),
            pace,
            stats,
            names,
            cancel,
        })
    }

    /// Changes the pace of every device.
    pub fn set_pace(&self, pace: Pace) {
        self.pace.send_replace(pace);
    }

    /// Arms a fault for device `d`'s next batch.
    pub fn inject(&self, d: usize, what: Inject) {
        self.stats[d].inject.store(what as u8, Ordering::SeqCst);
    }

    /// Sums of the counters now.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in &self.stats {
            let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
            t.generated += g(&s.generated);
            t.discarded += g(&s.discarded);
            t.published_unique += g(&s.max_published) - g(&s.skipped).min(g(&s.max_published));
            t.published += g(&s.published_readings);
            t.resent += g(&s.resent_readings);
            t.resends += g(&s.resends);
            t.queue_full += g(&s.queue_full);
            t.disconnects += g(&s.disconnects);
            t.backlog += g(&s.last_generated).saturating_sub(g(&s.max_published));
            t.unacked += g(&s.max_published).saturating_sub(g(&s.acked));
            t.skipped += g(&s.skipped);
            t.connected += u64::from(s.connected.load(Ordering::SeqCst));
        }
        t
    }

    /// Stops every task and the runtime (clients are dropped: their
    /// connections close).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.cancel.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A batch generated into the virtual buffer, not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Pending {
    first: u64,
    last: u64,
    time_ms: i64,
}

/// Connection state reported by the event-loop task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LinkState {
    generation: u64,
    up: bool,
}

/// One simulated agent.
struct Device {
    index: usize,
    name: String,
    stats: Arc<DeviceStats>,
    enc: Encoder,
}

/// Builds a device's batches in a reused `TelemetryBatch`.
#[derive(Debug, Clone)]
pub struct Encoder {
    sensors: Vec<String>,
    /// Spike phase of each sensor's series, ms.
    phase: Vec<i64>,
    noise: Vec<f32>,
    flip_index: Option<usize>,
    flip_phase: i64,
    spike_every: i64,
    spike_len: i64,
    flip_half: i64,
    batch: TelemetryBatch,
}

impl Encoder {
    /// The encoder of device `d`.
    pub fn new(spec: &LoadSpec, d: usize) -> Encoder {
        let sensors = device_sensors(d, spec.sensors, spec.sensor_pool, spec.flip_devices);
        let mut rng = Rng::new(0xB07 + d as u64);
        let spike_every = (spec.spike_every.as_millis() as i64).max(1);
        let phase = sensors
            .iter()
            .map(|_| (rng.next_u64() % spike_every as u64) as i64)
            .collect();
        let noise = (0..NOISE_LEN)
            .map(|_| BASE_VALUE + ((rng.unit() * 2.0 - 1.0) as f32) * NOISE)
            .collect();
        let flip_half = (spec.flip_half.as_millis() as i64).max(1);
        Encoder {
            flip_index: sensors.iter().position(|s| s == FLIP_SENSOR),
            // Spread the flips of the devices over the period, so
            // notifications do not queue behind each other.
            flip_phase: (2 * flip_half * d as i64) / spec.flip_devices.max(1) as i64,
            sensors,
            phase,
            noise,
            spike_every,
            spike_len: spec.spike_len.as_millis() as i64,
            flip_half,
            batch: TelemetryBatch {
                device_id: device_name(d),
                ..TelemetryBatch::default()
            },
        }
    }

    /// The value of sensor `k` at `time_ms` for sequence number `seq`.
    fn value(&self, k: usize, time_ms: i64, seq: u64) -> f32 {
        if Some(k) == self.flip_index {
            return if ((time_ms + self.flip_phase) / self.flip_half) % 2 == 0 {
                100.0
            } else {
                0.0
            };
        }
        if (time_ms + self.phase[k]) % self.spike_every < self.spike_len {
            SPIKE_VALUE
        } else {
            self.noise[(seq % NOISE_LEN as u64) as usize]
        }
    }

    /// Sensor index of the reading with sequence number `seq` (devices
    /// cycle over their sensors).
    fn sensor_of(&self, seq: u64) -> usize {
        (seq.wrapping_sub(1) % self.sensors.len() as u64) as usize
    }

    /// The batch of readings `first..first + n`, all stamped `time_ms`.
    pub fn encode(
        &mut self,
        first: u64,
        n: usize,
        time_ms: i64,
        prev_seq: u64,
        acked_seq: u64,
    ) -> Vec<u8> {
        self.fill(first, n, time_ms, prev_seq, acked_seq);
        self.batch.encode_to_vec()
    }

    fn fill(&mut self, first: u64, n: usize, time_ms: i64, prev_seq: u64, acked_seq: u64) {
        let s = self.sensors.len();
        let off = self.sensor_of(first);
        let mut b = std::mem::take(&mut self.batch);
        b.first_seq = first;
        b.base_time_ms = time_ms;
        b.prev_seq = prev_seq;
        b.acked_seq = acked_seq;
        // Sensors in order of first appearance, as BatchBuilder lists them.
        b.sensors.clear();
        b.sensors
            .extend((0..n.min(s)).map(|j| self.sensors[(off + j) % s].clone()));
        b.keys.clear();
        // Value kind F32 is 0: the key is the sensor's index << 3.
        b.keys.extend((0..n).map(|i| ((i % s) as u32) << 3));
        b.time_delta_ms.clear();
        b.time_delta_ms.resize(n, 0);
        b.f32_values.clear();
        b.f32_values
            .extend((0..n).map(|i| self.value((off + i) % s, time_ms, first + i as u64)));
        self.batch = b;
    }

    /// The same batch through the agent's `BatchBuilder` (reference).
    pub fn encode_with_builder(
        &self,
        first: u64,
        n: usize,
        time_ms: i64,
        prev_seq: u64,
        acked_seq: u64,
    ) -> TelemetryBatch {
        let mut b = BatchBuilder::new(&self.batch.device_id).expect("valid device id");
        b.set_prev_seq(prev_seq);
        b.set_acked_seq(acked_seq);
        for i in 0..n {
            let seq = first + i as u64;
            let k = self.sensor_of(seq);
            b.push(
                seq,
                time_ms,
                &self.sensors[k],
                &Value::F32(self.value(k, time_ms, seq)),
                Quality::Good,
            )
            .expect("a valid reading");
        }
        b.finish()
    }

    /// What [`Encoder::encode`] builds, as a message (for the check).
    pub fn message(
        &mut self,
        first: u64,
        n: usize,
        time_ms: i64,
        prev_seq: u64,
        acked_seq: u64,
    ) -> TelemetryBatch {
        self.fill(first, n, time_ms, prev_seq, acked_seq);
        self.batch.clone()
    }
}

/// Checks the fast encoder against `BatchBuilder` and times both; returns
/// (µs per batch fast, µs per batch with BatchBuilder + encode, bytes).
pub fn encoder_check(spec: &LoadSpec, batch: usize) -> anyhow::Result<(f64, f64, usize)> {
    let mut enc = Encoder::new(spec, 0);
    let t0 = now_ms();
    for (first, n) in [(1u64, batch), (7, batch), (1, 3), (1001, batch + 3)] {
        let fast = enc.message(first, n, t0, first - 1, first / 2);
        let slow = enc.encode_with_builder(first, n, t0, first - 1, first / 2);
        anyhow::ensure!(
            fast == slow,
            "the bench's batch encoder disagrees with BatchBuilder (first {first}, n {n})"
        );
    }
    let rounds = 2000u64;
    let start = Instant::now();
    let mut bytes = 0;
    for r in 0..rounds {
        bytes = enc.encode(1 + r * batch as u64, batch, t0, r, r).len();
    }
    let fast = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let start = Instant::now();
    for r in 0..rounds / 4 {
        let m = enc.encode_with_builder(1 + r * batch as u64, batch, t0, r, r);
        std::hint::black_box(m.encode_to_vec());
    }
    let slow = start.elapsed().as_secs_f64() * 1e6 / (rounds / 4) as f64;
    Ok((fast, slow, bytes))
}

impl Device {
    fn new(spec: &LoadSpec, index: usize, stats: Arc<DeviceStats>) -> Device {
        Device {
            index,
            name: device_name(index),
            stats,
            enc: Encoder::new(spec, index),
        }
    }

    fn birth(&self) -> Vec<u8> {
        DeviceStatus {
            device_id: self.name.clone(),
            state: DeviceState::Online as i32,
            agent_version: "outpost-bench".into(),
            labels: BTreeMap::from([("site".to_owned(), format!("site-{}", self.index % SITES))])
                .into_iter()
                .collect(),
            time_ms: now_ms(),
            ..DeviceStatus::default()
        }
        .encode_to_vec()
    }

    async fn run(
        mut self,
        spec: &LoadSpec,
        mut pace_rx: watch::Receiver<Pace>,
        cancel: CancellationToken,
    ) {
        let telemetry = topics::telemetry(&self.name).expect("valid device id");
        let mut opts = MqttOptions::new(self.name.clone(), spec.host.clone(), spec.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_inflight(u16::try_from(spec.window * 2 + 8).unwrap_or(u16::MAX));
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
        let (link_tx, mut link_rx) = watch::channel(LinkState::default());
        let (ack_tx, mut ack_rx) = watch::channel(0u64);
        let driver = tokio::spawn(drive(
            eventloop,
            client.clone(),
            self.name.clone(),
            self.birth(),
            link_tx,
            ack_tx,
            self.stats.clone(),
            cancel.clone(),
        ));

        let ack_timeout = spec
            .ack_timeout
            .unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let mut core = PublisherCore::new(0, spec.window, ack_timeout, Instant::now());
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut next_seq = 1u64;
        let mut max_published = 0u64;
        let mut pace = *pace_rx.borrow_and_update();
        let devices = spec.devices.max(1) as u32;
        // Devices are spread over the period so batches do not all leave at once.
        let mut anchor = Instant::now() + pace.period * self.index as u32 / devices;
        let mut periods = 0u64;
        let mut generation = 0u64;
        loop {
            let now = Instant::now();
            // 1. Generate what the pace says is due (open loop).
            if pace.generating {
                let mut due = anchor + pace.period.mul_f64(periods as f64);
                while due <= now {
                    let mut first = next_seq;
                    if self.stats.inject.load(Ordering::SeqCst) == Inject::SkipSeq as u8 {
                        self.stats
                            .inject
                            .store(Inject::None as u8, Ordering::SeqCst);
                        self.stats.skipped.fetch_add(1, Ordering::SeqCst);
                        first += 1;
                    }
                    let last = first + pace.batch as u64 - 1;
                    pending.push_back(Pending {
                        first,
                        last,
                        time_ms: now_ms(),
                    });
                    next_seq = last + 1;
                    self.stats
                        .generated
                        .fetch_add(pace.batch as u64, Ordering::SeqCst);
                    self.stats.last_generated.store(last, Ordering::SeqCst);
                    periods += 1;
                    due = anchor + pace.period.mul_f64(periods as f64);
                }
            }
            if pace.discard {
                // Unpublished batches are forgotten; numbering continues
                // after the last published one, so no gap is made.
                let keep = pending.partition_point(|p| p.first <= max_published);
                let dropped: u64 = pending.drain(keep..).map(|p| p.last - p.first + 1).sum();
                self.stats.discarded.fetch_add(dropped, Ordering::SeqCst);
                next_seq = pending
                    .back()
                    .map_or(max_published, |p| p.last)
                    .max(max_published)
                    + 1;
                self.stats
                    .last_generated
                    .store(next_seq - 1, Ordering::SeqCst);
                pace.discard = false;
            }
            // 2. Publish within the window, like the agent's publisher.
            while let Some(after) = core.next_after() {
                let i = pending.partition_point(|p| p.last <= after);
                let Some(b) = pending.get(i).copied() else {
                    break;
                };
                let n = (b.last - b.first + 1) as usize;
                let payload = self.enc.encode(b.first, n, b.time_ms, after, core.acked());
                let inject = self.stats.inject.load(Ordering::SeqCst);
                let copies = match inject {
                    x if x == Inject::Drop as u8 => 0,
                    x if x == Inject::Duplicate as u8 => 2,
                    _ => 1,
                };
                if inject == Inject::Drop as u8 || inject == Inject::Duplicate as u8 {
                    self.stats
                        .inject
                        .store(Inject::None as u8, Ordering::SeqCst);
                }
                let mut refused = false;
                for _ in 0..copies {
                    if client
                        .try_publish(telemetry.clone(), QoS::AtLeastOnce, false, payload.clone())
                        .is_err()
                    {
                        refused = true;
                    }
                }
                if refused {
                    self.stats.queue_full.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                core.on_published(b.first, b.last, Instant::now());
                let resent = if b.last <= max_published { n as u64 } else { 0 };
                max_published = max_published.max(b.last);
                self.stats
                    .published_readings
                    .fetch_add(n as u64, Ordering::SeqCst);
                self.stats
                    .resent_readings
                    .fetch_add(resent, Ordering::SeqCst);
                self.stats
                    .max_published
                    .store(max_published, Ordering::SeqCst);
            }
            // 3. Ack timeout: resend from the last ack (when enabled).
            if spec.ack_timeout.is_some() && core.on_tick(Instant::now()) {
                self.stats.resends.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            // 4. Sleep until the next batch is due or something changes.
            let next_due = if pace.generating {
                anchor + pace.period.mul_f64(periods as f64)
            } else {
                Instant::now() + Duration::from_secs(3600)
            };
            let wake = next_due.min(Instant::now() + TICK);
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = pace_rx.changed() => {
                    if r.is_err() { break; }
                    let new = *pace_rx.borrow_and_update();
                    if new.generating && (!pace.generating || new.period != pace.period || new.batch != pace.batch) {
                        anchor = Instant::now() + new.period * self.index as u32 / devices;
                        periods = 0;
                    }
                    pace = new;
                }
                r = ack_rx.changed() => {
                    if r.is_err() { break; }
                    let seq = *ack_rx.borrow_and_update();
                    core.on_ack(seq, Instant::now());
                    self.stats.acked.store(core.acked(), Ordering::SeqCst);
                    while pending.front().is_some_and(|p| p.last <= core.acked()) {
                        pending.pop_front();
                    }
                }
                r = link_rx.changed() => {
                    if r.is_err() { break; }
                    let state = *link_rx.borrow_and_update();
                    if state.up && state.generation != generation {
                        generation = state.generation;
                        core.on_connected(Instant::now());
                    } else if !state.up && core.link() == Link::Up {
                        core.on_disconnected();
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
    }
}

/// The MQTT event loop of one device: subscribes to its acks and sends its
/// birth status at every connection, reports link changes and acks.
#[allow(clippy::too_many_arguments)]
async fn drive(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    name: String,
    birth: Vec<u8>,
    link_tx: watch::Sender<LinkState>,
    ack_tx: watch::Sender<u64>,
    stats: Arc<DeviceStats>,
    cancel: CancellationToken,
) {
    let ack_topic = topics::ack(&name).expect("valid device id");
    let status_topic = topics::status(&name).expect("valid device id");
    let mut generation = 0u64;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe(ack_topic.clone(), QoS::AtLeastOnce);
                let _ =
                    client.try_publish(status_topic.clone(), QoS::AtLeastOnce, true, birth.clone());
                generation += 1;
                stats.connected.store(true, Ordering::SeqCst);
                link_tx.send_replace(LinkState {
                    generation,
                    up: true,
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                if let Ok(seq) = decode_ack(&p.payload, &name) {
                    ack_tx.send_if_modified(|a| {
                        let newer = seq > *a;
                        if newer {
                            *a = seq;
                        }
                        newer
                    });
                }
            }
            Ok(_) => {}
            Err(_) => {
                if stats.connected.swap(false, Ordering::SeqCst) {
                    stats.disconnects.fetch_add(1, Ordering::SeqCst);
                }
                link_tx.send_replace(LinkState {
                    generation,
                    up: false,
                });
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                }
            }
        }
    }
}
