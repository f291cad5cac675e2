//! Throughput of the aggregator's state store (`synchronous = FULL`, one
//! fsync per commit).
//!
//! ```text
//! cargo run --release -p outpost-aggregator --example state_bench [-- DIR]
//! ```
//!
//! DIR (default: a temporary directory) should be on the disk the
//! aggregator will use: the figure is mostly the disk's fsync latency.
//! Prints figures; asserts nothing.

use std::error::Error;
use std::time::{Duration, Instant};

use outpost_aggregator::state::{DeadLetter, DeviceUpdate, Flush, LastValue, Store};

/// Devices per flush.
const DEVICES: usize = 100;
/// Sensors with a last value per device update.
const SENSORS: usize = 4;
/// Readings per device per flush (counted, not stored).
const READINGS: u64 = 10;
/// Commits per measurement, at most.
const COMMITS: usize = 2_000;
/// Time per measurement, at most.
const BUDGET: Duration = Duration::from_secs(5);
/// Dead letters per flush in the flood measurement.
const FLOOD_BATCH: usize = 1_000;
/// Flushes in the flood measurement.
const FLOOD_FLUSHES: usize = 30;

fn main() -> Result<(), Box<dyn Error>> {
    let base = match std::env::args_os().nth(1) {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let path = base.path().join("aggregator.db");
    let mut store = Store::open(&path)?;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("gw-{i:04}")).collect();
    let sensors: Vec<String> = (0..SENSORS).map(|i| format!("sensor-{i}")).collect();

    let full = |n: u64| Flush {
        marks: names.iter().map(|d| (d.clone(), n * READINGS)).collect(),
        devices: names
            .iter()
            .map(|d| DeviceUpdate {
                device: d.clone(),
                seen_ms: n as i64,
                readings: READINGS,
                batches: 1,
                last_seq: Some(n * READINGS),
                last_values: sensors
                    .iter()
                    .map(|s| LastValue {
                        sensor: s.clone(),
                        time_ms: n as i64,
                        seq: n * READINGS,
                        value: serde_json::json!(21.5 + n as f64),
                        kind: "f32",
                    })
                    .collect(),
                ..DeviceUpdate::default()
            })
            .collect(),
        ..Flush::default()
    };
    let marks_only = |n: u64| Flush {
        marks: names.iter().map(|d| (d.clone(), n * READINGS)).collect(),
        ..Flush::default()
    };

    println!("state file: {}", path.display());
    let mut n = 1u64;
    run(
        &format!("{DEVICES} marks + {DEVICES} device updates x {SENSORS} last values"),
        &mut store,
        || {
            n += 1;
            full(n)
        },
    )?;
    run(&format!("{DEVICES} marks only"), &mut store, || {
        n += 1;
        marks_only(n)
    })?;

    let start = Instant::now();
    for f in 0..FLOOD_FLUSHES {
        let flush = Flush {
            dead_letters: (0..FLOOD_BATCH)
                .map(|i| DeadLetter {
                    received_ms: (f * FLOOD_BATCH + i) as i64,
                    topic: "outpost/v1/gw-0001/telemetry".into(),
                    device: Some("gw-0001".into()),
                    reason: "decode".into(),
                    detail: "invalid wire type".into(),
                    payload: vec![0x5a; 1024],
                })
                .collect(),
            ..Flush::default()
        };
        store.commit(&flush)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let letters = (FLOOD_FLUSHES * FLOOD_BATCH) as f64;
    println!(
        "dead-letter flood: {letters} letters (1 KiB payload) in {FLOOD_FLUSHES} commits: {:.0} letters/s",
        letters / secs
    );
    drop(store);
    let size = std::fs::metadata(&path)?.len();
    println!(
        "file after all runs (closed, checkpointed): {:.1} MiB",
        size as f64 / 1048576.0
    );
    Ok(())
}

/// Commits flushes from `next` for [`COMMITS`] or [`BUDGET`] and prints the rate.
fn run(
    label: &str,
    store: &mut Store,
    mut next: impl FnMut() -> Flush,
) -> Result<(), Box<dyn Error>> {
    let mut latencies = Vec::with_capacity(COMMITS);
    let start = Instant::now();
    while latencies.len() < COMMITS && start.elapsed() < BUDGET {
        let flush = next();
        let t = Instant::now();
        store.commit(&flush)?;
        latencies.push(t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "{label}: {} commits, {:.0} commits/s ({:.0} device updates/s), commit p50 {:.2} ms, p99 {:.2} ms",
        latencies.len(),
        latencies.len() as f64 / secs,
        (latencies.len() * DEVICES) as f64 / secs,
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3,
    );
    Ok(())
}
