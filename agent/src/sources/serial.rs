//! `serial-frames`: firmware speaking the Outpost frame protocol
//! (`docs/serial-protocol.md`) over a UART or USB CDC port.
//!
//! [`FramesCore`] is the sans-IO part: bytes in, [`Reading`]s and counted
//! problems out. It wraps `outpost_proto::frame::FrameDecoder` and adds:
//!
//! * **Names.** A reading's sensor name is the configured channel override,
//!   else the name the firmware's last descriptor frame gave the channel,
//!   else `ch{N}`. Descriptor names survive reconnects (a replugged adapter
//!   does not reboot the MCU behind it).
//! * **Values.** With an override's `scale`/`offset` other than 1/0, a
//!   numeric value becomes `raw * scale + offset`: F32 stays F32 (computed in
//!   f64), F64 and integers become F64. Bools are never scaled.
//! * **Lost frames.** Every frame carries a wrapping u16 counter; a forward
//!   gap between two consecutive frames counts `lost_frames`. A hello frame
//!   (firmware boot) and a reconnect restart the tracking. A counter that
//!   goes backwards or repeats (firmware restarted without a hello, or a
//!   duplicate) is not counted as loss: the tracking restarts there.
//! * **Errors.** Oversize runs, framing (COBS/too short), CRC and body errors
//!   are counted per kind (`oversize`, `framing`, `crc`, `body`); the decoder
//!   resynchronises at the next 0x00, so the frames around them still arrive.
//! * **Time.** `time-source = "receive"`: the wall clock when the bytes were
//!   read. `"tick"`: the firmware's `tick_ms`, anchored to the wall clock at
//!   the first reading after a hello or (re)open, extended across the 2^32 ms
//!   wrap (consecutive readings must be less than ~24 days apart). If the
//!   derived time strays more than [`TICK_MAX_SKEW`] from the wall clock
//!   (firmware restarted without a hello, a badly drifting crystal), the
//!   anchor is reset to the wall clock.

use std::collections::HashMap;
use std::time::Duration;

use outpost_proto::frame::{self, DecodeError, DecodedBody, DecodedFrame, FrameDecoder};
use serde::Deserialize;
use tracing::{debug, info};

use super::serial_port::{
    default_baud, default_data_bits, default_stop_bits, ByteCore, Parity, PortSettings,
    SerialDevice,
};
use super::{check_sensor_name, Problems};
use crate::reading::{Reading, Value};

/// How far a tick-derived time may stray from the wall clock before the
/// tick anchor is reset.
pub const TICK_MAX_SKEW: Duration = Duration::from_secs(60);

/// Where a reading's timestamp comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeSource {
    /// Wall clock when the bytes were read (default).
    #[default]
    Receive,
    /// The firmware's tick, anchored to the wall clock (see module docs).
    Tick,
}

/// Per-channel override: `{ channel = 0, name = "boiler_temp", unit =
/// "degC", scale = 1.0, offset = 0.0 }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChannelConfig {
    /// Channel id as in the firmware's frames.
    pub channel: u16,
    /// Sensor name; wins over the firmware's descriptor.
    pub name: Option<String>,
    /// Unit, for documentation and logs (readings do not carry units).
    pub unit: Option<String>,
    /// Multiplier applied to numeric values (default 1).
    #[serde(default = "one")]
    pub scale: f64,
    /// Added after scaling (default 0).
    #[serde(default)]
    pub offset: f64,
}

fn one() -> f64 {
    1.0
}

/// `type = "serial-frames"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SerialFramesConfig {
    /// Unique source name.
    pub name: String,
    /// Serial device; prefer `/dev/serial/by-id/...`, which survives replugging.
    pub path: String,
    /// Line speed (default 115200).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5-8 (default 8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// none | even | odd (default none).
    #[serde(default)]
    pub parity: Parity,
    /// 1 | 2 (default 1).
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Per-channel name/scale overrides.
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
    /// receive | tick (default receive).
    #[serde(default)]
    pub time_source: TimeSource,
}

impl SerialFramesConfig {
    pub(crate) fn port(&self) -> PortSettings {
        PortSettings {
            path: self.path.clone(),
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
        }
    }

    pub(crate) fn validate(&self, key: &str, errors: &mut Vec<String>) {
        self.port().validate(key, errors);
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let k = format!("{key}.channels[{i}]");
            if !seen.insert(c.channel) {
                errors.push(format!(
                    "{k}.channel: channel {} is configured twice",
                    c.channel
                ));
            }
            if let Some(name) = &c.name {
                check_sensor_name(&k, "name", name, errors);
            }
            if !c.scale.is_finite() {
                errors.push(format!("{k}.scale: must be a finite number"));
            }
            if !c.offset.is_finite() {
                errors.push(format!("{k}.offset: must be a finite number"));
            }
        }
    }
}

/// The running source's device.
pub(crate) fn device(config: SerialFramesConfig) -> SerialDevice<FramesCore> {
    SerialDevice::new(
        config.port(),
        FramesCore::new(&config),
        "bad serial frames skipped",
    )
}

/// A channel's configured override, ready to apply.
#[derive(Debug, Clone)]
struct Override {
    name: Option<String>,
    scale: f64,
    offset: f64,
    identity: bool,
}

impl Override {
    fn apply(&self, value: frame::Value) -> Value {
        if self.identity {
            return value.into();
        }
        let f = |x: f64| x * self.scale + self.offset;
        match value {
            frame::Value::F32(x) => Value::F32(f(f64::from(x)) as f32),
            frame::Value::F64(x) => Value::F64(f(x)),
            frame::Value::I64(x) => Value::F64(f(x as f64)),
            frame::Value::Bool(b) => Value::Bool(b),
        }
    }
}

/// Maps firmware tick times to Unix ms; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct TickClock {
    anchor: Option<Anchor>,
}

#[derive(Debug, Clone)]
struct Anchor {
    /// Unix ms at the anchor.
    unix_ms: i64,
    /// Tick of the last reading.
    last_tick: u32,
    /// Ticks elapsed since the anchor, extended past the u32 wrap.
    elapsed: i64,
}

impl TickClock {
    /// Forget the anchor: the next reading sets a new one.
    pub fn reset(&mut self) {
        self.anchor = None;
    }

    /// Unix ms of a reading stamped `tick` that arrived at `now_ms`, and
    /// `Some(skew_ms)` if the anchor had to be reset because the derived
    /// time was `skew_ms` away from `now_ms`.
    pub fn time(&mut self, tick: u32, now_ms: i64) -> (i64, Option<i64>) {
        let max_skew = TICK_MAX_SKEW.as_millis() as i64;
        let mut skew = None;
        if let Some(a) = &mut self.anchor {
            // Signed difference: a slightly older tick (readings of one
            // sampling round sent out of order) moves back, not 49 days on.
            a.elapsed += i64::from(tick.wrapping_sub(a.last_tick) as i32);
            a.last_tick = tick;
            let t = a.unix_ms + a.elapsed;
            if (t - now_ms).abs() <= max_skew {
                return (t, None);
            }
            skew = Some(t - now_ms);
        }
        self.anchor = Some(Anchor {
            unix_ms: now_ms,
            last_tick: tick,
            elapsed: 0,
        });
        (now_ms, skew)
    }
}

/// Sans-IO decoder of a `serial-frames` byte stream; see the module docs.
#[derive(Debug)]
pub struct FramesCore {
    source: String,
    decoder: FrameDecoder,
    overrides: HashMap<u16, Override>,
    /// Names and units from descriptor frames.
    described: HashMap<u16, (String, String)>,
    /// Resolved sensor name per channel (cache; cleared on descriptors).
    names: HashMap<u16, String>,
    last_counter: Option<u16>,
    time_source: TimeSource,
    clock: TickClock,
}

impl FramesCore {
    /// A core for the source `config`.
    pub fn new(config: &SerialFramesConfig) -> Self {
        let overrides = config
            .channels
            .iter()
            .map(|c| {
                let o = Override {
                    name: c.name.clone(),
                    scale: c.scale,
                    offset: c.offset,
                    identity: c.scale == 1.0 && c.offset == 0.0,
                };
                (c.channel, o)
            })
            .collect();
        FramesCore {
            source: config.name.clone(),
            decoder: FrameDecoder::new(),
            overrides,
            described: HashMap::new(),
            names: HashMap::new(),
            last_counter: None,
            time_source: config.time_source,
            clock: TickClock::default(),
        }
    }

    fn sensor_name(&mut self, channel: u16) -> String {
        if let Some(n) = self.names.get(&channel) {
            return n.clone();
        }
        let name = self
            .overrides
            .get(&channel)
            .and_then(|o| o.name.clone())
            .or_else(|| self.described.get(&channel).map(|(n, _)| n.clone()))
            .unwrap_or_else(|| format!("ch{channel}"));
        self.names.insert(channel, name.clone());
        name
    }

    fn frame(
        &mut self,
        f: DecodedFrame,
        now_ms: i64,
        out: &mut Vec<Reading>,
        problems: &mut Problems,
    ) {
        let is_hello = matches!(f.body, DecodedBody::Hello { .. });
        match self.last_counter {
            Some(prev) if !is_hello => {
                let step = f.counter.wrapping_sub(prev);
                if step == 0 || step > u16::MAX / 2 {
                    debug!(source = %self.source, prev, counter = f.counter, "frame counter went back; restarting loss tracking");
                } else {
                    let lost = frame::frames_lost(prev, f.counter);
                    problems.add("lost_frames", u64::from(lost), || {
                        format!("{lost} frame(s) lost (counter {prev} -> {})", f.counter)
                    });
                }
            }
            _ => {}
        }
        self.last_counter = Some(f.counter);
        match f.body {
            DecodedBody::Reading {
                channel,
                tick_ms,
                value,
            } => {
                let sensor = self.sensor_name(channel);
                let value = match self.overrides.get(&channel) {
                    Some(o) => o.apply(value),
                    None => value.into(),
                };
                let time_ms = match self.time_source {
                    TimeSource::Receive => now_ms,
                    TimeSource::Tick => {
                        let (t, skew) = self.clock.time(tick_ms, now_ms);
                        if let Some(skew_ms) = skew {
                            info!(source = %self.source, skew_ms, "firmware tick strayed from the wall clock; re-anchored");
                        }
                        t
                    }
                };
                out.push(Reading::new(sensor, time_ms, value));
            }
            DecodedBody::Descriptor {
                channel,
                name,
                unit,
            } => {
                if name.is_empty() {
                    debug!(source = %self.source, channel, "descriptor without a name ignored");
                    return;
                }
                let new = (name, unit);
                if self.described.get(&channel) != Some(&new) {
                    info!(source = %self.source, channel, name = %new.0, unit = %new.1, "firmware described a channel");
                    self.described.insert(channel, new);
                    self.names.remove(&channel);
                }
            }
            DecodedBody::Hello { firmware, tick_ms } => {
                info!(source = %self.source, %firmware, tick_ms, "firmware hello (device booted)");
                self.clock.reset();
            }
        }
    }
}

/// `source_errors` kind of a decode error.
fn error_kind(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::Oversize => "oversize",
        DecodeError::Cobs { .. } | DecodeError::TooShort { .. } => "framing",
        DecodeError::Crc { .. } => "crc",
        DecodeError::Body(_) => "body",
    }
}

impl ByteCore for FramesCore {
    fn reset(&mut self) {
        self.decoder = FrameDecoder::new();
        self.last_counter = None;
        self.clock.reset();
    }

    fn feed(&mut self, bytes: &[u8], now_ms: i64, out: &mut Vec<Reading>, problems: &mut Problems) {
        // The decoder's iterator borrows it; collect the items first.
        let items: Vec<_> = self.decoder.feed(bytes).collect();
        for item in items {
            match item {
                Ok(f) => self.frame(f, now_ms, out, problems),
                Err(e) => problems.add(error_kind(&e), 1, || e.to_string()),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use outpost_proto::frame::{Body, Frame, MAX_WIRE_LEN};

    fn config(extra: &str) -> SerialFramesConfig {
        toml::from_str(&format!("name = \"mcu\"\npath = \"/dev/null\"\n{extra}")).unwrap()
    }

    fn wire(counter: u16, body: Body<'_>) -> Vec<u8> {
        let mut out = [0u8; MAX_WIRE_LEN];
        let n = Frame { counter, body }.encode(&mut out).unwrap();
        out[..n].to_vec()
    }

    fn reading(counter: u16, channel: u16, tick_ms: u32, value: frame::Value) -> Vec<u8> {
        wire(
            counter,
            Body::Reading {
                channel,
                tick_ms,
                value,
            },
        )
    }

    /// `frame` with one bit flipped such that the CRC catches it (not the
    /// COBS structure).
    fn with_crc_error(frame: &[u8]) -> Vec<u8> {
        for i in 1..frame.len() - 1 {
            for bit in 0..8 {
                let mut f = frame.to_vec();
                f[i] ^= 1 << bit;
                let mut d = FrameDecoder::new();
                let items: Vec<_> = d.feed(&f).collect();
                if let [Err(DecodeError::Crc { .. })] = items.as_slice() {
                    return f;
                }
            }
        }
        panic!("no single bit flip gives a CRC error");
    }

    fn feed(core: &mut FramesCore, bytes: &[u8], now: i64) -> (Vec<Reading>, Problems) {
        let mut out = Vec::new();
        let mut p = Problems::default();
        core.feed(bytes, now, &mut out, &mut p);
        (out, p)
    }

    #[test]
    fn names_come_from_config_then_descriptor_then_channel_number() {
        let mut core = FramesCore::new(&config(
            "[[channels]]\nchannel = 1\nname = \"boiler_temp\"\nunit = \"degC\"\n",
        ));
        let mut bytes = wire(
            0,
            Body::Descriptor {
                channel: 0,
                name: "temperature",
                unit: "degC",
            },
        );
        bytes.extend(wire(
            1,
            Body::Descriptor {
                channel: 1,
                name: "ignored",
                unit: "",
            },
        ));
        for (i, ch) in [0u16, 1, 2].into_iter().enumerate() {
            bytes.extend(reading(2 + i as u16, ch, 0, frame::Value::F32(1.5)));
        }
        let (out, p) = feed(&mut core, &bytes, 1000);
        assert!(p.is_empty(), "{p:?}");
        let names: Vec<&str> = out.iter().map(|r| r.sensor.as_str()).collect();
        assert_eq!(names, ["temperature", "boiler_temp", "ch2"]);
        assert!(out
            .iter()
            .all(|r| r.time_ms == 1000 && r.value == Value::F32(1.5)));
    }

    #[test]
    fn scale_and_offset_apply_to_numbers_only() {
        let mut core = FramesCore::new(&config(
            "[[channels]]\nchannel = 0\nscale = 0.001\noffset = 1.0\n",
        ));
        let mut bytes = reading(0, 0, 0, frame::Value::I64(2500));
        bytes.extend(reading(1, 0, 0, frame::Value::F32(1000.0)));
        bytes.extend(reading(2, 0, 0, frame::Value::F64(-1000.0)));
        bytes.extend(reading(3, 0, 0, frame::Value::Bool(true)));
        let (out, _) = feed(&mut core, &bytes, 0);
        let values: Vec<Value> = out.into_iter().map(|r| r.value).collect();
        assert_eq!(
            values,
            [
                Value::F64(3.5),
                Value::F32(2.0),
                Value::F64(0.0),
                Value::Bool(true)
            ]
        );
    }

    #[test]
    fn noise_is_counted_by_kind_and_good_frames_around_it_arrive() {
        let mut core = FramesCore::new(&config(""));
        let mut bytes = reading(0, 0, 0, frame::Value::F32(1.0));
        bytes.extend([0x00, 0x13, 0x37, 0x42, 0x00]); // garbage between frames
        bytes.extend(with_crc_error(&reading(1, 0, 0, frame::Value::F32(2.0))));
        bytes.extend(vec![0x55; 300]); // oversize run
        bytes.extend(reading(2, 0, 0, frame::Value::F32(3.0)));
        let (out, p) = feed(&mut core, &bytes, 0);
        let values: Vec<Value> = out.into_iter().map(|r| r.value).collect();
        assert_eq!(values, [Value::F32(1.0), Value::F32(3.0)]);
        assert_eq!(p.count("crc"), 1, "{p:?}");
        assert_eq!(p.count("framing") + p.count("crc"), 2, "{p:?}");
        assert_eq!(p.count("oversize"), 1, "{p:?}");
        assert_eq!(
            p.count("lost_frames"),
            1,
            "the flipped frame is lost: {p:?}"
        );
    }

    #[test]
    fn lost_frames_counted_from_gaps_with_wrap_hello_and_reset() {
        let mut core = FramesCore::new(&config(""));
        let v = frame::Value::Bool(true);
        let mut bytes = reading(65534, 0, 0, v);
        bytes.extend(reading(1, 0, 0, v)); // 65535 and 0 lost
        bytes.extend(reading(5, 0, 0, v)); // 2, 3, 4 lost
        bytes.extend(wire(
            0,
            Body::Hello {
                firmware: "fw",
                tick_ms: 0,
            },
        )); // reboot: no loss
        bytes.extend(reading(1, 0, 0, v));
        bytes.extend(reading(1, 0, 0, v)); // duplicate: not loss
        bytes.extend(reading(0, 0, 0, v)); // backwards: not loss
        let (out, p) = feed(&mut core, &bytes, 0);
        assert_eq!(out.len(), 6);
        assert_eq!(p.count("lost_frames"), 5, "{p:?}");
        core.reset();
        let (_, p) = feed(&mut core, &reading(100, 0, 0, v), 0);
        assert!(p.is_empty(), "no gap across a reconnect: {p:?}");
    }

    #[test]
    fn descriptor_names_survive_a_reconnect() {
        let mut core = FramesCore::new(&config(""));
        feed(
            &mut core,
            &wire(
                0,
                Body::Descriptor {
                    channel: 3,
                    name: "level",
                    unit: "m",
                },
            ),
            0,
        );
        core.reset();
        let (out, _) = feed(&mut core, &reading(9, 3, 0, frame::Value::F32(1.0)), 0);
        assert_eq!(out[0].sensor, "level");
    }

    #[test]
    fn tick_time_is_anchored_and_survives_the_wrap() {
        let mut core = FramesCore::new(&config("time-source = \"tick\""));
        let start = u32::MAX - 500;
        let mut bytes = reading(0, 0, start, frame::Value::F32(0.0));
        bytes.extend(reading(
            1,
            0,
            start.wrapping_add(1000),
            frame::Value::F32(0.0),
        ));
        // Arrives late: the tick, not the receive time, counts.
        let (out, _) = feed(&mut core, &bytes, 1_000_000);
        assert_eq!(out[0].time_ms, 1_000_000);
        assert_eq!(out[1].time_ms, 1_001_000);
        let (out, _) = feed(
            &mut core,
            &reading(2, 0, 1500, frame::Value::F32(0.0)),
            1_009_000,
        );
        assert_eq!(
            out[0].time_ms, 1_002_001,
            "wrapped tick 1500 is 2001 ms after the start"
        );
        // A hello re-anchors at the next reading.
        let mut bytes = wire(
            0,
            Body::Hello {
                firmware: "fw",
                tick_ms: 0,
            },
        );
        bytes.extend(reading(1, 0, 10, frame::Value::F32(0.0)));
        let (out, _) = feed(&mut core, &bytes, 2_000_000);
        assert_eq!(out[0].time_ms, 2_000_000);
    }

    #[test]
    fn tick_clock_re_anchors_when_it_strays_too_far() {
        let mut c = TickClock::default();
        assert_eq!(c.time(0, 0), (0, None));
        assert_eq!(c.time(1000, 5000), (1000, None));
        let far = TICK_MAX_SKEW.as_millis() as i64 + 10_000;
        assert_eq!(c.time(2000, far), (far, Some(2000 - far)), "re-anchored");
        assert_eq!(c.time(2500, far + 1), (far + 500, None));
    }

    #[test]
    fn unknown_keys_in_a_channel_are_rejected() {
        let err = toml::from_str::<SerialFramesConfig>(
            "name = \"x\"\npath = \"/dev/x\"\n[[channels]]\nchannel = 0\nscael = 2.0\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("scael"), "{err}");
    }
}
