//! Figures of the buffer (not a pass/fail test: it asserts nothing about
//! speed). Run with
//! `cargo run --release -p outpost-agent --example buffer_bench`
//! and copy the figures into `docs/agent.md` (buffer section).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_agent::buffer::{Buffer, BufferConfig, Durability, SqliteBuffer, MAX_PENDING};
use outpost_agent::metrics::Metrics;
use outpost_agent::reading::{Reading, Value};

fn config(dir: &Path, durability: Durability) -> BufferConfig {
    BufferConfig {
        path: dir.join("bench.sqlite"),
        durability,
        max_bytes: 1 << 30,
        ..BufferConfig::default()
    }
}

/// A typical reading: one of 10 sensors, a reading per second, an f32.
fn typical(i: u64) -> Reading {
    Reading::new(
        format!("tank-{}/level", i % 10),
        1_750_000_000_000 + (i as i64 / 10) * 1000,
        Value::F32(20.0 + (i % 97) as f32 / 8.0),
    )
}

/// A mix of every kind.
fn mixed(i: u64) -> Reading {
    let value = match i % 5 {
        0 => Value::F32(i as f32 / 3.0),
        1 => Value::F64(i as f64 / 7.0),
        2 => Value::Int(i as i64 * 13),
        3 => Value::Bool(i % 3 == 0),
        _ => Value::Str(["open", "closed", "fault"][(i % 3) as usize].to_owned()),
    };
    Reading::new(
        format!("io-{}", i % 20),
        1_750_000_000_000 + i as i64 * 100,
        value,
    )
}

/// Bytes this process passed to write(2) so far (`/proc/self/io` wchar).
fn wchar() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn bytes_per_row() {
    for (name, make) in [
        ("typical f32", typical as fn(u64) -> Reading),
        ("mixed kinds", mixed),
    ] {
        for n in [100_000u64, 1_000_000] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(dir.path(), Durability::Off);
            let (mut b, _) = SqliteBuffer::open(&cfg).unwrap();
            for start in (0..n).step_by(MAX_PENDING) {
                let batch: Vec<Reading> = (start..(start + MAX_PENDING as u64).min(n))
                    .map(make)
                    .collect();
                b.append_vec(batch).unwrap();
                b.commit().unwrap();
            }
            let used = b.stats().unwrap().bytes;
            b.close().unwrap();
            let file = file_len(&cfg.path);
            let t = Instant::now();
            let (b, _) = SqliteBuffer::open(&cfg).unwrap();
            let open_s = t.elapsed().as_secs_f64();
            // Replay speed: everything, 10,000 rows per read.
            let t = Instant::now();
            let mut after = 0;
            let mut read = 0;
            loop {
                let rows = b.read_after(after, 10_000).unwrap();
                let Some(last) = rows.last() else { break };
                after = last.seq;
                read += rows.len();
            }
            let replay = read as f64 / t.elapsed().as_secs_f64();
            println!(
                "{name:12} {n:>9} rows: file {file:>10} B = {:.1} B/row, in use {:.1} B/row; \
                 open (quick_check) {open_s:.3} s; read_after {replay:.0} rows/s",
                file as f64 / n as f64,
                used as f64 / n as f64,
            );
        }
    }
}

fn append_throughput_with_a_commit_per_second() {
    for durability in [Durability::Normal, Durability::Full] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), durability);
        let (mut b, _) = SqliteBuffer::open(&cfg).unwrap();
        let run = Duration::from_secs(3);
        let start = Instant::now();
        let mut last_commit = Instant::now();
        let mut i = 0u64;
        while start.elapsed() < run {
            // Sources deliver small batches.
            b.append_vec((i..i + 100).map(typical).collect()).unwrap();
            i += 100;
            if last_commit.elapsed() >= Duration::from_secs(1) {
                b.commit().unwrap();
                last_commit = Instant::now();
            }
        }
        b.commit().unwrap();
        let s = b.stats().unwrap();
        println!(
            "core, {durability:?}: {:.0} readings/s appended, {} commits in {:.1} s ({} early at {MAX_PENDING} pending)",
            i as f64 / start.elapsed().as_secs_f64(),
            s.commits_total,
            start.elapsed().as_secs_f64(),
            s.commits_total.saturating_sub(start.elapsed().as_secs() + 1),
        );
    }
}

fn handle_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Durability::Normal);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Arc::new(Metrics::default());
    let (handle, thread) = Buffer::spawn(cfg.clone(), metrics.clone()).unwrap();
    let n = rt.block_on(async {
        let start = Instant::now();
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            handle
                .append((i..i + 100).map(typical).collect())
                .await
                .unwrap();
            i += 100;
        }
        let rate = i as f64 / start.elapsed().as_secs_f64();
        handle.close().await.unwrap();
        rate
    });
    thread.join().unwrap();
    println!(
        "handle, 100-reading appends: {n:.0} readings/s, {} commits",
        metrics.buffer_commits.get()
    );
}

fn bytes_written_per_reading_at_steady_state() {
    // Online steady state: each second, `rate` readings arrive, the previous
    // second's are acked, one commit. wchar counts WAL frames and checkpoint
    // writes alike (what reaches the SD card, before its own amplification).
    for durability in [Durability::Normal, Durability::Full] {
        for rate in [1u64, 10, 100, 1000] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(dir.path(), durability);
            let (mut b, _) = SqliteBuffer::open(&cfg).unwrap();
            let commits = 2000 / rate.min(10) + 100;
            // Warm up to a steady file size first.
            let mut i = 0;
            for _ in 0..50 {
                b.append_vec((i..i + rate).map(typical).collect()).unwrap();
                i += rate;
                b.commit().unwrap();
                let s = b.stats().unwrap();
                b.ack(s.last_committed_seq - rate).unwrap();
            }
            let Some(before) = wchar() else {
                println!("/proc/self/io unavailable");
                return;
            };
            for _ in 0..commits {
                b.append_vec((i..i + rate).map(typical).collect()).unwrap();
                i += rate;
                let s = b.stats().unwrap();
                b.ack(s.last_committed_seq).unwrap();
                b.commit().unwrap();
            }
            let written = wchar().unwrap() - before;
            println!(
                "{durability:?}, {rate:>4} readings/commit: {:>7.0} B written per commit, {:>7.1} B per reading ({commits} commits)",
                written as f64 / commits as f64,
                written as f64 / (commits * rate) as f64,
            );
        }
    }
}

fn main() {
    bytes_per_row();
    append_throughput_with_a_commit_per_second();
    handle_throughput();
    bytes_written_per_reading_at_steady_state();
}
