//! Packing readings into a [`TelemetryBatch`] and unpacking them again.
//!
//! The batch is columnar (see `schemas/outpost/v1/telemetry.proto`): a key per
//! reading (sensor index and value kind), a time delta per reading (from the
//! previous reading), and one column per value type. [`BatchBuilder`] is the
//! only writer; [`readings`] validates a received batch completely before it
//! yields anything, so its iterator cannot fail half way.

use std::collections::HashMap;

use prost::Message;

use crate::pb::{Quality, QualityMark, TelemetryBatch, ValueKind};
use crate::topics::{validate_device_id, IdError};

/// Most sensors one batch can name (the sensor index shares a `u32` key with
/// a 3-bit kind).
pub const MAX_SENSORS_PER_BATCH: usize = 1 << 20;
/// Longest sensor name accepted in a batch.
pub const MAX_SENSOR_NAME_LEN: usize = 128;
/// Longest string value accepted in a batch.
pub const MAX_STRING_VALUE_LEN: usize = 1024;
/// Bits of a key that hold the value kind.
const KIND_BITS: u32 = 3;

/// A reading's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Single precision float.
    F32(f32),
    /// Double precision float.
    F64(f64),
    /// Signed integer.
    Int(i64),
    /// Boolean (digital input).
    Bool(bool),
    /// Short text (state names, codes).
    Str(String),
}

impl Value {
    /// The value as a float, when it has a numeric meaning (bools are 0/1).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F32(v) => Some(f64::from(*v)),
            Value::F64(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Str(_) => None,
        }
    }
}

impl From<crate::frame::Value> for Value {
    fn from(v: crate::frame::Value) -> Self {
        match v {
            crate::frame::Value::F32(x) => Value::F32(x),
            crate::frame::Value::F64(x) => Value::F64(x),
            crate::frame::Value::I64(x) => Value::Int(x),
            crate::frame::Value::Bool(x) => Value::Bool(x),
        }
    }
}

/// A reading as it is packed into and unpacked from a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Device id (the same for every reading of a batch).
    pub device: String,
    /// Sensor name.
    pub sensor: String,
    /// Per-device sequence number.
    pub seq: u64,
    /// Unix time in ms.
    pub time_ms: i64,
    /// The value.
    pub value: Value,
    /// Quality flag.
    pub quality: Quality,
}

/// Why readings cannot be added to, or taken from, a batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// The device id is invalid.
    #[error("invalid device id: {0}")]
    DeviceId(#[from] IdError),
    /// Sequence numbers must strictly increase within a batch.
    #[error("sequence number {seq} does not follow {previous}")]
    SeqNotIncreasing {
        /// Previous reading's seq.
        previous: u64,
        /// This reading's seq.
        seq: u64,
    },
    /// A sensor name is empty or too long.
    #[error("sensor name is empty or longer than {MAX_SENSOR_NAME_LEN} bytes")]
    SensorName,
    /// A string value is too long.
    #[error("string value longer than {MAX_STRING_VALUE_LEN} bytes")]
    StringValue,
    /// Too many distinct sensors.
    #[error("more than {MAX_SENSORS_PER_BATCH} sensors in one batch")]
    TooManySensors,
    /// Not valid protobuf.
    #[error("not a TelemetryBatch: {0}")]
    Protobuf(String),
    /// Valid protobuf, but the columns do not describe a consistent batch.
    #[error("inconsistent batch: {0}")]
    Inconsistent(&'static str),
}

/// Packs readings of one device into a [`TelemetryBatch`].
#[derive(Debug)]
pub struct BatchBuilder {
    batch: TelemetryBatch,
    sensor_index: HashMap<String, u32>,
    last_seq: Option<u64>,
    last_time_ms: i64,
    contiguous: bool,
    len: usize,
}

impl BatchBuilder {
    /// A builder for `device`, which must be a valid device id.
    pub fn new(device: &str) -> Result<Self, BatchError> {
        validate_device_id(device)?;
        Ok(BatchBuilder {
            batch: TelemetryBatch {
                device_id: device.to_owned(),
                ..TelemetryBatch::default()
            },
            sensor_index: HashMap::new(),
            last_seq: None,
            last_time_ms: 0,
            contiguous: true,
            len: 0,
        })
    }

    /// Readings added so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequence number of the last reading added.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Records the sequence number after which these readings were read
    /// (see `prev_seq` in telemetry.proto): lets the receiver tell a gap the
    /// agent made on purpose from a batch lost in transit.
    pub fn set_prev_seq(&mut self, prev_seq: u64) {
        self.batch.prev_seq = prev_seq;
    }

    /// Records the highest sequence number the agent has seen acknowledged
    /// (see `acked_seq` in telemetry.proto).
    pub fn set_acked_seq(&mut self, acked_seq: u64) {
        self.batch.acked_seq = acked_seq;
    }

    /// Size of the batch if it were encoded now.
    pub fn encoded_len(&self) -> usize {
        self.batch.encoded_len()
    }

    /// Adds one reading. Sequence numbers must strictly increase; gaps are
    /// allowed (and cost one byte per reading of this batch).
    pub fn push(
        &mut self,
        seq: u64,
        time_ms: i64,
        sensor: &str,
        value: &Value,
        quality: Quality,
    ) -> Result<(), BatchError> {
        if sensor.is_empty() || sensor.len() > MAX_SENSOR_NAME_LEN {
            return Err(BatchError::SensorName);
        }
        if let Value::Str(s) = value {
            if s.len() > MAX_STRING_VALUE_LEN {
                return Err(BatchError::StringValue);
            }
        }
        if !self.sensor_index.contains_key(sensor)
            && self.batch.sensors.len() >= MAX_SENSORS_PER_BATCH
        {
            return Err(BatchError::TooManySensors);
        }
        match self.last_seq {
            Some(previous) if seq <= previous => {
                return Err(BatchError::SeqNotIncreasing { previous, seq })
            }
            Some(previous) => {
                if self.contiguous && seq != previous + 1 {
                    // First gap: materialise the delta column for what came before.
                    self.contiguous = false;
                    self.batch.seq_delta = std::iter::once(0)
                        .chain(std::iter::repeat_n(1, self.len - 1))
                        .collect();
                }
                if !self.contiguous {
                    self.batch.seq_delta.push(seq - previous);
                }
            }
            None => {
                self.batch.first_seq = seq;
                self.batch.base_time_ms = time_ms;
                self.last_time_ms = time_ms;
            }
        }
        let index = match self.sensor_index.get(sensor) {
            Some(i) => *i,
            None => {
                let i = self.batch.sensors.len() as u32;
                self.batch.sensors.push(sensor.to_owned());
                self.sensor_index.insert(sensor.to_owned(), i);
                i
            }
        };
        let kind = match value {
            Value::F32(v) => {
                self.batch.f32_values.push(*v);
                ValueKind::F32
            }
            Value::F64(v) => {
                self.batch.f64_values.push(*v);
                ValueKind::F64
            }
            Value::Int(v) => {
                self.batch.int_values.push(*v);
                ValueKind::Int
            }
            Value::Bool(v) => {
                self.batch.bool_values.push(*v);
                ValueKind::Bool
            }
            Value::Str(v) => {
                self.batch.string_values.push(v.clone());
                ValueKind::String
            }
        };
        self.batch.keys.push((index << KIND_BITS) | kind as u32);
        self.batch
            .time_delta_ms
            .push(time_ms.wrapping_sub(self.last_time_ms));
        if quality != Quality::Good {
            self.batch.quality.push(QualityMark {
                index: self.len as u32,
                quality: quality as i32,
            });
        }
        self.last_time_ms = time_ms;
        self.last_seq = Some(seq);
        self.len += 1;
        Ok(())
    }

    /// The finished batch.
    pub fn finish(self) -> TelemetryBatch {
        self.batch
    }

    /// The finished batch, protobuf-encoded.
    pub fn encode(self) -> Vec<u8> {
        self.batch.encode_to_vec()
    }
}

/// Decodes a protobuf payload into a batch (without checking consistency;
/// [`readings`] does that).
pub fn decode(payload: &[u8]) -> Result<TelemetryBatch, BatchError> {
    TelemetryBatch::decode(payload).map_err(|e| BatchError::Protobuf(e.to_string()))
}

/// A reading borrowed from a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRef<'a> {
    /// Device id from the batch.
    pub device: &'a str,
    /// Sensor name.
    pub sensor: &'a str,
    /// Sequence number.
    pub seq: u64,
    /// Unix time in ms.
    pub time_ms: i64,
    /// The value.
    pub value: ValueRef<'a>,
    /// Quality flag.
    pub quality: Quality,
}

/// A value borrowed from a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// Single precision float.
    F32(f32),
    /// Double precision float.
    F64(f64),
    /// Integer.
    Int(i64),
    /// Boolean.
    Bool(bool),
    /// Text.
    Str(&'a str),
}

impl ValueRef<'_> {
    /// Owned copy.
    pub fn to_value(&self) -> Value {
        match *self {
            ValueRef::F32(v) => Value::F32(v),
            ValueRef::F64(v) => Value::F64(v),
            ValueRef::Int(v) => Value::Int(v),
            ValueRef::Bool(v) => Value::Bool(v),
            ValueRef::Str(v) => Value::Str(v.to_owned()),
        }
    }
}

impl ReadingRef<'_> {
    /// Owned copy.
    pub fn to_reading(&self) -> Reading {
        Reading {
            device: self.device.to_owned(),
            sensor: self.sensor.to_owned(),
            seq: self.seq,
            time_ms: self.time_ms,
            value: self.value.to_value(),
            quality: self.quality,
        }
    }
}

/// Checks that a batch's columns are consistent, then iterates its readings
/// in order. Rejects (without panicking) any batch a peer could craft: short
/// or long columns, sensor indexes out of range, unknown kinds, quality marks
/// out of range, sequence or time overflow, an invalid device id.
pub fn readings(batch: &TelemetryBatch) -> Result<Readings<'_>, BatchError> {
    use BatchError::Inconsistent;
    validate_device_id(&batch.device_id)?;
    let n = batch.keys.len();
    if batch.time_delta_ms.len() != n {
        return Err(Inconsistent("time_delta_ms and keys differ in length"));
    }
    if !batch.seq_delta.is_empty() && batch.seq_delta.len() != n {
        return Err(Inconsistent("seq_delta and keys differ in length"));
    }
    if batch
        .sensors
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_SENSOR_NAME_LEN)
    {
        return Err(BatchError::SensorName);
    }
    let mut counts = [0usize; 5];
    for key in &batch.keys {
        let kind = (key & ((1 << KIND_BITS) - 1)) as usize;
        if kind >= counts.len() {
            return Err(Inconsistent("unknown value kind"));
        }
        if (key >> KIND_BITS) as usize >= batch.sensors.len() {
            return Err(Inconsistent("sensor index out of range"));
        }
        counts[kind] += 1;
    }
    if counts
        != [
            batch.f32_values.len(),
            batch.f64_values.len(),
            batch.int_values.len(),
            batch.bool_values.len(),
            batch.string_values.len(),
        ]
    {
        return Err(Inconsistent("value columns do not match the keys"));
    }
    if batch
        .string_values
        .iter()
        .any(|s| s.len() > MAX_STRING_VALUE_LEN)
    {
        return Err(BatchError::StringValue);
    }
    let mut qualities = vec![Quality::Good; 0];
    if !batch.quality.is_empty() {
        qualities = vec![Quality::Good; n];
        for mark in &batch.quality {
            let slot = qualities
                .get_mut(mark.index as usize)
                .ok_or(Inconsistent("quality mark index out of range"))?;
            *slot = Quality::try_from(mark.quality).map_err(|_| Inconsistent("unknown quality"))?;
        }
    }
    // Sequence numbers: must increase strictly and not overflow.
    if batch.seq_delta.is_empty() {
        if n > 0 && batch.first_seq.checked_add(n as u64 - 1).is_none() {
            return Err(Inconsistent("sequence numbers overflow"));
        }
    } else {
        if batch.seq_delta.first() != Some(&0) {
            return Err(Inconsistent("first seq_delta must be 0"));
        }
        let mut seq = batch.first_seq;
        for d in &batch.seq_delta[1..] {
            if *d == 0 {
                return Err(Inconsistent("sequence numbers must increase"));
            }
            seq = seq
                .checked_add(*d)
                .ok_or(Inconsistent("sequence numbers overflow"))?;
        }
    }
    let mut t = batch.base_time_ms;
    for d in &batch.time_delta_ms {
        t = t
            .checked_add(*d)
            .ok_or(Inconsistent("timestamps overflow"))?;
    }
    Ok(Readings {
        batch,
        qualities,
        i: 0,
        cursors: [0; 5],
        seq: batch.first_seq,
        time_ms: batch.base_time_ms,
    })
}

/// Iterator over a validated batch; see [`readings`].
#[derive(Debug)]
pub struct Readings<'a> {
    batch: &'a TelemetryBatch,
    qualities: Vec<Quality>,
    i: usize,
    cursors: [usize; 5],
    seq: u64,
    time_ms: i64,
}

impl<'a> Iterator for Readings<'a> {
    type Item = ReadingRef<'a>;

    fn next(&mut self) -> Option<ReadingRef<'a>> {
        let b = self.batch;
        let key = *b.keys.get(self.i)?;
        // Validated in `readings`: every index below is in range and no
        // arithmetic overflows; `get` keeps even a logic slip panic-free.
        let kind = (key & ((1 << KIND_BITS) - 1)) as usize;
        let sensor = b.sensors.get((key >> KIND_BITS) as usize)?;
        let c = self.cursors[kind];
        self.cursors[kind] += 1;
        let value = match kind {
            0 => ValueRef::F32(*b.f32_values.get(c)?),
            1 => ValueRef::F64(*b.f64_values.get(c)?),
            2 => ValueRef::Int(*b.int_values.get(c)?),
            3 => ValueRef::Bool(*b.bool_values.get(c)?),
            _ => ValueRef::Str(b.string_values.get(c)?),
        };
        if self.i > 0 {
            self.seq = self
                .seq
                .saturating_add(b.seq_delta.get(self.i).copied().unwrap_or(1));
        }
        self.time_ms = self.time_ms.saturating_add(*b.time_delta_ms.get(self.i)?);
        let quality = self.qualities.get(self.i).copied().unwrap_or(Quality::Good);
        self.i += 1;
        Some(ReadingRef {
            device: &b.device_id,
            sensor,
            seq: self.seq,
            time_ms: self.time_ms,
            value,
            quality,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.batch.keys.len() - self.i;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Readings<'_> {}

/// Highest sequence number in a validated batch (None when empty).
pub fn last_seq(batch: &TelemetryBatch) -> Option<u64> {
    if batch.keys.is_empty() {
        return None;
    }
    if batch.seq_delta.is_empty() {
        batch.first_seq.checked_add(batch.keys.len() as u64 - 1)
    } else {
        batch
            .seq_delta
            .iter()
            .skip(1)
            .try_fold(batch.first_seq, |s, d| s.checked_add(*d))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn build(readings: &[(u64, i64, &str, Value)]) -> TelemetryBatch {
        let mut b = BatchBuilder::new("gw-1").unwrap();
        for (seq, t, s, v) in readings {
            b.push(*seq, *t, s, v, Quality::Good).unwrap();
        }
        b.finish()
    }

    #[test]
    fn mixed_values_round_trip_in_order() {
        let input = vec![
            (10, 1_700_000_000_000, "temp", Value::F32(21.5)),
            (11, 1_700_000_000_000, "door", Value::Bool(true)),
            (12, 1_700_000_000_250, "count", Value::Int(-3)),
            (13, 1_699_999_999_900, "state", Value::Str("RUN".into())),
            (14, 1_700_000_001_000, "temp", Value::F64(21.25)),
        ];
        let batch = build(&input);
        let bytes = prost::Message::encode_to_vec(&batch);
        let back = decode(&bytes).unwrap();
        let got: Vec<_> = readings(&back).unwrap().map(|r| r.to_reading()).collect();
        let want: Vec<_> = input
            .iter()
            .map(|(seq, t, s, v)| Reading {
                device: "gw-1".into(),
                sensor: (*s).into(),
                seq: *seq,
                time_ms: *t,
                value: v.clone(),
                quality: Quality::Good,
            })
            .collect();
        assert_eq!(got, want);
        assert!(
            back.seq_delta.is_empty(),
            "contiguous seqs need no delta column"
        );
        assert_eq!(last_seq(&back), Some(14));
    }

    #[test]
    fn gaps_and_quality_survive() {
        let mut b = BatchBuilder::new("gw-1").unwrap();
        b.push(5, 100, "a", &Value::F32(1.0), Quality::Good)
            .unwrap();
        b.push(6, 101, "a", &Value::F32(2.0), Quality::Bad).unwrap();
        b.push(9, 102, "a", &Value::F32(3.0), Quality::Uncertain)
            .unwrap();
        assert_eq!(
            b.push(9, 103, "a", &Value::F32(4.0), Quality::Good),
            Err(BatchError::SeqNotIncreasing {
                previous: 9,
                seq: 9
            })
        );
        let batch = b.finish();
        let got: Vec<_> = readings(&batch)
            .unwrap()
            .map(|r| (r.seq, r.quality))
            .collect();
        assert_eq!(
            got,
            vec![
                (5, Quality::Good),
                (6, Quality::Bad),
                (9, Quality::Uncertain)
            ]
        );
        assert_eq!(last_seq(&batch), Some(9));
    }

    #[test]
    fn inconsistent_batches_are_rejected() {
        let good = build(&[(1, 0, "a", Value::F32(1.0)), (2, 0, "b", Value::Int(2))]);
        let mut b = good.clone();
        b.f32_values.clear();
        assert!(matches!(readings(&b), Err(BatchError::Inconsistent(_))));
        let mut b = good.clone();
        b.keys[1] = 7 << KIND_BITS;
        assert!(matches!(readings(&b), Err(BatchError::Inconsistent(_))));
        let mut b = good.clone();
        b.keys[1] = (1 << KIND_BITS) | 6;
        assert!(matches!(readings(&b), Err(BatchError::Inconsistent(_))));
        let mut b = good.clone();
        b.time_delta_ms.pop();
        assert!(matches!(readings(&b), Err(BatchError::Inconsistent(_))));
        let mut b = good.clone();
        b.first_seq = u64::MAX;
        assert!(matches!(readings(&b), Err(BatchError::Inconsistent(_))));
        let mut b = good.clone();
        b.base_time_ms = i64::MAX;
        b.time_delta_ms[1] = 1;
        assert!(matches!(readings(&b), Err(BatchError::Inconsistent(_))));
        let mut b = good.clone();
        b.device_id = "x/y".into();
        assert!(matches!(readings(&b), Err(BatchError::DeviceId(_))));
        let mut b = good;
        b.quality.push(QualityMark {
            index: 2,
            quality: 2,
        });
        assert!(matches!(readings(&b), Err(BatchError::Inconsistent(_))));
    }

    #[test]
    fn builder_rejects_bad_input() {
        assert!(BatchBuilder::new("bad id").is_err());
        let mut b = BatchBuilder::new("ok").unwrap();
        assert_eq!(
            b.push(1, 0, "", &Value::Int(1), Quality::Good),
            Err(BatchError::SensorName)
        );
        assert_eq!(
            b.push(
                1,
                0,
                "s",
                &Value::Str("x".repeat(MAX_STRING_VALUE_LEN + 1)),
                Quality::Good
            ),
            Err(BatchError::StringValue)
        );
        assert!(b.is_empty());
    }
}
