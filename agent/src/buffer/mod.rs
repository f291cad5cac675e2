//! The durable buffer: every reading lives here from the moment a source
//! produced it until the aggregator acknowledges it.
//!
//! [`SqliteBuffer`] (in [`sqlite`], with the design comment: invariants,
//! schema, failure cases) is the synchronous core. [`Buffer::spawn`] moves it
//! onto a dedicated thread and returns a [`BufferHandle`] that async code
//! uses through a bounded command channel: a full channel makes the sources
//! wait (backpressure), it never drops. The thread commits every
//! [`BufferConfig::commit_interval`] when something changed (and early at
//! [`MAX_PENDING`] uncommitted readings), keeps the buffer metrics current
//! and announces the highest committed sequence number on a
//! [`tokio::sync::watch`] channel ([`BufferHandle::committed`]), which the
//! publisher waits on: only committed readings are ever published.

pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::reading::{now_ms, Reading, StoredReading};

pub use sqlite::SqliteBuffer;

/// Default database path (systemd `StateDirectory=outpost-agent`).
pub const DEFAULT_PATH: &str = "/var/lib/outpost-agent/buffer.sqlite";
/// Default [`BufferConfig::max_bytes`]: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 * MIB;
/// Smallest accepted [`BufferConfig::max_bytes`]: 1 MiB.
pub const MIN_MAX_BYTES: u64 = MIB;
/// Default [`BufferConfig::commit_interval`]: 1 s (about one SQLite commit
/// per second at steady state: flash wear).
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest accepted commit interval.
pub const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(10);
/// Longest accepted commit interval (everything appended since the last
/// commit is lost on a crash).
pub const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(60);
/// Most readings held uncommitted in memory: reaching it commits early; if
/// that commit fails, the overflow policy applies to the in-memory readings.
pub const MAX_PENDING: usize = 10_000;
/// Capacity of the command channel of [`BufferHandle`] (full = the callers
/// wait).
pub const COMMAND_QUEUE: usize = 64;

const MIB: u64 = 1024 * 1024;

/// `[buffer]` table of the agent configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BufferConfig {
    /// SQLite database file (its directory is created if missing).
    pub path: PathBuf,
    /// Most bytes the rows may use (pages in use). Default 256 MiB.
    pub max_bytes: u64,
    /// Most readings held, if set. Default: no row limit.
    pub max_rows: Option<u64>,
    /// What to drop when a limit is reached. Default `drop-oldest`.
    pub overflow: OverflowPolicy,
    /// How hard commits are pushed to the disk. Default `normal`.
    pub durability: Durability,
    /// Time between commits (when something changed). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            path: PathBuf::from(DEFAULT_PATH),
            max_bytes: DEFAULT_MAX_BYTES,
            max_rows: None,
            overflow: OverflowPolicy::default(),
            durability: Durability::default(),
            commit_interval: DEFAULT_COMMIT_INTERVAL,
        }
    }
}

impl BufferConfig {
    /// Pushes one message per problem, each starting with `{key}.`.
    pub fn validate(&self, key: &str, errors: &mut Vec<String>) {
        if self.path.as_os_str().is_empty() {
            errors.push(format!("{key}.path: must not be empty"));
        } else if self.path.file_name().is_none() {
            errors.push(format!("{key}.path: must name a file, not a directory"));
        }
        if self.max_bytes < MIN_MAX_BYTES {
            errors.push(format!(
                "{key}.max-bytes: must be at least 1 MiB ({MIN_MAX_BYTES} bytes)"
            ));
        }
        if self.max_rows == Some(0) {
            errors.push(format!(
                "{key}.max-rows: must be at least 1 (leave it out for no row limit)"
            ));
        }
        if self.commit_interval < MIN_COMMIT_INTERVAL || self.commit_interval > MAX_COMMIT_INTERVAL
        {
            errors.push(format!(
                "{key}.commit-interval: must be between {} and {}",
                humantime_serde::re::humantime::format_duration(MIN_COMMIT_INTERVAL),
                humantime_serde::re::humantime::format_duration(MAX_COMMIT_INTERVAL),
            ));
        }
    }
}

/// What a full buffer drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Delete the oldest readings (in chunks) to make room: recent data
    /// matters most.
    #[default]
    DropOldest,
    /// Refuse new readings until acks make room: keep the start of an outage.
    DropNewest,
}

/// SQLite `synchronous` setting (the journal is always WAL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// `synchronous=NORMAL`: a power cut never corrupts the file but can roll
    /// back the last commits (those the kernel had not written back, at most
    /// since the last checkpoint).
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is on disk when it returns (an fsync
    /// per commit).
    Full,
    /// `synchronous=OFF`: no fsync; a power cut may corrupt the file (it is
    /// then moved aside and everything buffered is lost). Tests/RAM disks.
    Off,
}

/// Errors of the buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The database could not be opened (permissions, read-only file
    /// system...); the file was left alone.
    #[error("cannot open buffer {path}: {source}")]
    Open {
        /// Database path.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// Another process (a second agent?) holds the database.
    #[error("buffer {path} is locked by another process")]
    Locked {
        /// Database path.
        path: PathBuf,
    },
    /// Still unusable after moving the old file aside.
    #[error("buffer {path} unusable even after a fresh start: {reason}")]
    Unusable {
        /// Database path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// SQLite lacks something the buffer needs.
    #[error("buffer {path}: SQLite does not support {what}")]
    Unsupported {
        /// Database path.
        path: PathBuf,
        /// The missing feature.
        what: String,
    },
    /// A file system operation failed.
    #[error("buffer {path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// An SQLite operation failed (disk full, I/O error...); nothing
    /// committed is lost.
    #[error("buffer database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// An ack above the largest possible sequence number.
    #[error("sequence number {0} out of range")]
    SeqOutOfRange(u64),
    /// Every sequence number has been used (2^63 of them).
    #[error("sequence numbers exhausted")]
    SeqExhausted,
    /// The buffer thread has stopped.
    #[error("buffer closed")]
    Closed,
}

impl BufferError {
    /// Whether the disk (or SQLite's page limit) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, BufferError::Sqlite(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
    }
}

/// What [`SqliteBuffer::open`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenReport {
    /// Database path.
    pub path: PathBuf,
    /// A new, empty buffer was created.
    pub created: bool,
    /// Where an unusable file was moved to (`<path>.corrupt-<unix-secs>`).
    pub moved_aside: Option<PathBuf>,
    /// Why it was moved aside.
    pub moved_aside_reason: Option<String>,
    /// Rows found.
    pub rows: u64,
    /// Next sequence number to be assigned.
    pub next_seq: u64,
}

/// Result of an append.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// First sequence number assigned, if any reading was accepted.
    pub first_seq: Option<u64>,
    /// Last sequence number assigned.
    pub last_seq: Option<u64>,
    /// Readings accepted (given a sequence number).
    pub accepted: usize,
    /// Readings dropped by the overflow policy during this call: refused new
    /// ones (drop-newest), oldest uncommitted ones when commits fail
    /// (drop-oldest), and rows evicted by an early commit. Evictions by
    /// regular commits show in [`BufferStats::dropped_total`].
    pub dropped: u64,
}

/// Gauges and counters of the buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Readings held and not acknowledged (committed and pending).
    pub rows: u64,
    /// Of which not yet committed.
    pub pending: u64,
    /// Bytes in use in the database (live pages) as of the last commit.
    pub bytes: u64,
    /// Event time of the oldest reading held.
    pub oldest_time_ms: Option<i64>,
    /// Next sequence number to be assigned.
    pub next_seq: u64,
    /// Highest committed sequence number.
    pub last_committed_seq: u64,
    /// Highest sequence number acknowledged by the aggregator.
    pub acked_seq: u64,
    /// Readings dropped by the overflow policy, over the file's life.
    pub dropped_total: u64,
    /// Commits since open.
    pub commits_total: u64,
}

enum Command {
    Append {
        readings: Vec<Reading>,
        reply: oneshot::Sender<Result<AppendOutcome, BufferError>>,
    },
    ReadAfter {
        after_seq: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<StoredReading>, BufferError>>,
    },
    Ack {
        seq: u64,
        reply: oneshot::Sender<Result<u64, BufferError>>,
    },
    Stats {
        reply: oneshot::Sender<Result<BufferStats, BufferError>>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), BufferError>>,
    },
    Close {
        reply: oneshot::Sender<Result<(), BufferError>>,
    },
}

/// Starts the buffer thread.
#[derive(Debug)]
pub struct Buffer;

impl Buffer {
    /// Opens the buffer (blocking: `quick_check` reads the whole file; call
    /// it before the sources start or from `spawn_blocking`) and starts its
    /// thread. The thread ends after [`BufferHandle::close`] or when every
    /// handle is dropped, committing first in both cases.
    pub fn spawn(
        cfg: BufferConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(BufferHandle, JoinHandle<()>), BufferError> {
        let (buffer, report) = SqliteBuffer::open(&cfg)?;
        let io = |source| BufferError::Io {
            path: cfg.path.clone(),
            source,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(io)?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (committed_tx, committed_rx) = watch::channel(buffer.last_committed_seq());
        let mut worker = Worker {
            buffer: Some(buffer),
            rx,
            committed: committed_tx,
            metrics,
            interval: cfg.commit_interval,
            seen_commits: 0,
            seen_dropped: None,
        };
        worker.refresh_metrics();
        let thread = std::thread::Builder::new()
            .name("outpost-buffer".into())
            .spawn(move || runtime.block_on(worker.run()))
            .map_err(io)?;
        Ok((
            BufferHandle {
                tx,
                committed: committed_rx,
                report: Arc::new(report),
            },
            thread,
        ))
    }
}

/// Async access to the buffer thread. Cheap to clone. Every method returns
/// [`BufferError::Closed`] once the thread has stopped.
#[derive(Debug, Clone)]
pub struct BufferHandle {
    tx: mpsc::Sender<Command>,
    committed: watch::Receiver<u64>,
    report: Arc<OpenReport>,
}

impl BufferHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, BufferError>>) -> Command,
    ) -> Result<T, BufferError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| BufferError::Closed)?;
        rx.await.map_err(|_| BufferError::Closed)?
    }

    /// Appends readings (waits while the command channel is full). They are
    /// committed within one commit interval.
    pub async fn append(&self, readings: Vec<Reading>) -> Result<AppendOutcome, BufferError> {
        self.call(|reply| Command::Append { readings, reply }).await
    }

    /// Committed readings after `after_seq`, oldest first, at most `limit`.
    pub async fn read_after(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredReading>, BufferError> {
        self.call(|reply| Command::ReadAfter {
            after_seq,
            limit,
            reply,
        })
        .await
    }

    /// The aggregator processed everything up to `seq`: those readings are
    /// deleted (by the next commit). Returns how many readings it covered.
    pub async fn ack(&self, seq: u64) -> Result<u64, BufferError> {
        self.call(|reply| Command::Ack { seq, reply }).await
    }

    /// Current counters.
    pub async fn stats(&self) -> Result<BufferStats, BufferError> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Commits now.
    pub async fn flush(&self) -> Result<(), BufferError> {
        self.call(|reply| Command::Flush { reply }).await
    }

    /// Commits and stops the thread (other handles then get
    /// [`BufferError::Closed`]). Returns the final commit's result.
    pub async fn close(&self) -> Result<(), BufferError> {
        self.call(|reply| Command::Close { reply }).await
    }

    /// Highest committed sequence number; changes after every commit that
    /// wrote readings. `changed()` errors once the thread has stopped.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// What opening the file found (e.g. a corrupt file moved aside).
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Whether the buffer thread has stopped (closed, or died).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// State of the buffer thread.
struct Worker {
    /// `None` once closed.
    buffer: Option<SqliteBuffer>,
    rx: mpsc::Receiver<Command>,
    committed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    interval: Duration,
    /// `commits_total` already added to the metric.
    seen_commits: u64,
    /// `dropped_total` already added to the metric (`None`: not yet read;
    /// the metric counts drops of this process only).
    seen_dropped: Option<u64>,
}

impl Worker {
    async fn run(mut self) {
        let start = tokio::time::Instant::now() + self.interval;
        let mut tick = tokio::time::interval_at(start, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Close { reply }) => {
                        let _ = reply.send(self.close());
                        break;
                    }
                    Some(cmd) => self.handle(cmd),
                    // Every handle dropped: commit and stop (close logs a failure).
                    None => {
                        let _ = self.close();
                        break;
                    }
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        info!("buffer thread stopped");
    }

    fn handle(&mut self, cmd: Command) {
        let Some(buffer) = self.buffer.as_mut() else {
            return; // dropping the reply makes the caller see Closed
        };
        match cmd {
            Command::Append { readings, reply } => {
                let result = buffer.append_vec(readings);
                if let Ok(out) = &result {
                    self.metrics.buffer_appended.inc_by(out.accepted as u64);
                }
                let _ = reply.send(result);
                self.publish_committed();
            }
            Command::ReadAfter {
                after_seq,
                limit,
                reply,
            } => {
                let _ = reply.send(buffer.read_after(after_seq, limit));
            }
            Command::Ack { seq, reply } => {
                let result = buffer.ack(seq);
                if let Ok(n) = &result {
                    self.metrics.acked_readings.inc_by(*n);
                }
                let _ = reply.send(result);
            }
            Command::Stats { reply } => {
                let _ = reply.send(buffer.stats());
            }
            Command::Flush { reply } => {
                let _ = reply.send(buffer.commit());
                self.after_commit();
            }
            Command::Close { reply } => {
                let _ = reply.send(self.close());
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(buffer) = self.buffer.as_mut() {
            // A failure is logged by commit() (rate limited) and retried on
            // the next tick; the readings stay in memory.
            let _ = buffer.commit();
        }
        self.after_commit();
    }

    fn close(&mut self) -> Result<(), BufferError> {
        let Some(mut buffer) = self.buffer.take() else {
            return Ok(());
        };
        let pending = buffer.pending_len();
        let committed = buffer.commit();
        let last = buffer.last_committed_seq();
        self.committed.send_if_modified(|v| {
            let changed = *v != last;
            *v = last;
            changed
        });
        let result = committed.and(buffer.close());
        match &result {
            Ok(()) => info!("buffer committed and closed"),
            Err(e) => {
                error!(error = %e, pending, "buffer: final commit failed, uncommitted readings lost")
            }
        }
        result
    }

    fn after_commit(&mut self) {
        self.publish_committed();
        self.refresh_metrics();
    }

    fn publish_committed(&mut self) {
        if let Some(buffer) = &self.buffer {
            let last = buffer.last_committed_seq();
            self.committed.send_if_modified(|v| {
                let changed = *v != last;
                *v = last;
                changed
            });
        }
    }

    fn refresh_metrics(&mut self) {
        let Some(buffer) = &self.buffer else { return };
        let stats = match buffer.stats() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "buffer statistics unavailable");
                return;
            }
        };
        let m = &self.metrics;
        m.buffer_rows
            .set(i64::try_from(stats.rows).unwrap_or(i64::MAX));
        m.buffer_bytes
            .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        let age = stats
            .oldest_time_ms
            .map_or(0.0, |t| (now_ms().saturating_sub(t)).max(0) as f64 / 1000.0);
        m.buffer_oldest_age_seconds.set(age);
        m.buffer_commits
            .inc_by(stats.commits_total.saturating_sub(self.seen_commits));
        self.seen_commits = stats.commits_total;
        if let Some(seen) = self.seen_dropped {
            m.buffer_dropped
                .inc_by(stats.dropped_total.saturating_sub(seen));
        }
        self.seen_dropped = Some(stats.dropped_total);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = BufferConfig::default();
        assert_eq!(
            c.path,
            PathBuf::from("/var/lib/outpost-agent/buffer.sqlite")
        );
        assert_eq!(c.max_bytes, 256 * 1024 * 1024);
        assert_eq!(c.max_rows, None);
        assert_eq!(c.overflow, OverflowPolicy::DropOldest);
        assert_eq!(c.durability, Durability::Normal);
        assert_eq!(c.commit_interval, Duration::from_secs(1));
        let mut errors = Vec::new();
        c.validate("buffer", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        // An empty table is the default.
        assert_eq!(toml::from_str::<BufferConfig>("").unwrap(), c);
    }

    #[test]
    fn parses_kebab_case_keys() {
        let c: BufferConfig = toml::from_str(
            r#"
            path = "/data/buf.sqlite"
            max-bytes = 1048576
            max-rows = 500000
            overflow = "drop-newest"
            durability = "full"
            commit-interval = "250ms"
            "#,
        )
        .unwrap();
        assert_eq!(c.path, PathBuf::from("/data/buf.sqlite"));
        assert_eq!(c.max_bytes, 1 << 20);
        assert_eq!(c.max_rows, Some(500_000));
        assert_eq!(c.overflow, OverflowPolicy::DropNewest);
        assert_eq!(c.durability, Durability::Full);
        assert_eq!(c.commit_interval, Duration::from_millis(250));
        let off: BufferConfig = toml::from_str(r#"durability = "off""#).unwrap();
        assert_eq!(off.durability, Durability::Off);
    }

    #[test]
    fn rejects_unknown_keys_and_values() {
        let e = toml::from_str::<BufferConfig>("max_bytes = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_bytes"), "{e}");
        assert!(toml::from_str::<BufferConfig>(r#"overflow = "drop-random""#).is_err());
        assert!(toml::from_str::<BufferConfig>(r#"commit-interval = "soon""#).is_err());
    }

    #[test]
    fn validate_reports_every_problem_with_its_key() {
        let c = BufferConfig {
            path: PathBuf::new(),
            max_bytes: 1000,
            max_rows: Some(0),
            commit_interval: Duration::from_secs(3600),
            ..BufferConfig::default()
        };
        let mut errors = Vec::new();
        c.validate("buffer", &mut errors);
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("buffer.path: "));
        assert!(errors[1].starts_with("buffer.max-bytes: must be at least 1 MiB"));
        assert!(errors[2].starts_with("buffer.max-rows: "));
        assert_eq!(
            errors[3],
            "buffer.commit-interval: must be between 10ms and 1m"
        );
    }
}
