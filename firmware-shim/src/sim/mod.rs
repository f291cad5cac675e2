//! The device simulator behind `outpost-sim` (feature `sim`).
//!
//! A simulated sensor board: it produces readings for a few channels under a
//! [`Scenario`] and writes them as Outpost frames or text lines to a serial
//! port or a pseudo-terminal, optionally with line noise. The demo, the
//! end-to-end tests and the benchmarks use it as the sensor.
//!
//! The pieces, each sans-IO except the last two:
//! * [`Signals`] (scenario.rs): values per channel per tick, a pure function
//!   of the time since start and a seeded PRNG ([`Rng`]).
//! * [`Emitter`] (format.rs): values -> bytes (frames via the firmware
//!   shim's own [`FrameEncoder`](crate::link::FrameEncoder), or
//!   lines/CSV/JSON), with [`Garbage`] (garbage.rs) corrupting a share of
//!   the items.
//! * [`Device`]: one tick = hello and descriptors when due, then readings.
//! * [`Output`] (output.rs): a non-blocking transmitter (writer thread,
//!   bounded queue, drop-and-count when nobody reads).
//! * [`run`]: the real-time loop (ticks at `rate` Hz on the wall clock,
//!   until `count` ticks, `duration` or the stop flag).
//!
//! [`cli`] holds the command line and its validation; `src/bin/sim.rs` only
//! opens the port and wires these together.

pub mod cli;
mod format;
mod garbage;
mod output;
mod rng;
mod scenario;

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use outpost_proto::frame::EncodeError;

pub use format::{write_text, Emitter, Format, TEXT_DECIMALS};
pub use garbage::{Garbage, GarbageEvent, GarbageStats, MAX_BURST, MIN_BURST};
pub use output::{Output, OutputStats, QUEUE_CHUNKS};
pub use rng::Rng;
pub use scenario::{ChannelSpec, Scenario, ScenarioParams, Signals, DEFAULT_CHANNELS};

/// Firmware string of the hello frame.
pub const FIRMWARE: &str = concat!("outpost-sim/", env!("CARGO_PKG_VERSION"));
/// Longest the run loop sleeps before it looks at the stop flag again.
pub const SLEEP_SLICE: Duration = Duration::from_millis(50);
/// When the loop falls further behind its schedule than this (the process
/// was stopped or starved), it skips the missed ticks instead of sending
/// them in a burst, as a real device would.
pub const MAX_LAG: Duration = Duration::from_secs(1);

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The channels; channel id = index.
    pub channels: Vec<ChannelSpec>,
    /// What goes on the line.
    pub format: Format,
    /// How the values behave.
    pub params: ScenarioParams,
    /// Seeds the values' noise and the garbage.
    pub seed: u64,
    /// Probability of a corruption event per frame or line.
    pub garbage_rate: f64,
    /// Descriptor frames are repeated this often (0: only at start).
    pub describe_every_ms: u64,
    /// Ticks per second; each tick reads every channel.
    pub rate_hz: f64,
    /// Stop after this many ticks.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

impl Default for Config {
    /// The CLI defaults: 3 default channels, frames, steady, 1 Hz, forever.
    fn default() -> Self {
        Config {
            channels: (0..3).map(ChannelSpec::default_for).collect(),
            format: Format::Frames,
            params: ScenarioParams::default(),
            seed: cli::DEFAULT_SEED,
            garbage_rate: 0.0,
            describe_every_ms: 5_000,
            rate_hz: 1.0,
            count: None,
            duration: None,
        }
    }
}

/// Counts of what a [`Device`] produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Ticks run.
    pub ticks: u64,
    /// Readings produced (channel values, in any format).
    pub readings: u64,
    /// Frames produced (lines in the text formats).
    pub frames: u64,
    /// Corruption events.
    pub garbage: GarbageStats,
}

/// The simulated device, sans IO: call [`Device::tick`] with the time since
/// start and send the bytes it appends.
#[derive(Debug, Clone)]
pub struct Device {
    signals: Signals,
    emitter: Emitter,
    describe_every_ms: u64,
    last_describe_ms: u64,
    values: Vec<Option<f64>>,
    ticks: u64,
}

impl Device {
    /// A device as `config` describes (rate, count and duration are the run
    /// loop's business).
    pub fn new(config: &Config) -> Self {
        // Separate streams, so garbage does not change the values.
        let mut seeder = Rng::new(config.seed);
        let signals = Signals::new(
            config.params.clone(),
            config.channels.clone(),
            seeder.next_u64(),
        );
        let garbage = Garbage::new(config.garbage_rate, seeder.next_u64());
        Device {
            signals,
            emitter: Emitter::new(config.format, garbage),
            describe_every_ms: config.describe_every_ms,
            last_describe_ms: 0,
            values: Vec::with_capacity(config.channels.len()),
            ticks: 0,
        }
    }

    /// Runs one tick at `elapsed_ms` since start (ticks in time order):
    /// appends its bytes to `out` and returns how many frames (or lines)
    /// they hold. The first tick sends the hello and the descriptors first.
    pub fn tick(&mut self, elapsed_ms: u64, out: &mut Vec<u8>) -> Result<u64, EncodeError> {
        let before = self.emitter.items();
        // The firmware tick wraps at 2^32 ms, like a real MCU's.
        let tick_ms = elapsed_ms as u32;
        let channels = self.signals.channels();
        if self.ticks == 0 {
            self.emitter.hello(FIRMWARE, tick_ms, out)?;
            self.emitter.describe(channels, out)?;
            self.last_describe_ms = elapsed_ms;
        } else if self.describe_every_ms > 0
            && elapsed_ms.saturating_sub(self.last_describe_ms) >= self.describe_every_ms
        {
            self.emitter.describe(channels, out)?;
            self.last_describe_ms = elapsed_ms;
        }
        self.signals.sample(elapsed_ms, &mut self.values);
        self.emitter
            .readings_at(tick_ms, self.signals.channels(), &self.values, out)?;
        self.ticks += 1;
        Ok(self.emitter.items() - before)
    }

    /// The values of the last tick (`None`: channel silent).
    pub fn values(&self) -> &[Option<f64>] {
        &self.values
    }

    /// The channels.
    pub fn channels(&self) -> &[ChannelSpec] {
        self.signals.channels()
    }

    /// What the device produced so far.
    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            ticks: self.ticks,
            readings: self.emitter.readings(),
            frames: self.emitter.items(),
            garbage: self.emitter.garbage(),
        }
    }
}

/// One tick's values, for `--verbose`; displays as
/// `tick=3 t_ms=3000 temperature=21.50 humidity=45.12 ...`.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// Tick number from 0.
    pub tick: u64,
    /// Milliseconds since start.
    pub elapsed_ms: u64,
    /// The channels.
    pub channels: &'a [ChannelSpec],
    /// Their values (`None`: silent).
    pub values: &'a [Option<f64>],
}

impl fmt::Display for Sample<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tick={} t_ms={} ", self.tick, self.elapsed_ms)?;
        write_text(f, Format::Lines, self.channels, self.values)
    }
}

/// The one-line summary printed on exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// What the device produced.
    pub device: DeviceStats,
    /// What reached the port.
    pub output: OutputStats,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d, o) = (&self.device, &self.output);
        write!(
            f,
            "outpost-sim: ticks={} readings={} frames={} written={} garbage_events={} (bursts={} bit_flips={}) dropped_no_reader={}",
            d.ticks,
            d.readings,
            d.frames,
            o.written,
            d.garbage.events(),
            d.garbage.bursts,
            d.garbage.bit_flips,
            o.dropped_no_reader
        )
    }
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A frame could not be encoded (a name or unit too long: validation
    /// should have caught it).
    #[error("cannot encode frame: {0}")]
    Encode(EncodeError),
    /// Writing to the port failed.
    #[error("serial write failed: {0}")]
    Write(#[from] io::Error),
}

/// Runs `config` in real time, writing through `output`, until `count`
/// ticks, `duration`, or `stop` becomes true. Calls `on_sample` after each
/// tick. Returns what the device produced; the caller finishes `output`.
pub fn run<W: Write + Send + 'static>(
    config: &Config,
    output: &mut Output<W>,
    stop: &AtomicBool,
    mut on_sample: impl FnMut(&Sample<'_>),
) -> Result<DeviceStats, SimError> {
    let mut device = Device::new(config);
    let start = Instant::now();
    let secs_per_tick = 1.0 / config.rate_hz;
    let mut slot: u64 = 0; // index of the next tick on the schedule
    let mut chunk = Vec::new();
    while config.count.is_none_or(|c| device.ticks < c) {
        let offset =
            Duration::try_from_secs_f64(slot as f64 * secs_per_tick).unwrap_or(Duration::MAX);
        let Some(due) = start.checked_add(offset) else {
            break;
        };
        if !sleep_until(due, stop) {
            break;
        }
        let elapsed = start.elapsed();
        if config.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let frames = device
            .tick(elapsed_ms, &mut chunk)
            .map_err(SimError::Encode)?;
        on_sample(&Sample {
            tick: device.ticks - 1,
            elapsed_ms,
            channels: device.channels(),
            values: device.values(),
        });
        output.send(std::mem::take(&mut chunk), frames)?;
        slot += 1;
        if elapsed.saturating_sub(offset) > MAX_LAG {
            slot = (elapsed.as_secs_f64() * config.rate_hz) as u64 + 1;
        }
    }
    Ok(device.stats())
}

/// Sleeps until `due` in slices of [`SLEEP_SLICE`]; false if `stop` was set.
pub fn sleep_until(due: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= due {
            return true;
        }
        thread::sleep((due - now).min(SLEEP_SLICE));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use outpost_proto::frame::{DecodedBody, DecodedFrame, FrameDecoder, Value};
    use std::sync::{Arc, Mutex};

    fn decode_all(bytes: &[u8]) -> (Vec<DecodedFrame>, u64) {
        let mut d = FrameDecoder::new();
        let frames: Vec<DecodedFrame> = d.feed(bytes).filter_map(Result::ok).collect();
        (frames, d.stats().errors())
    }

    /// Ticks a device at 1 s intervals; returns it and all its bytes.
    fn ticks(config: &Config, n: u64) -> (Device, Vec<u8>) {
        let mut dev = Device::new(config);
        let mut out = Vec::new();
        for i in 0..n {
            dev.tick(i * 1000, &mut out).unwrap();
        }
        (dev, out)
    }

    #[test]
    fn frames_decode_to_the_expected_values() {
        let config = Config {
            describe_every_ms: 2_000,
            ..Config::default()
        };
        let (dev, out) = ticks(&config, 5);
        let (frames, errors) = decode_all(&out);
        assert_eq!(errors, 0);
        // hello + 3 descriptors + 5 x 3 readings + descriptors at 2 s and 4 s.
        assert_eq!(frames.len(), 1 + 3 + 15 + 6);
        assert_eq!(dev.stats().frames, 25);
        assert_eq!(dev.stats().readings, 15);
        assert!(frames
            .iter()
            .enumerate()
            .all(|(i, f)| usize::from(f.counter) == i));
        assert_eq!(
            frames[0].body,
            DecodedBody::Hello {
                firmware: FIRMWARE.into(),
                tick_ms: 0
            }
        );
        // Same seed, same values: compare with the signals directly.
        let mut signals = Signals::new(
            config.params.clone(),
            config.channels.clone(),
            Rng::new(config.seed).next_u64(),
        );
        let mut expected = Vec::new();
        let mut values = Vec::new();
        for i in 0..5u32 {
            signals.sample(u64::from(i) * 1000, &mut values);
            for (ch, v) in values.iter().enumerate() {
                expected.push((ch as u16, i * 1000, Value::F32(v.unwrap() as f32)));
            }
        }
        let readings: Vec<(u16, u32, Value)> = frames
            .iter()
            .filter_map(|f| match f.body {
                DecodedBody::Reading {
                    channel,
                    tick_ms,
                    value,
                } => Some((channel, tick_ms, value)),
                _ => None,
            })
            .collect();
        assert_eq!(readings, expected);
        let descriptor_ticks: Vec<usize> = frames
            .iter()
            .enumerate()
            .filter(|(_, f)| matches!(&f.body, DecodedBody::Descriptor { channel: 0, .. }))
            .map(|(i, _)| i)
            .collect();
        // At start, then before the readings of tick 2 and tick 4.
        assert_eq!(descriptor_ticks, [1, 4 + 6, 4 + 6 + 3 + 6]);
    }

    #[test]
    fn garbage_spares_the_frames_it_does_not_flip() {
        let clean = Config::default();
        let noisy = Config {
            garbage_rate: 0.3,
            ..clean.clone()
        };
        let (_, clean_bytes) = ticks(&clean, 200);
        let (dev, noisy_bytes) = ticks(&noisy, 200);
        let (good, _) = decode_all(&clean_bytes);
        let (got, errors) = decode_all(&noisy_bytes);
        let g = dev.stats().garbage;
        assert!(g.bursts > 0 && g.bit_flips > 0, "{g:?}");
        // Every frame not bit-flipped decodes, identical to the clean run
        // (same seed: the values do not depend on the garbage).
        assert_eq!(got.len() as u64, dev.stats().frames - g.bit_flips);
        assert!(got.iter().all(|f| good.contains(f)));
        assert!(
            errors >= g.events(),
            "every event is at least one decode error"
        );
    }

    #[test]
    fn garbage_rate_one_hits_every_frame() {
        let config = Config {
            garbage_rate: 1.0,
            ..Config::default()
        };
        let (dev, bytes) = ticks(&config, 50);
        let s = dev.stats();
        assert_eq!(s.garbage.events(), s.frames);
        let (got, _) = decode_all(&bytes);
        assert_eq!(got.len() as u64, s.frames - s.garbage.bit_flips);
    }

    #[test]
    fn silent_scenario_stops_channel_0_readings() {
        let params = ScenarioParams {
            scenario: Scenario::Silent,
            silent_after_ms: 3_000,
            ..Default::default()
        };
        let config = Config {
            params,
            describe_every_ms: 0,
            ..Config::default()
        };
        let (_, bytes) = ticks(&config, 6);
        let (frames, _) = decode_all(&bytes);
        let ch0: Vec<u32> = frames
            .iter()
            .filter_map(|f| match f.body {
                DecodedBody::Reading {
                    channel: 0,
                    tick_ms,
                    ..
                } => Some(tick_ms),
                _ => None,
            })
            .collect();
        assert_eq!(ch0, [0, 1000, 2000]);
    }

    #[test]
    fn text_format_lines_per_tick() {
        let config = Config {
            format: Format::Lines,
            ..Config::default()
        };
        let (dev, bytes) = ticks(&config, 3);
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text
            .lines()
            .all(|l| l.starts_with("temperature=") && l.contains(" pressure=")));
        assert_eq!(dev.stats().frames, 3);
        assert_eq!(dev.stats().readings, 9);
    }

    /// A writer into a shared buffer.
    #[derive(Debug, Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn run_stops_after_count_and_reports_samples() {
        let config = Config {
            rate_hz: 1000.0,
            count: Some(20),
            ..Config::default()
        };
        let buf = Buf::default();
        let mut output = Output::spawn(buf.clone()).unwrap();
        let mut samples = Vec::new();
        let stats = run(&config, &mut output, &AtomicBool::new(false), |s| {
            samples.push(s.to_string())
        })
        .unwrap();
        let (out, _) = output.finish(Duration::from_secs(5));
        assert_eq!(stats.ticks, 20);
        assert_eq!(samples.len(), 20);
        assert!(
            samples[0].starts_with("tick=0 t_ms=0 temperature="),
            "{}",
            samples[0]
        );
        assert_eq!(out.offered, stats.frames);
        let (frames, errors) = decode_all(&buf.0.lock().unwrap());
        assert_eq!(errors, 0);
        // On a loaded machine the writer thread may fall behind and the
        // simulator drops (and counts) frames rather than block, as a UART
        // would: every frame is either written and decodable, or counted.
        assert_eq!(frames.len() as u64, out.written);
        assert_eq!(out.written + out.dropped_no_reader, stats.frames);
        let summary = Summary {
            device: stats,
            output: out,
        }
        .to_string();
        assert!(
            summary.contains("ticks=20 readings=60 frames=64"),
            "{summary}"
        );
    }

    #[test]
    fn run_returns_at_once_when_stopped() {
        let config = Config {
            rate_hz: 0.001,
            ..Config::default()
        };
        let mut output = Output::spawn(io::sink()).unwrap();
        let stop = AtomicBool::new(true);
        let stats = run(&config, &mut output, &stop, |_| {}).unwrap();
        assert_eq!(stats.ticks, 0);
    }
}
