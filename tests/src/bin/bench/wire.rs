//! Scenario `wire`: bytes per reading on the wire for batches of 1, 10, 100
//! and 500 readings, Outpost's protobuf batch against the text formats a
//! gateway would otherwise send.
//!
//! Data model (deterministic, seeded): one gateway (`pumphouse-07`) polls 10
//! sensors once a second. Each polling round starts on the second plus
//! 0-40 ms of scheduler jitter, and the sensors are read 3 ms apart (+0-2 ms).
//! Values, like the sensors they stand for:
//!
//! | sensor | kind | model |
//! |---|---|---|
//! | temperature | f32 | 21 degC, slow drift, noise, 0.01 resolution (BME280) |
//! | humidity | f32 | 45 %, noise, 0.1 resolution |
//! | pressure | f32 | 1013 hPa, drift, 0.01 resolution |
//! | tank_level | f32 | raw mm * 0.001f32 (the agent's `scale`): full f32 digits |
//! | flow_rate | f32 | 12.5 L/min from a pulse rate: full f32 digits |
//! | pump_current | f32 | 12-bit ADC * (3.3 / 4096 * 10): full f32 digits |
//! | vibration_rms | f32 | computed RMS, 2.1 mm/s: full f32 digits |
//! | supply_voltage | f32 | 24 V, 0.001 resolution |
//! | pulse_count | int | counter, +10..14 per second |
//! | pump_running | bool | true, flips now and then |
//!
//! Sequence numbers are contiguous from 25,920,001 (30 days of 10 readings/s).
//! A stream of [`STREAM_READINGS`] readings is cut into consecutive batches
//! of N; the figure is total bytes / total readings, so a batch size that
//! does not divide a polling round is averaged over every position.
//!
//! Formats (MQTT topic and framing not counted for any of them):
//! * **Outpost**: `outpost_agent::publisher::build_batch`, the exact payload
//!   the agent publishes (with `prev_seq` and `acked_seq` set as in steady
//!   state).
//! * **JSON**: one JSON array per message, one object per reading
//!   `{"device":..,"sensor":..,"seq":..,"time_ms":..,"value":..}`, compact
//!   (no spaces), floats in their shortest round-trip form (as serde_json
//!   prints an f32), bools as `true`/`false`.
//! * **JSON+gzip**: the same message through the system's `gzip -6 -n`
//!   (flate2 is not in the dependency tree and is not worth adding for a
//!   reference point); left out when `gzip` is not installed.
//! * **Influx, per reading** ("long"): one line per reading,
//!   `telemetry,device=D,sensor=S value=V T_ns` (ints `42i`, bools `true`).
//! * **Influx, per round** ("wide"): one line per polling round,
//!   `telemetry,device=D s1=v1,...,s10=v10 T_ns` with the round's first
//!   timestamp; it drops the per-sensor times (a few ms apart) and seqs, so it
//!   carries less information than the others.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use outpost_agent::reading::{Reading, StoredReading};
use outpost_proto::batch::Value;
use outpost_proto::pb::Quality;

/// Readings in the generated stream (500 polling rounds).
pub const STREAM_READINGS: usize = 5_000;
/// Batch sizes reported.
pub const BATCH_SIZES: [usize; 4] = [1, 10, 100, 500];
/// The device id of the data set.
const DEVICE: &str = "pumphouse-07";
/// First sequence number (30 days of 10 readings/s).
const FIRST_SEQ: u64 = 25_920_001;
/// Start of the stream, Unix ms (2025-11-23T12:13:20Z).
const BASE_MS: i64 = 1_763_900_000_000;
/// The batch size the 8 B/reading target is set for.
const TARGET_AT: usize = 100;
/// Target, bytes per reading at [`TARGET_AT`].
const TARGET_BYTES: f64 = 8.0;

/// `wire` options.
#[derive(Debug, clap::Args)]
pub struct WireArgs {
    /// Seed of the data set.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Leave out the gzip'd JSON column (it runs `gzip` once per message).
    #[arg(long)]
    no_gzip: bool,
}

/// SplitMix64: small, seeded, good enough for test data.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Roughly normal (sum of 4 uniforms), mean 0, standard deviation `sd`.
    fn noise(&mut self, sd: f64) -> f64 {
        let s: f64 = (0..4).map(|_| self.unit()).sum::<f64>() - 2.0;
        s * sd * 3f64.sqrt()
    }
}

/// Rounds to a sensor's resolution `step` and stores as f32.
fn quantized(v: f64, step: f64) -> Value {
    Value::F32(((v / step).round() * step) as f32)
}

/// The seeded stream of readings (see the module comment).
pub fn readings(seed: u64) -> Vec<StoredReading> {
    const SENSORS: [&str; 10] = [
        "temperature",
        "humidity",
        "pressure",
        "tank_level",
        "flow_rate",
        "pump_current",
        "vibration_rms",
        "supply_voltage",
        "pulse_count",
        "pump_running",
    ];
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(STREAM_READINGS);
    let mut seq = FIRST_SEQ;
    let mut pulses: i64 = 1_482_113;
    let mut running = true;
    let mut level_mm: f64 = 2_347.0;
    for round in 0..STREAM_READINGS / SENSORS.len() {
        let round_ms = BASE_MS + round as i64 * 1000 + rng.below(41) as i64;
        let minutes = round as f64 / 60.0;
        level_mm += if running { -0.4 } else { 0.3 } + rng.noise(0.5);
        if rng.below(120) == 0 {
            running = !running;
        }
        pulses += if running { 10 + rng.below(5) as i64 } else { 0 };
        for (i, sensor) in SENSORS.iter().enumerate() {
            let t = round_ms + i as i64 * 3 + rng.below(3) as i64;
            let value = match i {
                0 => quantized(21.0 + 0.2 * minutes + rng.noise(0.05), 0.01),
                1 => quantized(45.0 + rng.noise(0.3), 0.1),
                2 => quantized(1013.2 - 0.05 * minutes + rng.noise(0.03), 0.01),
                3 => Value::F32((level_mm.round() as f32) * 0.001),
                4 => Value::F32(if running {
                    (12.5 + rng.noise(0.8)) as f32
                } else {
                    0.0
                }),
                5 => {
                    let raw = if running { 2_400.0 } else { 40.0 } + rng.noise(12.0);
                    Value::F32(raw.round() as f32 * (3.3 / 4096.0 * 10.0))
                }
                6 => Value::F32((2.1 + rng.noise(0.15)).abs() as f32),
                7 => quantized(24.0 + rng.noise(0.02), 0.001),
                8 => Value::Int(pulses),
                _ => Value::Bool(running),
            };
            out.push(StoredReading {
                seq,
                reading: Reading {
                    sensor: (*sensor).to_owned(),
                    time_ms: t,
                    value,
                    quality: Quality::Good,
                },
            });
            seq += 1;
        }
    }
    out
}

/// The agent's MQTT payload for `rows`, in steady state: every earlier
/// reading acknowledged.
pub fn outpost(rows: &[StoredReading]) -> Vec<u8> {
    let after = rows[0].seq - 1;
    outpost_agent::publisher::build_batch(DEVICE, after, after, rows)
        .expect("a valid batch")
        .2
}

fn json_value(v: &Value) -> String {
    match v {
        Value::F32(x) => serde_json::to_string(x),
        Value::F64(x) => serde_json::to_string(x),
        Value::Int(x) => serde_json::to_string(x),
        Value::Bool(x) => serde_json::to_string(x),
        Value::Str(x) => serde_json::to_string(x),
    }
    .expect("a JSON value")
}

/// One JSON array of reading objects, compact.
pub fn json(rows: &[StoredReading]) -> Vec<u8> {
    let device = serde_json::to_string(DEVICE).expect("a JSON string");
    let mut s = String::from("[");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let sensor = serde_json::to_string(&r.reading.sensor).expect("a JSON string");
        write!(
            s,
            r#"{{"device":{device},"sensor":{sensor},"seq":{},"time_ms":{},"value":{}}}"#,
            r.seq,
            r.reading.time_ms,
            json_value(&r.reading.value)
        )
        .expect("write to a String");
    }
    s.push(']');
    s.into_bytes()
}

fn influx_value(v: &Value) -> String {
    match v {
        Value::F32(x) => format!("{x}"),
        Value::F64(x) => format!("{x}"),
        Value::Int(x) => format!("{x}i"),
        Value::Bool(x) => format!("{x}"),
        Value::Str(x) => format!("{x:?}"),
    }
}

/// InfluxDB line protocol, one line per reading.
pub fn influx_long(rows: &[StoredReading]) -> Vec<u8> {
    let mut s = String::new();
    for r in rows {
        writeln!(
            s,
            "telemetry,device={DEVICE},sensor={} value={} {}",
            r.reading.sensor,
            influx_value(&r.reading.value),
            r.reading.time_ms * 1_000_000
        )
        .expect("write to a String");
    }
    s.into_bytes()
}

/// InfluxDB line protocol, one line per polling round (a new line starts
/// when a sensor repeats), stamped with the round's first reading's time.
pub fn influx_wide(rows: &[StoredReading]) -> Vec<u8> {
    let mut s = String::new();
    let mut line: Vec<&StoredReading> = Vec::new();
    let flush = |line: &mut Vec<&StoredReading>, s: &mut String| {
        if line.is_empty() {
            return;
        }
        let fields: Vec<String> = line
            .iter()
            .map(|r| format!("{}={}", r.reading.sensor, influx_value(&r.reading.value)))
            .collect();
        writeln!(
            s,
            "telemetry,device={DEVICE} {} {}",
            fields.join(","),
            line[0].reading.time_ms * 1_000_000
        )
        .expect("write to a String");
        line.clear();
    };
    for r in rows {
        if line.iter().any(|l| l.reading.sensor == r.reading.sensor) {
            flush(&mut line, &mut s);
        }
        line.push(r);
    }
    flush(&mut line, &mut s);
    s.into_bytes()
}

/// Size of `data` through `gzip -6 -n` (no name or time in the header);
/// None when gzip cannot be run.
fn gzip_len(data: &[u8]) -> Option<usize> {
    let mut child = Command::new("gzip")
        .args(["-6", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = data.to_vec();
    // Write from a thread: gzip may fill its stdout pipe before reading all.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().ok()?;
    writer.join().ok()?.ok()?;
    out.status.success().then_some(out.stdout.len())
}

/// The formats, in table order.
const FORMATS: [&str; 5] = [
    "Outpost",
    "JSON",
    "JSON+gzip",
    "Influx/reading",
    "Influx/round",
];

pub fn run(a: WireArgs) -> anyhow::Result<()> {
    let rows = readings(a.seed);
    let gzip = !a.no_gzip && gzip_len(b"probe").is_some();
    println!(
        "# wire: {} readings (10 sensors at 1 Hz: 8 f32, 1 int, 1 bool), seed {}, device {DEVICE}",
        rows.len(),
        a.seed
    );
    if !gzip {
        println!("# JSON+gzip left out (--no-gzip, or no `gzip` to run)");
    }
    // bytes[format][batch size index]
    let mut bytes = [[0usize; BATCH_SIZES.len()]; FORMATS.len()];
    for (j, &n) in BATCH_SIZES.iter().enumerate() {
        for chunk in rows.chunks(n) {
            let js = json(chunk);
            bytes[0][j] += outpost(chunk).len();
            if gzip {
                bytes[2][j] +=
                    gzip_len(&js).ok_or_else(|| anyhow::anyhow!("gzip failed half way"))?;
            }
            bytes[1][j] += js.len();
            bytes[3][j] += influx_long(chunk).len();
            bytes[4][j] += influx_wide(chunk).len();
        }
    }
    let per = |f: usize, j: usize| bytes[f][j] as f64 / rows.len() as f64;

    println!();
    println!("bytes per reading (ratio = format / Outpost)");
    print!("| batch |");
    for f in FORMATS {
        print!(" {f} |");
    }
    println!();
    println!("|---:|{}", "---:|".repeat(FORMATS.len()));
    for (j, n) in BATCH_SIZES.iter().enumerate() {
        print!("| {n} | **{:.2}** |", per(0, j));
        for f in 1..FORMATS.len() {
            if f == 2 && !gzip {
                print!(" - |");
            } else {
                print!(" {:.1} ({:.1}x) |", per(f, j), per(f, j) / per(0, j));
            }
        }
        println!();
    }

    // Where Outpost's bytes go in one batch of TARGET_AT.
    let one = outpost(&rows[..TARGET_AT]);
    let batch = outpost_proto::batch::decode(&one)?;
    let len = |b: &outpost_proto::pb::TelemetryBatch| prost::Message::encoded_len(b);
    let mut b = batch.clone();
    let total = len(&b);
    let mut parts = Vec::new();
    for (name, clear) in [
        (
            "sensor name table",
            (|b: &mut outpost_proto::pb::TelemetryBatch| b.sensors.clear())
                as fn(&mut outpost_proto::pb::TelemetryBatch),
        ),
        ("keys", |b| b.keys.clear()),
        ("time deltas", |b| b.time_delta_ms.clear()),
        ("f32 column", |b| b.f32_values.clear()),
        ("int column", |b| b.int_values.clear()),
        ("bool column", |b| b.bool_values.clear()),
    ] {
        let before = len(&b);
        clear(&mut b);
        parts.push(format!("{name} {} B", before - len(&b)));
    }
    parts.push(format!(
        "header (device id, first_seq, base time, prev_seq, acked_seq) {} B",
        len(&b)
    ));
    println!();
    println!(
        "one Outpost batch of {TARGET_AT} ({} f32, {} int, {} bool): {total} B = {}",
        batch.f32_values.len(),
        batch.int_values.len(),
        batch.bool_values.len(),
        parts.join(", ")
    );
    let at = BATCH_SIZES
        .iter()
        .position(|n| *n == TARGET_AT)
        .expect("the target's batch size is measured");
    println!(
        "target: <= {TARGET_BYTES} B/reading at {TARGET_AT}: {:.2} -> {}",
        per(0, at),
        if per(0, at) <= TARGET_BYTES {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_carry_the_readings() {
        let rows = readings(7);
        assert_eq!(rows.len(), STREAM_READINGS);
        let chunk = &rows[..12];
        let b = outpost_proto::batch::decode(&outpost(chunk)).unwrap();
        assert_eq!(outpost_proto::batch::readings(&b).unwrap().count(), 12);
        let j: serde_json::Value = serde_json::from_slice(&json(chunk)).unwrap();
        assert_eq!(j.as_array().unwrap().len(), 12);
        assert_eq!(j[0]["seq"], FIRST_SEQ);
        let long = String::from_utf8(influx_long(chunk)).unwrap();
        assert_eq!(long.lines().count(), 12);
        // 10 sensors per round: the 11th reading starts a second line.
        let wide = String::from_utf8(influx_wide(chunk)).unwrap();
        assert_eq!(wide.lines().count(), 2);
        assert!(wide.contains("pulse_count=") && wide.contains("i,pump_running="));
    }

    #[test]
    fn the_data_set_is_deterministic() {
        let a = readings(7);
        let b = readings(7);
        assert_eq!(json(&a), json(&b));
        assert_ne!(json(&a), json(&readings(8)));
    }
}
