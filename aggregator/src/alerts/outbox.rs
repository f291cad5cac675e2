//! [`Outbox`]: the delivery side's connection to the state database.
//!
//! Rows are *inserted* only by the ingest's [`crate::state::Store`], in the
//! transaction that records the transition (`alert_history`) and the alert
//! state. This connection *updates* them (attempts, next attempt, delivered
//! or dead) and queues repeats; the API opens it read-only for the history,
//! the outbox listing and the SSE stream. WAL lets it read while the ingest
//! writes; writes of both wait on each other (busy timeout), each is one
//! short transaction. `synchronous = FULL` like the store: a "delivered"
//! mark lost in a power cut would only send that notification again (with
//! the same idempotency key), but there is no reason to allow it.
//!
//! Row states: `pending` (to send; `next_attempt_ms` says when),
//! `delivered` (the receiver confirmed), `dead` (given up after the sink's
//! max age, or the sink is no longer configured). Finished rows are kept
//! with their history entry (the newest [`crate::state::MAX_ALERT_HISTORY`]).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::rules::model::Transition;
use crate::state::{StateError, BUSY_TIMEOUT};

/// Largest `limit` the listing queries accept.
pub const MAX_LIST_LIMIT: usize = 1000;
/// Default `limit` of the listing queries.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// A pending notification, with its transition.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub id: i64,
    pub history_id: i64,
    pub fingerprint: String,
    pub repeat: u32,
    pub attempts: u32,
    pub created_ms: i64,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    /// The transition (JSON), as recorded.
    pub body: String,
}

/// One delivery of a transition, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryRecord {
    /// Outbox row id.
    pub id: i64,
    pub sink: String,
    /// 0 for the transition, n for its n-th repeat.
    pub repeat: u32,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    pub attempts: u32,
    pub created_ms: i64,
    pub next_attempt_ms: Option<i64>,
    pub last_attempt_ms: Option<i64>,
    pub last_error: Option<String>,
    /// When it was delivered or dead-lettered.
    pub done_ms: Option<i64>,
}

/// A recorded transition with its deliveries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// History id (the SSE event id).
    pub id: i64,
    /// When it was committed (Unix ms).
    pub committed_ms: i64,
    /// The transition.
    #[serde(flatten)]
    pub transition: Transition,
    /// One per routed sink and repeat (empty for transitions nobody is
    /// notified of: pending, silent resolves).
    pub deliveries: Vec<DeliveryRecord>,
}

/// An outbox row with what it is about, for `GET /api/v1/outbox`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxEntry {
    #[serde(flatten)]
    pub delivery: DeliveryRecord,
    pub history_id: i64,
    pub fingerprint: String,
    pub rule: String,
    pub device: String,
    pub state: String,
}

/// See [`Outbox::startup`].
#[derive(Debug, Clone, Default)]
pub struct StartupHistory {
    /// Highest recorded transition number per fingerprint.
    pub numbers: std::collections::HashMap<String, u64>,
    /// The newest transition of every alert that is firing per the history.
    pub firing: Vec<Transition>,
}

/// Filters of [`Outbox::history`].
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub device: Option<String>,
    pub rule: Option<String>,
    /// Transitions with an event time at or after this (Unix ms).
    pub since_ms: Option<i64>,
    /// Only ids below this (paging backwards).
    pub before_id: Option<i64>,
    pub limit: usize,
}

/// Counts of one sink's outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub pending: u64,
    /// `created_ms` of the oldest pending row.
    pub oldest_pending_ms: Option<i64>,
    pub dead: u64,
}

/// The oldest pending row of each alert (fingerprint) at sink `?1`: only
/// that one may be sent, so one alert's notifications keep their order
/// while one alert in backoff does not hold up the others. The heads come
/// from a covering scan of `outbox_by_fingerprint`; the due ones first.
const SELECT_PENDING: &str = "SELECT o.id, o.history_id, o.fingerprint, o.repeat, o.attempts,
         o.created_ms, o.next_attempt_ms, o.last_error, h.body
     FROM (SELECT min(id) AS id FROM outbox WHERE sink = ?1 AND status = 'pending'
           GROUP BY fingerprint) heads
     JOIN outbox o ON o.id = heads.id
     JOIN alert_history h ON h.id = o.history_id
     ORDER BY o.next_attempt_ms, o.id LIMIT ?2";
/// When the next head of sink `?1` is due.
const NEXT_DUE: &str = "SELECT min(o.next_attempt_ms)
     FROM (SELECT min(id) AS id FROM outbox WHERE sink = ?1 AND status = 'pending'
           GROUP BY fingerprint) heads
     JOIN outbox o ON o.id = heads.id";
const DELIVERED: &str = "UPDATE outbox SET status = 'delivered', attempts = attempts + 1,
         last_attempt_ms = ?2, done_ms = ?2, last_error = NULL
     WHERE id = ?1 AND status = 'pending'";
const FAILED: &str = "UPDATE outbox SET attempts = attempts + 1, last_attempt_ms = ?2,
         next_attempt_ms = ?3, last_error = ?4
     WHERE id = ?1 AND status = 'pending'";
const DEAD: &str = "UPDATE outbox SET status = 'dead', done_ms = ?2, last_error = ?3
     WHERE id = ?1 AND status = 'pending'";
/// Firing alerts of sink `?1` whose newest notification there was
/// delivered (or queued, if never delivered) at or before `?2` (ms) and
/// none is pending: (history id, fingerprint, next repeat). "Firing" = the
/// newest firing/resolved transition of the fingerprint is a firing, and it
/// was routed to this sink. Read outside the write lock; each candidate is
/// checked again ([`STILL_DUE`]) in the transaction that queues it.
const DUE_REPEATS: &str = "SELECT o.history_id, o.fingerprint, max(o2.repeat) + 1
     FROM outbox o
     JOIN alert_history h ON h.id = o.history_id
     JOIN outbox o2 ON o2.history_id = o.history_id AND o2.sink = o.sink
     WHERE o.sink = ?1 AND o.repeat = 0 AND h.state = 'firing'
       AND NOT EXISTS (SELECT 1 FROM alert_history h2
                       WHERE h2.fingerprint = h.fingerprint AND h2.id > h.id AND h2.state != 'pending')
       AND NOT EXISTS (SELECT 1 FROM outbox o3
                       WHERE o3.sink = o.sink AND o3.status = 'pending' AND o3.fingerprint = o.fingerprint)
     GROUP BY o.history_id
     HAVING max(coalesce(o2.done_ms, o2.created_ms)) <= ?2";
/// Whether alert `?3` (history row `?2`) at sink `?1` still gets a repeat:
/// no newer transition, nothing pending.
const STILL_DUE: &str = "SELECT NOT EXISTS (SELECT 1 FROM alert_history h2
                           WHERE h2.fingerprint = ?3 AND h2.id > ?2 AND h2.state != 'pending')
       AND NOT EXISTS (SELECT 1 FROM outbox o3
                       WHERE o3.sink = ?1 AND o3.status = 'pending' AND o3.fingerprint = ?3)";
const INSERT_REPEAT: &str = "INSERT INTO outbox (history_id, sink, fingerprint, repeat, status,
         created_ms, next_attempt_ms)
     VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5)";
/// Finished repeats older than the one just queued: an alert firing for a
/// month keeps two repeat rows per sink, not 40,000.
const DROP_OLD_REPEATS: &str = "DELETE FROM outbox WHERE sink = ?1 AND history_id = ?2
     AND repeat > 0 AND repeat < ?3 AND status != 'pending'";
const STATS: &str = "SELECT
         (SELECT count(*) FROM outbox WHERE sink = ?1 AND status = 'pending'),
         (SELECT min(created_ms) FROM outbox WHERE sink = ?1 AND status = 'pending'),
         (SELECT count(*) FROM outbox WHERE sink = ?1 AND status = 'dead')";
const DELIVERY_COLUMNS: &str = "o.id, o.sink, o.repeat, o.status, o.attempts, o.created_ms,
     o.next_attempt_ms, o.last_attempt_ms, o.last_error, o.done_ms";

/// The connection; see the module documentation.
#[derive(Debug)]
pub struct Outbox {
    conn: Connection,
}

fn delivery_at(r: &rusqlite::Row<'_>, base: usize) -> rusqlite::Result<DeliveryRecord> {
    let status: String = r.get(base + 3)?;
    let pending = status == "pending";
    Ok(DeliveryRecord {
        id: r.get(base)?,
        sink: r.get(base + 1)?,
        repeat: r.get(base + 2)?,
        status,
        attempts: r.get(base + 4)?,
        created_ms: r.get(base + 5)?,
        next_attempt_ms: if pending { r.get(base + 6)? } else { None },
        last_attempt_ms: r.get(base + 7)?,
        last_error: r.get(base + 8)?,
        done_ms: r.get(base + 9)?,
    })
}

fn decode(body: &str) -> Result<Transition, StateError> {
    serde_json::from_str(body).map_err(|e| StateError::Decode(format!("alert_history.body: {e}")))
}

impl Outbox {
    /// A read-write connection (the delivery workers). The file must exist
    /// (the store created it).
    pub fn open(path: &Path) -> Result<Outbox, StateError> {
        Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
    }

    /// A read-only connection (the API).
    pub fn open_reader(path: &Path) -> Result<Outbox, StateError> {
        Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<Outbox, StateError> {
        let err = |source| StateError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        conn.execute_batch("PRAGMA synchronous = FULL;")
            .map_err(err)?;
        Ok(Outbox { conn })
    }

    /// The oldest pending row of each alert at `sink` (up to `limit`
    /// alerts), oldest first.
    pub fn pending(&self, sink: &str, limit: usize) -> Result<Vec<PendingRow>, StateError> {
        let mut stmt = self.conn.prepare(SELECT_PENDING)?;
        let rows = stmt.query_map(params![sink, limit as i64], |r| {
            Ok(PendingRow {
                id: r.get(0)?,
                history_id: r.get(1)?,
                fingerprint: r.get(2)?,
                repeat: r.get(3)?,
                attempts: r.get(4)?,
                created_ms: r.get(5)?,
                next_attempt_ms: r.get(6)?,
                last_error: r.get(7)?,
                body: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Applies the outcomes of a round of attempts in one transaction.
    pub fn record(&mut self, outcomes: &[Outcome], now: i64) -> Result<(), StateError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for o in outcomes {
            match o {
                Outcome::Delivered { id } => tx.execute(DELIVERED, params![id, now])?,
                Outcome::Failed {
                    id,
                    next_attempt_ms,
                    error,
                } => tx.execute(FAILED, params![id, now, next_attempt_ms, error])?,
                Outcome::Dead { id, error } => tx.execute(DEAD, params![id, now, error])?,
            };
        }
        tx.commit()?;
        Ok(())
    }

    /// Queues a repeat of every alert firing at `sink` whose newest
    /// notification there was done (delivered or given up) at or before
    /// `older_than_ms` and none is pending. Returns how many.
    pub fn queue_repeats(
        &mut self,
        sink: &str,
        older_than_ms: i64,
        now: i64,
    ) -> Result<usize, StateError> {
        let due: Vec<(i64, String, i64)> = {
            let mut stmt = self.conn.prepare(DUE_REPEATS)?;
            let rows = stmt.query_map(params![sink, older_than_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        if due.is_empty() {
            return Ok(0);
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut queued = 0;
        for (history_id, fp, repeat) in &due {
            let still: bool =
                tx.query_row(STILL_DUE, params![sink, history_id, fp], |r| r.get(0))?;
            if !still {
                continue;
            }
            tx.execute(INSERT_REPEAT, params![history_id, sink, fp, repeat, now])?;
            tx.execute(DROP_OLD_REPEATS, params![sink, history_id, repeat])?;
            queued += 1;
        }
        tx.commit()?;
        Ok(queued)
    }

    /// When the earliest pending notification of `sink` is due, if any.
    pub fn next_due(&self, sink: &str) -> Result<Option<i64>, StateError> {
        Ok(self.conn.query_row(NEXT_DUE, [sink], |r| r.get(0))?)
    }

    /// Dead-letters the pending rows of sinks not in `known` (a sink
    /// removed from the config). Returns (sink, count) per such sink.
    pub fn retire_unknown_sinks(
        &mut self,
        known: &[String],
        now: i64,
    ) -> Result<Vec<(String, u64)>, StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let sinks: Vec<(String, u64)> = {
            let mut stmt = tx.prepare(
                "SELECT sink, count(*) FROM outbox WHERE status = 'pending' GROUP BY sink",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|(s, _)| !known.contains(s))
                .map(|(s, n)| (s, n.max(0) as u64))
                .collect()
        };
        for (s, _) in &sinks {
            tx.execute(
                "UPDATE outbox SET status = 'dead', done_ms = ?2,
                     last_error = 'sink no longer configured'
                 WHERE sink = ?1 AND status = 'pending'",
                params![s, now],
            )?;
        }
        tx.commit()?;
        Ok(sinks)
    }

    /// Pending and dead counts of `sink`.
    pub fn stats(&self, sink: &str) -> Result<SinkStats, StateError> {
        let mut stmt = self.conn.prepare(STATS)?;
        Ok(stmt.query_row([sink], |r| {
            Ok(SinkStats {
                pending: r.get::<_, i64>(0)?.max(0) as u64,
                oldest_pending_ms: r.get(1)?,
                dead: r.get::<_, i64>(2)?.max(0) as u64,
            })
        })?)
    }

    /// Transitions, newest first, with their deliveries.
    pub fn history(&self, q: &HistoryQuery) -> Result<Vec<HistoryEntry>, StateError> {
        let limit = q.limit.clamp(1, MAX_LIST_LIMIT) as i64;
        let mut stmt = self.conn.prepare(
            "SELECT id, committed_ms, body FROM alert_history
             WHERE (?1 IS NULL OR device = ?1) AND (?2 IS NULL OR rule = ?2)
               AND (?3 IS NULL OR event_time_ms >= ?3) AND (?4 IS NULL OR id < ?4)
             ORDER BY id DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![q.device, q.rule, q.since_ms, q.before_id, limit],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            },
        )?;
        let rows: Vec<_> = rows.collect::<Result<_, _>>()?;
        self.entries(rows)
    }

    /// Transitions with an id above `after`, oldest first (the SSE stream).
    pub fn history_after(&self, after: i64, limit: usize) -> Result<Vec<HistoryEntry>, StateError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, committed_ms, body FROM alert_history WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit.clamp(1, MAX_LIST_LIMIT) as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let rows: Vec<_> = rows.collect::<Result<_, _>>()?;
        self.entries(rows)
    }

    /// What the rules runtime needs at start: the highest transition
    /// number recorded per fingerprint (numbers keep growing across
    /// restarts, so idempotency keys are never reused), and the alerts
    /// whose newest notified transition is a firing (to resolve those the
    /// restored engine no longer has).
    pub fn startup(&self) -> Result<StartupHistory, StateError> {
        let mut numbers = std::collections::HashMap::new();
        {
            let mut stmt = self.conn.prepare(
                "SELECT fingerprint, max(number) FROM alert_history GROUP BY fingerprint",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (fp, n) = row?;
                numbers.insert(fp, n.max(0) as u64);
            }
        }
        let mut stmt = self.conn.prepare(
            "SELECT h.body FROM alert_history h
             WHERE h.state = 'firing' AND h.id = (SELECT max(h2.id) FROM alert_history h2
                 WHERE h2.fingerprint = h.fingerprint AND h2.state != 'pending')",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut firing = Vec::new();
        for body in rows {
            firing.push(decode(&body?)?);
        }
        Ok(StartupHistory { numbers, firing })
    }

    /// The newest history id (0 when there is none).
    pub fn last_history_id(&self) -> Result<i64, StateError> {
        Ok(self
            .conn
            .query_row("SELECT max(id) FROM alert_history", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()?
            .flatten()
            .unwrap_or(0))
    }

    fn entries(&self, rows: Vec<(i64, i64, String)>) -> Result<Vec<HistoryEntry>, StateError> {
        let mut by_history: BTreeMap<i64, Vec<DeliveryRecord>> = BTreeMap::new();
        {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM outbox o WHERE o.history_id = ?1 ORDER BY o.id"
            ))?;
            for (id, _, _) in &rows {
                let ds = stmt.query_map([id], |r| delivery_at(r, 0))?;
                by_history.insert(*id, ds.collect::<Result<_, _>>()?);
            }
        }
        rows.into_iter()
            .map(|(id, committed_ms, body)| {
                Ok(HistoryEntry {
                    id,
                    committed_ms,
                    transition: decode(&body)?,
                    deliveries: by_history.remove(&id).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Outbox rows (newest first), optionally of one status and sink.
    pub fn list(
        &self,
        status: Option<&str>,
        sink: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {DELIVERY_COLUMNS}, o.history_id, o.fingerprint, h.rule, h.device, h.state
             FROM outbox o JOIN alert_history h ON h.id = o.history_id
             WHERE (?1 IS NULL OR o.status = ?1) AND (?2 IS NULL OR o.sink = ?2)
             ORDER BY o.id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![status, sink, limit.clamp(1, MAX_LIST_LIMIT) as i64],
            |r| {
                Ok(OutboxEntry {
                    delivery: delivery_at(r, 0)?,
                    history_id: r.get(10)?,
                    fingerprint: r.get(11)?,
                    rule: r.get(12)?,
                    device: r.get(13)?,
                    state: r.get(14)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Counts by status over all sinks: (pending, delivered, dead).
    pub fn totals(&self) -> Result<(u64, u64, u64), StateError> {
        Ok(self.conn.query_row(
            "SELECT
                 (SELECT count(*) FROM outbox WHERE status = 'pending'),
                 (SELECT count(*) FROM outbox WHERE status = 'delivered'),
                 (SELECT count(*) FROM outbox WHERE status = 'dead')",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?.max(0) as u64,
                    r.get::<_, i64>(1)?.max(0) as u64,
                    r.get::<_, i64>(2)?.max(0) as u64,
                ))
            },
        )?)
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver confirmed it.
    Delivered { id: i64 },
    /// It failed; try again at `next_attempt_ms`.
    Failed {
        id: i64,
        next_attempt_ms: i64,
        error: String,
    },
    /// Given up.
    Dead { id: i64, error: String },
}
