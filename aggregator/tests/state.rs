//! The aggregator's durable state: marks, registry, caps, restart, refusal of
//! foreign or corrupt files, concurrent readers, and a model test of marks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use outpost_aggregator::state::{
    DeadLetter, DeviceUpdate, Flush, Gap, LastValue, StateError, StatusUpdate, Store, StoreReader,
    APPLICATION_ID, DEAD_LETTER_HEX_BYTES, MAX_DEAD_LETTERS, MAX_DEAD_LETTER_DETAIL_BYTES,
    MAX_DEAD_LETTER_PAYLOAD_BYTES, MAX_DEAD_LETTER_TEXT_BYTES, MAX_GAPS_PER_DEVICE, MAX_SEQ,
};
use proptest::prelude::*;
use serde_json::json;

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("aggregator.db");
    (dir, path)
}

fn marks(list: &[(&str, u64)]) -> Flush {
    Flush {
        marks: list.iter().map(|(d, s)| ((*d).to_owned(), *s)).collect(),
        ..Flush::default()
    }
}

fn status(online: bool, time_ms: i64, version: &str) -> StatusUpdate {
    StatusUpdate {
        online,
        time_ms,
        agent_version: version.to_owned(),
        labels: [("site".to_owned(), format!("s{time_ms}"))].into(),
        buffer_rows: 10,
        dropped_total: 1,
    }
}

fn value(
    sensor: &str,
    time_ms: i64,
    seq: u64,
    v: serde_json::Value,
    kind: &'static str,
) -> LastValue {
    LastValue {
        sensor: sensor.to_owned(),
        time_ms,
        seq,
        value: v,
        kind,
    }
}

fn dead_letter(i: usize, reason: &str, payload: Vec<u8>) -> DeadLetter {
    DeadLetter {
        received_ms: i as i64,
        topic: format!("outpost/v1/dev{i}/telemetry"),
        device: Some(format!("dev{i}")),
        reason: reason.to_owned(),
        detail: format!("bad payload #{i}"),
        payload,
    }
}

/// Every file in `dir` with its length and a hash of its bytes (printable).
fn snapshot(dir: &Path) -> BTreeMap<String, (usize, u64)> {
    use std::hash::{Hash, Hasher};
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            (
                e.file_name().to_string_lossy().into_owned(),
                (bytes.len(), h.finish()),
            )
        })
        .collect()
}

#[test]
fn store_and_reader_are_send() {
    fn send<T: Send>() {}
    send::<Store>();
    send::<StoreReader>();
}

#[test]
fn marks_upsert_never_lowers() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    store.commit(&marks(&[("a", 100), ("b", 5)])).unwrap();
    store.commit(&marks(&[("a", 50), ("b", 6)])).unwrap();
    // Within one flush too: the lower mark after the higher one is a no-op.
    store
        .commit(&marks(&[("c", 9), ("c", 3), ("a", 0)]))
        .unwrap();
    let got = store.load_marks().unwrap();
    let want: HashMap<String, u64> = [("a".into(), 100), ("b".into(), 6), ("c".into(), 9)].into();
    assert_eq!(got, want);
}

#[test]
fn restart_keeps_marks_devices_last_values_gaps_and_dead_letters() {
    let (_dir, path) = temp();
    {
        let mut store = Store::open(&path).unwrap();
        store
            .commit(&Flush {
                marks: vec![("dev-1".into(), 1_700_000_000_000_123)],
                devices: vec![DeviceUpdate {
                    device: "dev-1".into(),
                    seen_ms: 1_000,
                    readings: 12,
                    batches: 2,
                    duplicates: 3,
                    gap_readings: 4,
                    gaps: 1,
                    last_seq: Some(1_700_000_000_000_123),
                    last_values: vec![
                        value("temp", 990, 7, json!(21.5), "f32"),
                        value("door", 995, 8, json!(true), "bool"),
                        value("mode", 999, 9, json!("RUN"), "str"),
                    ],
                    status: Some(status(true, 900, "0.1.0")),
                }],
                gaps: vec![Gap {
                    device: "dev-1".into(),
                    from_seq: 3,
                    to_seq: 6,
                    detected_ms: 1_000,
                }],
                dead_letters: vec![dead_letter(1, "decode", vec![1, 2, 3])],
                kv: vec![("rules".into(), b"alert states".to_vec())],
                alerts: vec![],
            })
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.load_kv("rules").unwrap(),
        Some(b"alert states".to_vec())
    );
    assert_eq!(store.load_kv("absent").unwrap(), None);
    assert_eq!(
        store.load_marks().unwrap(),
        HashMap::from([("dev-1".to_owned(), 1_700_000_000_000_123)])
    );
    let reader = store.reader().unwrap();
    let detail = reader.device("dev-1").unwrap().unwrap();
    let d = &detail.device;
    assert_eq!(d.id, "dev-1");
    assert!(d.online);
    assert_eq!((d.first_seen_ms, d.last_seen_ms), (1_000, 1_000));
    assert_eq!(d.status_time_ms, Some(900));
    assert_eq!(d.agent_version.as_deref(), Some("0.1.0"));
    assert_eq!(d.labels.get("site").map(String::as_str), Some("s900"));
    assert_eq!((d.buffer_rows, d.dropped_total), (10, 1));
    assert_eq!(
        (
            d.readings_total,
            d.batches_total,
            d.duplicates_total,
            d.gaps_total,
            d.gap_readings_total
        ),
        (12, 2, 3, 1, 4)
    );
    assert_eq!(d.last_gap_at_ms, Some(1_000));
    assert_eq!(d.last_seq, Some(1_700_000_000_000_123));
    assert_eq!(d.mark, Some(1_700_000_000_000_123));
    let values: Vec<_> = detail
        .last_values
        .iter()
        .map(|v| (v.sensor.as_str(), v.value.clone(), v.kind.as_str(), v.seq))
        .collect();
    assert_eq!(
        values,
        [
            ("door", json!(true), "bool", 8),
            ("mode", json!("RUN"), "str", 9),
            ("temp", json!(21.5), "f32", 7),
        ]
    );
    assert_eq!(detail.recent_gaps.len(), 1);
    assert_eq!(
        (detail.recent_gaps[0].from_seq, detail.recent_gaps[0].to_seq),
        (3, 6)
    );
    let letters = reader.dead_letters(10, None).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].payload_hex, "010203");
    assert_eq!(reader.devices().unwrap().len(), 1);
    assert!(reader.device("nope").unwrap().is_none());
}

#[test]
fn device_detail_serialises_flat() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    store
        .commit(&Flush {
            marks: vec![("d".into(), 4)],
            devices: vec![DeviceUpdate {
                device: "d".into(),
                seen_ms: 5,
                last_values: vec![value("t", 5, 4, json!(1.5), "f64")],
                ..DeviceUpdate::default()
            }],
            ..Flush::default()
        })
        .unwrap();
    let detail = store.reader().unwrap().device("d").unwrap().unwrap();
    let v = serde_json::to_value(&detail).unwrap();
    assert_eq!(v["id"], "d");
    assert_eq!(v["mark"], 4);
    assert_eq!(v["status_time_ms"], serde_json::Value::Null);
    assert_eq!(v["last_values"][0]["value"], 1.5);
    assert_eq!(v["recent_gaps"], json!([]));
}

#[test]
fn a_stale_status_does_not_override_a_newer_one() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let with_status = |s: StatusUpdate| Flush {
        devices: vec![DeviceUpdate {
            device: "d".into(),
            seen_ms: 1,
            status: Some(s),
            ..DeviceUpdate::default()
        }],
        ..Flush::default()
    };
    let reader = store.reader().unwrap();
    let current = || reader.devices().unwrap().remove(0);

    store
        .commit(&with_status(status(true, 2_000, "2.0")))
        .unwrap();
    // An older retained status arriving later is ignored.
    store
        .commit(&with_status(status(false, 1_000, "1.0")))
        .unwrap();
    let d = current();
    assert!(d.online);
    assert_eq!(d.agent_version.as_deref(), Some("2.0"));
    assert_eq!(d.status_time_ms, Some(2_000));
    // Same time: applied (a last will stamped like the birth message).
    store
        .commit(&with_status(status(false, 2_000, "2.0")))
        .unwrap();
    assert!(!current().online);
    // Newer: applied.
    store
        .commit(&with_status(status(true, 3_000, "3.0")))
        .unwrap();
    let d = current();
    assert!(d.online);
    assert_eq!(d.agent_version.as_deref(), Some("3.0"));
    assert_eq!(d.labels.get("site").map(String::as_str), Some("s3000"));
}

#[test]
fn last_values_keep_the_newest_by_time() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let with_values = |values: Vec<LastValue>| Flush {
        devices: vec![DeviceUpdate {
            device: "d".into(),
            seen_ms: 1,
            last_values: values,
            ..DeviceUpdate::default()
        }],
        ..Flush::default()
    };
    store
        .commit(&with_values(vec![
            value("t", 2_000, 20, json!(2.0), "f32"),
            value("u", 2_000, 20, json!(1), "int"),
        ]))
        .unwrap();
    // Older by time (a replayed backlog): ignored, even with a higher seq.
    store
        .commit(&with_values(vec![value("t", 1_000, 30, json!(1.0), "f32")]))
        .unwrap();
    // Same time, higher seq: replaces; same time, lower seq: ignored.
    store
        .commit(&with_values(vec![
            value("u", 2_000, 21, json!(2), "int"),
            value("u", 2_000, 19, json!(0), "int"),
        ]))
        .unwrap();
    // Newer: replaces, kind included.
    store
        .commit(&with_values(vec![value(
            "t",
            3_000,
            10,
            json!("ERR"),
            "str",
        )]))
        .unwrap();
    let detail = store.reader().unwrap().device("d").unwrap().unwrap();
    let got: Vec<_> = detail
        .last_values
        .iter()
        .map(|v| {
            (
                v.sensor.as_str(),
                v.time_ms,
                v.seq,
                v.value.clone(),
                v.kind.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("t", 3_000, 10, json!("ERR"), "str"),
            ("u", 2_000, 21, json!(2), "int"),
        ]
    );
}

#[test]
fn dead_letters_are_capped_keeping_the_newest() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let total = MAX_DEAD_LETTERS + 100;
    let reason = |i: usize| if i % 3 == 0 { "signature" } else { "decode" };
    // In chunks, as a flood would arrive.
    for chunk in (0..total).collect::<Vec<_>>().chunks(1_000) {
        let letters = chunk
            .iter()
            .map(|&i| dead_letter(i, reason(i), vec![(i % 251) as u8; 8]))
            .collect();
        store
            .commit(&Flush {
                dead_letters: letters,
                ..Flush::default()
            })
            .unwrap();
    }
    let reader = store.reader().unwrap();
    let counts = reader.dead_letter_counts().unwrap();
    assert_eq!(counts.values().sum::<u64>(), MAX_DEAD_LETTERS as u64);
    let kept = (100..total).filter(|&i| reason(i) == "signature").count() as u64;
    assert_eq!(counts["signature"], kept);
    let all = reader.dead_letters(usize::MAX, None).unwrap();
    assert_eq!(all.len(), MAX_DEAD_LETTERS);
    // Newest first; the oldest 100 are gone.
    assert_eq!(all[0].received_ms, (total - 1) as i64);
    assert_eq!(all.last().unwrap().received_ms, 100);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    let some = reader.dead_letters(5, Some("signature")).unwrap();
    assert_eq!(some.len(), 5);
    assert!(some.iter().all(|d| d.reason == "signature"));
    assert_eq!(some[0].received_ms, (total - 1 - (total - 1) % 3) as i64);
    assert!(reader.dead_letters(5, Some("other")).unwrap().is_empty());

    // One flush holding more than the cap keeps its newest.
    store
        .commit(&Flush {
            dead_letters: (0..MAX_DEAD_LETTERS + 7)
                .map(|i| dead_letter(1_000_000 + i, "flood", vec![]))
                .collect(),
            ..Flush::default()
        })
        .unwrap();
    let counts = reader.dead_letter_counts().unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([("flood".to_owned(), MAX_DEAD_LETTERS as u64)])
    );
    let newest = reader.dead_letters(1, None).unwrap();
    assert_eq!(
        newest[0].received_ms,
        (1_000_000 + MAX_DEAD_LETTERS + 6) as i64
    );
}

#[test]
fn dead_letter_payload_and_text_are_truncated() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let payload: Vec<u8> = (0..MAX_DEAD_LETTER_PAYLOAD_BYTES * 3)
        .map(|i| (i % 256) as u8)
        .collect();
    let mut letter = dead_letter(1, "too-big", payload.clone());
    letter.topic = "t".repeat(MAX_DEAD_LETTER_TEXT_BYTES * 10);
    letter.device = None;
    letter.detail = "é".repeat(MAX_DEAD_LETTER_DETAIL_BYTES); // 2 bytes each
    store
        .commit(&Flush {
            dead_letters: vec![letter],
            ..Flush::default()
        })
        .unwrap();
    let reader = store.reader().unwrap();
    let got = reader.dead_letters(10, None).unwrap().remove(0);
    assert_eq!(got.payload_len, payload.len() as u64);
    assert_eq!(got.payload_hex.len(), DEAD_LETTER_HEX_BYTES * 2);
    assert!(got.payload_hex.starts_with("000102030405"));
    assert_eq!(got.topic.len(), MAX_DEAD_LETTER_TEXT_BYTES);
    assert_eq!(got.detail.len(), MAX_DEAD_LETTER_DETAIL_BYTES);
    assert_eq!(got.device, None);
    let stored = reader.dead_letter_payload(got.id).unwrap().unwrap();
    assert_eq!(stored, payload[..MAX_DEAD_LETTER_PAYLOAD_BYTES]);
    assert_eq!(reader.dead_letter_payload(got.id + 1).unwrap(), None);
}

#[test]
fn gaps_are_capped_per_device() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let gap = |device: &str, i: u64| Gap {
        device: device.to_owned(),
        from_seq: i * 10,
        to_seq: i * 10 + 5,
        detected_ms: i as i64,
    };
    let n = MAX_GAPS_PER_DEVICE as u64 + 20;
    for i in 0..n {
        store
            .commit(&Flush {
                devices: vec![DeviceUpdate {
                    device: "busy".into(),
                    seen_ms: 1,
                    gaps: 1,
                    gap_readings: 6,
                    ..DeviceUpdate::default()
                }],
                gaps: vec![gap("busy", i)],
                ..Flush::default()
            })
            .unwrap();
    }
    store
        .commit(&Flush {
            devices: vec![DeviceUpdate {
                device: "quiet".into(),
                seen_ms: 1,
                ..DeviceUpdate::default()
            }],
            gaps: (0..5).map(|i| gap("quiet", i)).collect(),
            ..Flush::default()
        })
        .unwrap();
    let reader = store.reader().unwrap();
    let busy = reader.device("busy").unwrap().unwrap();
    assert_eq!(busy.recent_gaps.len(), MAX_GAPS_PER_DEVICE);
    assert_eq!(busy.recent_gaps[0].from_seq, (n - 1) * 10);
    assert_eq!(busy.recent_gaps.last().unwrap().from_seq, 20 * 10);
    // The totals count every gap, the table only the newest.
    assert_eq!(busy.device.gaps_total, n);
    assert_eq!(busy.device.gap_readings_total, 6 * n);
    assert_eq!(busy.device.last_gap_at_ms, Some((n - 1) as i64));
    assert_eq!(
        reader.device("quiet").unwrap().unwrap().recent_gaps.len(),
        5
    );
}

#[test]
fn a_corrupt_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aggregator.db");
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let before = snapshot(dir.path());

    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Unusable { .. }), "{err:?}");
    let msg = format!("{err:#}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("not a database"), "{msg}");
    assert!(msg.contains("untouched"), "{msg}");
    assert_eq!(
        snapshot(dir.path()),
        before,
        "nothing deleted, renamed or created"
    );
    // And again: still refused, still untouched.
    assert!(Store::open(&path).is_err());
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn a_damaged_state_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aggregator.db");
    {
        let mut store = Store::open(&path).unwrap();
        for i in 0..50u64 {
            store
                .commit(&Flush {
                    marks: vec![(format!("device-{i:03}"), i)],
                    devices: vec![DeviceUpdate {
                        device: format!("device-{i:03}"),
                        seen_ms: 1,
                        ..DeviceUpdate::default()
                    }],
                    ..Flush::default()
                })
                .unwrap();
        }
    }
    // The writer closed cleanly: everything is in the main file, no WAL.
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() >= 3 * 4096, "{}", bytes.len());
    // Smash the b-tree pages after the schema page.
    for b in &mut bytes[4096..3 * 4096] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let before = snapshot(dir.path());
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Unusable { .. }), "{err:?}");
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn a_foreign_sqlite_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE marks (device TEXT, seq INTEGER); INSERT INTO marks VALUES ('x', 1);",
        )
        .unwrap();
    }
    let before = snapshot(dir.path());
    let err = Store::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StateError::Unusable { .. }), "{err:?}");
    assert!(msg.contains("application_id"), "{msg}");
    assert_eq!(
        snapshot(dir.path()),
        before,
        "not switched to WAL, not written"
    );

    // Another program's file with an application_id of its own.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA application_id = 1234;").unwrap();
    drop(conn);
    assert!(matches!(
        Store::open(&path),
        Err(StateError::Unusable { .. })
    ));
    assert!(matches!(
        StoreReader::open(&path),
        Err(StateError::Unusable { .. })
    ));
}

#[test]
fn a_foreign_database_with_a_wal_keeps_its_wal() {
    // A crash image of another program's WAL database: the main file plus an
    // uncheckpointed -wal. Closing our connection must not checkpoint it into
    // the main file or delete it.
    let live = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let live_path = live.path().join("other.db");
    let conn = rusqlite::Connection::open(&live_path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
         CREATE TABLE t (x); INSERT INTO t VALUES (1), (2), (3);",
    )
    .unwrap();
    for suffix in ["", "-wal"] {
        std::fs::copy(
            live.path().join(format!("other.db{suffix}")),
            dir.path().join(format!("other.db{suffix}")),
        )
        .unwrap();
    }
    drop(conn);
    let path = dir.path().join("other.db");
    let wal = dir.path().join("other.db-wal");
    let (db_before, wal_before) = (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap());
    assert!(!wal_before.is_empty());

    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Unusable { .. }), "{err:?}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        db_before,
        "main file not written"
    );
    assert_eq!(
        std::fs::read(&wal).unwrap(),
        wal_before,
        "-wal kept as it was"
    );
}

#[test]
fn a_newer_schema_version_is_refused() {
    let (_dir, path) = temp();
    drop(Store::open(&path).unwrap());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let app: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap();
        assert_eq!(app, APPLICATION_ID);
        conn.execute_batch("PRAGMA user_version = 99;").unwrap();
    }
    let msg = Store::open(&path).unwrap_err().to_string();
    assert!(msg.contains("schema version 99"), "{msg}");
}

#[test]
fn an_empty_file_is_initialised() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aggregator.db");
    std::fs::write(&path, b"").unwrap();
    let mut store = Store::open(&path).unwrap();
    store.commit(&marks(&[("a", 1)])).unwrap();
    drop(store);
    assert_eq!(Store::open(&path).unwrap().load_marks().unwrap()["a"], 1);
}

#[test]
fn a_seq_above_i64_max_is_rejected_and_nothing_is_written() {
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    store.commit(&marks(&[("a", MAX_SEQ)])).unwrap();
    let bad = Flush {
        marks: vec![("b".into(), 5)],
        devices: vec![DeviceUpdate {
            device: "b".into(),
            seen_ms: 1,
            readings: 3,
            last_values: vec![value("t", 1, MAX_SEQ + 1, json!(1), "int")],
            ..DeviceUpdate::default()
        }],
        ..Flush::default()
    };
    let err = store.commit(&bad).unwrap_err();
    assert!(
        matches!(&err, StateError::SeqOutOfRange { device, value, .. } if device == "b" && *value == MAX_SEQ + 1),
        "{err:?}"
    );
    assert_eq!(
        store.load_marks().unwrap(),
        HashMap::from([("a".to_owned(), MAX_SEQ)])
    );
    assert!(store.reader().unwrap().devices().unwrap().is_empty());
    assert!(matches!(
        store.commit(&marks(&[("c", u64::MAX)])),
        Err(StateError::SeqOutOfRange { .. })
    ));
}

#[test]
fn readers_see_whole_commits_while_the_writer_writes() {
    const COMMITS: u64 = 300;
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let reader = store.reader().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 1..=COMMITS {
            store
                .commit(&Flush {
                    marks: vec![("d".into(), i)],
                    devices: vec![DeviceUpdate {
                        device: "d".into(),
                        seen_ms: i as i64,
                        readings: 1,
                        last_values: vec![value("t", i as i64, i, json!(i), "int")],
                        ..DeviceUpdate::default()
                    }],
                    ..Flush::default()
                })
                .unwrap();
        }
        store
    });
    let mut last = 0;
    let mut observations = 0;
    while last < COMMITS {
        if let Some(detail) = reader.device("d").unwrap() {
            let d = &detail.device;
            // One transaction: the counter, mark and last value agree.
            assert_eq!(d.mark, Some(d.readings_total));
            assert_eq!(detail.last_values[0].seq, d.readings_total);
            assert!(d.readings_total >= last, "went back");
            last = d.readings_total;
            observations += 1;
        }
        if writer.is_finished() && last < COMMITS {
            // The writer is done: the next read must see the last commit.
            let d = reader.devices().unwrap().remove(0);
            assert_eq!(d.readings_total, COMMITS);
            break;
        }
    }
    let store = writer.join().unwrap();
    assert!(observations > 0);
    // A second reader opened later sees the same.
    let again = store.reader().unwrap().devices().unwrap();
    assert_eq!(again[0].mark, Some(COMMITS));
}

// ---- model test ------------------------------------------------------------

const DEVICES: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Debug, Clone)]
enum Op {
    /// (device index, mark), (device index, readings delta, last_seq).
    Commit(Vec<(usize, u64)>, Vec<(usize, u64, Option<u64>)>),
    Reopen,
}

fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![
        20 => 0u64..1_000,
        1 => Just(MAX_SEQ),
        1 => Just(MAX_SEQ + 1),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            prop::collection::vec((0..DEVICES.len(), seq()), 0..6),
            prop::collection::vec((0..DEVICES.len(), 0u64..100, prop::option::of(seq())), 0..4),
        )
            .prop_map(|(m, d)| Op::Commit(m, d)),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default)]
struct Model {
    marks: HashMap<String, u64>,
    readings: HashMap<String, u64>,
    last_seq: HashMap<String, u64>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn marks_match_a_max_model_across_reopens(ops in prop::collection::vec(op(), 1..25)) {
        let (_dir, path) = temp();
        let mut store = Some(Store::open(&path).unwrap());
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Reopen => {
                    drop(store.take());
                    store = Some(Store::open(&path).unwrap());
                }
                Op::Commit(m, d) => {
                    let flush = Flush {
                        marks: m.iter().map(|&(i, s)| (DEVICES[i].to_owned(), s)).collect(),
                        devices: d
                            .iter()
                            .map(|&(i, readings, last_seq)| DeviceUpdate {
                                device: DEVICES[i].to_owned(),
                                seen_ms: 1,
                                readings,
                                last_seq,
                                ..DeviceUpdate::default()
                            })
                            .collect(),
                        ..Flush::default()
                    };
                    let valid = m.iter().all(|&(_, s)| s <= MAX_SEQ)
                        && d.iter().all(|&(_, _, l)| l.is_none_or(|l| l <= MAX_SEQ));
                    let result = store.as_mut().unwrap().commit(&flush);
                    prop_assert_eq!(result.is_ok(), valid, "{:?}", result);
                    if valid {
                        for (dev, s) in &flush.marks {
                            let e = model.marks.entry(dev.clone()).or_insert(*s);
                            *e = (*e).max(*s);
                        }
                        for u in &flush.devices {
                            *model.readings.entry(u.device.clone()).or_default() += u.readings;
                            if let Some(l) = u.last_seq {
                                let e = model.last_seq.entry(u.device.clone()).or_insert(l);
                                *e = (*e).max(l);
                            }
                        }
                    }
                }
            }
            let s = store.as_ref().unwrap();
            prop_assert_eq!(&s.load_marks().unwrap(), &model.marks);
            let devices = s.reader().unwrap().devices().unwrap();
            prop_assert_eq!(devices.len(), model.readings.len());
            for d in devices {
                prop_assert_eq!(d.readings_total, model.readings[&d.id]);
                prop_assert_eq!(d.last_seq, model.last_seq.get(&d.id).copied());
                prop_assert_eq!(d.mark, model.marks.get(&d.id).copied());
            }
        }
    }
}

fn alert(
    fp: &str,
    number: u64,
    state: &str,
    sinks: &[&str],
) -> outpost_aggregator::state::AlertRecord {
    outpost_aggregator::state::AlertRecord {
        fingerprint: fp.into(),
        number,
        rule: "boiler-hot".into(),
        device: "dev-1".into(),
        sensor: "temp".into(),
        severity: "critical".into(),
        state: state.into(),
        event_time_ms: 1_000 + number as i64,
        processing_time_ms: 2_000,
        body: serde_json::json!({
            "fingerprint": fp, "number": number, "rule": "boiler-hot", "device": "dev-1",
            "sensor": "temp", "severity": "critical", "state": state, "labels": {},
            "summary": "s", "value": 85.0, "threshold": 80.0, "event_time_ms": 1_000 + number as i64,
            "processing_time_ms": 2_000, "active_since_ms": 1_000
        })
        .to_string(),
        sinks: sinks.iter().map(|s| (*s).to_owned()).collect(),
        follow_firing: state == "resolved",
        skip_sinks: vec![],
    }
}

#[test]
fn alert_transitions_are_committed_with_the_marks_and_queue_one_notification_per_sink() {
    use outpost_aggregator::alerts::outbox::{HistoryQuery, Outbox, Outcome};
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let mut f = marks(&[("dev-1", 5)]);
    f.alerts = vec![
        alert("fp1", 1, "pending", &[]),
        alert("fp1", 2, "firing", &["hook", "log"]),
        alert("fp1", 3, "resolved", &["hook"]),
    ];
    store.commit(&f).unwrap();
    let mut o = Outbox::open(&path).unwrap();
    // Only the head of the alert is offered: the resolve waits for the firing.
    let heads = o.pending("hook", 100).unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].repeat, 0);
    let firing_hook = heads[0].id;
    assert_eq!(o.pending("log", 100).unwrap().len(), 1);
    o.record(
        &[Outcome::Failed {
            id: firing_hook,
            next_attempt_ms: 9,
            error: "HTTP 500".into(),
        }],
        5,
    )
    .unwrap();
    let heads = o.pending("hook", 100).unwrap();
    assert_eq!((heads[0].id, heads[0].attempts), (firing_hook, 1));
    assert_eq!(heads[0].last_error.as_deref(), Some("HTTP 500"));
    o.record(&[Outcome::Delivered { id: firing_hook }], 10)
        .unwrap();
    let heads = o.pending("hook", 100).unwrap();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].id > firing_hook, "then the resolve");
    o.record(
        &[Outcome::Dead {
            id: heads[0].id,
            error: "too old".into(),
        }],
        11,
    )
    .unwrap();
    assert!(o.pending("hook", 100).unwrap().is_empty());
    let st = o.stats("hook").unwrap();
    assert_eq!((st.pending, st.dead), (0, 1));
    // History: newest first, each with its deliveries.
    let h = o
        .history(&HistoryQuery {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(h.len(), 3);
    assert_eq!(h[0].transition.number, 3);
    assert_eq!(h[0].deliveries[0].status, "dead");
    assert_eq!(h[1].deliveries.len(), 2);
    assert_eq!(h[1].deliveries[0].status, "delivered");
    assert_eq!(h[1].deliveries[0].attempts, 2);
    assert!(
        h[2].deliveries.is_empty(),
        "pending transitions notify nobody"
    );
    assert_eq!(o.history_after(h[1].id, 10).unwrap().len(), 1);
    assert_eq!(o.last_history_id().unwrap(), h[0].id);
    // A sink removed from the config: its pending rows are dead-lettered.
    let retired = o.retire_unknown_sinks(&["hook".to_owned()], 20).unwrap();
    // Two: the firing's, and the resolve's (it follows the sinks that got
    // the firing).
    assert_eq!(retired, vec![("log".to_owned(), 2)]);
    assert!(o.pending("log", 100).unwrap().is_empty());
}

#[test]
fn repeats_are_queued_only_while_firing_and_only_when_nothing_is_pending() {
    use outpost_aggregator::alerts::outbox::{Outbox, Outcome};
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    let f = Flush {
        alerts: vec![alert("fp1", 1, "firing", &["hook"])],
        ..Default::default()
    };
    store.commit(&f).unwrap();
    let mut o = Outbox::open(&path).unwrap();
    let now = outpost_aggregator::ingest::now_ms();
    // Still pending: no repeat.
    assert_eq!(o.queue_repeats("hook", now + 1, now).unwrap(), 0);
    let id = o.pending("hook", 10).unwrap()[0].id;
    o.record(&[Outcome::Delivered { id }], now).unwrap();
    // Delivered, newer than the interval: none; older: one, numbered 1.
    assert_eq!(o.queue_repeats("hook", now - 60_000, now).unwrap(), 0);
    assert_eq!(o.queue_repeats("hook", now + 1, now).unwrap(), 1);
    assert_eq!(
        o.queue_repeats("hook", now + 1, now).unwrap(),
        0,
        "one pending at a time"
    );
    let r = o.pending("hook", 10).unwrap();
    assert_eq!(r[0].repeat, 1);
    o.record(&[Outcome::Delivered { id: r[0].id }], now)
        .unwrap();
    assert_eq!(o.queue_repeats("hook", now + 1, now).unwrap(), 1);
    assert_eq!(o.pending("hook", 10).unwrap()[0].repeat, 2);
    // Finished older repeats are dropped when the next one is queued.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM outbox WHERE sink = 'hook'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(rows, 2, "the firing's own row and repeat 2 (pending)");
    // Resolved (even if not routed to this sink): no more repeats.
    let id = o.pending("hook", 10).unwrap()[0].id;
    o.record(&[Outcome::Delivered { id }], now).unwrap();
    let f = Flush {
        alerts: vec![alert("fp1", 2, "resolved", &[])],
        ..Default::default()
    };
    store.commit(&f).unwrap();
    assert_eq!(o.queue_repeats("hook", now + 1, now).unwrap(), 0);
}

#[test]
fn a_version_1_state_file_is_upgraded_in_place_keeping_its_marks() {
    let (_dir, path) = temp();
    {
        // A file as the previous version wrote it: schema 1, no alert tables.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA application_id = {};\nPRAGMA user_version = 1;\n{}\nINSERT INTO marks VALUES ('dev-1', 42);",
            outpost_aggregator::state::APPLICATION_ID,
            include_str!("../src/state/schema.sql")
        ))
        .unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.load_marks().unwrap()["dev-1"], 42);
    let f = Flush {
        alerts: vec![alert("fp1", 1, "firing", &["hook"])],
        ..Default::default()
    };
    store.commit(&f).unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, outpost_aggregator::state::SCHEMA_VERSION);
    let n: i64 = conn
        .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_resolve_also_goes_to_the_sinks_that_got_the_firing_except_those_without_resolves() {
    use outpost_aggregator::alerts::outbox::Outbox;
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    store
        .commit(&Flush {
            alerts: vec![alert("fp1", 1, "firing", &["old-hook", "pager"])],
            ..Default::default()
        })
        .unwrap();
    // The routes changed (a restart): the resolve is routed to "new-hook"
    // only; "pager" does not take resolves.
    let mut resolved = alert("fp1", 2, "resolved", &["new-hook"]);
    resolved.skip_sinks = vec!["pager".into()];
    store
        .commit(&Flush {
            alerts: vec![resolved],
            ..Default::default()
        })
        .unwrap();
    let o = Outbox::open(&path).unwrap();
    let h = o
        .history(&outpost_aggregator::alerts::outbox::HistoryQuery {
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    let mut sinks: Vec<&str> = h[0].deliveries.iter().map(|d| d.sink.as_str()).collect();
    sinks.sort();
    assert_eq!(sinks, ["new-hook", "old-hook"]);
}

#[test]
fn history_is_pruned_to_the_newest_but_an_alert_still_firing_keeps_its_rows() {
    use outpost_aggregator::alerts::outbox::{Outbox, Outcome};
    use outpost_aggregator::state::MAX_ALERT_HISTORY;
    let (_dir, path) = temp();
    let mut store = Store::open(&path).unwrap();
    // fp-old fired first and never resolved; fp-flap fires and resolves a lot.
    store
        .commit(&Flush {
            alerts: vec![
                alert("fp-old", 1, "firing", &["hook"]),
                alert("fp-also", 1, "firing", &["hook"]),
            ],
            ..Default::default()
        })
        .unwrap();
    let mut o = Outbox::open(&path).unwrap();
    let heads = o.pending("hook", 10).unwrap();
    let outcomes: Vec<Outcome> = heads
        .iter()
        .map(|r| Outcome::Delivered { id: r.id })
        .collect();
    o.record(&outcomes, 1).unwrap();
    let flood: Vec<_> = (0..MAX_ALERT_HISTORY as u64 + 10)
        .map(|i| {
            alert(
                "fp-flap",
                i + 1,
                if i % 2 == 0 { "firing" } else { "resolved" },
                &[],
            )
        })
        .collect();
    store
        .commit(&Flush {
            alerts: flood,
            ..Default::default()
        })
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT count(*) FROM alert_history WHERE fingerprint = 'fp-flap'"),
        MAX_ALERT_HISTORY as i64,
        "the newest are kept"
    );
    assert_eq!(
        count("SELECT count(*) FROM alert_history WHERE fingerprint = 'fp-also'"),
        1,
        "also still firing, so it stays"
    );
    assert_eq!(
        count("SELECT count(*) FROM alert_history WHERE fingerprint = 'fp-old'"),
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM outbox WHERE fingerprint = 'fp-old'"),
        1
    );
    // The still-firing alert keeps getting repeats.
    let now = outpost_aggregator::ingest::now_ms();
    assert_eq!(o.queue_repeats("hook", now + 1, now).unwrap(), 2);
}
