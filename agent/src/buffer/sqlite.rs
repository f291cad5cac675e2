//! [`SqliteBuffer`]: the synchronous core of the durable buffer.
//!
//! # Design
//!
//! One SQLite file holds every reading from the moment a source produced it
//! until the aggregator acknowledges it. The core is owned by exactly one
//! thread (see [`super::Buffer`]); nothing here is shared or async.
//!
//! ## Invariants
//!
//! 1. **Committed before published.** [`SqliteBuffer::read_after`] returns
//!    only committed rows. Appended readings are held in memory (`pending`)
//!    and written by the next [`SqliteBuffer::commit`], in one transaction
//!    together with the acknowledgements and evictions since the last commit
//!    (and the `meta` counters when they changed). A failed commit (disk full, I/O error) is
//!    rolled back *as a whole*; `pending` is untouched, so the retry writes
//!    the same readings with the same sequence numbers. (Inserting at append
//!    time inside a long-open transaction would need this in-memory copy
//!    anyway, to survive the rollback, so rows are only written at commit.)
//! 2. **Sequence numbers only grow**, per device, across restarts and across
//!    a lost or corrupt file, and **continue without a gap after a process
//!    crash** (SIGKILL, OOM, panic), so the aggregator sees a gap only where
//!    readings were really dropped. A new file starts `next_seq` at the
//!    current Unix time in microseconds. Every commit that assigned sequence
//!    numbers stores the exact `meta.next_seq` (one extra page per commit,
//!    about one per second at steady state). An open continues at
//!    `max(meta.next_seq, highest stored seq + 1, acked_seq + 1)`.
//!    Why the clock, and when: the aggregator drops anything at or below its
//!    high-water mark for the device, so a new file restarting from 1 would
//!    get fresh readings silently dropped as duplicates. And with
//!    `durability = normal` an OS crash or power cut can roll back commits
//!    whose readings were already published; continuing from the rolled-back
//!    value would reuse sequence numbers the aggregator has seen. A process
//!    crash cannot roll anything back (the kernel still has every write), a
//!    power cut or OS crash always means a reboot: so the open also takes the
//!    clock in µs into the maximum when the kernel's boot id differs from
//!    the one stored at the previous open and durability is not `full`. One
//!    reading per µs is far above any gateway's rate, so the clock stays
//!    ahead of the counter. Caveat: a gateway whose clock is far in the
//!    *past* at that moment starts below the aggregator's mark; the
//!    aggregator then acks a seq above anything this buffer committed, and
//!    [`SqliteBuffer::ack`] moves `next_seq` past it (WARN) and renumbers
//!    the uncommitted readings, so only the committed readings in flight at
//!    that moment are lost. Seqs assigned to readings that were never
//!    committed (a crash before the commit) are assigned again: they were
//!    never published, so nobody has seen them.
//! 3. **Rows are deleted only by an ack or by the overflow policy**, always
//!    oldest first; the number dropped is counted in `dropped_total`, which is
//!    persisted with the commit that drops them. An ack's deletions are
//!    committed with the next commit; `meta.acked_seq` itself is written
//!    only with other `meta` changes and at close, so after a crash
//!    [`SqliteBuffer::stats`] may report an older acked seq until the next
//!    ack (it is statistics: the deleted rows stay deleted).
//! 4. **Bounded.** Memory: at most [`MAX_PENDING`] uncommitted readings (an
//!    append that finds `pending` full commits early; if that commit fails,
//!    the overflow policy applies to the in-memory readings: drop-oldest drops
//!    the oldest *uncommitted* reading, drop-newest refuses the new one).
//!    Disk: see "Size accounting".
//!
//! ## On-disk schema (`application_id` [`APPLICATION_ID`], `user_version`
//! [`SCHEMA_VERSION`])
//!
//! ```sql
//! CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT, WITHOUT ROWID;
//!   -- next_seq (reservation), dropped_total, acked_seq, created_at (Unix s)
//! CREATE TABLE sensors (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE) STRICT;
//! CREATE TABLE readings (
//!   seq INTEGER PRIMARY KEY,              -- the rowid: no extra index
//!   time_ms INTEGER NOT NULL,             -- Unix ms
//!   sensor INTEGER NOT NULL REFERENCES sensors(id),  -- not enforced
//!   kind INTEGER NOT NULL,                -- 0 f32, 1 f64, 2 int, 3 bool, 4 str
//!   value ANY,                            -- see below
//!   quality INTEGER NOT NULL              -- outpost.v1.Quality
//! ) STRICT;
//! ```
//!
//! Values are stored exactly, NaN payloads and -0.0 included (SQLite turns a
//! NaN REAL into NULL): f32 as the integer of its bits (4 bytes on disk), f64
//! as the integer of its bits (8 bytes), ints as integers, bools as 0/1 (0
//! bytes: SQLite has serial types for the constants 0 and 1), strings as
//! TEXT. A typical f32 row costs about 29.5 bytes of file, a mix of every
//! kind about 30 (measured, see `docs/agent.md`, Buffer). Sensor names live once in `sensors`; names no
//! longer referenced are pruned when the table reaches [`SENSOR_PRUNE_AT`]
//! names (sources that invent names cannot grow it without bound).
//!
//! ## Pragmas
//!
//! - `locking_mode = EXCLUSIVE` before WAL: a second agent on the same file
//!   fails at open with [`BufferError::Locked`] instead of interleaving
//!   sequence numbers; no `-shm` file is mapped.
//! - `journal_mode = WAL`, `wal_autocheckpoint` [`WAL_AUTOCHECKPOINT_PAGES`],
//!   `journal_size_limit` [`WAL_SIZE_LIMIT_BYTES`] (the WAL file is truncated
//!   back to this after a checkpoint).
//! - `synchronous` per [`Durability`]:
//!   - `full`: the WAL is fsynced at every commit. A power cut loses only
//!     readings not yet committed (at most one commit interval).
//!   - `normal` (default): the WAL is fsynced only at checkpoints. A power
//!     cut never corrupts the file but can roll back every commit since the
//!     last checkpoint that the kernel had not yet written back: typically
//!     the last ~30 s (Linux `vm.dirty_expire_centisecs`), at most
//!     [`WAL_AUTOCHECKPOINT_PAGES`] pages of WAL. Acks rolled back this way
//!     only cause resends (the aggregator drops duplicates); rolled back
//!     readings that were already published reached the aggregator, those
//!     that were not are lost; their sequence numbers are not reused (see
//!     invariant 2).
//!   - `off`: no fsync at all. A process crash loses nothing committed, but
//!     a power cut or kernel crash may corrupt the file, which the next start
//!     then moves aside (everything buffered is lost). For tests and RAM
//!     disks only.
//! - `auto_vacuum = INCREMENTAL`, set before the tables are created.
//!   Deleted pages go to the freelist and are reused first, so at steady
//!   state the file neither grows nor shrinks; after a backlog drains (free
//!   pages above [`VACUUM_MIN_FREE_BYTES`] and above the bytes in use) each
//!   commit gives back up to [`VACUUM_STEP_PAGES`] pages to the filesystem
//!   (gateways share the SD card with logs). The price is a pointer-map page
//!   per ~800 pages and a few extra page writes per commit; a full `VACUUM`
//!   (rewrites the whole file, needs twice the space) is never run.
//!
//! ## Size accounting
//!
//! `bytes` = `(page_count - freelist_count) * page_size`: pages in use,
//! measured exactly and cheaply (two pragmas read page 1) inside the commit's
//! transaction. It counts b-tree overhead and the few pages of `meta` and
//! `sensors`, so it is what the rows really cost. With `drop-oldest` the
//! commit checks it while inserting (every time the estimate
//! [`ROW_BYTES_ESTIMATE`] + string length of the rows inserted since the last
//! measurement would pass `max_bytes`) and deletes the oldest rows in chunks
//! (what is needed plus [`EVICT_HEADROOM_PERCENT`] of the limit, so a full
//! buffer does not evict on every commit), so the file never holds much more
//! than `max_bytes` of live pages plus one chunk. With `drop-newest` readings
//! are refused at append time from the last measurement plus the estimate of
//! pending readings; the estimate can overshoot the limit by its error on at
//! most one commit's readings, after which appends are refused until acks
//! free space. `max_rows` is exact: the row count is kept in memory
//! (counted once at open, in the same pass over the file as `quick_check`).
//!
//! ## Flash wear
//!
//! A steady-state commit (a few readings in, the previous ones acked out)
//! writes one 4 KiB page to the WAL (plus its 24-byte frame header), checked
//! by a test: the `meta` page is only written when a counter has to change.
//! The checkpoint writes each distinct page once more into the main file.
//!
//! ## Failure cases
//!
//! - Unusable file at open (not a database, `PRAGMA quick_check` not "ok",
//!   wrong `application_id`/schema, I/O error): the file and its `-wal`,
//!   `-shm` are renamed to `<path>.corrupt-<unix-secs>[.N]` (plus the same
//!   suffixes, so `sqlite3` can still open the set), logged at ERROR, and a
//!   fresh file is created ([`OpenReport::moved_aside`]). A file locked by
//!   another process, a read-only or full disk, or a missing permission is
//!   *not* moved aside: open fails, nothing is touched.
//!   `quick_check` reads the whole file once per start (about 0.1 s per
//!   million rows, 29 MB, on a fast disk; an SD card reading 20 MB/s needs
//!   about 1.5 s per million rows).
//! - Commit fails (`SQLITE_FULL`, I/O error): the transaction is rolled
//!   back, nothing committed is lost, `pending` and the acks are kept and the
//!   caller retries later; logged at WARN (rate limited), INFO on recovery.
//! - A committed row that cannot be decoded (cannot happen short of bit rot
//!   that `quick_check` missed) is skipped by `read_after` and logged at
//!   ERROR, so one bad row cannot stall the publisher.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, ToSql};
use tracing::{debug, error, info, warn};

use super::{
    AppendOutcome, BufferConfig, BufferError, BufferStats, Durability, OpenReport, OverflowPolicy,
    MAX_PENDING,
};
use crate::reading::{Quality, Reading, StoredReading, Value};

/// `PRAGMA application_id` of a buffer file ("OPBF").
pub const APPLICATION_ID: i32 = 0x4F50_4246;
/// `PRAGMA user_version` of the current schema.
pub const SCHEMA_VERSION: i32 = 1;
/// Estimated bytes of file per row, before its string value (measured: about
/// 29.5 for an f32 reading; kept conservative).
pub const ROW_BYTES_ESTIMATE: u64 = 40;
/// Extra room an eviction makes beyond what is needed, in percent of the
/// limit (at least one row), so a full buffer evicts in chunks.
pub const EVICT_HEADROOM_PERCENT: u64 = 1;
/// WAL pages after which SQLite checkpoints into the main file (SQLite's
/// default; 4 MiB with 4 KiB pages).
pub const WAL_AUTOCHECKPOINT_PAGES: i64 = 1000;
/// Size the WAL file is truncated back to after a checkpoint.
pub const WAL_SIZE_LIMIT_BYTES: i64 = 4 * 1024 * 1024;
/// SQLite page cache, in KiB.
pub const CACHE_SIZE_KIB: i64 = 2048;
/// Free pages (in bytes) above which commits give space back to the
/// filesystem, provided there are also more free than used bytes.
pub const VACUUM_MIN_FREE_BYTES: u64 = 4 * 1024 * 1024;
/// Most pages one commit gives back (bounds the commit's extra latency).
pub const VACUUM_STEP_PAGES: u64 = 1024;
/// Number of sensor names at which names without rows are pruned (after a
/// prune the threshold becomes twice the names left, at least this).
pub const SENSOR_PRUNE_AT: u64 = 10_000;
/// Highest sequence number (SQLite rowids are signed 64-bit).
pub const MAX_SEQ: u64 = i64::MAX as u64;
/// Minimum time between two ERROR logs about dropped readings.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Value kinds as stored in `readings.kind`.
mod kind {
    pub const F32: i64 = 0;
    pub const F64: i64 = 1;
    pub const INT: i64 = 2;
    pub const BOOL: i64 = 3;
    pub const STR: i64 = 4;
}

/// Keys of the `meta` table.
mod key {
    pub const NEXT_SEQ: &str = "next_seq";
    pub const DROPPED_TOTAL: &str = "dropped_total";
    pub const ACKED_SEQ: &str = "acked_seq";
    pub const CREATED_AT: &str = "created_at";
    /// Hash of the kernel boot id at the last open (see the design comment).
    pub const BOOT: &str = "boot";
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT, WITHOUT ROWID;
CREATE TABLE sensors (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE) STRICT;
CREATE TABLE readings (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    sensor INTEGER NOT NULL REFERENCES sensors(id),
    kind INTEGER NOT NULL,
    value ANY,
    quality INTEGER NOT NULL
) STRICT;
";

const INSERT_READING: &str =
    "INSERT INTO readings (seq, time_ms, sensor, kind, value, quality) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const SELECT_AFTER: &str = "SELECT r.seq, r.time_ms, s.name, r.kind, r.value, r.quality
     FROM readings r LEFT JOIN sensors s ON s.id = r.sensor
     WHERE r.seq > ?1 AND r.seq <= ?2 ORDER BY r.seq LIMIT ?3";
const DELETE_OLDEST: &str =
    "DELETE FROM readings WHERE seq IN (SELECT seq FROM readings ORDER BY seq LIMIT ?1)";
const UPSERT_META: &str =
    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// The buffer's synchronous core; see the module documentation.
pub struct SqliteBuffer {
    conn: Connection,
    path: PathBuf,
    max_bytes: u64,
    max_rows: Option<u64>,
    overflow: OverflowPolicy,
    page_size: u64,

    /// Next sequence number to assign (in memory; persisted by commits).
    next_seq: u64,
    /// Every seq up to this one is committed (or was dropped/acked).
    last_committed_seq: u64,
    /// Rows in the table as of the last commit.
    committed_rows: u64,
    /// Bytes in use as of the last commit (see "Size accounting").
    used_bytes: u64,
    /// Dropped readings, including in-memory drops not yet committed.
    dropped_total: u64,
    /// Highest acked seq (in memory).
    acked_seq: u64,
    /// Highest acked seq whose deletion is committed.
    durable_acked_seq: u64,
    /// Committed rows at or below `acked_seq` still in the table.
    acked_uncommitted_rows: u64,
    /// Commits since open.
    commits_total: u64,
    /// Appended, not yet committed (ascending seq).
    pending: VecDeque<StoredReading>,
    /// Sum of [`estimate_row_bytes`] over `pending`.
    pending_bytes: u64,
    /// Counters changed without rows to write (drops, acks, seq jump).
    meta_dirty: bool,
    /// `meta.next_seq`: every seq below it may have been assigned.
    reserved_seq: u64,
    /// `meta.dropped_total`.
    persisted_dropped: u64,
    /// `meta.acked_seq` (written with other meta changes and at close).
    persisted_acked: u64,
    /// Write every `meta` value with the next commit (close).
    persist_all_meta: bool,

    /// Sensor name -> id, valid for committed state only.
    sensors: HashMap<String, i64>,
    sensor_count: u64,
    sensor_prune_at: u64,

    consecutive_commit_failures: u32,
    drop_log: DropLog,
}

impl fmt::Debug for SqliteBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBuffer")
            .field("path", &self.path)
            .field("next_seq", &self.next_seq)
            .field("last_committed_seq", &self.last_committed_seq)
            .field("committed_rows", &self.committed_rows)
            .field("pending", &self.pending.len())
            .field("acked_seq", &self.acked_seq)
            .finish_non_exhaustive()
    }
}

/// A failed open, with the connection when there was one (still open).
type FailedOpen = (OpenFailure, Option<Connection>);

/// Why a file could not be opened: its own fault (move it aside) or not.
enum OpenFailure {
    /// The file is corrupt or not ours: move it aside and start afresh.
    Unusable(String),
    /// Anything else (locked, permissions, disk full): give up.
    Fatal(BufferError),
}

impl OpenFailure {
    fn from_sqlite(path: &Path, e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(
                ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt | ErrorCode::SystemIoFailure,
            ) => OpenFailure::Unusable(e.to_string()),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                OpenFailure::Fatal(BufferError::Locked {
                    path: path.to_owned(),
                })
            }
            _ => OpenFailure::Fatal(BufferError::Open {
                path: path.to_owned(),
                source: e,
            }),
        }
    }
}

/// Counters of one successful write transaction.
struct TxOutcome {
    rows: u64,
    used_bytes: u64,
    evicted: u64,
    /// `meta` next_seq, dropped_total and acked_seq, if written.
    meta: Option<(u64, u64, u64)>,
}

impl SqliteBuffer {
    /// Opens (or creates) the buffer file of `cfg`; see the module
    /// documentation for what happens to an unusable file. Blocks while
    /// `PRAGMA quick_check` reads the file.
    pub fn open(cfg: &BufferConfig) -> Result<(SqliteBuffer, OpenReport), BufferError> {
        Self::open_at(cfg, now_us())
    }

    /// [`SqliteBuffer::open`] with the current time passed in (µs).
    pub fn open_at(
        cfg: &BufferConfig,
        now_us: u64,
    ) -> Result<(SqliteBuffer, OpenReport), BufferError> {
        let path = cfg.path.as_path();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| BufferError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        let (buffer, created, moved_aside) = match Self::try_open(cfg, now_us).map_err(|b| *b) {
            Ok((b, created)) => (b, created, None),
            Err((OpenFailure::Fatal(e), _)) => return Err(e),
            Err((OpenFailure::Unusable(reason), conn)) => {
                let dest = move_aside(path);
                drop(conn);
                let dest = dest?;
                error!(
                    path = %path.display(),
                    moved_to = %dest.display(),
                    reason = %reason,
                    "buffer file unusable: moved aside, starting an empty buffer (its readings will not be published)"
                );
                match Self::try_open(cfg, now_us).map_err(|b| *b) {
                    Ok((b, created)) => (b, created, Some((dest, reason))),
                    Err((OpenFailure::Fatal(e), _)) => return Err(e),
                    Err((OpenFailure::Unusable(reason), _)) => {
                        return Err(BufferError::Unusable {
                            path: path.to_owned(),
                            reason,
                        })
                    }
                }
            }
        };
        let report = OpenReport {
            path: path.to_owned(),
            created,
            moved_aside: moved_aside.as_ref().map(|(d, _)| d.clone()),
            moved_aside_reason: moved_aside.map(|(_, r)| r),
            rows: buffer.committed_rows,
            next_seq: buffer.next_seq,
        };
        info!(
            path = %path.display(),
            created,
            rows = buffer.committed_rows,
            bytes = buffer.used_bytes,
            next_seq = buffer.next_seq,
            acked_seq = buffer.acked_seq,
            durability = ?cfg.durability,
            "buffer opened"
        );
        Ok((buffer, report))
    }

    /// Opens and checks the file. On failure the connection is handed back
    /// open: closing it can delete the `-wal` file, so an unusable file must
    /// be moved aside before it is closed.
    fn try_open(cfg: &BufferConfig, now_us: u64) -> Result<(SqliteBuffer, bool), Box<FailedOpen>> {
        let path = cfg.path.as_path();
        let conn = Connection::open(path)
            .map_err(|e| Box::new((OpenFailure::from_sqlite(path, e), None)))?;
        let found = match inspect(&conn, cfg, now_us) {
            Ok(found) => found,
            Err(failure) => return Err(Box::new((failure, Some(conn)))),
        };
        let buffer = SqliteBuffer {
            conn,
            path: path.to_owned(),
            max_bytes: cfg.max_bytes,
            max_rows: cfg.max_rows,
            overflow: cfg.overflow,
            page_size: found.page_size,
            next_seq: found.next_seq,
            last_committed_seq: found.last_committed_seq,
            committed_rows: found.rows,
            used_bytes: found.used_bytes,
            dropped_total: found.dropped_total,
            acked_seq: found.acked_seq,
            durable_acked_seq: found.acked_seq,
            acked_uncommitted_rows: 0,
            commits_total: 0,
            pending: VecDeque::new(),
            pending_bytes: 0,
            meta_dirty: false,
            reserved_seq: found.stored_next_seq,
            persisted_dropped: found.dropped_total,
            persisted_acked: found.acked_seq,
            persist_all_meta: false,
            sensors: HashMap::new(),
            sensor_count: found.sensor_count,
            sensor_prune_at: SENSOR_PRUNE_AT.max(2 * found.sensor_count),
            consecutive_commit_failures: 0,
            drop_log: DropLog::default(),
        };
        Ok((buffer, found.created))
    }

    /// Gives the readings the next sequence numbers and holds them until the
    /// next [`commit`](Self::commit). When [`MAX_PENDING`] readings are held,
    /// commits early; if that fails, applies the overflow policy to the
    /// in-memory readings (and logs). Errors only when sequence numbers are
    /// exhausted.
    pub fn append(&mut self, readings: &[Reading]) -> Result<AppendOutcome, BufferError> {
        self.append_iter(readings.iter().cloned())
    }

    /// [`append`](Self::append) taking ownership (no copies).
    pub fn append_vec(&mut self, readings: Vec<Reading>) -> Result<AppendOutcome, BufferError> {
        self.append_iter(readings)
    }

    fn append_iter(
        &mut self,
        readings: impl IntoIterator<Item = Reading>,
    ) -> Result<AppendOutcome, BufferError> {
        let mut out = AppendOutcome::default();
        let mut commit_failed = false;
        let mut result = Ok(());
        // Readings this call drops itself (evictions by an early commit are
        // logged by the commit).
        let mut dropped = 0u64;
        for reading in readings {
            if self.pending.len() >= MAX_PENDING && !commit_failed {
                let before = self.dropped_total;
                // A failure is logged by commit(); the policy below handles
                // it, and this call does not try again.
                match self.commit() {
                    Ok(()) => out.dropped += self.dropped_total - before,
                    Err(_) => commit_failed = true,
                }
            }
            let est = estimate_row_bytes(&reading);
            let full = self.pending.len() >= MAX_PENDING;
            if self.overflow == OverflowPolicy::DropNewest && (full || !self.admits(est)) {
                dropped += 1;
                continue;
            }
            if full {
                if let Some(old) = self.pending.pop_front() {
                    self.pending_bytes = self
                        .pending_bytes
                        .saturating_sub(estimate_row_bytes(&old.reading));
                    dropped += 1;
                }
            }
            let seq = self.next_seq;
            if seq > MAX_SEQ {
                result = Err(BufferError::SeqExhausted);
                break;
            }
            self.next_seq += 1;
            self.pending.push_back(StoredReading { seq, reading });
            self.pending_bytes += est;
            out.first_seq.get_or_insert(seq);
            out.last_seq = Some(seq);
            out.accepted += 1;
        }
        if dropped > 0 {
            out.dropped += dropped;
            self.dropped_total += dropped;
            self.meta_dirty = true;
            self.log_dropped(dropped);
        }
        result.map(|()| out)
    }

    /// Whether one more reading of `est` bytes fits the limits (drop-newest).
    fn admits(&self, est: u64) -> bool {
        if self.max_rows.is_some_and(|max| self.rows_held() >= max) {
            return false;
        }
        let freed = self
            .acked_uncommitted_rows
            .saturating_mul(self.avg_row_bytes());
        let bytes = (self.used_bytes + self.pending_bytes).saturating_sub(freed) + est;
        bytes <= self.max_bytes
    }

    fn avg_row_bytes(&self) -> u64 {
        self.used_bytes
            .checked_div(self.committed_rows)
            .map_or(ROW_BYTES_ESTIMATE, |avg| avg.max(1))
    }

    /// Readings held: committed and not acknowledged, plus pending.
    fn rows_held(&self) -> u64 {
        self.committed_rows
            .saturating_sub(self.acked_uncommitted_rows)
            + self.pending.len() as u64
    }

    /// Whether a commit has anything to write.
    pub fn is_dirty(&self) -> bool {
        !self.pending.is_empty() || self.acked_seq > self.durable_acked_seq || self.meta_dirty
    }

    /// Writes pending readings, acks, evictions and counters in one
    /// transaction. A no-op when there is nothing to write. On failure the
    /// transaction is rolled back, nothing in memory changes, and a later
    /// call retries.
    pub fn commit(&mut self) -> Result<(), BufferError> {
        if !self.is_dirty() {
            return Ok(());
        }
        let started = Instant::now();
        let written = self.pending.len();
        match self.write_transaction() {
            Ok(tx) => {
                self.committed_rows = tx.rows;
                self.used_bytes = tx.used_bytes;
                self.dropped_total += tx.evicted;
                self.durable_acked_seq = self.acked_seq;
                self.acked_uncommitted_rows = 0;
                self.pending.clear();
                self.pending_bytes = 0;
                self.meta_dirty = false;
                self.persist_all_meta = false;
                if let Some((reserved, dropped, acked)) = tx.meta {
                    self.reserved_seq = reserved;
                    self.persisted_dropped = dropped;
                    self.persisted_acked = acked;
                }
                self.last_committed_seq = self.next_seq - 1;
                self.commits_total += 1;
                if self.consecutive_commit_failures > 0 {
                    info!(
                        path = %self.path.display(),
                        failures = self.consecutive_commit_failures,
                        "buffer commit succeeded again"
                    );
                    self.consecutive_commit_failures = 0;
                }
                if tx.evicted > 0 {
                    self.log_dropped(tx.evicted);
                }
                debug!(
                    rows = written,
                    evicted = tx.evicted,
                    total_rows = tx.rows,
                    bytes = tx.used_bytes,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "buffer commit"
                );
                Ok(())
            }
            Err(e) => {
                if !self.conn.is_autocommit() {
                    if let Err(rb) = self.conn.execute_batch("ROLLBACK") {
                        warn!(path = %self.path.display(), error = %rb, "buffer rollback failed");
                    }
                }
                // Sensor ids inserted by the failed transaction are gone.
                self.sensors.clear();
                if let Ok(n) = self
                    .conn
                    .query_row("SELECT count(*) FROM sensors", [], |r| r.get::<_, i64>(0))
                {
                    self.sensor_count = u64::try_from(n).unwrap_or(0);
                }
                self.consecutive_commit_failures =
                    self.consecutive_commit_failures.saturating_add(1);
                let n = self.consecutive_commit_failures;
                if n.is_power_of_two() {
                    warn!(
                        path = %self.path.display(),
                        error = %e,
                        pending = self.pending.len(),
                        failures = n,
                        "buffer commit failed: rolled back, readings kept in memory, will retry"
                    );
                }
                Err(e)
            }
        }
    }

    fn write_transaction(&mut self) -> Result<TxOutcome, BufferError> {
        let conn = &self.conn;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut rows = self.committed_rows;
        if self.acked_seq > self.durable_acked_seq {
            let n = conn.execute(
                "DELETE FROM readings WHERE seq <= ?1",
                [seq_sql(self.acked_seq)],
            )?;
            rows = rows.saturating_sub(n as u64);
        }

        let limits = Limits {
            max_bytes: self.max_bytes,
            max_rows: self.max_rows,
        };
        let drop_oldest = self.overflow == OverflowPolicy::DropOldest;
        let mut used = measure_used(conn, self.page_size)?;
        let mut evicted = 0u64;
        let mut since = 0u64;
        {
            let mut insert = conn.prepare(INSERT_READING)?;
            for stored in &self.pending {
                let r = &stored.reading;
                let est = estimate_row_bytes(r);
                if drop_oldest && limits.over(used + since + est, rows + 1) {
                    used = measure_used(conn, self.page_size)?;
                    since = 0;
                    let ev = evict(conn, self.page_size, &limits, used, rows, est, 1)?;
                    (used, rows) = (ev.used, ev.rows);
                    evicted += ev.evicted;
                }
                let sensor = sensor_id(conn, &mut self.sensors, &mut self.sensor_count, &r.sensor)?;
                let (k, v) = encode(&r.value);
                insert.execute(params![
                    seq_sql(stored.seq),
                    r.time_ms,
                    sensor,
                    k,
                    v,
                    r.quality as i32
                ])?;
                rows += 1;
                since += est;
            }
        }
        used = measure_used(conn, self.page_size)?;
        if drop_oldest && limits.over(used, rows) {
            let ev = evict(conn, self.page_size, &limits, used, rows, 0, 0)?;
            (used, rows) = (ev.used, ev.rows);
            evicted += ev.evicted;
        }
        if self.sensor_count >= self.sensor_prune_at {
            let pruned = conn.execute(
                "DELETE FROM sensors WHERE id NOT IN (SELECT DISTINCT sensor FROM readings)",
                [],
            )?;
            self.sensors.clear();
            self.sensor_count = self.sensor_count.saturating_sub(pruned as u64);
            self.sensor_prune_at = SENSOR_PRUNE_AT.max(2 * self.sensor_count);
            info!(
                pruned,
                left = self.sensor_count,
                "buffer pruned unused sensor names"
            );
        }

        // `meta` is written only when needed: its page would otherwise
        // double the bytes every steady-state commit writes.
        let dropped = self.dropped_total + evicted;
        let reserve = self.next_seq > self.reserved_seq;
        let mut meta_written = None;
        if reserve || dropped != self.persisted_dropped || self.persist_all_meta {
            let reserved = if reserve {
                self.next_seq
            } else {
                self.reserved_seq
            };
            let mut meta = conn.prepare(UPSERT_META)?;
            meta.execute(params![key::NEXT_SEQ, seq_sql(reserved)])?;
            meta.execute(params![key::DROPPED_TOTAL, u64_sql(dropped)])?;
            meta.execute(params![key::ACKED_SEQ, seq_sql(self.acked_seq)])?;
            meta_written = Some((reserved, dropped, self.acked_seq));
        }

        let free_pages: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let free_bytes = u64::try_from(free_pages).unwrap_or(0) * self.page_size;
        if free_bytes > VACUUM_MIN_FREE_BYTES && free_bytes > used {
            let mut stmt =
                conn.prepare(&format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})"))?;
            let mut it = stmt.query([])?;
            while it.next()?.is_some() {}
            debug!(free_bytes, used, "buffer gave free pages back");
        }
        conn.execute_batch("COMMIT")?;
        Ok(TxOutcome {
            rows,
            used_bytes: used,
            evicted,
            meta: meta_written,
        })
    }

    /// Committed readings with `seq > after_seq` (and above the acked seq),
    /// oldest first, at most `limit`. Readings not yet committed are never
    /// returned.
    pub fn read_after(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredReading>, BufferError> {
        let lo = after_seq.max(self.acked_seq);
        let hi = self.last_committed_seq;
        if lo >= hi || limit == 0 {
            return Ok(Vec::new());
        }
        let mut stmt = self.conn.prepare(SELECT_AFTER)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![seq_sql(lo), seq_sql(hi), limit])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            match decode_row(row) {
                Ok(stored) => out.push(stored),
                Err(reason) => error!(
                    path = %self.path.display(),
                    seq,
                    reason = %reason,
                    "buffer row cannot be decoded: skipped (reading lost)"
                ),
            }
        }
        Ok(out)
    }

    /// The aggregator has processed every reading up to `seq`: they are
    /// deleted by the next commit (and no longer returned by `read_after`).
    /// Returns how many committed readings this ack covers; an ack at or
    /// below the current acked seq is a no-op. An ack above the last
    /// committed seq (the aggregator's high-water mark is ahead of this
    /// buffer) moves `next_seq` past it and renumbers the uncommitted
    /// readings above it.
    pub fn ack(&mut self, seq: u64) -> Result<u64, BufferError> {
        if seq <= self.acked_seq {
            return Ok(0);
        }
        if seq > MAX_SEQ - 1 {
            return Err(BufferError::SeqOutOfRange(seq));
        }
        let upper = seq.min(self.last_committed_seq);
        let mut committed = 0u64;
        if upper > self.acked_seq {
            let n: i64 = self.conn.query_row(
                "SELECT count(*) FROM readings WHERE seq > ?1 AND seq <= ?2",
                params![seq_sql(self.acked_seq), seq_sql(upper)],
                |r| r.get(0),
            )?;
            committed = u64::try_from(n).unwrap_or(0);
        }
        if seq > self.last_committed_seq {
            // The aggregator has processed seqs this buffer never committed:
            // its mark comes from an earlier file (recreated with the clock
            // behind, or commits lost to a power cut). Readings not yet
            // committed were never published: renumber them above the mark
            // (in order) rather than have them dropped as duplicates.
            warn!(
                path = %self.path.display(),
                ack = seq,
                last_committed_seq = self.last_committed_seq,
                next_seq = self.next_seq,
                "ack beyond what this buffer committed: the aggregator's high-water mark is ahead; sequence numbers jump past it"
            );
            let mut next = self.next_seq.max(seq + 1);
            if let Some(first) = self.pending.front().map(|p| p.seq) {
                let shift = (seq + 1).saturating_sub(first);
                for p in &mut self.pending {
                    p.seq += shift;
                }
                next = next.max(self.pending.back().map_or(0, |p| p.seq + 1));
            }
            if next > MAX_SEQ {
                return Err(BufferError::SeqOutOfRange(seq));
            }
            self.next_seq = next;
        }
        self.acked_seq = seq;
        self.acked_uncommitted_rows += committed;
        self.meta_dirty = true;
        Ok(committed)
    }

    /// Counters and gauges of the buffer.
    pub fn stats(&self) -> Result<BufferStats, BufferError> {
        let oldest: Option<i64> = self
            .conn
            .query_row(
                "SELECT time_ms FROM readings WHERE seq > ?1 ORDER BY seq LIMIT 1",
                [seq_sql(self.acked_seq)],
                |r| r.get(0),
            )
            .optional()?;
        Ok(BufferStats {
            rows: self.rows_held(),
            pending: self.pending.len() as u64,
            bytes: self.used_bytes,
            oldest_time_ms: oldest.or_else(|| self.pending.front().map(|p| p.reading.time_ms)),
            next_seq: self.next_seq,
            last_committed_seq: self.last_committed_seq,
            acked_seq: self.acked_seq,
            dropped_total: self.dropped_total,
            commits_total: self.commits_total,
        })
    }

    /// Highest committed sequence number (what the publisher may read up to).
    pub fn last_committed_seq(&self) -> u64 {
        self.last_committed_seq
    }

    /// Readings appended and not yet committed.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits, then closes the database (checkpointing the WAL).
    pub fn close(mut self) -> Result<(), BufferError> {
        if self.acked_seq != self.persisted_acked {
            self.persist_all_meta = true;
            self.meta_dirty = true;
        }
        let committed = self.commit();
        let closed = self.conn.close().map_err(|(_, e)| BufferError::Sqlite(e));
        committed.and(closed)
    }

    fn log_dropped(&mut self, n: u64) {
        self.drop_log.since_log += n;
        let due = self
            .drop_log
            .last
            .is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL);
        if due {
            error!(
                path = %self.path.display(),
                dropped = self.drop_log.since_log,
                dropped_total = self.dropped_total,
                policy = ?self.overflow,
                max_bytes = self.max_bytes,
                max_rows = ?self.max_rows,
                "buffer full: readings dropped"
            );
            self.drop_log = DropLog {
                last: Some(Instant::now()),
                since_log: 0,
            };
        }
    }
}

/// What opening found in a usable file.
struct Found {
    created: bool,
    stored_next_seq: u64,
    next_seq: u64,
    last_committed_seq: u64,
    rows: u64,
    dropped_total: u64,
    acked_seq: u64,
    page_size: u64,
    sensor_count: u64,
    used_bytes: u64,
}

/// Sets the pragmas, checks the file, creates the schema in an empty one
/// and reads the counters.
fn inspect(conn: &Connection, cfg: &BufferConfig, now_us: u64) -> Result<Found, OpenFailure> {
    let path = cfg.path.as_path();
    let sq = |e: rusqlite::Error| OpenFailure::from_sqlite(path, e);
    // Order matters: exclusive locking before WAL (no shared memory),
    // auto_vacuum before the first table exists.
    pragma(conn, "locking_mode", "EXCLUSIVE").map_err(sq)?;
    pragma(conn, "auto_vacuum", "INCREMENTAL").map_err(sq)?;
    let mode = pragma(conn, "journal_mode", "WAL").map_err(sq)?;
    if !mode
        .as_deref()
        .is_some_and(|m| m.eq_ignore_ascii_case("wal"))
    {
        return Err(OpenFailure::Fatal(BufferError::Unsupported {
            path: path.to_owned(),
            what: format!("journal_mode WAL (got {mode:?})"),
        }));
    }
    let sync = match cfg.durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
        Durability::Off => "OFF",
    };
    pragma(conn, "synchronous", sync).map_err(sq)?;
    pragma(
        conn,
        "wal_autocheckpoint",
        &WAL_AUTOCHECKPOINT_PAGES.to_string(),
    )
    .map_err(sq)?;
    pragma(
        conn,
        "journal_size_limit",
        &WAL_SIZE_LIMIT_BYTES.to_string(),
    )
    .map_err(sq)?;
    pragma(conn, "cache_size", &(-CACHE_SIZE_KIB).to_string()).map_err(sq)?;
    // The bundled SQLite enforces foreign keys by default; the buffer is the
    // only writer, and pruning `sensors` would scan `readings` per name.
    pragma(conn, "foreign_keys", "OFF").map_err(sq)?;

    let check: Vec<String> = {
        let mut stmt = conn.prepare("PRAGMA quick_check").map_err(sq)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sq)?;
        rows.collect::<Result<_, _>>().map_err(sq)?
    };
    if check != ["ok"] {
        return Err(OpenFailure::Unusable(format!(
            "quick_check: {}",
            check.join("; ")
        )));
    }

    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(sq)?;
    let created = objects == 0;
    if created {
        init_schema(conn, now_us).map_err(sq)?;
    } else {
        let app_id: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(sq)?;
        let version: i32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sq)?;
        if app_id != APPLICATION_ID {
            return Err(OpenFailure::Unusable(format!(
                "not an outpost buffer (application_id {app_id:#x}, expected {APPLICATION_ID:#x})"
            )));
        }
        if version != SCHEMA_VERSION {
            return Err(OpenFailure::Unusable(format!(
                "schema version {version}, this agent reads {SCHEMA_VERSION}"
            )));
        }
        for sql in [
            INSERT_READING,
            SELECT_AFTER,
            DELETE_OLDEST,
            UPSERT_META,
            "SELECT id, name FROM sensors",
        ] {
            if let Err(e) = conn.prepare(sql) {
                return Err(OpenFailure::Unusable(format!("schema unusable: {e}")));
            }
        }
    }

    let meta = load_meta(conn).map_err(sq)?;
    let get = |k: &str| -> Result<u64, OpenFailure> {
        meta.get(k)
            .and_then(|v| u64::try_from(*v).ok())
            .ok_or_else(|| OpenFailure::Unusable(format!("meta.{k} missing or negative")))
    };
    let stored_next = get(key::NEXT_SEQ)?;
    let dropped_total = get(key::DROPPED_TOTAL)?;
    let acked_seq = get(key::ACKED_SEQ)?;
    // One scan (quick_check just read the whole file anyway).
    let (rows, max_seq): (i64, Option<i64>) = conn
        .query_row("SELECT count(*), max(seq) FROM readings", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(sq)?;
    let rows = u64::try_from(rows).unwrap_or(0);
    let max_seq = max_seq.map(|s| u64::try_from(s).unwrap_or(0));
    let boot = boot_hash();
    let rebooted = meta.get(key::BOOT).copied() != Some(boot);
    let floor = if rebooted && cfg.durability != Durability::Full {
        now_us
    } else {
        0
    };
    if rebooted {
        conn.execute(UPSERT_META, params![key::BOOT, boot])
            .map_err(sq)?;
    }
    let next_seq = [
        stored_next,
        max_seq.map_or(0, |s| s + 1),
        acked_seq.saturating_add(1),
        floor,
    ]
    .into_iter()
    .max()
    .unwrap_or(now_us)
    .min(MAX_SEQ);
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(sq)?;
    let sensor_count: i64 = conn
        .query_row("SELECT count(*) FROM sensors", [], |r| r.get(0))
        .map_err(sq)?;
    let sensor_count = u64::try_from(sensor_count).unwrap_or(0);

    let page_size = u64::try_from(page_size).unwrap_or(4096);
    Ok(Found {
        created,
        stored_next_seq: stored_next,
        next_seq,
        last_committed_seq: stored_next
            .max(max_seq.map_or(0, |s| s + 1))
            .saturating_sub(1),
        rows,
        dropped_total,
        acked_seq,
        page_size,
        sensor_count,
        used_bytes: measure_used(conn, page_size).map_err(sq)?,
    })
}

/// Rate limit of the "readings dropped" ERROR log.
#[derive(Debug, Default)]
struct DropLog {
    last: Option<Instant>,
    since_log: u64,
}

/// The size limits.
struct Limits {
    max_bytes: u64,
    max_rows: Option<u64>,
}

impl Limits {
    fn over(&self, bytes: u64, rows: u64) -> bool {
        bytes > self.max_bytes || self.max_rows.is_some_and(|m| rows > m)
    }
}

struct Evicted {
    used: u64,
    rows: u64,
    evicted: u64,
}

/// Deletes the oldest rows until `need_bytes` more bytes and `need_rows` more
/// rows fit, plus headroom. Stops when the table is empty.
fn evict(
    conn: &Connection,
    page_size: u64,
    limits: &Limits,
    mut used: u64,
    mut rows: u64,
    need_bytes: u64,
    need_rows: u64,
) -> Result<Evicted, rusqlite::Error> {
    let mut evicted = 0;
    while rows > 0 && limits.over(used + need_bytes, rows + need_rows) {
        let avg = (used / rows).max(1);
        let mut k = 0;
        if used + need_bytes > limits.max_bytes {
            let excess = used + need_bytes - limits.max_bytes
                + limits.max_bytes * EVICT_HEADROOM_PERCENT / 100;
            k = excess.div_ceil(avg);
        }
        if let Some(max) = limits.max_rows {
            if rows + need_rows > max {
                k = k.max(rows + need_rows - max + (max * EVICT_HEADROOM_PERCENT / 100).max(1));
            }
        }
        let k = k.clamp(1, rows);
        let n = conn.execute(DELETE_OLDEST, [u64_sql(k)])? as u64;
        if n == 0 {
            break;
        }
        rows = rows.saturating_sub(n);
        evicted += n;
        used = measure_used(conn, page_size)?;
    }
    Ok(Evicted {
        used,
        rows,
        evicted,
    })
}

/// Bytes in live pages, as seen by the current transaction.
fn measure_used(conn: &Connection, page_size: u64) -> Result<u64, rusqlite::Error> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok(u64::try_from(pages - free).unwrap_or(0) * page_size)
}

/// Id of sensor `name`, inserting it when new.
fn sensor_id(
    conn: &Connection,
    cache: &mut HashMap<String, i64>,
    count: &mut u64,
    name: &str,
) -> Result<i64, rusqlite::Error> {
    if let Some(id) = cache.get(name) {
        return Ok(*id);
    }
    let found: Option<i64> = conn
        .query_row("SELECT id FROM sensors WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    let id = match found {
        Some(id) => id,
        None => {
            conn.execute("INSERT INTO sensors (name) VALUES (?1)", [name])?;
            *count += 1;
            conn.last_insert_rowid()
        }
    };
    cache.insert(name.to_owned(), id);
    Ok(id)
}

fn init_schema(conn: &Connection, now_us: u64) -> Result<(), rusqlite::Error> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        conn.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
        ))?;
        conn.execute_batch(SCHEMA)?;
        let mut meta = conn.prepare(UPSERT_META)?;
        meta.execute(params![key::NEXT_SEQ, seq_sql(now_us)])?;
        meta.execute(params![key::DROPPED_TOTAL, 0i64])?;
        meta.execute(params![key::ACKED_SEQ, 0i64])?;
        meta.execute(params![key::CREATED_AT, u64_sql(now_us / 1_000_000)])?;
        meta.execute(params![key::BOOT, boot_hash()])?;
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn load_meta(conn: &Connection) -> Result<HashMap<String, i64>, rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT key, value FROM meta")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    rows.collect()
}

/// Sets a pragma, returning the first column of its first row, if any.
fn pragma(conn: &Connection, name: &str, value: &str) -> Result<Option<String>, rusqlite::Error> {
    let mut stmt = conn.prepare(&format!("PRAGMA {name} = {value}"))?;
    let mut rows = stmt.query([])?;
    match rows.next()? {
        Some(row) => Ok(row
            .get::<_, rusqlite::types::Value>(0)
            .ok()
            .map(|v| match v {
                rusqlite::types::Value::Text(s) => s,
                other => format!("{other:?}"),
            })),
        None => Ok(None),
    }
}

/// Renames `path` and its `-wal`/`-shm`/`-journal` files to
/// `<path>.corrupt-<unix-secs>[.N]` (same suffixes).
fn move_aside(path: &Path) -> Result<PathBuf, BufferError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = path.as_os_str().to_owned();
    let with = |s: &str| {
        let mut p = base.clone();
        p.push(s);
        PathBuf::from(p)
    };
    let mut n = 0u32;
    let dest = loop {
        let candidate = if n == 0 {
            format!(".corrupt-{secs}")
        } else {
            format!(".corrupt-{secs}.{n}")
        };
        let dest = with(&candidate);
        if !dest.exists() && !with(&format!("{candidate}-wal")).exists() {
            break dest;
        }
        n += 1;
    };
    let dest_with = |suffix: &str| {
        let mut p = dest.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    };
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let from = with(suffix);
        match std::fs::rename(&from, dest_with(suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(BufferError::Io { path: from, source }),
        }
    }
    Ok(dest)
}

/// A value as bound to `readings.value`.
enum Stored<'a> {
    Int(i64),
    Text(&'a str),
}

impl ToSql for Stored<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Stored::Int(i) => ToSqlOutput::from(*i),
            Stored::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// Kind code and stored form of a value (floats as their bits: exact).
fn encode(value: &Value) -> (i64, Stored<'_>) {
    match value {
        // Sign-extended so negative floats take 4 bytes, not 6.
        Value::F32(v) => (kind::F32, Stored::Int(i64::from(v.to_bits() as i32))),
        Value::F64(v) => (kind::F64, Stored::Int(v.to_bits() as i64)),
        Value::Int(v) => (kind::INT, Stored::Int(*v)),
        Value::Bool(v) => (kind::BOOL, Stored::Int(i64::from(*v))),
        Value::Str(s) => (kind::STR, Stored::Text(s)),
    }
}

fn decode_value(kind: i64, v: ValueRef<'_>) -> Result<Value, String> {
    match (kind, v) {
        (kind::F32, ValueRef::Integer(i)) => Ok(Value::F32(f32::from_bits(i as u32))),
        (kind::F64, ValueRef::Integer(i)) => Ok(Value::F64(f64::from_bits(i as u64))),
        (kind::INT, ValueRef::Integer(i)) => Ok(Value::Int(i)),
        (kind::BOOL, ValueRef::Integer(i)) => Ok(Value::Bool(i != 0)),
        (kind::STR, ValueRef::Text(t)) => std::str::from_utf8(t)
            .map(|s| Value::Str(s.to_owned()))
            .map_err(|e| e.to_string()),
        (k, v) => Err(format!("kind {k} with a {:?} value", v.data_type())),
    }
}

fn decode_row(row: &rusqlite::Row<'_>) -> Result<StoredReading, String> {
    let e = |e: rusqlite::Error| e.to_string();
    let seq: i64 = row.get(0).map_err(e)?;
    let time_ms: i64 = row.get(1).map_err(e)?;
    let sensor: Option<String> = row.get(2).map_err(e)?;
    let kind: i64 = row.get(3).map_err(e)?;
    let value = decode_value(kind, row.get_ref(4).map_err(e)?)?;
    let quality: i32 = row.get(5).map_err(e)?;
    let quality = Quality::try_from(quality).map_err(|_| format!("unknown quality {quality}"))?;
    let sensor = sensor.ok_or("sensor id without a name")?;
    Ok(StoredReading {
        seq: u64::try_from(seq).map_err(|_| format!("negative seq {seq}"))?,
        reading: Reading {
            sensor,
            time_ms,
            value,
            quality,
        },
    })
}

/// Estimated bytes of file a reading costs (see "Size accounting").
pub fn estimate_row_bytes(r: &Reading) -> u64 {
    let text = match &r.value {
        Value::Str(s) => s.len() as u64,
        _ => 0,
    };
    ROW_BYTES_ESTIMATE + text
}

/// A sequence number as an SQLite integer (seqs never exceed [`MAX_SEQ`]).
fn seq_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn u64_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// FNV-1a hash (63 bits, fits SQLite's INTEGER) of the kernel's boot id,
/// which changes on every boot. 0 where the file does not exist.
pub fn boot_hash() -> i64 {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.trim().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

/// Current Unix time in microseconds.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "sqlite_tests.rs"]
mod tests;
