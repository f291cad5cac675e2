//! Golden bytes and the size budget of telemetry batches. A change to the
//! schema or builder that alters what is on the wire fails here: old agents
//! and old aggregators must keep understanding each other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use outpost_proto::batch::{self, BatchBuilder, Value};
use outpost_proto::pb::Quality;

/// 100 float readings from 10 sensors at 1 Hz: the typical batch.
fn typical_batch() -> Vec<u8> {
    let mut b = BatchBuilder::new("pumphouse-07").unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("sensor_{i}")).collect();
    let base = 1_763_900_000_000i64;
    let mut seq = 1_000;
    for second in 0..10 {
        for (i, name) in names.iter().enumerate() {
            // Readings of one second are taken a few ms apart, as a polling
            // loop over ten sensors would.
            let t = base + second * 1000 + i as i64 * 3;
            let v = 20.0 + i as f32 + (second as f32) * 0.125;
            b.push(seq, t, name, &Value::F32(v), Quality::Good).unwrap();
            seq += 1;
        }
    }
    b.encode()
}

#[test]
fn typical_batch_is_under_10_bytes_per_reading() {
    let bytes = typical_batch();
    let per_reading = bytes.len() as f64 / 100.0;
    println!("typical batch: 100 f32 readings, 10 sensors, 1 Hz: {} bytes, {per_reading:.2} bytes/reading", bytes.len());
    assert!(per_reading < 10.0, "{per_reading} bytes per reading");
    let decoded = batch::decode(&bytes).unwrap();
    assert_eq!(batch::readings(&decoded).unwrap().count(), 100);
}

#[test]
fn golden_batch_bytes() {
    let mut b = BatchBuilder::new("gw-1").unwrap();
    b.push(
        7,
        1_700_000_000_000,
        "temp",
        &Value::F32(21.5),
        Quality::Good,
    )
    .unwrap();
    b.push(
        8,
        1_700_000_000_010,
        "door",
        &Value::Bool(true),
        Quality::Good,
    )
    .unwrap();
    b.push(
        9,
        1_700_000_001_000,
        "temp",
        &Value::F32(22.0),
        Quality::Bad,
    )
    .unwrap();
    b.push(
        11,
        1_700_000_001_000,
        "count",
        &Value::Int(-3),
        Quality::Good,
    )
    .unwrap();
    let hex: String = b.encode().iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(
        hex,
        include_str!("golden/batch-v1.hex").trim(),
        "the encoded batch changed: if intended, this breaks old peers; bump the schema version"
    );
}
