//! [`Store`]: the aggregator's durable state in one SQLite file (WAL), and
//! [`StoreReader`], read-only connections to it for the HTTP API.
//!
//! # Design
//!
//! The file holds what must survive a restart: each device's high-water
//! mark (the dedup state behind "nothing doubled"), the device registry,
//! each sensor's last value, recent sequence gaps and the dead letters. The
//! [`Store`] (the only writer) is owned by one thread, the ingest's; nothing
//! here is async. Readers open their own connections ([`Store::reader`]);
//! WAL lets them read while the writer writes, each query seeing the last
//! committed state.
//!
//! ## Invariants
//!
//! 1. **One transaction per [`Flush`].** [`Store::commit`] writes the marks,
//!    device updates, gaps and dead letters of a flush in one `BEGIN
//!    IMMEDIATE` transaction: after a crash either all of it is there or
//!    none. So the registry's counters always agree with the marks (a
//!    reading counted in `readings_total` is at or below the mark).
//! 2. **Marks never go down.** The upsert is `seq = max(seq, new)`; a lower
//!    mark in a flush (a late duplicate, a retried flush) is a no-op.
//! 3. **Durable before the ack.** `commit` returns only after the WAL is
//!    fsynced (`synchronous = FULL`, see "Durability"). The ingest publishes
//!    an ack only for marks whose commit returned `Ok`, because the ack makes
//!    the agent delete the readings for good.
//! 4. **Newest wins, per record.** A status is applied only if its `time_ms`
//!    is at or above the stored `status_time_ms` (a stale retained status
//!    cannot override a newer one); a last value only if its `(time_ms,
//!    seq)` is at or above the stored pair; `last_seen_ms`, `last_seq` and
//!    `last_gap_at_ms` only grow. So re-applying a flush leaves marks,
//!    statuses and last values as they are, but adds its counter deltas,
//!    gaps and dead letters again: the caller commits each flush once (a
//!    failed commit applied nothing, so retrying it is exact).
//! 5. **Bounded.** Gaps: the newest [`MAX_GAPS_PER_DEVICE`] per device. Last
//!    values: at most [`MAX_LAST_VALUES_PER_DEVICE`] sensors per device (the
//!    oldest by time go first). Dead letters: the newest
//!    [`MAX_DEAD_LETTERS`] rows, payload cut to
//!    [`MAX_DEAD_LETTER_PAYLOAD_BYTES`] (the original length is kept), text
//!    fields cut to [`MAX_DEAD_LETTER_TEXT_BYTES`] /
//!    [`MAX_DEAD_LETTER_DETAIL_BYTES`]. So a flood of bad messages costs at
//!    most about 60 MB of file. Devices and marks are not capped: a device
//!    row exists only for a device the ingest accepted (authenticated).
//! 6. **Integers fit SQLite's signed 64 bits.** Sequence numbers above
//!    [`MAX_SEQ`] (`i64::MAX`) make `commit` fail *before* anything is
//!    written ([`StateError::SeqOutOfRange`]), never wrap. Counters and
//!    status numbers saturate at `i64::MAX` instead (an absurd counter in a
//!    status message must not block the marks).
//!
//! ## On-disk schema
//!
//! `application_id` [`APPLICATION_ID`] ("OPAG"), `user_version`
//! [`SCHEMA_VERSION`]; `src/state/schema.sql`:
//!
//! ```sql
#![doc = include_str!("state/schema.sql")]
#![doc = include_str!("state/alerts.sql")]
//! ```
//!
//! Values in `last_values.value` are JSON text (`21.5`, `true`, `"RUN"`),
//! `kind` says what the agent sent (`f32`, `int`, ...); `labels` is a JSON
//! object of strings. All times are Unix milliseconds.
//!
//! ## Durability
//!
//! `journal_mode = WAL`, `synchronous = FULL`: every commit fsyncs the WAL.
//! `NORMAL` would fsync only at checkpoints, so an OS crash or power cut
//! could roll back the last commits, whose acks are already out and whose
//! readings the agents have already deleted. Nothing would be doubled (the
//! agents never resend them) but the rolled-back state is wrong: counters
//! go back, the next batch shows a false gap, and whatever else was
//! persisted from those readings in the same window (alert transitions) is
//! gone with no source left to recompute it. A process crash (SIGKILL, OOM,
//! panic) loses nothing committed in either mode. The price of `FULL` is
//! one fsync per commit; the ingest commits about once per flush interval,
//! not per reading, so it is small (measured: `examples/state_bench.rs`).
//! This is not configurable: without it the "persist before ack" rule of
//! the design does not hold.
//!
//! ## Failure cases
//!
//! - **Unusable file at open** (not an SQLite file, `quick_check` not "ok",
//!   another program's database, a newer schema): [`Store::open`] fails with
//!   a message saying so and leaves the file exactly as it was. Unlike the
//!   agent's buffer it is never moved aside: it holds the dedup marks, and
//!   starting afresh would accept every reading the agents still hold again.
//!   The operator decides (restore a backup, or move it away knowingly).
//!   Nothing is written before the file is known to be ours: the first
//!   statements only read its header, and until then closing the connection
//!   does not checkpoint a `-wal` file into it (nor delete the `-wal`); the
//!   empty `-wal` and the `-shm` that opening created are removed again. A
//!   missing or zero-length file, or an SQLite database without tables and
//!   without an `application_id`, is initialised.
//! - **Commit fails** (disk full, I/O error): the transaction is rolled
//!   back as a whole, nothing is applied, the error is returned; the caller
//!   still holds its [`Flush`], sends no ack for it and retries later.
//! - A stored value that cannot be decoded (only by editing the file) makes
//!   the reader call fail with [`StateError::Decode`]; the writer never
//!   reads rows back except the marks at start.
//! - Two writers on one file are not detected (WAL allows them and the
//!   `max` keeps the marks monotonic, but each process's in-memory dedup
//!   would be wrong). Run one aggregator per state file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};
use tracing::info;

mod reader;

pub use reader::{
    DeadLetterRecord, DeviceDetail, DeviceRecord, GapRecord, LastValueRecord, StoreReader,
    DEAD_LETTER_HEX_BYTES,
};

/// `PRAGMA application_id` of an aggregator state file ("OPAG").
pub const APPLICATION_ID: i32 = 0x4F50_4147;
/// `PRAGMA user_version` of the current schema.
pub const SCHEMA_VERSION: i32 = 2;
/// Oldest schema version [`Store::open`] upgrades (in place, in one
/// transaction: version 1 lacks the alert tables).
pub const OLDEST_UPGRADABLE_VERSION: i32 = 1;
/// Highest storable sequence number (SQLite integers are signed 64-bit).
/// Agents start from Unix µs, far below it.
pub const MAX_SEQ: u64 = i64::MAX as u64;
/// Gap records kept per device (the newest).
pub const MAX_GAPS_PER_DEVICE: usize = 100;
/// Sensors whose last value is kept per device; above it the sensors with
/// the oldest values are forgotten (a source inventing names cannot grow the
/// table without bound).
pub const MAX_LAST_VALUES_PER_DEVICE: usize = 1024;
/// Alert transitions kept in `alert_history` (the newest; older ones go
/// with their notifications once none of those is pending).
pub const MAX_ALERT_HISTORY: usize = 100_000;
/// Dead letters kept (the newest).
pub const MAX_DEAD_LETTERS: usize = 10_000;
/// Bytes of a dead letter's payload that are stored.
pub const MAX_DEAD_LETTER_PAYLOAD_BYTES: usize = 4096;
/// Bytes stored of a dead letter's topic, device and reason (cut at a
/// character boundary).
pub const MAX_DEAD_LETTER_TEXT_BYTES: usize = 256;
/// Bytes stored of a dead letter's detail (cut at a character boundary).
pub const MAX_DEAD_LETTER_DETAIL_BYTES: usize = 1024;
/// How long a statement waits for a lock held by another connection
/// (checkpoints, WAL recovery) before failing with "database is locked".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// WAL pages after which SQLite checkpoints into the main file (SQLite's
/// default; 4 MiB with 4 KiB pages).
pub const WAL_AUTOCHECKPOINT_PAGES: i64 = 1000;
/// Size the WAL file is truncated back to after a checkpoint.
pub const WAL_SIZE_LIMIT_BYTES: i64 = 4 * 1024 * 1024;
/// SQLite page cache of the writer, in KiB.
pub const CACHE_SIZE_KIB: i64 = 4096;

/// The schema, created in one transaction in an empty file.
const SCHEMA: &str = concat!(
    include_str!("state/schema.sql"),
    include_str!("state/alerts.sql")
);
/// What version 2 added (idempotent: `IF NOT EXISTS`).
const SCHEMA_V2: &str = include_str!("state/alerts.sql");

const UPSERT_MARK: &str = "INSERT INTO marks (device, seq) VALUES (?1, ?2)
     ON CONFLICT (device) DO UPDATE SET seq = max(seq, excluded.seq)";
/// Counters are deltas; `min(.., i64::MAX)` saturates (an overflowing
/// integer sum becomes a REAL in SQLite, which `min` replaces).
const UPSERT_DEVICE: &str = "INSERT INTO devices (id, first_seen_ms, last_seen_ms,
         readings_total, batches_total, duplicates_total, gaps_total, gap_readings_total, last_seq)
     VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
     ON CONFLICT (id) DO UPDATE SET
         last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
         readings_total = min(readings_total + excluded.readings_total, 9223372036854775807),
         batches_total = min(batches_total + excluded.batches_total, 9223372036854775807),
         duplicates_total = min(duplicates_total + excluded.duplicates_total, 9223372036854775807),
         gaps_total = min(gaps_total + excluded.gaps_total, 9223372036854775807),
         gap_readings_total = min(gap_readings_total + excluded.gap_readings_total, 9223372036854775807),
         last_seq = coalesce(max(last_seq, excluded.last_seq), last_seq, excluded.last_seq)";
const UPDATE_STATUS: &str = "UPDATE devices SET online = ?2, status_time_ms = ?3,
         agent_version = ?4, labels = ?5, buffer_rows = ?6, dropped_total = ?7
     WHERE id = ?1 AND (status_time_ms IS NULL OR status_time_ms <= ?3)";
const UPSERT_LAST_VALUE: &str =
    "INSERT INTO last_values (device, sensor, time_ms, seq, value, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT (device, sensor) DO UPDATE SET
         time_ms = excluded.time_ms, seq = excluded.seq, value = excluded.value, kind = excluded.kind
     WHERE (excluded.time_ms, excluded.seq) >= (last_values.time_ms, last_values.seq)";
const COUNT_LAST_VALUES: &str = "SELECT count(*) FROM last_values WHERE device = ?1";
const DELETE_OLDEST_LAST_VALUES: &str = "DELETE FROM last_values WHERE device = ?1 AND sensor IN
     (SELECT sensor FROM last_values WHERE device = ?1 ORDER BY time_ms, seq LIMIT ?2)";
const INSERT_GAP: &str =
    "INSERT INTO gaps (device, from_seq, to_seq, detected_ms) VALUES (?1, ?2, ?3, ?4)";
const UPDATE_LAST_GAP: &str = "UPDATE devices
     SET last_gap_at_ms = max(coalesce(last_gap_at_ms, ?2), ?2) WHERE id = ?1";
/// Deletes all but the newest `?2` gaps of device `?1` (nothing when there
/// are no more than that: `id <= NULL` is never true).
const PRUNE_GAPS: &str = "DELETE FROM gaps WHERE device = ?1 AND id <=
     (SELECT id FROM gaps WHERE device = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)";
const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters
         (received_ms, topic, device, reason, detail, payload, payload_len)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const PRUNE_DEAD_LETTERS: &str = "DELETE FROM dead_letters WHERE id <=
     (SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?1)";

const INSERT_ALERT: &str = "INSERT INTO alert_history (fingerprint, number, rule, device, sensor,
         severity, state, event_time_ms, processing_time_ms, committed_ms, body)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
const INSERT_OUTBOX: &str = "INSERT INTO outbox (history_id, sink, fingerprint, repeat, status,
         created_ms, next_attempt_ms)
     VALUES (?1, ?2, ?3, 0, 'pending', ?4, ?4)";
/// The newest firing of an alert that has not resolved since: kept when
/// older than the cut-off (its repeats and its resolve need it).
macro_rules! still_firing {
    ($h:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM alert_history f WHERE f.id = ",
            $h,
            " AND f.state = 'firing' AND NOT EXISTS (SELECT 1 FROM alert_history n
             WHERE n.fingerprint = f.fingerprint AND n.id > f.id AND n.state != 'pending'))"
        )
    };
}
/// Finished notifications of history rows at or below `?1`.
const PRUNE_OUTBOX: &str = concat!(
    "DELETE FROM outbox WHERE status != 'pending' AND history_id <= ?1 AND NOT ",
    still_firing!("outbox.history_id")
);
/// History rows at or below `?1` without notifications left.
const PRUNE_ALERTS: &str = concat!(
    "DELETE FROM alert_history WHERE id <= ?1
     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.history_id = alert_history.id) AND NOT ",
    still_firing!("alert_history.id")
);
/// The sinks that got the newest firing of fingerprint `?1` before row `?2`.
const FIRING_SINKS: &str = "SELECT DISTINCT o.sink FROM outbox o WHERE o.repeat = 0 AND o.history_id =
     (SELECT max(h.id) FROM alert_history h WHERE h.fingerprint = ?1 AND h.id < ?2 AND h.state = 'firing')";

/// Every statement the writer uses, prepared at open to check the schema.
const WRITER_STATEMENTS: &[&str] = &[
    UPSERT_MARK,
    UPSERT_DEVICE,
    UPDATE_STATUS,
    UPSERT_LAST_VALUE,
    COUNT_LAST_VALUES,
    DELETE_OLDEST_LAST_VALUES,
    INSERT_GAP,
    UPDATE_LAST_GAP,
    PRUNE_GAPS,
    INSERT_DEAD_LETTER,
    PRUNE_DEAD_LETTERS,
    INSERT_ALERT,
    INSERT_OUTBOX,
    FIRING_SINKS,
    PRUNE_OUTBOX,
    PRUNE_ALERTS,
    reader::SELECT_DEVICES,
    reader::SELECT_DEVICE,
    reader::SELECT_LAST_VALUES,
    reader::SELECT_GAPS,
    reader::SELECT_DEAD_LETTERS,
    reader::SELECT_DEAD_LETTERS_BY_REASON,
    reader::SELECT_DEAD_LETTER_COUNTS,
];

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state directory could not be created.
    #[error("cannot create state directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file could not be opened or set up (permissions, locked, I/O).
    #[error("cannot open state file {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The file is not a usable aggregator state file. It was not changed.
    #[error(
        "state file {} is unusable: {reason}. It holds the per-device dedup marks, so it was \
         left untouched: restore it from a backup, or move it away to start with an empty \
         state (agents' unacknowledged readings are then accepted again, so readings the \
         aggregator processed but did not ack yet are processed twice)",
        path.display()
    )]
    Unusable { path: PathBuf, reason: String },
    /// A sequence number above [`MAX_SEQ`]; nothing of the flush was written.
    #[error("{what} {value} of device {device:?} is above the largest storable sequence number {MAX_SEQ}")]
    SeqOutOfRange {
        device: String,
        what: &'static str,
        value: u64,
    },
    /// A statement failed (disk full, I/O error, ...). A failed commit was
    /// rolled back as a whole.
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be decoded (the file was edited by hand).
    #[error("state file holds an invalid value: {0}")]
    Decode(String),
}

/// Everything one [`Store::commit`] writes, in one transaction.
#[derive(Debug, Default, Clone)]
pub struct Flush {
    /// `(device, seq)`: upserted, never lowering a stored mark.
    pub marks: Vec<(String, u64)>,
    /// Applied in order (a device may appear more than once).
    pub devices: Vec<DeviceUpdate>,
    pub gaps: Vec<Gap>,
    /// Oldest first; only the newest [`MAX_DEAD_LETTERS`] are kept.
    pub dead_letters: Vec<DeadLetter>,
    /// Opaque state of other stages to store with these marks, by key
    /// (the rule engine's snapshot), so both survive a crash consistently.
    pub kv: Vec<(String, Vec<u8>)>,
    /// Alert transitions to record, in order, each with an outbox row per
    /// sink it is routed to (see [`crate::alerts`]).
    pub alerts: Vec<AlertRecord>,
}

/// An alert transition for `alert_history`, and the sinks that get a
/// notification of it (`outbox` rows, status `pending`).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRecord {
    pub fingerprint: String,
    pub number: u64,
    pub rule: String,
    pub device: String,
    pub sensor: String,
    /// `info`, `warning`, `critical`.
    pub severity: String,
    /// `pending`, `firing`, `resolved`.
    pub state: String,
    pub event_time_ms: i64,
    pub processing_time_ms: i64,
    /// The transition as JSON.
    pub body: String,
    /// Sink names; empty for a transition nobody is notified of.
    pub sinks: Vec<String>,
    /// For a resolve: also notify the sinks that got this alert's firing
    /// (routes may have changed since), except `skip_sinks`.
    pub follow_firing: bool,
    /// Sinks a resolve never goes to (`send-resolved = false`).
    pub skip_sinks: Vec<String>,
}

impl Flush {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
            && self.devices.is_empty()
            && self.gaps.is_empty()
            && self.dead_letters.is_empty()
            && self.kv.is_empty()
            && self.alerts.is_empty()
    }

    /// Fails on the first sequence number above [`MAX_SEQ`].
    pub fn validate(&self) -> Result<(), StateError> {
        let check = |device: &str, what: &'static str, value: u64| {
            if value > MAX_SEQ {
                Err(StateError::SeqOutOfRange {
                    device: device.to_owned(),
                    what,
                    value,
                })
            } else {
                Ok(())
            }
        };
        for (device, seq) in &self.marks {
            check(device, "mark", *seq)?;
        }
        for d in &self.devices {
            if let Some(seq) = d.last_seq {
                check(&d.device, "last_seq", seq)?;
            }
            for v in &d.last_values {
                check(&d.device, "last value seq", v.seq)?;
            }
        }
        for g in &self.gaps {
            check(&g.device, "gap from_seq", g.from_seq)?;
            check(&g.device, "gap to_seq", g.to_seq)?;
        }
        Ok(())
    }
}

/// What happened to one device since the last flush.
#[derive(Debug, Clone, Default)]
pub struct DeviceUpdate {
    pub device: String,
    /// Sets `last_seen_ms` (only forward), and `first_seen_ms` when the
    /// device is new.
    pub seen_ms: i64,
    /// Deltas added to the totals (saturating).
    pub readings: u64,
    pub batches: u64,
    pub duplicates: u64,
    pub gap_readings: u64,
    pub gaps: u64,
    /// Highest sequence number seen; the stored one only grows.
    pub last_seq: Option<u64>,
    /// Upserted per sensor when `(time_ms, seq)` is at or above the stored.
    pub last_values: Vec<LastValue>,
    /// From a status message; applied when not older than the stored one.
    pub status: Option<StatusUpdate>,
}

/// A sensor's latest reading.
#[derive(Debug, Clone)]
pub struct LastValue {
    pub sensor: String,
    pub time_ms: i64,
    pub seq: u64,
    /// Stored as JSON text: `21.5`, `true`, `"RUN"`.
    pub value: serde_json::Value,
    /// What the agent sent: `f32`, `f64`, `int`, `bool`, `str`.
    pub kind: &'static str,
}

/// A device's status message. Applied only if `time_ms` is at or above the
/// stored status time (a stale retained status must not override a newer
/// one). Note: the agent's last will is encoded once at start, so its
/// `time_ms` is older than the agent's later statuses; the ingest should
/// pass the receive time for an offline status, or it would be ignored.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub online: bool,
    pub time_ms: i64,
    pub agent_version: String,
    pub labels: BTreeMap<String, String>,
    pub buffer_rows: u64,
    pub dropped_total: u64,
}

/// Sequence numbers `from_seq..=to_seq` that a device skipped.
#[derive(Debug, Clone)]
pub struct Gap {
    pub device: String,
    pub from_seq: u64,
    pub to_seq: u64,
    pub detected_ms: i64,
}

/// A message the ingest rejected.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub received_ms: i64,
    pub topic: String,
    /// The device named by the topic, when there was one.
    pub device: Option<String>,
    /// Short machine-readable reason (`decode`, `signature`, ...).
    pub reason: String,
    pub detail: String,
    /// Stored up to [`MAX_DEAD_LETTER_PAYLOAD_BYTES`].
    pub payload: Vec<u8>,
}

/// The writer; see the module documentation.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the state file, creating it (and its directory) when missing.
    /// Refuses, without changing it, a file that is not ours or not sound
    /// ([`StateError::Unusable`]). Blocks while `PRAGMA quick_check` reads
    /// the file (bounded by the caps: tens of MB at most).
    pub fn open(path: &Path) -> Result<Store, StateError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StateError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        let open_err = |source| StateError::Open {
            path: path.to_owned(),
            source,
        };
        let sidecars = Sidecars::before_open(path);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Until the file is known to be ours, closing the connection must not
        // checkpoint a `-wal` into it, nor delete that `-wal`.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(open_err)?;
        let found = match inspect(&conn, path) {
            Ok(found) => found,
            Err(e) => {
                drop(conn);
                sidecars.remove_created();
                return Err(e);
            }
        };
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
            .map_err(open_err)?;
        let created = found == Found::Empty;
        match found {
            Found::Empty => init_schema(&conn).map_err(|e| classify(path, e))?,
            Found::Current => {}
            Found::Older(version) => {
                upgrade_schema(&conn).map_err(|e| classify(path, e))?;
                for sql in WRITER_STATEMENTS {
                    if let Err(e) = conn.prepare(sql) {
                        return Err(StateError::Unusable {
                            path: path.to_owned(),
                            reason: format!("schema does not match after the upgrade: {e}"),
                        });
                    }
                }
                info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "state schema upgraded");
            }
        }
        set_pragmas(&conn, path)?;
        let store = Store {
            conn,
            path: path.to_owned(),
        };
        info!(path = %path.display(), created, "state opened");
        Ok(store)
    }

    /// The file this store writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every device's high-water mark.
    pub fn load_marks(&self) -> Result<HashMap<String, u64>, StateError> {
        let mut stmt = self.conn.prepare("SELECT device, seq FROM marks")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, reader::u64_at(r, 1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes everything in `flush` in one transaction and returns once it is
    /// durable (WAL fsynced). On error nothing of it was written.
    pub fn commit(&mut self, flush: &Flush) -> Result<(), StateError> {
        if flush.is_empty() {
            return Ok(());
        }
        flush.validate()?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        write_flush(&tx, flush)?;
        for (key, value) in &flush.kv {
            tx.execute(
                "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                rusqlite::params![key, value],
            )?;
        }
        write_alerts(&tx, &flush.alerts)?;
        tx.commit()?;
        Ok(())
    }

    /// A value stored under `key` with [`Flush::kv`], if any.
    pub fn load_kv(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// A new read-only connection to the same file.
    pub fn reader(&self) -> Result<StoreReader, StateError> {
        StoreReader::open(&self.path)
    }
}

/// The `-wal` and `-shm` files beside a database, and whether they existed
/// before it was opened.
struct Sidecars {
    wal: PathBuf,
    shm: PathBuf,
    had_wal: bool,
    had_shm: bool,
}

impl Sidecars {
    fn before_open(path: &Path) -> Sidecars {
        let with = |suffix: &str| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        let (wal, shm) = (with("-wal"), with("-shm"));
        Sidecars {
            had_wal: wal.exists(),
            had_shm: shm.exists(),
            wal,
            shm,
        }
    }

    /// After a refused open (connection closed): removes the empty `-wal`
    /// and the `-shm` index that opening a WAL-mode file created, so the
    /// directory is as it was. Best effort: they are harmless if left.
    fn remove_created(&self) {
        let empty = std::fs::metadata(&self.wal).is_ok_and(|m| m.len() == 0);
        if !self.had_wal && empty {
            let _ = std::fs::remove_file(&self.wal);
        }
        if !self.had_shm {
            let _ = std::fs::remove_file(&self.shm);
        }
    }
}

/// What [`inspect`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// An empty file: to be initialised.
    Empty,
    /// Ours, current schema.
    Current,
    /// Ours, an older schema this version upgrades.
    Older(i32),
}

/// Checks the file before anything is written.
fn inspect(conn: &Connection, path: &Path) -> Result<Found, StateError> {
    let unusable = |reason: String| StateError::Unusable {
        path: path.to_owned(),
        reason,
    };
    // Reading the header is the first access: a file that is not SQLite
    // fails here ("file is not a database") without being written.
    let (app_id, version, objects) = read_header(conn).map_err(|e| classify(path, e))?;
    if app_id == 0 && version == 0 && objects == 0 {
        return Ok(Found::Empty);
    }
    if app_id != APPLICATION_ID {
        return Err(unusable(format!(
            "not an Outpost aggregator state file (SQLite application_id {app_id:#x}, \
             expected {APPLICATION_ID:#x}, {objects} schema objects)"
        )));
    }
    let upgradable = (OLDEST_UPGRADABLE_VERSION..SCHEMA_VERSION).contains(&version);
    if version != SCHEMA_VERSION && !upgradable {
        return Err(unusable(format!(
            "schema version {version}, this aggregator reads version {SCHEMA_VERSION}"
        )));
    }
    let check = quick_check(conn).map_err(|e| classify(path, e))?;
    if check != ["ok"] {
        return Err(unusable(format!("quick_check: {}", check.join("; "))));
    }
    if upgradable {
        return Ok(Found::Older(version));
    }
    for sql in WRITER_STATEMENTS {
        if let Err(e) = conn.prepare(sql) {
            return Err(unusable(format!("schema does not match: {e}")));
        }
    }
    Ok(Found::Current)
}

/// Brings a file of an older schema to [`SCHEMA_VERSION`] in one
/// transaction (all of it or nothing).
fn upgrade_schema(conn: &Connection) -> Result<(), rusqlite::Error> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(SCHEMA_V2)?;
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))?;
    tx.commit()
}

fn read_header(conn: &Connection) -> Result<(i32, i32, i64), rusqlite::Error> {
    let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let objects: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
    Ok((app_id, version, objects))
}

fn quick_check(conn: &Connection) -> Result<Vec<String>, rusqlite::Error> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Sorts an SQLite error at open into "the file's fault" or not.
fn classify(path: &Path, e: rusqlite::Error) -> StateError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StateError::Unusable {
            path: path.to_owned(),
            reason: e.to_string(),
        },
        _ => StateError::Open {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// Creates the schema and stamps the file, in the default rollback-journal
/// mode (before WAL), so the header of the main file says "ours" from the
/// first commit on.
fn init_schema(conn: &Connection) -> Result<(), rusqlite::Error> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(&format!(
        "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
    ))?;
    tx.execute_batch(SCHEMA)?;
    tx.commit()
}

fn set_pragmas(conn: &Connection, path: &Path) -> Result<(), StateError> {
    let open_err = |source| StateError::Open {
        path: path.to_owned(),
        source,
    };
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StateError::Unusable {
            path: path.to_owned(),
            reason: format!("cannot switch to WAL (journal_mode is {mode})"),
        });
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL;
         PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};
         PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES};
         PRAGMA cache_size = -{CACHE_SIZE_KIB};
         PRAGMA foreign_keys = OFF;"
    ))
    .map_err(open_err)
}

/// Records alert transitions and queues their notifications.
fn write_alerts(tx: &Transaction<'_>, alerts: &[AlertRecord]) -> Result<(), rusqlite::Error> {
    if alerts.is_empty() {
        return Ok(());
    }
    let now = crate::ingest::now_ms();
    let mut insert = tx.prepare(INSERT_ALERT)?;
    let mut queue = tx.prepare(INSERT_OUTBOX)?;
    for a in alerts {
        insert.execute(params![
            a.fingerprint,
            i64::try_from(a.number).unwrap_or(i64::MAX),
            a.rule,
            a.device,
            a.sensor,
            a.severity,
            a.state,
            a.event_time_ms,
            a.processing_time_ms,
            now,
            a.body
        ])?;
        let id = tx.last_insert_rowid();
        let mut sinks: Vec<&str> = a.sinks.iter().map(String::as_str).collect();
        let followed: Vec<String> = if a.follow_firing {
            let mut stmt = tx.prepare(FIRING_SINKS)?;
            let rows = stmt.query_map(params![a.fingerprint, id], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        for f in &followed {
            if !sinks.contains(&f.as_str()) && !a.skip_sinks.contains(f) {
                sinks.push(f);
            }
        }
        for sink in sinks {
            queue.execute(params![id, sink, a.fingerprint, now])?;
        }
    }
    let newest: i64 = tx.query_row("SELECT coalesce(max(id), 0) FROM alert_history", [], |r| {
        r.get(0)
    })?;
    // Ids are consecutive (AUTOINCREMENT; a rolled-back insert leaves a
    // gap, which only keeps a few rows more), so no OFFSET walk is needed.
    let cutoff = newest - MAX_ALERT_HISTORY as i64;
    if cutoff > 0 {
        tx.execute(PRUNE_OUTBOX, [cutoff])?;
        tx.execute(PRUNE_ALERTS, [cutoff])?;
    }
    Ok(())
}

/// The body of [`Store::commit`] (the caller commits or rolls back).
fn write_flush(tx: &Transaction<'_>, flush: &Flush) -> Result<(), rusqlite::Error> {
    {
        let mut upsert = tx.prepare(UPSERT_MARK)?;
        for (device, seq) in &flush.marks {
            upsert.execute(params![device, seq_sql(*seq)])?;
        }
    }
    if !flush.devices.is_empty() {
        let mut upsert = tx.prepare(UPSERT_DEVICE)?;
        let mut status = tx.prepare(UPDATE_STATUS)?;
        let mut value = tx.prepare(UPSERT_LAST_VALUE)?;
        let mut with_values = BTreeSet::new();
        for d in &flush.devices {
            upsert.execute(params![
                d.device,
                d.seen_ms,
                sat(d.readings),
                sat(d.batches),
                sat(d.duplicates),
                sat(d.gaps),
                sat(d.gap_readings),
                d.last_seq.map(seq_sql),
            ])?;
            if let Some(s) = &d.status {
                status.execute(params![
                    d.device,
                    s.online,
                    s.time_ms,
                    s.agent_version,
                    labels_json(&s.labels),
                    sat(s.buffer_rows),
                    sat(s.dropped_total),
                ])?;
            }
            for v in &d.last_values {
                value.execute(params![
                    d.device,
                    v.sensor,
                    v.time_ms,
                    seq_sql(v.seq),
                    v.value.to_string(),
                    v.kind,
                ])?;
            }
            if !d.last_values.is_empty() {
                with_values.insert(d.device.as_str());
            }
        }
        cap_last_values(tx, &with_values)?;
    }
    if !flush.gaps.is_empty() {
        let mut insert = tx.prepare(INSERT_GAP)?;
        let mut last_gap = tx.prepare(UPDATE_LAST_GAP)?;
        let mut devices = BTreeSet::new();
        for g in &flush.gaps {
            insert.execute(params![
                g.device,
                seq_sql(g.from_seq),
                seq_sql(g.to_seq),
                g.detected_ms
            ])?;
            last_gap.execute(params![g.device, g.detected_ms])?;
            devices.insert(g.device.as_str());
        }
        let mut prune = tx.prepare(PRUNE_GAPS)?;
        for device in devices {
            prune.execute(params![device, count_sql(MAX_GAPS_PER_DEVICE)])?;
        }
    }
    if !flush.dead_letters.is_empty() {
        let mut insert = tx.prepare(INSERT_DEAD_LETTER)?;
        // Rows beyond the cap would be deleted by the prune below anyway.
        let skip = flush.dead_letters.len().saturating_sub(MAX_DEAD_LETTERS);
        for d in &flush.dead_letters[skip..] {
            let payload = &d.payload[..d.payload.len().min(MAX_DEAD_LETTER_PAYLOAD_BYTES)];
            insert.execute(params![
                d.received_ms,
                truncate_utf8(&d.topic, MAX_DEAD_LETTER_TEXT_BYTES),
                d.device
                    .as_deref()
                    .map(|s| truncate_utf8(s, MAX_DEAD_LETTER_TEXT_BYTES)),
                truncate_utf8(&d.reason, MAX_DEAD_LETTER_TEXT_BYTES),
                truncate_utf8(&d.detail, MAX_DEAD_LETTER_DETAIL_BYTES),
                payload,
                count_sql(d.payload.len()),
            ])?;
        }
        tx.execute(PRUNE_DEAD_LETTERS, [count_sql(MAX_DEAD_LETTERS)])?;
    }
    Ok(())
}

/// Forgets the sensors with the oldest values of each device above
/// [`MAX_LAST_VALUES_PER_DEVICE`].
fn cap_last_values(tx: &Transaction<'_>, devices: &BTreeSet<&str>) -> Result<(), rusqlite::Error> {
    if devices.is_empty() {
        return Ok(());
    }
    let mut count = tx.prepare(COUNT_LAST_VALUES)?;
    let mut delete = tx.prepare(DELETE_OLDEST_LAST_VALUES)?;
    for device in devices {
        let n: i64 = count.query_row([device], |r| r.get(0))?;
        let excess = usize::try_from(n)
            .unwrap_or(0)
            .saturating_sub(MAX_LAST_VALUES_PER_DEVICE);
        if excess > 0 {
            delete.execute(params![device, count_sql(excess)])?;
        }
    }
    Ok(())
}

/// A JSON object of the labels (infallible, unlike `serde_json::to_string`).
fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
    .to_string()
}

/// A sequence number checked by [`Flush::validate`].
fn seq_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A counter or status number, saturating at `i64::MAX`.
fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn count_sql(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The longest prefix of `s` of at most `max` bytes that ends at a
/// character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
