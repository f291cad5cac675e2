//! [`StoreReader`]: a read-only connection for the HTTP API.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};
use serde::Serialize;

use super::{StateError, APPLICATION_ID, BUSY_TIMEOUT, MAX_DEAD_LETTERS};

/// Bytes of a dead letter's payload shown in [`DeadLetterRecord::payload_hex`]
/// (the whole stored payload is available from
/// [`StoreReader::dead_letter_payload`]).
pub const DEAD_LETTER_HEX_BYTES: usize = 64;

/// The columns of a [`DeviceRecord`], in [`device_record`]'s order.
macro_rules! select_device_columns {
    () => {
        "SELECT d.id, d.online, d.first_seen_ms, d.last_seen_ms, d.status_time_ms,
             d.agent_version, d.labels, d.buffer_rows, d.dropped_total, d.readings_total,
             d.batches_total, d.duplicates_total, d.gaps_total, d.gap_readings_total,
             d.last_gap_at_ms, d.last_seq, m.seq
         FROM devices d LEFT JOIN marks m ON m.device = d.id"
    };
}

pub(super) const SELECT_DEVICES: &str = concat!(select_device_columns!(), " ORDER BY d.id");
pub(super) const SELECT_DEVICE: &str = concat!(select_device_columns!(), " WHERE d.id = ?1");
pub(super) const SELECT_LAST_VALUES: &str = "SELECT sensor, time_ms, seq, value, kind
     FROM last_values WHERE device = ?1 ORDER BY sensor";
pub(super) const SELECT_GAPS: &str = "SELECT from_seq, to_seq, detected_ms
     FROM gaps WHERE device = ?1 ORDER BY id DESC";
macro_rules! select_dead_letter_columns {
    () => {
        "SELECT id, received_ms, topic, device, reason, detail, substr(payload, 1, ?2), payload_len
         FROM dead_letters"
    };
}
pub(super) const SELECT_DEAD_LETTERS: &str =
    concat!(select_dead_letter_columns!(), " ORDER BY id DESC LIMIT ?1");
pub(super) const SELECT_DEAD_LETTERS_BY_REASON: &str = concat!(
    select_dead_letter_columns!(),
    " WHERE reason = ?3 ORDER BY id DESC LIMIT ?1"
);
pub(super) const SELECT_DEAD_LETTER_COUNTS: &str =
    "SELECT reason, count(*) FROM dead_letters GROUP BY reason";
const SELECT_DEAD_LETTER_PAYLOAD: &str = "SELECT payload FROM dead_letters WHERE id = ?1";

/// A device in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRecord {
    pub id: String,
    /// From the newest status message (false until there is one).
    pub online: bool,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// `time_ms` of the status message applied last.
    pub status_time_ms: Option<i64>,
    pub agent_version: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Readings waiting in the agent's buffer, per its last status.
    pub buffer_rows: u64,
    /// Readings the agent's buffer dropped, per its last status.
    pub dropped_total: u64,
    pub readings_total: u64,
    pub batches_total: u64,
    pub duplicates_total: u64,
    pub gaps_total: u64,
    pub gap_readings_total: u64,
    /// `detected_ms` of the newest gap.
    pub last_gap_at_ms: Option<i64>,
    /// Highest sequence number the ingest reported for the device.
    pub last_seq: Option<u64>,
    /// The durable high-water mark (what acks cover).
    pub mark: Option<u64>,
}

/// A device with its last values and recent gaps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: DeviceRecord,
    /// By sensor name.
    pub last_values: Vec<LastValueRecord>,
    /// Newest first, at most [`super::MAX_GAPS_PER_DEVICE`].
    pub recent_gaps: Vec<GapRecord>,
}

/// A sensor's last value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastValueRecord {
    pub sensor: String,
    pub time_ms: i64,
    pub seq: u64,
    pub value: serde_json::Value,
    /// `f32`, `f64`, `int`, `bool`, `str`.
    pub kind: String,
}

/// A recorded gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapRecord {
    pub from_seq: u64,
    pub to_seq: u64,
    pub detected_ms: i64,
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterRecord {
    pub id: i64,
    pub received_ms: i64,
    pub topic: String,
    pub device: Option<String>,
    pub reason: String,
    pub detail: String,
    /// The first [`DEAD_LETTER_HEX_BYTES`] bytes of the payload, lowercase hex.
    pub payload_hex: String,
    /// The payload's original length (only the first
    /// [`super::MAX_DEAD_LETTER_PAYLOAD_BYTES`] are stored).
    pub payload_len: u64,
}

/// A read-only connection to the state file. `Send`, not `Sync`: share it
/// behind a `Mutex`, or open one per request. Each call sees the state as
/// of the last commit when it started (one read transaction per call).
pub struct StoreReader {
    conn: Connection,
    path: PathBuf,
}

impl fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StoreReader {
    /// Opens `path` read-only. The file must be an existing state file in
    /// WAL mode; use [`super::Store::reader`] while the writer is open.
    pub fn open(path: &Path) -> Result<StoreReader, StateError> {
        let open_err = |source| StateError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let app_id: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| super::classify(path, e))?;
        if app_id != APPLICATION_ID {
            return Err(StateError::Unusable {
                path: path.to_owned(),
                reason: format!(
                    "not an Outpost aggregator state file (application_id {app_id:#x})"
                ),
            });
        }
        Ok(StoreReader {
            conn,
            path: path.to_owned(),
        })
    }

    /// Every device, ordered by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StateError> {
        let mut stmt = self.conn.prepare(SELECT_DEVICES)?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(device_record(row)?);
        }
        Ok(out)
    }

    /// One device with its last values and recent gaps, from one snapshot.
    pub fn device(&self, id: &str) -> Result<Option<DeviceDetail>, StateError> {
        let tx = self.conn.unchecked_transaction()?;
        let device = {
            let mut stmt = tx.prepare(SELECT_DEVICE)?;
            let mut rows = stmt.query([id])?;
            match rows.next()? {
                Some(row) => device_record(row)?,
                None => return Ok(None),
            }
        };
        let last_values = {
            let mut stmt = tx.prepare(SELECT_LAST_VALUES)?;
            let mut rows = stmt.query([id])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let text: String = r.get(3)?;
                let value = serde_json::from_str(&text).map_err(|e| {
                    StateError::Decode(format!("last value of {id}: {e}: {text:?}"))
                })?;
                out.push(LastValueRecord {
                    sensor: r.get(0)?,
                    time_ms: r.get(1)?,
                    seq: u64_at(r, 2)?,
                    value,
                    kind: r.get(4)?,
                });
            }
            out
        };
        let recent_gaps = {
            let mut stmt = tx.prepare(SELECT_GAPS)?;
            let rows = stmt.query_map([id], |r| {
                Ok(GapRecord {
                    from_seq: u64_at(r, 0)?,
                    to_seq: u64_at(r, 1)?,
                    detected_ms: r.get(2)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.commit()?;
        Ok(Some(DeviceDetail {
            device,
            last_values,
            recent_gaps,
        }))
    }

    /// The newest `limit` dead letters (at most [`MAX_DEAD_LETTERS`]), newest
    /// first, optionally only those with `reason`.
    pub fn dead_letters(
        &self,
        limit: usize,
        reason: Option<&str>,
    ) -> Result<Vec<DeadLetterRecord>, StateError> {
        let limit = i64::try_from(limit.min(MAX_DEAD_LETTERS)).unwrap_or(0);
        let hex_bytes = i64::try_from(DEAD_LETTER_HEX_BYTES).unwrap_or(0);
        let map = |r: &Row<'_>| {
            // substr() of an empty blob is NULL.
            let payload: Option<Vec<u8>> = r.get(6)?;
            Ok(DeadLetterRecord {
                id: r.get(0)?,
                received_ms: r.get(1)?,
                topic: r.get(2)?,
                device: r.get(3)?,
                reason: r.get(4)?,
                detail: r.get(5)?,
                payload_hex: hex(payload.as_deref().unwrap_or_default()),
                payload_len: u64_at(r, 7)?,
            })
        };
        let out = match reason {
            Some(reason) => {
                let mut stmt = self.conn.prepare(SELECT_DEAD_LETTERS_BY_REASON)?;
                let rows = stmt.query_map(rusqlite::params![limit, hex_bytes, reason], map)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
            None => {
                let mut stmt = self.conn.prepare(SELECT_DEAD_LETTERS)?;
                let rows = stmt.query_map(rusqlite::params![limit, hex_bytes], map)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(out)
    }

    /// The stored payload of dead letter `id` (at most
    /// [`super::MAX_DEAD_LETTER_PAYLOAD_BYTES`]), if it is still kept.
    pub fn dead_letter_payload(&self, id: i64) -> Result<Option<Vec<u8>>, StateError> {
        let payload: Option<Option<Vec<u8>>> = self
            .conn
            .query_row(SELECT_DEAD_LETTER_PAYLOAD, [id], |r| r.get(0))
            .optional()?;
        Ok(payload.map(Option::unwrap_or_default))
    }

    /// Dead letters kept, by reason.
    pub fn dead_letter_counts(&self) -> Result<BTreeMap<String, u64>, StateError> {
        let mut stmt = self.conn.prepare(SELECT_DEAD_LETTER_COUNTS)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, u64_at(r, 1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A row of [`SELECT_DEVICES`] / [`SELECT_DEVICE`].
fn device_record(r: &Row<'_>) -> Result<DeviceRecord, StateError> {
    let id: String = r.get(0)?;
    let labels: String = r.get(6)?;
    let labels = serde_json::from_str(&labels)
        .map_err(|e| StateError::Decode(format!("labels of {id}: {e}: {labels:?}")))?;
    Ok(DeviceRecord {
        online: r.get(1)?,
        first_seen_ms: r.get(2)?,
        last_seen_ms: r.get(3)?,
        status_time_ms: r.get(4)?,
        agent_version: r.get(5)?,
        labels,
        buffer_rows: u64_at(r, 7)?,
        dropped_total: u64_at(r, 8)?,
        readings_total: u64_at(r, 9)?,
        batches_total: u64_at(r, 10)?,
        duplicates_total: u64_at(r, 11)?,
        gaps_total: u64_at(r, 12)?,
        gap_readings_total: u64_at(r, 13)?,
        last_gap_at_ms: r.get(14)?,
        last_seq: opt_u64_at(r, 15)?,
        mark: opt_u64_at(r, 16)?,
        id,
    })
}

/// Column `i` as a `u64` (an error if negative: the schema never stores one).
pub(super) fn u64_at(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(i)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
}

/// Column `i` as an optional `u64`.
fn opt_u64_at(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = r.get(i)?;
    v.map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v)))
        .transpose()
}

/// Lowercase hex of `bytes`.
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}
