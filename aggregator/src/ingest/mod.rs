//! Ingest: broker messages -> validated, deduplicated readings -> the
//! [`ReadingSink`] (rules engine); marks and registry -> SQLite; then acks.
//!
//! # Delivery rules (see DESIGN.md, "Delivery")
//! * The device in the topic is the one that counts: a batch naming another
//!   device is a dead letter (`device-mismatch`).
//! * Per device, the **mark** is the highest sequence number processed.
//!   Readings at or below it are duplicates: counted, dropped.
//! * A batch carries `prev_seq`, the sequence number after which the agent
//!   read it from its buffer, and `acked_seq`, the highest ack the agent has
//!   seen. If `max(mark, acked_seq)` is below `prev_seq`, an earlier batch
//!   was lost in transit (rumqttd and Mosquitto drop messages for a
//!   slow consumer): the batch is held back (not processed, not acked, the
//!   agent resends from its last ack after its ack timeout). Otherwise
//!   sequence numbers skipped between the mark and the batch are a **gap**
//!   the agent made on purpose (buffer overflow): accepted, counted, recorded.
//! * Marks are committed to SQLite before the ack that covers them is
//!   published ([`IngestCore::take_flush`] hands both out together; acks go
//!   only after the commit succeeded). A failed commit sends no ack; the
//!   work is retried at the next flush.
//! * Payloads that cannot be used (bad topic, oversize, malformed, a status
//!   for another device) go to the dead-letter table with their reason, are
//!   counted per reason and logged at WARN at most once per
//!   [`DEAD_LETTER_LOG_INTERVAL`]. Nothing panics on any payload.
//!
//! [`IngestCore`] is sans-IO (a clock is passed in); [`run`] is the loop.

pub mod broker;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_proto::batch::{self, ReadingRef, ValueRef};
use outpost_proto::pb::{Ack, DeviceState, DeviceStatus};
use outpost_proto::topics::{self, DeviceTopic};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::state::{DeadLetter, DeviceUpdate, Flush, Gap, LastValue, StatusUpdate, Store};

use self::broker::{Inbound, Outbound};

/// Minimum time between two WARN logs about dead letters.
pub const DEAD_LETTER_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the rules engine implements: it receives every new reading exactly
/// once per processing (duplicates never reach it), in sequence order per
/// device, and device status changes.
pub trait ReadingSink: Send {
    /// New readings of `device`, in sequence order.
    fn readings(
        &mut self,
        device: &str,
        labels: &BTreeMap<String, String>,
        readings: &[ReadingRef<'_>],
    );
    /// A device's status changed (birth, last will, clean shutdown).
    fn device_status(&mut self, device: &str, online: bool, time_ms: i64);
    /// Adds what must be committed together with the marks of the
    /// readings seen so far (state snapshots in `flush.kv`, alert
    /// transitions in `flush.alerts`). Called at every flush, before the
    /// commit; a failed commit is retried with the same flush, so what was
    /// added is not lost.
    fn checkpoint(&mut self, _flush: &mut Flush) {}
    /// The last flush was committed (durable).
    fn committed(&mut self) {}
}

/// The interim sink until the rules engine lands: counts and logs at DEBUG.
#[derive(Debug, Default)]
pub struct LogSink {
    /// Readings received.
    pub readings: u64,
    /// Status changes received.
    pub statuses: u64,
}

impl ReadingSink for LogSink {
    fn readings(
        &mut self,
        device: &str,
        _labels: &BTreeMap<String, String>,
        readings: &[ReadingRef<'_>],
    ) {
        self.readings += readings.len() as u64;
        if let (Some(first), Some(last)) = (readings.first(), readings.last()) {
            debug!(
                device,
                first = first.seq,
                last = last.seq,
                n = readings.len(),
                "readings"
            );
        }
    }

    fn device_status(&mut self, device: &str, online: bool, _time_ms: i64) {
        self.statuses += 1;
        debug!(device, online, "device status");
    }
}

/// What happened to one message (for tests and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Telemetry processed: `new` readings to the sink, `duplicates` dropped,
    /// `gap` sequence numbers skipped by the agent.
    Processed {
        /// Device.
        device: String,
        /// New readings.
        new: usize,
        /// Duplicates dropped.
        duplicates: usize,
        /// Skipped sequence numbers accepted as a gap.
        gap: u64,
    },
    /// An earlier batch is missing: held back for the agent to resend.
    OutOfOrder {
        /// Device.
        device: String,
        /// The device's mark.
        mark: u64,
        /// The batch's `prev_seq`.
        prev_seq: u64,
    },
    /// A status message applied.
    Status {
        /// Device.
        device: String,
        /// Online or not.
        online: bool,
    },
    /// Rejected into the dead-letter table.
    DeadLetter {
        /// Reason.
        reason: &'static str,
    },
    /// The device belongs to another aggregator's partition.
    ForeignPartition,
    /// Nothing to do (an ack topic echo, an empty retained status).
    Ignored,
}

/// Stable partition of a device: FNV-1a (64-bit) of the id, modulo `count`.
pub fn partition_of(device: &str, count: u32) -> u32 {
    broker::partition_of(device, count)
}

/// The ingest state machine.
#[derive(Debug)]
pub struct IngestCore {
    marks: HashMap<String, u64>,
    labels: HashMap<String, BTreeMap<String, String>>,
    online: HashMap<String, bool>,
    partition: Option<(u32, u32)>,
    max_payload: usize,
    flush: Flush,
    device_updates: HashMap<String, DeviceUpdate>,
    acks: HashMap<String, u64>,
    batches_waiting: usize,
    last_dead_letter_log: Option<Instant>,
    dead_letters_since_log: u64,
}

impl IngestCore {
    /// A core starting from the persisted marks. `partition` is
    /// `(index, count)` when several aggregators share the devices.
    pub fn new(
        marks: HashMap<String, u64>,
        partition: Option<(u32, u32)>,
        max_payload: usize,
    ) -> Self {
        IngestCore {
            marks,
            labels: HashMap::new(),
            online: HashMap::new(),
            partition,
            max_payload,
            flush: Flush::default(),
            device_updates: HashMap::new(),
            acks: HashMap::new(),
            batches_waiting: 0,
            last_dead_letter_log: None,
            dead_letters_since_log: 0,
        }
    }

    /// The device's mark, if any.
    pub fn mark(&self, device: &str) -> Option<u64> {
        self.marks.get(device).copied()
    }

    /// Batches processed since the last [`take_flush`](Self::take_flush).
    pub fn batches_waiting(&self) -> usize {
        self.batches_waiting
    }

    /// Devices known to be online (from status messages).
    pub fn devices_online(&self) -> usize {
        self.online.values().filter(|o| **o).count()
    }

    fn owns(&self, device: &str) -> bool {
        match self.partition {
            Some((index, count)) if count > 1 => partition_of(device, count) == index,
            _ => true,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &mut self,
        metrics: &Metrics,
        now_ms: i64,
        topic: &str,
        device: Option<&str>,
        reason: &'static str,
        detail: String,
        payload: &[u8],
    ) -> Outcome {
        metrics.dead_letter(reason);
        self.dead_letters_since_log += 1;
        let due = self
            .last_dead_letter_log
            .is_none_or(|t| t.elapsed() >= DEAD_LETTER_LOG_INTERVAL);
        if due {
            warn!(topic, reason, detail = %detail, since_last_log = self.dead_letters_since_log, "message rejected to the dead-letter table");
            self.last_dead_letter_log = Some(Instant::now());
            self.dead_letters_since_log = 0;
        }
        self.flush.dead_letters.push(DeadLetter {
            received_ms: now_ms,
            topic: topic.chars().take(512).collect(),
            device: device.map(str::to_owned),
            reason: reason.to_owned(),
            detail,
            payload: payload.to_vec(),
        });
        Outcome::DeadLetter { reason }
    }

    fn update(&mut self, device: &str, now_ms: i64) -> &mut DeviceUpdate {
        self.device_updates
            .entry(device.to_owned())
            .or_insert_with(|| DeviceUpdate {
                device: device.to_owned(),
                seen_ms: now_ms,
                ..DeviceUpdate::default()
            })
    }

    /// Handles one message from the broker.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
        sink: &mut dyn ReadingSink,
        metrics: &Metrics,
    ) -> Outcome {
        let (device, kind) = match topics::parse_device_topic(topic) {
            Ok(x) => x,
            Err(e) => {
                return self.dead_letter(
                    metrics,
                    now_ms,
                    topic,
                    None,
                    "bad-topic",
                    e.to_string(),
                    payload,
                )
            }
        };
        if !self.owns(device) {
            metrics.foreign_partition.inc();
            return Outcome::ForeignPartition;
        }
        match kind {
            DeviceTopic::Telemetry => self.telemetry(topic, device, payload, now_ms, sink, metrics),
            DeviceTopic::Status => self.status(topic, device, payload, now_ms, sink, metrics),
            DeviceTopic::Ack => Outcome::Ignored,
        }
    }

    fn telemetry(
        &mut self,
        topic: &str,
        device: &str,
        payload: &[u8],
        now_ms: i64,
        sink: &mut dyn ReadingSink,
        metrics: &Metrics,
    ) -> Outcome {
        metrics.batches.inc();
        metrics.bytes.inc_by(payload.len() as u64);
        if payload.len() > self.max_payload {
            let detail = format!("{} bytes, limit {}", payload.len(), self.max_payload);
            return self.dead_letter(
                metrics,
                now_ms,
                topic,
                Some(device),
                "oversize",
                detail,
                payload,
            );
        }
        let b = match batch::decode(payload) {
            Ok(b) => b,
            Err(e) => {
                return self.dead_letter(
                    metrics,
                    now_ms,
                    topic,
                    Some(device),
                    "malformed",
                    e.to_string(),
                    payload,
                )
            }
        };
        if !b.device_id.is_empty() && b.device_id != device {
            let detail = format!(
                "payload names device {:?}",
                b.device_id.chars().take(80).collect::<String>()
            );
            return self.dead_letter(
                metrics,
                now_ms,
                topic,
                Some(device),
                "device-mismatch",
                detail,
                payload,
            );
        }
        let readings = match batch::readings(&b) {
            Ok(r) => r,
            Err(e) => {
                return self.dead_letter(
                    metrics,
                    now_ms,
                    topic,
                    Some(device),
                    "inconsistent",
                    e.to_string(),
                    payload,
                )
            }
        };
        let mark = self.marks.get(device).copied();
        // What the agent already had acknowledged is delivered, whether or
        // not this aggregator remembers it (new state, restored backup).
        let delivered = mark.unwrap_or(0).max(b.acked_seq);
        if b.prev_seq > delivered {
            metrics.out_of_order_batches.inc();
            debug!(
                device,
                delivered,
                prev_seq = b.prev_seq,
                "earlier batch missing; waiting for the resend"
            );
            return Outcome::OutOfOrder {
                device: device.to_owned(),
                mark: delivered,
                prev_seq: b.prev_seq,
            };
        }
        let mut new: Vec<ReadingRef<'_>> = Vec::with_capacity(b.keys.len());
        let mut duplicates = 0usize;
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        let mut expect = mark.map(|m| m + 1);
        for r in readings {
            if r.seq > crate::state::MAX_SEQ {
                // It could never be committed: every flush would fail on it.
                let detail = format!(
                    "sequence number {} is above the largest storable {}",
                    r.seq,
                    crate::state::MAX_SEQ
                );
                return self.dead_letter(
                    metrics,
                    now_ms,
                    topic,
                    Some(device),
                    "seq-out-of-range",
                    detail,
                    payload,
                );
            }
            if mark.is_some_and(|m| r.seq <= m) {
                duplicates += 1;
                continue;
            }
            if let Some(e) = expect {
                if r.seq > e {
                    gaps.push((e, r.seq - 1));
                }
            }
            expect = Some(r.seq + 1);
            new.push(r);
        }
        let gap: u64 = gaps.iter().map(|(a, b)| b - a + 1).sum();
        metrics.duplicates.inc_by(duplicates as u64);
        metrics.gap_readings.inc_by(gap);
        metrics.readings.inc_by(new.len() as u64);
        for r in &new {
            metrics
                .ingest_latency
                .observe((now_ms - r.time_ms).max(0) as f64 / 1000.0);
        }
        if !new.is_empty() {
            let labels = self.labels.get(device).cloned().unwrap_or_default();
            sink.readings(device, &labels, &new);
        }
        let new_mark = new.last().map(|r| r.seq).or(mark);
        // Last value per sensor in this batch.
        let mut last: BTreeMap<&str, &ReadingRef<'_>> = BTreeMap::new();
        for r in &new {
            last.insert(r.sensor, r);
        }
        let last_values: Vec<LastValue> = last
            .into_values()
            .map(|r| {
                let (value, kind) = json_value(&r.value);
                LastValue {
                    sensor: r.sensor.to_owned(),
                    time_ms: r.time_ms,
                    seq: r.seq,
                    value,
                    kind,
                }
            })
            .collect();
        let n_new = new.len();
        drop(new);
        for (from, to) in &gaps {
            info!(
                device,
                from, to, "sequence gap accepted (readings the agent dropped)"
            );
            self.flush.gaps.push(Gap {
                device: device.to_owned(),
                from_seq: *from,
                to_seq: *to,
                detected_ms: now_ms,
            });
        }
        let u = self.update(device, now_ms);
        u.seen_ms = now_ms;
        u.batches += 1;
        u.readings += n_new as u64;
        u.duplicates += duplicates as u64;
        u.gap_readings += gap;
        u.gaps += gaps.len() as u64;
        if let Some(m) = new_mark {
            u.last_seq = Some(u.last_seq.map_or(m, |s| s.max(m)));
        }
        for lv in last_values {
            if let Some(existing) = u.last_values.iter_mut().find(|v| v.sensor == lv.sensor) {
                if lv.time_ms >= existing.time_ms {
                    *existing = lv;
                }
            } else {
                u.last_values.push(lv);
            }
        }
        if let Some(m) = new_mark {
            self.marks.insert(device.to_owned(), m);
            // Ack even a batch of pure duplicates: the agent resent it
            // because an earlier ack was lost.
            self.acks.insert(device.to_owned(), m);
            self.batches_waiting += 1;
        }
        Outcome::Processed {
            device: device.to_owned(),
            new: n_new,
            duplicates,
            gap,
        }
    }

    fn status(
        &mut self,
        topic: &str,
        device: &str,
        payload: &[u8],
        now_ms: i64,
        sink: &mut dyn ReadingSink,
        metrics: &Metrics,
    ) -> Outcome {
        if payload.is_empty() {
            return Outcome::Ignored; // a cleared retained status
        }
        let s = match DeviceStatus::decode(payload) {
            Ok(s) => s,
            Err(e) => {
                return self.dead_letter(
                    metrics,
                    now_ms,
                    topic,
                    Some(device),
                    "malformed",
                    e.to_string(),
                    payload,
                )
            }
        };
        if !s.device_id.is_empty() && s.device_id != device {
            let detail = format!(
                "status names device {:?}",
                s.device_id.chars().take(80).collect::<String>()
            );
            return self.dead_letter(
                metrics,
                now_ms,
                topic,
                Some(device),
                "device-mismatch",
                detail,
                payload,
            );
        }
        let online = s.state == DeviceState::Online as i32;
        // The last will is built once when the agent starts, so its time is
        // older than any periodic status: take an OFFLINE at receive time
        // (a retained status is always the device's latest word).
        let time_ms = if !online || s.time_ms <= 0 {
            now_ms
        } else {
            s.time_ms
        };
        let labels: BTreeMap<String, String> = s.labels.into_iter().collect();
        if !labels.is_empty() || online {
            self.labels.insert(device.to_owned(), labels.clone());
        }
        let changed = self.online.insert(device.to_owned(), online) != Some(online);
        let u = self.update(device, now_ms);
        u.status = Some(StatusUpdate {
            online,
            time_ms,
            agent_version: s.agent_version,
            labels,
            buffer_rows: s.buffer_rows,
            dropped_total: s.dropped_total,
        });
        if changed {
            info!(device, online, "device status");
            sink.device_status(device, online, time_ms);
        }
        Outcome::Status {
            device: device.to_owned(),
            online,
        }
    }

    /// Everything to commit, and the acks to publish once it is committed.
    pub fn take_flush(&mut self) -> (Flush, Vec<(String, u64)>) {
        let mut flush = std::mem::take(&mut self.flush);
        flush.devices = self.device_updates.drain().map(|(_, u)| u).collect();
        flush.marks = self.acks.iter().map(|(d, m)| (d.clone(), *m)).collect();
        let acks = self.acks.drain().collect();
        self.batches_waiting = 0;
        (flush, acks)
    }

    /// Puts back a flush whose commit failed, so the next one retries it
    /// (acks included; marks in memory never went backwards).
    pub fn restore(&mut self, flush: Flush, acks: Vec<(String, u64)>) {
        let Flush {
            marks: _,
            kv,
            devices,
            gaps,
            dead_letters,
            alerts,
        } = flush;
        let newer = std::mem::take(&mut self.flush);
        // Alert transitions stay in their order: the failed flush's first.
        self.flush.alerts = alerts;
        self.flush.alerts.extend(newer.alerts);
        self.flush.gaps = gaps;
        self.flush.gaps.extend(newer.gaps);
        self.flush.dead_letters = dead_letters;
        self.flush.dead_letters.extend(newer.dead_letters);
        for d in devices {
            // Newer updates since the failed flush win; add the failed ones' deltas.
            let name = d.device.clone();
            match self.device_updates.remove(&name) {
                None => {
                    self.device_updates.insert(name, d);
                }
                Some(n) => {
                    let mut merged = d;
                    merged.seen_ms = merged.seen_ms.max(n.seen_ms);
                    merged.readings += n.readings;
                    merged.batches += n.batches;
                    merged.duplicates += n.duplicates;
                    merged.gap_readings += n.gap_readings;
                    merged.gaps += n.gaps;
                    merged.last_seq = merged.last_seq.max(n.last_seq);
                    for lv in n.last_values {
                        merged.last_values.retain(|v| v.sensor != lv.sensor);
                        merged.last_values.push(lv);
                    }
                    if n.status.is_some() {
                        merged.status = n.status;
                    }
                    self.device_updates.insert(name, merged);
                }
            }
        }
        for (d, m) in acks {
            let e = self.acks.entry(d).or_insert(m);
            *e = (*e).max(m);
        }
        for (k, v) in kv {
            if !self.flush.kv.iter().any(|(key, _)| *key == k) {
                self.flush.kv.push((k, v));
            }
        }
    }
}

/// A reading's value as JSON, with its kind name.
pub fn json_value(v: &ValueRef<'_>) -> (serde_json::Value, &'static str) {
    match *v {
        ValueRef::F32(x) => (
            // Via the shortest decimal that is this f32 (21.3, not 21.299999237060547).
            format!("{x}")
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(serde_json::Value::Null, Into::into),
            "f32",
        ),
        ValueRef::F64(x) => (
            serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, Into::into),
            "f64",
        ),
        ValueRef::Int(x) => (x.into(), "int"),
        ValueRef::Bool(x) => (x.into(), "bool"),
        ValueRef::Str(x) => (x.into(), "string"),
    }
}

/// Current Unix time in ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Encoded ack for `device` at `seq`.
pub fn ack_payload(device: &str, seq: u64) -> Vec<u8> {
    Ack {
        device_id: device.to_owned(),
        seq,
        time_ms: now_ms(),
    }
    .encode_to_vec()
}

/// Commits what the core gathered, then publishes the acks. On a failed
/// commit nothing is acked and the work goes back into the core.
pub fn flush(
    core: &mut IngestCore,
    store: &mut Store,
    outbound: &Outbound,
    sink: &mut dyn ReadingSink,
    metrics: &Metrics,
) -> bool {
    let (mut flush, acks) = core.take_flush();
    sink.checkpoint(&mut flush);
    if flush.is_empty() && acks.is_empty() {
        return true;
    }
    match store.commit(&flush) {
        Ok(()) => {
            metrics.state_commits.inc();
            sink.committed();
            for (device, seq) in acks {
                let Ok(topic) = topics::ack(&device) else {
                    continue;
                };
                match outbound.publish(topic, ack_payload(&device, seq), true) {
                    Ok(()) => {
                        metrics.acks.inc();
                    }
                    Err(e) => {
                        warn!(device = %device, seq, error = %e, "ack not published; the agent will resend")
                    }
                }
            }
            metrics.devices_online.set(core.devices_online() as i64);
            true
        }
        Err(e) => {
            error!(error = %e, "committing ingest state failed; acks held back, retrying");
            core.restore(flush, acks);
            false
        }
    }
}

/// Runs ingest until `cancel`: messages from `inbound` through the core,
/// commits every `flush_interval` (or after `flush_batches` batches), acks
/// after each commit. On cancel, the messages already queued are processed
/// for up to `grace`, then a final commit and its acks.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut core: IngestCore,
    mut store: Store,
    mut inbound: mpsc::Receiver<Inbound>,
    outbound: Outbound,
    mut sink: Box<dyn ReadingSink>,
    metrics: Arc<Metrics>,
    flush_interval: Duration,
    flush_batches: usize,
    grace: Duration,
    cancel: CancellationToken,
) -> Store {
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_flush = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            msg = inbound.recv() => {
                let Some(msg) = msg else { break };
                core.handle(&msg.topic, &msg.payload, now_ms(), sink.as_mut(), &metrics);
                // A steady stream of messages that are not batches (status,
                // rejected, other partitions) must not starve the tick arm
                // below: flush on time here too.
                if core.batches_waiting() >= flush_batches || last_flush.elapsed() >= flush_interval {
                    tokio::task::block_in_place(|| flush(&mut core, &mut store, &outbound, sink.as_mut(), &metrics));
                    last_flush = Instant::now();
                }
            }
            _ = tick.tick() => {
                tokio::task::block_in_place(|| flush(&mut core, &mut store, &outbound, sink.as_mut(), &metrics));
                last_flush = Instant::now();
            }
        }
    }
    // Drain what the broker already handed over, bounded by the grace period.
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match inbound.try_recv() {
            Ok(msg) => {
                core.handle(&msg.topic, &msg.payload, now_ms(), sink.as_mut(), &metrics);
            }
            Err(_) => break,
        }
    }
    if !tokio::task::block_in_place(|| {
        flush(&mut core, &mut store, &outbound, sink.as_mut(), &metrics)
    }) {
        error!("final commit failed: the last acks were not sent; agents will resend");
    }
    info!("ingest stopped");
    store
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use outpost_proto::batch::{BatchBuilder, Value};
    use outpost_proto::pb::Quality;

    #[derive(Default)]
    struct Rec {
        seqs: Vec<(String, u64)>,
        statuses: Vec<(String, bool)>,
    }

    impl ReadingSink for Rec {
        fn readings(
            &mut self,
            device: &str,
            _l: &BTreeMap<String, String>,
            readings: &[ReadingRef<'_>],
        ) {
            self.seqs
                .extend(readings.iter().map(|r| (device.to_string(), r.seq)));
        }
        fn device_status(&mut self, device: &str, online: bool, _t: i64) {
            self.statuses.push((device.to_string(), online));
        }
    }

    fn batch(device: &str, prev: u64, seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut b = BatchBuilder::new(device).unwrap();
        b.set_prev_seq(prev);
        for s in seqs {
            b.push(
                s,
                1_700_000_000_000 + s as i64,
                "temp",
                &Value::F32(s as f32),
                Quality::Good,
            )
            .unwrap();
        }
        b.encode()
    }

    fn core() -> (IngestCore, Rec, Metrics) {
        (
            IngestCore::new(HashMap::new(), None, 64 * 1024),
            Rec::default(),
            Metrics::default(),
        )
    }

    const T: &str = "outpost/v1/dev/telemetry";

    #[test]
    fn new_readings_reach_the_sink_and_resends_are_duplicates() {
        let (mut c, mut sink, m) = core();
        let out = c.handle(T, &batch("dev", 0, 1..=10), 0, &mut sink, &m);
        assert_eq!(
            out,
            Outcome::Processed {
                device: "dev".into(),
                new: 10,
                duplicates: 0,
                gap: 0
            }
        );
        let out = c.handle(T, &batch("dev", 0, 1..=10), 0, &mut sink, &m);
        assert_eq!(
            out,
            Outcome::Processed {
                device: "dev".into(),
                new: 0,
                duplicates: 10,
                gap: 0
            }
        );
        // A batch straddling the mark: only the new part.
        let out = c.handle(T, &batch("dev", 5, 6..=15), 0, &mut sink, &m);
        assert_eq!(
            out,
            Outcome::Processed {
                device: "dev".into(),
                new: 5,
                duplicates: 5,
                gap: 0
            }
        );
        assert_eq!(
            sink.seqs.iter().map(|s| s.1).collect::<Vec<_>>(),
            (1..=15).collect::<Vec<_>>()
        );
        let (flush, acks) = c.take_flush();
        assert_eq!(acks, vec![("dev".to_string(), 15)]);
        assert_eq!(flush.marks, vec![("dev".to_string(), 15)]);
        assert_eq!(flush.devices[0].readings, 15);
        assert_eq!(flush.devices[0].duplicates, 15);
    }

    #[test]
    fn a_gap_the_agent_made_is_accepted_but_a_lost_batch_is_held_back() {
        let (mut c, mut sink, m) = core();
        c.handle(T, &batch("dev", 0, 1..=10), 0, &mut sink, &m);
        // The agent read after 10 and found 21..: it dropped 11..=20 itself.
        let out = c.handle(T, &batch("dev", 10, 21..=25), 0, &mut sink, &m);
        assert_eq!(
            out,
            Outcome::Processed {
                device: "dev".into(),
                new: 5,
                duplicates: 0,
                gap: 10
            }
        );
        // The agent sent 26..=30 (prev 25) and then 31..=35 (prev 30); the
        // first was lost on the way.
        let out = c.handle(T, &batch("dev", 30, 31..=35), 0, &mut sink, &m);
        assert_eq!(
            out,
            Outcome::OutOfOrder {
                device: "dev".into(),
                mark: 25,
                prev_seq: 30
            }
        );
        assert_eq!(c.mark("dev"), Some(25), "nothing acked past the hole");
        let (flush, _) = c.take_flush();
        assert_eq!(flush.gaps.len(), 1);
        assert_eq!((flush.gaps[0].from_seq, flush.gaps[0].to_seq), (11, 20));
    }

    #[test]
    fn an_unknown_device_whose_first_batch_was_lost_is_held_back_until_resent() {
        let (mut c, mut sink, m) = core();
        // The agent sent 1..=25 (lost) and then 26..=30 (prev 25, nothing acked yet).
        let out = c.handle(T, &batch("dev", 25, 26..=30), 0, &mut sink, &m);
        assert!(matches!(out, Outcome::OutOfOrder { .. }), "{out:?}");
        // An agent whose earlier readings another aggregator acked: accepted.
        let mut b = BatchBuilder::new("dev").unwrap();
        b.set_prev_seq(25);
        b.set_acked_seq(25);
        b.push(26, 0, "temp", &Value::F32(1.0), Quality::Good)
            .unwrap();
        let out = c.handle(T, &b.encode(), 0, &mut sink, &m);
        assert_eq!(
            out,
            Outcome::Processed {
                device: "dev".into(),
                new: 1,
                duplicates: 0,
                gap: 0
            }
        );
    }

    #[test]
    fn bad_messages_become_dead_letters_with_reasons() {
        let (mut c, mut sink, m) = core();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "outpost/v1/bad id/telemetry",
                batch("dev", 0, 1..=1),
                "bad-topic",
            ),
            ("outpost/v1/dev/telemetry", vec![0xff; 10], "malformed"),
            (
                "outpost/v1/dev/telemetry",
                batch("other", 0, 1..=3),
                "device-mismatch",
            ),
            ("outpost/v1/dev/telemetry", vec![0u8; 70 * 1024], "oversize"),
            ("outpost/v1/dev/status", vec![0xff, 0x01], "malformed"),
        ];
        for (topic, payload, reason) in cases {
            assert_eq!(
                c.handle(topic, &payload, 0, &mut sink, &m),
                Outcome::DeadLetter {
                    reason: reason_static(reason)
                }
            );
        }
        assert!(sink.seqs.is_empty());
        let (flush, acks) = c.take_flush();
        assert_eq!(flush.dead_letters.len(), 5);
        assert!(acks.is_empty());
        assert!(m
            .render()
            .contains("outpost_aggregator_dead_letters_total{reason=\"device-mismatch\"} 1"));
    }

    fn reason_static(r: &str) -> &'static str {
        [
            "bad-topic",
            "malformed",
            "device-mismatch",
            "oversize",
            "inconsistent",
        ]
        .into_iter()
        .find(|x| *x == r)
        .unwrap()
    }

    #[test]
    fn random_payloads_never_panic() {
        let (mut c, mut sink, m) = core();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000usize {
            let payload: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            c.handle(T, &payload, 0, &mut sink, &m);
            c.handle("outpost/v1/dev/status", &payload, 0, &mut sink, &m);
        }
    }

    #[test]
    fn status_changes_reach_the_sink_once() {
        let (mut c, mut sink, m) = core();
        let online = DeviceStatus {
            device_id: "dev".into(),
            state: DeviceState::Online as i32,
            time_ms: 5,
            ..Default::default()
        };
        let p = online.encode_to_vec();
        c.handle("outpost/v1/dev/status", &p, 0, &mut sink, &m);
        c.handle("outpost/v1/dev/status", &p, 0, &mut sink, &m);
        let offline = DeviceStatus {
            state: DeviceState::Offline as i32,
            ..online
        };
        c.handle(
            "outpost/v1/dev/status",
            &offline.encode_to_vec(),
            0,
            &mut sink,
            &m,
        );
        assert_eq!(
            sink.statuses,
            vec![("dev".into(), true), ("dev".into(), false)]
        );
        assert_eq!(
            c.handle("outpost/v1/dev/status", &[], 0, &mut sink, &m),
            Outcome::Ignored
        );
    }

    #[test]
    fn only_the_own_partition_is_processed() {
        let m = Metrics::default();
        let mut sink = Rec::default();
        let mut owned = 0;
        for i in 0..20 {
            let d = format!("dev-{i}");
            let topic = topics::telemetry(&d).unwrap();
            let mut a = IngestCore::new(HashMap::new(), Some((0, 2)), 64 * 1024);
            let mut b = IngestCore::new(HashMap::new(), Some((1, 2)), 64 * 1024);
            let ra = a.handle(&topic, &batch(&d, 0, 1..=1), 0, &mut sink, &m);
            let rb = b.handle(&topic, &batch(&d, 0, 1..=1), 0, &mut sink, &m);
            assert!(
                (ra == Outcome::ForeignPartition) != (rb == Outcome::ForeignPartition),
                "exactly one owns {d}"
            );
            owned += usize::from(ra != Outcome::ForeignPartition);
        }
        assert!(
            owned > 0 && owned < 20,
            "both partitions get devices: {owned}"
        );
    }

    #[test]
    fn a_failed_commit_keeps_everything_for_the_next_one() {
        let (mut c, mut sink, m) = core();
        c.handle(T, &batch("dev", 0, 1..=5), 0, &mut sink, &m);
        let (flush, acks) = c.take_flush();
        c.restore(flush, acks);
        c.handle(T, &batch("dev", 5, 6..=8), 0, &mut sink, &m);
        let (flush, acks) = c.take_flush();
        assert_eq!(acks, vec![("dev".to_string(), 8)]);
        assert_eq!(flush.devices[0].readings, 8);
    }
}
