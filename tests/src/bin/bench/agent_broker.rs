//! The far end of the agent benchmarks: the aggregator's own embedded broker
//! (`outpost_aggregator::ingest::broker`, rumqttd in process, the agent
//! connects over TCP) with an ack responder on its local link instead of
//! ingest. Every telemetry batch is decoded and answered at once with a
//! cumulative, retained `Ack` on `outpost/v1/{device}/ack` carrying the
//! highest sequence number seen for the device: what the aggregator sends
//! once it has processed a batch, without its dedup store and rules.
//!
//! Every sequence number that arrives is recorded in a bit set per device,
//! so a run can prove that nothing was lost (no gap between the lowest and
//! the highest number) and count what arrived twice (resends).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outpost_aggregator::ingest::broker::{self, BrokerConfig, BrokerHandle, EmbeddedConfig};
use outpost_proto::batch;
use outpost_proto::pb::Ack;
use outpost_proto::topics::{self, DeviceTopic};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// Sequence numbers kept in the dense bit set above the first one seen
/// (8 MiB of bits); anything further away goes to an ordered set.
const DENSE_SPAN: u64 = 64 * 1024 * 1024;
/// Attempts at binding a free port for the broker.
const BIND_ATTEMPTS: usize = 5;

/// A set of `u64` sequence numbers: a bit per number from the first one
/// inserted, an ordered set for the (unexpected) rest.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    base: Option<u64>,
    bits: Vec<u64>,
    sparse: BTreeSet<u64>,
    len: u64,
}

impl SeqSet {
    /// Adds `seq`; true when it was not there yet.
    pub fn insert(&mut self, seq: u64) -> bool {
        let base = *self.base.get_or_insert(seq);
        let new = match seq.checked_sub(base).filter(|d| *d < DENSE_SPAN) {
            Some(d) => {
                let (word, bit) = ((d / 64) as usize, d % 64);
                if word >= self.bits.len() {
                    self.bits.resize(word + 1, 0);
                }
                let was = self.bits[word] & (1 << bit) != 0;
                self.bits[word] |= 1 << bit;
                !was
            }
            None => self.sparse.insert(seq),
        };
        self.len += u64::from(new);
        new
    }

    /// Distinct numbers held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Lowest and highest number held.
    pub fn range(&self) -> Option<(u64, u64)> {
        let base = self.base?;
        let dense_hi = self
            .bits
            .iter()
            .rposition(|w| *w != 0)
            .map(|i| base + i as u64 * 64 + 63 - u64::from(self.bits[i].leading_zeros()));
        let lo = self.sparse.first().map_or(base, |s| (*s).min(base));
        let hi = dense_hi
            .into_iter()
            .chain(self.sparse.last().copied())
            .max()
            .unwrap_or(base);
        Some((lo, hi))
    }

    /// Numbers missing between the lowest and the highest held.
    pub fn gaps(&self) -> u64 {
        self.range().map_or(0, |(lo, hi)| (hi - lo + 1) - self.len)
    }
}

/// What the responder saw from one device.
#[derive(Debug, Clone, Default)]
pub struct DeviceLog {
    /// Telemetry batches received.
    pub batches: u64,
    /// Readings received, resends included.
    pub readings: u64,
    /// Readings whose sequence number had arrived before.
    pub duplicates: u64,
    /// Lowest sequence number seen.
    pub min_seq: Option<u64>,
    /// Highest sequence number seen (= the last ack sent).
    pub max_seq: u64,
    /// Acks that could not be queued (the outbound queue was full; the
    /// next ack supersedes them).
    pub acks_not_sent: u64,
    /// When the first and the latest batch arrived.
    pub first_batch: Option<Instant>,
    /// See `first_batch`.
    pub last_batch: Option<Instant>,
    /// Batches that did not decode.
    pub bad_batches: u64,
    /// Every distinct sequence number.
    pub seqs: SeqSet,
}

impl DeviceLog {
    /// Distinct sequence numbers received.
    pub fn distinct(&self) -> u64 {
        self.seqs.len()
    }

    /// Numbers missing between the lowest and the highest seen.
    pub fn gaps(&self) -> u64 {
        self.seqs.gaps()
    }
}

/// The embedded broker and its ack responder, on a runtime of their own.
/// Stopped when dropped (rumqttd's router thread stays idle until the
/// process exits: it has no shutdown API).
pub struct AckBroker {
    /// MQTT port on 127.0.0.1.
    pub port: u16,
    log: Arc<Mutex<HashMap<String, DeviceLog>>>,
    cancel: CancellationToken,
    handle: Option<BrokerHandle>,
    task: Option<tokio::task::JoinHandle<BrokerHandle>>,
    rt: tokio::runtime::Runtime,
}

impl AckBroker {
    /// Starts the broker on a free loopback port and the responder.
    pub fn start() -> anyhow::Result<AckBroker> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-responder")
            .enable_all()
            .build()
            .context("cannot build the responder runtime")?;
        let mut last_err = None;
        for _ in 0..BIND_ATTEMPTS {
            let port = outpost_tests::free_port();
            let cfg = BrokerConfig::Embedded(EmbeddedConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], port)),
                ..EmbeddedConfig::default()
            });
            match rt.block_on(broker::start(&cfg)) {
                Ok(handle) => {
                    let mut b = AckBroker {
                        port,
                        log: Arc::default(),
                        cancel: CancellationToken::new(),
                        handle: None,
                        task: None,
                        rt,
                    };
                    let task = b.rt.spawn(respond(handle, b.log.clone(), b.cancel.clone()));
                    b.task = Some(task);
                    return Ok(b);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(anyhow::anyhow!(
            "cannot start the embedded broker: {:#}",
            last_err.map_or_else(String::new, |e| e.to_string())
        ))
    }

    /// A copy of what `device` sent so far (an empty log if nothing).
    pub fn device(&self, device: &str) -> DeviceLog {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .cloned()
            .unwrap_or_default()
    }

    /// Forgets `device` (its bit set can be large).
    pub fn forget(&self, device: &str) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(device);
    }
}

impl Drop for AckBroker {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            if let Ok(Ok(h)) = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await })
            {
                self.handle = Some(h);
            }
        }
        if let Some(h) = self.handle.take() {
            self.rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
            });
        }
    }
}

/// The responder: decode each telemetry batch, record its sequence numbers,
/// ack the highest seen (retained, like the aggregator). Returns the handle
/// for a clean shutdown.
async fn respond(
    mut handle: BrokerHandle,
    log: Arc<Mutex<HashMap<String, DeviceLog>>>,
    cancel: CancellationToken,
) -> BrokerHandle {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = handle.inbound.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let Ok((device, DeviceTopic::Telemetry)) = topics::parse_device_topic(&msg.topic) else {
            continue; // status messages
        };
        let now = Instant::now();
        let ack_seq = {
            let mut map = log.lock().unwrap_or_else(|p| p.into_inner());
            let d = map.entry(device.to_owned()).or_default();
            d.first_batch.get_or_insert(now);
            d.last_batch = Some(now);
            let decoded = batch::decode(&msg.payload)
                .and_then(|b| batch::readings(&b).map(|rs| rs.map(|r| r.seq).collect::<Vec<_>>()));
            match decoded {
                Ok(seqs) => {
                    d.batches += 1;
                    for seq in seqs {
                        d.readings += 1;
                        if !d.seqs.insert(seq) {
                            d.duplicates += 1;
                        }
                        d.min_seq = Some(d.min_seq.map_or(seq, |m| m.min(seq)));
                        d.max_seq = d.max_seq.max(seq);
                    }
                    d.max_seq
                }
                Err(_) => {
                    d.bad_batches += 1;
                    continue;
                }
            }
        };
        let ack = Ack {
            device_id: device.to_owned(),
            seq: ack_seq,
            time_ms: outpost_agent::reading::now_ms(),
        };
        let topic = topics::ack(device).unwrap_or_default();
        if handle
            .outbound
            .publish(topic, ack.encode_to_vec(), true)
            .is_err()
        {
            let mut map = log.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(device.to_owned()).or_default().acks_not_sent += 1;
        }
    }
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_set_counts_distinct_numbers_and_gaps() {
        let mut s = SeqSet::default();
        let base = 1_800_000_000_000_000;
        for d in [0u64, 1, 2, 5, 2, 100, DENSE_SPAN + 7] {
            s.insert(base + d);
        }
        assert_eq!(s.len(), 6);
        assert_eq!(s.range(), Some((base, base + DENSE_SPAN + 7)));
        assert_eq!(s.gaps(), DENSE_SPAN + 8 - 6);
        assert!(!s.insert(base + DENSE_SPAN + 7));
        assert!(s.insert(base - 1));
        assert_eq!(s.range(), Some((base - 1, base + DENSE_SPAN + 7)));
        let mut t = SeqSet::default();
        for seq in (10..=20).filter(|s| *s != 13) {
            t.insert(seq);
        }
        assert_eq!((t.range(), t.gaps()), (Some((10, 20)), 1));
    }
}
