//! The durable buffer through its public API: the sync core
//! ([`SqliteBuffer`]), a model test against a reference `BTreeMap`, crash and
//! corruption handling, and the async handle ([`Buffer::spawn`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_agent::buffer::sqlite::now_us;
use outpost_agent::buffer::{
    Buffer, BufferConfig, BufferError, Durability, OverflowPolicy, SqliteBuffer, MAX_PENDING,
};
use outpost_agent::metrics::Metrics;
use outpost_agent::reading::{Quality, Reading, StoredReading, Value};
use proptest::prelude::*;

const MIB: u64 = 1024 * 1024;
/// Generous deadline for anything asynchronous (a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(60);

fn config(dir: &Path) -> BufferConfig {
    BufferConfig {
        path: dir.join("buffer.sqlite"),
        ..BufferConfig::default()
    }
}

fn reading(i: u64) -> Reading {
    Reading::new(
        format!("sensor-{}", i % 5),
        1_700_000_000_000 + i as i64 * 100,
        Value::F32(i as f32 / 4.0),
    )
}

fn readings(range: std::ops::Range<u64>) -> Vec<Reading> {
    range.map(reading).collect()
}

fn open(cfg: &BufferConfig) -> SqliteBuffer {
    let (b, report) = SqliteBuffer::open(cfg).unwrap();
    assert_eq!(report.moved_aside, None);
    b
}

fn all(b: &SqliteBuffer) -> Vec<StoredReading> {
    b.read_after(0, usize::MAX).unwrap()
}

fn seqs(rows: &[StoredReading]) -> Vec<u64> {
    rows.iter().map(|r| r.seq).collect()
}

/// Readings equal, floats compared by their bits (NaN == NaN).
fn same(a: &Reading, b: &Reading) -> bool {
    let v = match (&a.value, &b.value) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (x, y) => x == y,
    };
    v && a.sensor == b.sensor && a.time_ms == b.time_ms && a.quality == b.quality
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn with_suffix(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    PathBuf::from(o)
}

// ---------------------------------------------------------------- basics

#[test]
fn append_commit_read_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    let out = b.append(&readings(0..10)).unwrap();
    assert_eq!(out.accepted, 10);
    assert_eq!(out.dropped, 0);
    let (first, last) = (out.first_seq.unwrap(), out.last_seq.unwrap());
    assert_eq!(last, first + 9);

    // Committed before published: nothing visible yet.
    assert!(all(&b).is_empty());
    assert_eq!(b.stats().unwrap().rows, 10);
    b.commit().unwrap();
    let rows = all(&b);
    assert_eq!(seqs(&rows), (first..=last).collect::<Vec<_>>());
    assert_eq!(
        rows.iter().map(|r| r.reading.clone()).collect::<Vec<_>>(),
        readings(0..10)
    );

    // More appended but not committed stay invisible.
    b.append(&readings(10..15)).unwrap();
    assert_eq!(all(&b).len(), 10);
    assert_eq!(b.stats().unwrap().last_committed_seq, last);

    // read_after: strictly after, oldest first, limited.
    assert_eq!(
        seqs(&b.read_after(first + 3, 2).unwrap()),
        [first + 4, first + 5]
    );
    assert!(b.read_after(last, 100).unwrap().is_empty());
    assert!(b.read_after(0, 0).unwrap().is_empty());

    // Ack: gone at once from reads, counted, deleted by the next commit.
    assert_eq!(b.ack(first + 4).unwrap(), 5);
    assert_eq!(seqs(&all(&b))[0], first + 5);
    assert_eq!(
        b.ack(first + 2).unwrap(),
        0,
        "ack below the acked seq is a no-op"
    );
    assert_eq!(b.ack(first + 4).unwrap(), 0);
    let s = b.stats().unwrap();
    assert_eq!((s.rows, s.pending, s.acked_seq), (10, 5, first + 4));
    b.commit().unwrap();
    let s = b.stats().unwrap();
    assert_eq!(s.rows, 10);
    assert_eq!(s.acked_seq, first + 4);
    assert_eq!(s.oldest_time_ms, Some(reading(5).time_ms));
    assert_eq!(s.last_committed_seq, first + 14);
    assert_eq!(s.commits_total, 2);
    assert!(s.bytes > 0);
    assert_eq!(s.dropped_total, 0);
}

#[test]
fn commit_without_changes_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    b.append(&readings(0..3)).unwrap();
    b.commit().unwrap();
    b.commit().unwrap();
    b.commit().unwrap();
    assert_eq!(b.stats().unwrap().commits_total, 1);
}

#[test]
fn every_value_kind_and_quality_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let values = vec![
        Value::F32(1.5),
        Value::F32(-0.0),
        Value::F32(-273.15),
        Value::F32(f32::from_bits(0x7fc0_1234)), // NaN with a payload
        Value::F32(f32::INFINITY),
        Value::F32(f32::MIN_POSITIVE / 2.0), // subnormal
        Value::F64(std::f64::consts::PI),
        Value::F64(-0.0),
        Value::F64(f64::from_bits(0xfff8_0000_dead_beef)),
        Value::F64(f64::MAX),
        Value::Int(0),
        Value::Int(1),
        Value::Int(-1),
        Value::Int(i64::MIN),
        Value::Int(i64::MAX),
        Value::Bool(true),
        Value::Bool(false),
        Value::Str(String::new()),
        Value::Str("123".into()), // text that looks like a number stays text
        Value::Str("état: ouvert ✓".into()),
        Value::Str("x".repeat(5000)),
    ];
    let qualities = [Quality::Good, Quality::Uncertain, Quality::Bad];
    let input: Vec<Reading> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Reading {
            sensor: format!("s-{}", i % 4),
            time_ms: -5 + i as i64 * 1_000_000_000_000,
            value: v.clone(),
            quality: qualities[i % 3],
        })
        .collect();
    let mut b = open(&cfg);
    b.append(&input).unwrap();
    b.commit().unwrap();
    drop(b);
    let b = open(&cfg);
    let got = all(&b);
    assert_eq!(got.len(), input.len());
    for (g, w) in got.iter().zip(&input) {
        assert!(same(&g.reading, w), "{:?} != {w:?}", g.reading);
    }
}

// ---------------------------------------------------------------- sequence numbers

#[test]
fn a_new_file_starts_at_the_clock_in_microseconds() {
    let dir = tempfile::tempdir().unwrap();
    let before = now_us();
    let (mut b, report) = SqliteBuffer::open(&config(dir.path())).unwrap();
    assert!(report.created);
    assert!(report.next_seq >= before);
    let out = b.append(&readings(0..1)).unwrap();
    assert!(out.first_seq.unwrap() >= before);
}

#[test]
fn restart_keeps_committed_rows_and_seqs_keep_growing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut b = open(&cfg);
    let first = b.append(&readings(0..20)).unwrap();
    b.commit().unwrap();
    b.ack(first.first_seq.unwrap() + 4).unwrap();
    b.commit().unwrap();
    drop(b); // a crash after the commit

    let (b, report) = SqliteBuffer::open(&cfg).unwrap();
    assert!(!report.created);
    assert_eq!(report.rows, 15);
    let rows = all(&b);
    assert_eq!(rows.len(), 15);
    assert_eq!(rows[0].reading, reading(5));
    // The acked seq itself is persisted lazily (at close, or with other
    // meta changes): the deletion it caused is what counts.
    b.close().unwrap();
    let (mut b, _) = SqliteBuffer::open(&cfg).unwrap();
    b.ack(first.first_seq.unwrap() + 4).unwrap();
    b.close().unwrap();
    let (mut b, _) = SqliteBuffer::open(&cfg).unwrap();
    assert_eq!(b.stats().unwrap().acked_seq, first.first_seq.unwrap() + 4);
    assert_eq!(all(&b).len(), 15);
    let second = b.append(&readings(20..30)).unwrap();
    assert!(second.first_seq.unwrap() > first.last_seq.unwrap());
    b.commit().unwrap();

    // Everything acked and deleted: the counter survives in meta.
    let last = second.last_seq.unwrap();
    assert_eq!(b.ack(last).unwrap(), 25);
    b.commit().unwrap();
    drop(b);
    // Even with the clock far behind, the stored next_seq wins.
    let (mut b, report) = SqliteBuffer::open_at(&cfg, 1).unwrap();
    assert_eq!(report.rows, 0);
    assert!(all(&b).is_empty());
    let third = b.append(&readings(30..31)).unwrap();
    assert!(third.first_seq.unwrap() > last);
}

#[test]
fn an_ack_beyond_anything_committed_moves_seqs_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&config(dir.path()));
    let out = b.append(&readings(0..5)).unwrap();
    b.commit().unwrap();
    let pending = b.append(&readings(5..8)).unwrap();
    // The aggregator's high-water mark is far ahead (a file created with
    // the clock in the past, or commits lost to a power cut).
    let mark = pending.last_seq.unwrap() + 1_000_000;
    assert_eq!(b.ack(mark).unwrap(), 5, "the committed readings it covers");
    // The uncommitted readings were renumbered above the mark, in order.
    let next = b.append(&readings(8..9)).unwrap();
    assert_eq!(next.first_seq, Some(mark + 4));
    b.commit().unwrap();
    let rows = all(&b);
    assert_eq!(seqs(&rows), [mark + 1, mark + 2, mark + 3, mark + 4]);
    assert_eq!(rows[0].reading, reading(5));
    assert_eq!(rows[3].reading, reading(8));
    assert!(out.last_seq.unwrap() < mark);
    assert!(matches!(
        b.ack(u64::MAX),
        Err(BufferError::SeqOutOfRange(_))
    ));
}

// ---------------------------------------------------------------- crash, corruption

#[test]
fn dropping_without_commit_loses_only_uncommitted_readings() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut b = open(&cfg);
    let committed = b.append(&readings(0..50)).unwrap();
    b.commit().unwrap();
    let lost = b.append(&readings(50..60)).unwrap();
    b.ack(committed.first_seq.unwrap() + 9).unwrap(); // not committed either
    drop(b);
    let mut b = open(&cfg);
    let rows = all(&b);
    assert_eq!(
        rows.len(),
        50,
        "the uncommitted ack is lost too: resent, deduplicated upstream"
    );
    assert_eq!(rows.last().unwrap().seq, committed.last_seq.unwrap());
    // Uncommitted seqs were never visible; new ones are above every
    // committed one (here also above the lost ones: the clock moved on).
    let next = b.append(&readings(0..1)).unwrap();
    assert!(next.first_seq.unwrap() > committed.last_seq.unwrap());
    let _ = lost;
}

const CRASH_CHILD_DIR: &str = "OUTPOST_BUFFER_TEST_CRASH_DIR";

/// Not a test on its own: the body of the child process of
/// `a_killed_process_keeps_its_commits`. Does nothing unless run by it.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_CHILD_DIR) else {
        return;
    };
    let cfg = BufferConfig {
        durability: Durability::Full,
        ..config(Path::new(&dir))
    };
    let mut b = open(&cfg);
    let out = b.append(&readings(0..100)).unwrap();
    b.commit().unwrap();
    b.append(&readings(100..150)).unwrap();
    println!("committed-last-seq={}", out.last_seq.unwrap());
    // No destructors, no checkpoint: the WAL is left as a crash leaves it.
    std::process::abort();
}

#[test]
fn a_killed_process_keeps_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_DIR, dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child aborts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("committed-last-seq=").map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("child output: {stdout}"))
        .parse()
        .unwrap();
    let cfg = config(dir.path());
    assert!(
        file_len(&with_suffix(&cfg.path, "-wal")) > 0,
        "a hot WAL was left behind"
    );

    let (mut b, report) = SqliteBuffer::open(&cfg).unwrap();
    assert_eq!(report.moved_aside, None);
    let rows = all(&b);
    assert_eq!(rows.len(), 100);
    assert_eq!(rows.last().unwrap().seq, last);
    assert_eq!(rows[99].reading, reading(99));
    assert!(b.append(&readings(0..1)).unwrap().first_seq.unwrap() > last);
}

/// Fills a buffer file with committed rows and closes it cleanly.
fn make_buffer_file(cfg: &BufferConfig, n: u64) -> u64 {
    let mut b = open(cfg);
    let out = b.append(&readings(0..n)).unwrap();
    b.close().unwrap();
    out.last_seq.unwrap()
}

fn assert_moved_aside_and_fresh(cfg: &BufferConfig, old_last_seq: Option<u64>) -> PathBuf {
    let before = now_us();
    let (mut b, report) = SqliteBuffer::open(cfg).unwrap();
    let aside = report.moved_aside.clone().expect("moved aside");
    assert!(report.created);
    assert!(report.moved_aside_reason.is_some());
    let name = aside.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("buffer.sqlite.corrupt-"), "{name}");
    assert!(aside.exists());
    assert_eq!(report.rows, 0);
    // The fresh buffer works and starts above anything the old one had.
    let out = b.append(&readings(0..3)).unwrap();
    assert!(out.first_seq.unwrap() >= before);
    if let Some(old) = old_last_seq {
        assert!(out.first_seq.unwrap() > old);
    }
    b.commit().unwrap();
    assert_eq!(all(&b).len(), 3);
    drop(b);
    // And it is kept on the next start.
    let b = open(cfg);
    assert_eq!(all(&b).len(), 3);
    aside
}

#[test]
fn garbage_file_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let garbage: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&cfg.path, &garbage).unwrap();
    std::fs::write(with_suffix(&cfg.path, "-wal"), b"not a wal either").unwrap();
    let aside = assert_moved_aside_and_fresh(&cfg, None);
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        garbage,
        "kept byte for byte"
    );
    assert_eq!(
        std::fs::read(with_suffix(&aside, "-wal")).unwrap(),
        b"not a wal either"
    );
}

#[test]
fn zeroed_database_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let last = make_buffer_file(&cfg, 5000);
    let len = file_len(&cfg.path) as usize;
    std::fs::write(&cfg.path, vec![0u8; len]).unwrap();
    assert_moved_aside_and_fresh(&cfg, Some(last));
}

#[test]
fn truncated_database_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let last = make_buffer_file(&cfg, 20_000);
    let len = file_len(&cfg.path);
    assert!(len > 100_000, "{len}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_moved_aside_and_fresh(&cfg, Some(last));
}

#[test]
fn database_with_damaged_pages_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let last = make_buffer_file(&cfg, 20_000);
    let mut bytes = std::fs::read(&cfg.path).unwrap();
    // Overwrite pages in the middle (b-tree pages) with noise, keep the header.
    let mid = bytes.len() / 2 / 4096 * 4096;
    for (i, b) in bytes[mid..mid + 3 * 4096].iter_mut().enumerate() {
        *b = (i * 37 % 251) as u8;
    }
    std::fs::write(&cfg.path, bytes).unwrap();
    assert_moved_aside_and_fresh(&cfg, Some(last));
}

#[test]
fn a_foreign_sqlite_database_is_moved_aside_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let other = rusqlite::Connection::open(&cfg.path).unwrap();
    other
        .execute_batch("CREATE TABLE readings (x TEXT); INSERT INTO readings VALUES ('theirs');")
        .unwrap();
    drop(other);
    assert_moved_aside_and_fresh(&cfg, None);
}

#[test]
fn a_buffer_with_a_broken_schema_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    make_buffer_file(&cfg, 10);
    let c = rusqlite::Connection::open(&cfg.path).unwrap();
    c.execute_batch("PRAGMA foreign_keys = OFF; DROP TABLE sensors;")
        .unwrap();
    drop(c);
    assert_moved_aside_and_fresh(&cfg, None);
}

#[test]
fn a_locked_file_is_an_error_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut first = open(&cfg);
    first.append(&readings(0..5)).unwrap();
    first.commit().unwrap();
    let err = SqliteBuffer::open(&cfg).unwrap_err();
    assert!(matches!(err, BufferError::Locked { .. }), "{err}");
    let entries: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries.iter().all(|n| !n.contains("corrupt")),
        "{entries:?}"
    );
    // The first one is unaffected.
    first.append(&readings(5..6)).unwrap();
    first.commit().unwrap();
    assert_eq!(all(&first).len(), 6);
}

#[test]
fn an_unopenable_path_is_an_error_not_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::create_dir(&cfg.path).unwrap(); // a directory where the file should be
    assert!(SqliteBuffer::open(&cfg).is_err());
    assert!(cfg.path.is_dir(), "left alone");
}

#[test]
fn missing_parent_directories_are_created() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        path: dir.path().join("a/b/buffer.sqlite"),
        ..BufferConfig::default()
    };
    let mut b = open(&cfg);
    b.append(&readings(0..1)).unwrap();
    b.commit().unwrap();
    assert!(cfg.path.exists());
}

// ---------------------------------------------------------------- overflow

#[test]
fn drop_oldest_keeps_the_newest_and_bounds_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let max_bytes = 2 * MIB;
    let cfg = BufferConfig {
        max_bytes,
        durability: Durability::Off,
        ..config(dir.path())
    };
    let wal = with_suffix(&cfg.path, "-wal");
    let mut b = open(&cfg);
    // 20 x max_bytes of readings: a mix of small numeric and 200-byte text
    // values, committed every 2,000 readings.
    let text = "t".repeat(200);
    let make = |i: u64| {
        if i & 1 == 0 {
            Reading::new("text", i as i64, Value::Str(format!("{i:>12}{text}")))
        } else {
            reading(i)
        }
    };
    let total = 20 * max_bytes / 130; // ~130 bytes per reading on average
    let mut appended = 0u64;
    let mut last_seq = 0;
    let mut max_file = 0;
    while appended < total {
        let batch: Vec<Reading> = (appended..appended + 2000).map(make).collect();
        last_seq = b.append(&batch).unwrap().last_seq.unwrap();
        appended += 2000;
        b.commit().unwrap();
        let s = b.stats().unwrap();
        assert!(
            s.bytes <= max_bytes,
            "bytes in use {} > {max_bytes}",
            s.bytes
        );
        max_file = max_file.max(file_len(&cfg.path) + file_len(&wal));
    }
    let s = b.stats().unwrap();
    let rows = all(&b);
    // Counted exactly: every appended reading is either held or dropped.
    assert_eq!(s.rows, rows.len() as u64);
    assert_eq!(s.dropped_total + s.rows, appended);
    assert!(s.dropped_total > appended * 9 / 10);
    // The newest are kept, contiguous up to the last one.
    assert_eq!(rows.last().unwrap().seq, last_seq);
    assert_eq!(
        seqs(&rows),
        (last_seq + 1 - rows.len() as u64..=last_seq).collect::<Vec<_>>()
    );
    assert!(same(&rows.last().unwrap().reading, &make(appended - 1)));
    // The file stays bounded: the live pages plus one commit's worth, and a
    // WAL that is truncated back after checkpoints.
    let bound = max_bytes + 2 * MIB + 4 * MIB;
    assert!(
        max_file <= bound,
        "database + WAL reached {max_file} bytes (bound {bound})"
    );
    b.close().unwrap();
    assert!(
        file_len(&cfg.path) <= max_bytes + MIB,
        "{}",
        file_len(&cfg.path)
    );
}

#[test]
fn drop_oldest_by_rows_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        max_rows: Some(1000),
        ..config(dir.path())
    };
    let mut b = open(&cfg);
    let mut last = 0;
    for round in 0..10 {
        last = b
            .append(&readings(round * 450..(round + 1) * 450))
            .unwrap()
            .last_seq
            .unwrap();
        b.commit().unwrap();
        let s = b.stats().unwrap();
        assert!(s.rows <= 1000, "{}", s.rows);
        assert_eq!(s.rows + s.dropped_total, (round + 1) * 450);
    }
    let rows = all(&b);
    assert_eq!(rows.last().unwrap().seq, last);
    assert_eq!(rows.last().unwrap().reading, reading(4499));
    drop(b);
    // dropped_total is persisted.
    let b = open(&cfg);
    let s = b.stats().unwrap();
    assert_eq!(s.rows + s.dropped_total, 4500);
}

#[test]
fn drop_newest_refuses_new_readings_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        max_rows: Some(100),
        overflow: OverflowPolicy::DropNewest,
        ..config(dir.path())
    };
    let mut b = open(&cfg);
    let out = b.append(&readings(0..80)).unwrap();
    b.commit().unwrap();
    let more = b.append(&readings(80..130)).unwrap();
    assert_eq!(more.accepted, 20);
    assert_eq!(more.dropped, 30);
    assert_eq!(
        more.last_seq,
        Some(out.last_seq.unwrap() + 20),
        "refused readings get no seq"
    );
    b.commit().unwrap();
    let rows = all(&b);
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[0].reading, reading(0), "the oldest are kept");
    assert_eq!(rows[99].reading, reading(99));
    assert_eq!(b.stats().unwrap().dropped_total, 30);
    // Acks make room again.
    b.ack(rows[9].seq).unwrap();
    let again = b.append(&readings(200..220)).unwrap();
    assert_eq!((again.accepted, again.dropped), (10, 10));
    assert_eq!(again.first_seq, Some(rows[99].seq + 1));
    b.commit().unwrap();
    assert_eq!(b.stats().unwrap().dropped_total, 40);
}

#[test]
fn drop_newest_by_bytes_refuses_once_full() {
    let dir = tempfile::tempdir().unwrap();
    let max_bytes = MIB;
    let cfg = BufferConfig {
        max_bytes,
        overflow: OverflowPolicy::DropNewest,
        ..config(dir.path())
    };
    let mut b = open(&cfg);
    let text = "v".repeat(500);
    let mut accepted = 0u64;
    let mut dropped = 0u64;
    for round in 0..10u64 {
        let batch: Vec<Reading> = (0..1000)
            .map(|i| Reading::new("s", (round * 1000 + i) as i64, Value::Str(text.clone())))
            .collect();
        let out = b.append(&batch).unwrap();
        accepted += out.accepted as u64;
        dropped += out.dropped;
        b.commit().unwrap();
    }
    let s = b.stats().unwrap();
    assert_eq!(accepted + dropped, 10_000);
    assert_eq!(s.dropped_total, dropped);
    assert_eq!(s.rows, accepted);
    assert!(
        accepted > 1000,
        "{accepted}: about 1 MiB worth of readings kept"
    );
    // The estimate may overshoot by its error on one commit, not more.
    assert!(s.bytes <= max_bytes + max_bytes / 10, "{} bytes", s.bytes);
}

// ---------------------------------------------------------------- model test

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Commit,
    Ack(prop::sample::Index),
    Read(prop::sample::Index, u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40).prop_map(Op::Append),
        3 => Just(Op::Commit),
        2 => any::<prop::sample::Index>().prop_map(Op::Ack),
        2 => (any::<prop::sample::Index>(), 0u8..30).prop_map(|(i, l)| Op::Read(i, l)),
        1 => Just(Op::Reopen),
    ]
}

/// A reading of any kind, derived from a counter.
fn model_reading(i: u64) -> Reading {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let value = match i % 5 {
        0 => Value::F32(f32::from_bits(h as u32)),
        1 => Value::F64(f64::from_bits(h)),
        2 => Value::Int(h as i64),
        3 => Value::Bool(h & 1 == 1),
        _ => Value::Str(format!("{h:x}").repeat((h % 4) as usize)),
    };
    Reading {
        sensor: format!("m{}", h % 3),
        time_ms: (h >> 20) as i64,
        value,
        quality: [Quality::Good, Quality::Uncertain, Quality::Bad][(h % 3) as usize],
    }
}

/// What the buffer should hold: committed rows, the acked mark, pending.
#[derive(Default)]
struct Model {
    durable: BTreeMap<u64, Reading>,
    durable_acked: u64,
    acked: u64,
    pending: Vec<(u64, Reading)>,
    /// Highest seq ever committed: new seqs must stay above it, even after
    /// a reopen.
    max_committed: u64,
    /// Highest seq assigned in this process.
    max_assigned: u64,
}

impl Model {
    fn visible(&self) -> Vec<(u64, &Reading)> {
        self.durable
            .range(self.acked + 1..)
            .map(|(s, r)| (*s, r))
            .collect()
    }
}

fn check_visible(b: &SqliteBuffer, m: &Model) -> Result<(), TestCaseError> {
    let got = all(b);
    let want = m.visible();
    prop_assert_eq!(got.len(), want.len());
    for (g, (s, r)) in got.iter().zip(&want) {
        prop_assert_eq!(g.seq, *s);
        prop_assert!(same(&g.reading, r), "{:?} != {:?}", g.reading, r);
    }
    let stats = b.stats().unwrap();
    prop_assert_eq!(stats.rows, (want.len() + m.pending.len()) as u64);
    prop_assert_eq!(stats.pending, m.pending.len() as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn buffer_matches_a_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BufferConfig { durability: Durability::Off, ..config(dir.path()) };
        let mut b = open(&cfg);
        let mut m = Model::default();
        let mut counter = 0u64;
        for op in ops {
            match op {
                Op::Append(n) => {
                    let batch: Vec<Reading> = (counter..counter + u64::from(n)).map(model_reading).collect();
                    counter += u64::from(n);
                    let out = b.append(&batch).unwrap();
                    prop_assert_eq!(out.accepted, batch.len());
                    prop_assert_eq!(out.dropped, 0);
                    if let (Some(first), Some(last)) = (out.first_seq, out.last_seq) {
                        prop_assert!(first > m.max_committed && first > m.max_assigned);
                        prop_assert_eq!(last - first + 1, u64::from(n));
                        m.max_assigned = last;
                        m.pending.extend((first..=last).zip(batch));
                    }
                }
                Op::Commit => {
                    b.commit().unwrap();
                    for (s, r) in m.pending.drain(..) {
                        m.max_committed = m.max_committed.max(s);
                        m.durable.insert(s, r);
                    }
                    let acked = m.acked;
                    m.durable.retain(|s, _| *s > acked);
                    m.durable_acked = m.acked;
                }
                Op::Ack(i) => {
                    let visible: Vec<u64> = m.visible().iter().map(|(s, _)| *s).collect();
                    // Mostly a visible seq; sometimes an old, already acked one.
                    let seq = if visible.is_empty() || i.index(4) == 0 {
                        m.acked.saturating_sub(i.index(3) as u64)
                    } else {
                        *i.get(&visible)
                    };
                    let want = if seq > m.acked { visible.iter().filter(|s| **s <= seq).count() } else { 0 };
                    prop_assert_eq!(b.ack(seq).unwrap(), want as u64);
                    m.acked = m.acked.max(seq);
                }
                Op::Read(i, limit) => {
                    let visible = m.visible();
                    let after = if visible.is_empty() { 0 } else { i.get(&visible).0 };
                    let got = b.read_after(after, usize::from(limit)).unwrap();
                    let want: Vec<u64> =
                        visible.iter().map(|(s, _)| *s).filter(|s| *s > after).take(usize::from(limit)).collect();
                    prop_assert_eq!(seqs(&got), want);
                }
                Op::Reopen => {
                    drop(b);
                    b = open(&cfg);
                    m.pending.clear();
                    m.acked = m.durable_acked;
                    m.max_assigned = 0;
                    prop_assert!(b.stats().unwrap().next_seq > m.max_committed);
                }
            }
            check_visible(&b, &m)?;
        }
    }

    #[test]
    fn drop_oldest_keeps_a_suffix_and_counts_every_drop(
        batches in prop::collection::vec((1u16..400, any::<bool>()), 1..25),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let max_rows = 500;
        let cfg = BufferConfig { max_rows: Some(max_rows), durability: Durability::Off, ..config(dir.path()) };
        let mut b = open(&cfg);
        // Every accepted, not acknowledged reading, in seq order.
        let mut alive: BTreeMap<u64, Reading> = BTreeMap::new();
        let mut evicted = 0u64;
        let mut counter = 0;
        for (n, ack_half) in batches {
            let batch: Vec<Reading> = (counter..counter + u64::from(n)).map(model_reading).collect();
            counter += u64::from(n);
            let out = b.append(&batch).unwrap();
            alive.extend((out.first_seq.unwrap()..=out.last_seq.unwrap()).zip(batch));
            if ack_half && !alive.is_empty() {
                let visible = all(&b);
                if let Some(mid) = visible.get(visible.len() / 2) {
                    b.ack(mid.seq).unwrap();
                    alive.retain(|s, _| *s > mid.seq);
                }
            }
            b.commit().unwrap();
            let got = all(&b);
            prop_assert!(got.len() as u64 <= max_rows);
            // What is left is the newest part of what should be there.
            let expect: Vec<u64> = alive.keys().copied().skip(alive.len() - got.len()).collect();
            prop_assert_eq!(seqs(&got), expect);
            evicted += (alive.len() - got.len()) as u64;
            alive.retain(|s, _| got.first().is_some_and(|g| *s >= g.seq));
            prop_assert_eq!(b.stats().unwrap().dropped_total, evicted);
        }
    }
}

// ---------------------------------------------------------------- async handle

async fn wait_committed(rx: &mut tokio::sync::watch::Receiver<u64>, seq: u64) {
    tokio::time::timeout(DEADLINE, rx.wait_for(|v| *v >= seq))
        .await
        .expect("commit within the deadline")
        .expect("buffer thread alive");
}

#[tokio::test]
async fn handle_append_commit_read_ack_close() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        commit_interval: Duration::from_millis(20),
        ..config(dir.path())
    };
    let metrics = Arc::new(Metrics::default());
    let (handle, thread) = Buffer::spawn(cfg.clone(), metrics.clone()).unwrap();
    assert!(handle.open_report().created);
    let mut committed = handle.committed();
    let start = *committed.borrow();

    let out = handle.append(readings(0..100)).await.unwrap();
    let (first, last) = (out.first_seq.unwrap(), out.last_seq.unwrap());
    assert!(first > start);
    // The commit interval commits them; the watch says so.
    wait_committed(&mut committed, last).await;
    let rows = handle.read_after(0, 1000).await.unwrap();
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[0].seq, first);
    assert_eq!(rows[99].reading, reading(99));
    assert_eq!(
        handle.read_after(first + 49, 10).await.unwrap()[0].seq,
        first + 50
    );

    assert_eq!(handle.ack(first + 49).await.unwrap(), 50);
    handle.flush().await.unwrap();
    let s = handle.stats().await.unwrap();
    assert_eq!((s.rows, s.pending, s.acked_seq), (50, 0, first + 49));
    assert_eq!(metrics.buffer_appended.get(), 100);
    assert_eq!(metrics.acked_readings.get(), 50);
    assert_eq!(metrics.buffer_rows.get(), 50);
    assert!(metrics.buffer_bytes.get() > 0);
    assert!(metrics.buffer_commits.get() >= 2);
    assert!(metrics.buffer_oldest_age_seconds.get() > 0.0);

    // A clone shares the thread.
    let other = handle.clone();
    other.append(readings(100..110)).await.unwrap();
    assert!(!handle.is_closed());
    handle.close().await.unwrap();
    assert!(matches!(other.stats().await, Err(BufferError::Closed)));
    assert!(matches!(
        handle.append(readings(0..1)).await,
        Err(BufferError::Closed)
    ));
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
        .unwrap();
    assert!(handle.is_closed() && other.is_closed());
    // The watch announced the final commit, then reports the thread gone.
    assert_eq!(*committed.borrow_and_update(), last + 10);
    assert!(committed.changed().await.is_err());

    // Close committed everything.
    let b = open(&cfg);
    let rows = all(&b);
    assert_eq!(rows.len(), 60);
    assert_eq!(rows[0].seq, first + 50);
    assert_eq!(rows.last().unwrap().reading, reading(109));
}

#[tokio::test]
async fn close_commits_without_waiting_for_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        commit_interval: Duration::from_secs(60),
        ..config(dir.path())
    };
    let (handle, thread) = Buffer::spawn(cfg.clone(), Arc::new(Metrics::default())).unwrap();
    handle.append(readings(0..10)).await.unwrap();
    assert!(
        handle.read_after(0, 100).await.unwrap().is_empty(),
        "not committed yet"
    );
    handle.close().await.unwrap();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all(&open(&cfg)).len(), 10);
}

#[tokio::test]
async fn dropping_every_handle_commits_and_stops_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        commit_interval: Duration::from_secs(60),
        ..config(dir.path())
    };
    let (handle, thread) = Buffer::spawn(cfg.clone(), Arc::new(Metrics::default())).unwrap();
    handle.append(readings(0..7)).await.unwrap();
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all(&open(&cfg)).len(), 7);
}

#[tokio::test]
async fn a_large_backlog_is_committed_early_and_announced() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        commit_interval: Duration::from_secs(60),
        ..config(dir.path())
    };
    let (handle, thread) = Buffer::spawn(cfg.clone(), Arc::new(Metrics::default())).unwrap();
    let mut committed = handle.committed();
    let out = handle
        .append(readings(0..MAX_PENDING as u64 + 1))
        .await
        .unwrap();
    // MAX_PENDING readings were committed by the append itself.
    wait_committed(
        &mut committed,
        out.first_seq.unwrap() + MAX_PENDING as u64 - 1,
    )
    .await;
    assert_eq!(
        handle.read_after(0, usize::MAX).await.unwrap().len(),
        MAX_PENDING
    );
    handle.close().await.unwrap();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn spawn_reports_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::write(&cfg.path, b"SQLite format 2\0 definitely not a database").unwrap();
    let (handle, thread) = Buffer::spawn(cfg.clone(), Arc::new(Metrics::default())).unwrap();
    assert!(handle.open_report().moved_aside.is_some());
    handle.append(readings(0..1)).await.unwrap();
    handle.close().await.unwrap();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
        .unwrap();
}
