//! Unit tests of [`SqliteBuffer`] (those that need its internals: disk full,
//! pragmas, pending overflow). The public behaviour, the model test and the
//! async handle are tested in `agent/tests/buffer.rs`.

use super::*;
use std::path::Path;

fn config(dir: &Path) -> BufferConfig {
    BufferConfig {
        path: dir.join("buffer.sqlite"),
        durability: Durability::Normal,
        ..BufferConfig::default()
    }
}

fn reading(i: u64) -> Reading {
    Reading::new(
        format!("s{}", i % 7),
        1_700_000_000_000 + i as i64,
        Value::F32(i as f32 * 0.5),
    )
}

fn readings(range: std::ops::Range<u64>) -> Vec<Reading> {
    range.map(reading).collect()
}

fn open(cfg: &BufferConfig) -> SqliteBuffer {
    SqliteBuffer::open(cfg).unwrap().0
}

fn pragma_i64(b: &SqliteBuffer, name: &str) -> i64 {
    b.conn
        .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
        .unwrap()
}

fn count_rows(b: &SqliteBuffer) -> u64 {
    b.conn
        .query_row("SELECT count(*) FROM readings", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

#[test]
fn new_file_has_the_chosen_pragmas_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let b = open(&cfg);
    assert_eq!(pragma_i64(&b, "auto_vacuum"), 2, "INCREMENTAL");
    assert_eq!(pragma_i64(&b, "synchronous"), 1, "NORMAL");
    assert_eq!(pragma_i64(&b, "application_id"), i64::from(APPLICATION_ID));
    assert_eq!(pragma_i64(&b, "user_version"), i64::from(SCHEMA_VERSION));
    let mode: String = b
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(b);
    for (durability, level) in [(Durability::Full, 2), (Durability::Off, 0)] {
        let b = open(&BufferConfig {
            durability,
            ..cfg.clone()
        });
        assert_eq!(pragma_i64(&b, "synchronous"), level, "{durability:?}");
    }
}

#[test]
fn disk_full_on_commit_rolls_back_keeps_committed_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    b.append(&readings(0..100)).unwrap();
    b.commit().unwrap();
    let committed = b.read_after(0, usize::MAX).unwrap();
    let stats_before = b.stats().unwrap();

    // SQLite's page limit provokes SQLITE_FULL like a full disk would.
    let pages = pragma_i64(&b, "page_count");
    b.conn
        .query_row(
            &format!("PRAGMA max_page_count = {}", pages + 2),
            [],
            |_| Ok(()),
        )
        .unwrap();
    let big: Vec<Reading> = (0..2000)
        .map(|i| Reading::new("text", i, Value::Str(format!("{i:0>200}"))))
        .collect();
    let out = b.append(&big).unwrap();
    b.ack(committed[9].seq).unwrap();
    let err = b.commit().unwrap_err();
    assert!(err.is_disk_full(), "{err}");
    assert!(b.conn.is_autocommit(), "rolled back");

    // Nothing committed was lost, nothing pending was written.
    let stats = b.stats().unwrap();
    assert_eq!(stats.last_committed_seq, stats_before.last_committed_seq);
    assert_eq!(stats.pending, 2000);
    assert_eq!(count_rows(&b), 100);
    assert_eq!(
        b.read_after(0, usize::MAX).unwrap(),
        committed[10..].to_vec()
    );
    // Still failing: still an error, still no crash.
    assert!(b.commit().unwrap_err().is_disk_full());

    // Space comes back: the retry writes the same readings with the same seqs.
    b.conn
        .query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))
        .unwrap();
    b.commit().unwrap();
    let all = b.read_after(0, usize::MAX).unwrap();
    assert_eq!(all.len(), 90 + 2000);
    assert_eq!(all[90].seq, out.first_seq.unwrap());
    assert_eq!(all.last().unwrap().seq, out.last_seq.unwrap());
    assert_eq!(all[90].reading, big[0]);
    assert_eq!(count_rows(&b), 2090);
}

#[test]
fn new_sensor_of_a_failed_commit_gets_a_valid_id_on_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    b.append(&readings(0..10)).unwrap();
    b.commit().unwrap();
    let pages = pragma_i64(&b, "page_count");
    b.conn
        .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
        .unwrap();
    let fresh: Vec<Reading> = (0..500)
        .map(|i| Reading::new(format!("new-{i}"), i, Value::Int(i)))
        .collect();
    b.append(&fresh).unwrap();
    assert!(b.commit().is_err());
    b.conn
        .query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))
        .unwrap();
    b.commit().unwrap();
    let got: Vec<Reading> = b
        .read_after(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| s.reading)
        .collect();
    assert_eq!(&got[10..], &fresh[..]);
}

#[test]
fn pending_is_bounded_when_commits_fail() {
    for policy in [OverflowPolicy::DropOldest, OverflowPolicy::DropNewest] {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(&BufferConfig {
            overflow: policy,
            ..config(dir.path())
        });
        b.append(&readings(0..5)).unwrap();
        b.commit().unwrap();
        let pages = pragma_i64(&b, "page_count");
        b.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .unwrap();

        let n = MAX_PENDING as u64 + 500;
        let out = b.append(&readings(0..n)).unwrap();
        assert_eq!(b.pending_len(), MAX_PENDING, "{policy:?}");
        assert_eq!(out.dropped, 500, "{policy:?}");
        let stats = b.stats().unwrap();
        assert_eq!(stats.dropped_total, 500);
        assert_eq!(stats.rows, 5 + MAX_PENDING as u64);
        let first_kept = b.pending.front().unwrap().reading.clone();
        match policy {
            // The oldest uncommitted readings went; all new ones got seqs.
            OverflowPolicy::DropOldest => {
                assert_eq!(out.accepted as u64, n);
                assert_eq!(first_kept, reading(500));
            }
            // The newest were refused without a seq.
            OverflowPolicy::DropNewest => {
                assert_eq!(out.accepted, MAX_PENDING);
                assert_eq!(first_kept, reading(0));
            }
        }
        b.conn
            .query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))
            .unwrap();
        b.commit().unwrap();
        assert_eq!(count_rows(&b), 5 + MAX_PENDING as u64);
        let meta: i64 = b
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'dropped_total'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(meta, 500);
    }
}

#[test]
fn a_large_append_commits_early_instead_of_dropping() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    let n = 3 * MAX_PENDING as u64 + 7;
    let out = b.append(&readings(0..n)).unwrap();
    assert_eq!(out.accepted as u64, n);
    assert_eq!(out.dropped, 0);
    assert!(b.pending_len() <= MAX_PENDING);
    assert_eq!(b.stats().unwrap().commits_total, 3);
    b.commit().unwrap();
    assert_eq!(count_rows(&b), n);
}

#[test]
fn meta_row_count_matches_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        max_rows: Some(1000),
        ..config(dir.path())
    };
    let mut b = open(&cfg);
    for round in 0..5u64 {
        b.append(&readings(round * 700..(round + 1) * 700)).unwrap();
        b.commit().unwrap();
        let first = b.read_after(0, 1).unwrap()[0].seq;
        b.ack(first + 50).unwrap();
        b.commit().unwrap();
        assert_eq!(b.committed_rows, count_rows(&b));
    }
    drop(b);
    let b = open(&cfg);
    assert_eq!(b.committed_rows, count_rows(&b));
}

#[test]
fn freed_space_goes_back_to_the_filesystem_after_a_backlog_drains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        durability: Durability::Off,
        ..config(dir.path())
    };
    let mut b = open(&cfg);
    let text = "x".repeat(300);
    for chunk in 0..4 {
        let batch: Vec<Reading> = (0..MAX_PENDING as i64)
            .map(|i| Reading::new("t", chunk * 100_000 + i, Value::Str(text.clone())))
            .collect();
        b.append(&batch).unwrap();
        b.commit().unwrap();
    }
    let full_pages = pragma_i64(&b, "page_count");
    assert!(full_pages * 4096 > 12 * 1024 * 1024, "{full_pages} pages");
    let last = b.stats().unwrap().last_committed_seq;
    b.ack(last).unwrap();
    b.commit().unwrap();
    // A few more commits (each gives back up to VACUUM_STEP_PAGES).
    for i in 0..10 {
        b.append(&[reading(i)]).unwrap();
        b.commit().unwrap();
    }
    let pages = pragma_i64(&b, "page_count");
    assert!(
        pages * 4096 <= VACUUM_MIN_FREE_BYTES as i64 + 64 * 4096,
        "{pages} pages left of {full_pages}"
    );
}

#[test]
fn sensor_names_table_stays_within_twice_the_names_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&BufferConfig {
        durability: Durability::Off,
        ..config(dir.path())
    });
    let names = |prefix: &str| -> Vec<Reading> {
        (0..SENSOR_PRUNE_AT as i64 + 10)
            .map(|i| Reading::new(format!("{prefix}-{i}"), i, Value::Int(i)))
            .collect()
    };
    // Reaching the threshold while every name is in use prunes nothing.
    b.append(&names("a")).unwrap();
    b.commit().unwrap();
    let last = b.stats().unwrap().last_committed_seq;
    b.ack(last).unwrap();
    b.commit().unwrap();
    // The "a" names have no rows left; the "b" names reach twice the count.
    b.append(&names("b")).unwrap();
    b.commit().unwrap();
    let count: i64 = b
        .conn
        .query_row("SELECT count(*) FROM sensors", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count as u64, SENSOR_PRUNE_AT + 10);
    // Ids are still right, for old and new names.
    b.append(&[
        Reading::new("a-3", 3, Value::Int(3)),
        Reading::new("b-4", 4, Value::Int(4)),
    ])
    .unwrap();
    b.commit().unwrap();
    let got: Vec<String> = b
        .read_after(last, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| s.reading.sensor)
        .collect();
    assert_eq!(got.len() as u64, SENSOR_PRUNE_AT + 12);
    assert_eq!(got[..3], ["b-0", "b-1", "b-2"]);
    assert_eq!(got[got.len() - 2..], ["a-3", "b-4"]);
}

#[test]
fn an_undecodable_row_is_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    b.append(&readings(0..3)).unwrap();
    b.commit().unwrap();
    let rows = b.read_after(0, 10).unwrap();
    b.conn
        .execute(
            "UPDATE readings SET kind = 99 WHERE seq = ?1",
            [rows[1].seq as i64],
        )
        .unwrap();
    let got = b.read_after(0, 10).unwrap();
    assert_eq!(got, vec![rows[0].clone(), rows[2].clone()]);
}

#[test]
fn floats_are_stored_compactly_and_exactly() {
    for v in [
        0.0f32,
        -0.0,
        1.5,
        -1.5,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::NEG_INFINITY,
    ] {
        let value = Value::F32(v);
        let (k, stored) = encode(&value);
        let Stored::Int(i) = stored else {
            panic!("f32 stored as text")
        };
        assert!(
            i >= i64::from(i32::MIN) && i <= i64::from(i32::MAX),
            "4 bytes on disk"
        );
        assert_eq!(
            decode_value(k, ValueRef::Integer(i)).unwrap(),
            Value::F32(v)
        );
    }
}

/// Pages the commits since the last checkpoint wrote (WAL frames), then
/// resets the WAL.
fn wal_frames(b: &SqliteBuffer) -> i64 {
    let frames = b
        .conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .unwrap();
    b.conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    frames
}

#[test]
fn a_steady_state_commit_writes_two_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    let mut i = 0;
    // Online: every commit carries a few readings and the ack of the last.
    for _ in 0..5 {
        b.append(&readings(i..i + 10)).unwrap();
        i += 10;
        let s = b.stats().unwrap();
        b.ack(s.last_committed_seq).unwrap();
        b.commit().unwrap();
    }
    wal_frames(&b);
    for _ in 0..20 {
        b.append(&readings(i..i + 10)).unwrap();
        i += 10;
        let s = b.stats().unwrap();
        b.ack(s.last_committed_seq).unwrap();
        b.commit().unwrap();
        assert_eq!(
            wal_frames(&b),
            2,
            "the readings page and the meta page (exact next_seq, for gap-free restarts)"
        );
    }
}

#[test]
fn a_process_crash_continues_the_sequence_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut b = open(&cfg);
    let first = b.append(&readings(0..3)).unwrap();
    b.commit().unwrap();
    // Everything acked and deleted: only meta remembers where we were.
    b.ack(first.last_seq.unwrap()).unwrap();
    b.commit().unwrap();
    b.append(&readings(3..5)).unwrap(); // never committed: lost in the crash
    drop(b);
    // Same boot, clock far behind: continue exactly after the last commit.
    let (mut b, _) = SqliteBuffer::open_at(&cfg, 1).unwrap();
    let next = b.append(&readings(5..6)).unwrap();
    assert_eq!(next.first_seq, Some(first.last_seq.unwrap() + 1));
}

#[test]
fn after_a_reboot_with_normal_durability_the_clock_floor_applies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut b = open(&cfg);
    let first = b.append(&readings(0..3)).unwrap();
    b.commit().unwrap();
    // Pretend the previous open happened in another boot.
    b.conn
        .execute(UPSERT_META, params![key::BOOT, boot_hash() ^ 1])
        .unwrap();
    drop(b);
    let later = first.last_seq.unwrap() + 10_000_000;
    let (mut b, _) = SqliteBuffer::open_at(&cfg, later).unwrap();
    let next = b.append(&readings(3..4)).unwrap();
    assert_eq!(
        next.first_seq,
        Some(later),
        "a power cut may have rolled back published commits: jump"
    );
    drop(b);
    // Same boot again: no further jump.
    let (mut b, _) = SqliteBuffer::open_at(&cfg, later + 10_000_000).unwrap();
    b.commit().unwrap();
    let next = b.append(&readings(4..5)).unwrap();
    assert!(next.first_seq.unwrap() < later + 10_000_000);
}
