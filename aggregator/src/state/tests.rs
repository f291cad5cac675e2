//! Unit tests of the private helpers and the SQL corner cases.

use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).unwrap();
    (dir, store)
}

#[test]
fn truncate_utf8_cuts_at_a_char_boundary() {
    assert_eq!(truncate_utf8("abc", 5), "abc");
    assert_eq!(truncate_utf8("abc", 2), "ab");
    // 'é' is two bytes: cutting inside it keeps the prefix before it.
    assert_eq!(truncate_utf8("aé", 2), "a");
    assert_eq!(truncate_utf8("aé", 3), "aé");
    assert_eq!(truncate_utf8("€", 2), "");
    assert_eq!(truncate_utf8("", 0), "");
}

#[test]
fn hex_is_lowercase_and_complete() {
    assert_eq!(reader::hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    assert_eq!(reader::hex(&[]), "");
}

#[test]
fn labels_json_round_trips_odd_strings() {
    let labels: BTreeMap<String, String> = [
        ("site".to_owned(), "north \"A\"".to_owned()),
        ("ünï".to_owned(), "\n\\".to_owned()),
    ]
    .into();
    let back: BTreeMap<String, String> = serde_json::from_str(&labels_json(&labels)).unwrap();
    assert_eq!(back, labels);
    assert_eq!(labels_json(&BTreeMap::new()), "{}");
}

#[test]
fn validate_names_the_device_and_the_field() {
    let mut flush = Flush {
        marks: vec![("ok".into(), MAX_SEQ)],
        ..Flush::default()
    };
    flush.validate().unwrap();
    flush.gaps.push(Gap {
        device: "dev-9".into(),
        from_seq: 5,
        to_seq: MAX_SEQ + 1,
        detected_ms: 0,
    });
    let e = flush.validate().unwrap_err();
    assert!(matches!(
        &e,
        StateError::SeqOutOfRange { device, what: "gap to_seq", value } if device == "dev-9" && *value == MAX_SEQ + 1
    ));
    assert!(e.to_string().contains("dev-9"), "{e}");
}

#[test]
fn counters_saturate_instead_of_failing_the_commit() {
    let (_dir, mut store) = store();
    let update = DeviceUpdate {
        device: "d".into(),
        seen_ms: 1,
        readings: u64::MAX,
        status: Some(StatusUpdate {
            online: true,
            time_ms: 1,
            agent_version: "x".into(),
            labels: BTreeMap::new(),
            buffer_rows: u64::MAX,
            dropped_total: u64::MAX,
        }),
        ..DeviceUpdate::default()
    };
    let flush = Flush {
        marks: vec![("d".into(), 7)],
        devices: vec![update.clone(), update],
        ..Flush::default()
    };
    store.commit(&flush).unwrap();
    let d = store.reader().unwrap().devices().unwrap().remove(0);
    assert_eq!(d.readings_total, MAX_SEQ);
    assert_eq!(d.buffer_rows, MAX_SEQ);
    assert_eq!(d.dropped_total, MAX_SEQ);
    assert_eq!(d.mark, Some(7));
}

#[test]
fn last_seq_and_last_gap_only_grow_and_null_does_not_erase() {
    let (_dir, mut store) = store();
    let up = |last_seq| DeviceUpdate {
        device: "d".into(),
        seen_ms: 10,
        last_seq,
        ..DeviceUpdate::default()
    };
    for (last_seq, gap_ms) in [(Some(50), 300), (None, 100), (Some(20), 200)] {
        store
            .commit(&Flush {
                devices: vec![up(last_seq)],
                gaps: vec![Gap {
                    device: "d".into(),
                    from_seq: 1,
                    to_seq: 2,
                    detected_ms: gap_ms,
                }],
                ..Flush::default()
            })
            .unwrap();
    }
    let d = store.reader().unwrap().devices().unwrap().remove(0);
    assert_eq!(d.last_seq, Some(50));
    assert_eq!(d.last_gap_at_ms, Some(300));
    assert_eq!(d.mark, None);
}

#[test]
fn seen_ms_moves_last_seen_forward_only_and_keeps_first_seen() {
    let (_dir, mut store) = store();
    for seen_ms in [100, 50, 200] {
        store
            .commit(&Flush {
                devices: vec![DeviceUpdate {
                    device: "d".into(),
                    seen_ms,
                    ..DeviceUpdate::default()
                }],
                ..Flush::default()
            })
            .unwrap();
    }
    let d = store.reader().unwrap().devices().unwrap().remove(0);
    assert_eq!((d.first_seen_ms, d.last_seen_ms), (100, 200));
    assert!(!d.online);
    assert!(d.labels.is_empty());
}

#[test]
fn last_values_are_capped_per_device_dropping_the_oldest() {
    let (_dir, mut store) = store();
    let values: Vec<LastValue> = (0..MAX_LAST_VALUES_PER_DEVICE + 10)
        .map(|i| LastValue {
            sensor: format!("s{i:05}"),
            time_ms: i as i64,
            seq: i as u64,
            value: serde_json::json!(i),
            kind: "int",
        })
        .collect();
    store
        .commit(&Flush {
            devices: vec![DeviceUpdate {
                device: "d".into(),
                seen_ms: 1,
                last_values: values,
                ..DeviceUpdate::default()
            }],
            ..Flush::default()
        })
        .unwrap();
    let detail = store.reader().unwrap().device("d").unwrap().unwrap();
    assert_eq!(detail.last_values.len(), MAX_LAST_VALUES_PER_DEVICE);
    assert_eq!(detail.last_values[0].sensor, "s00010");
}

#[test]
fn an_empty_flush_writes_nothing() {
    let (_dir, mut store) = store();
    assert!(Flush::default().is_empty());
    store.commit(&Flush::default()).unwrap();
    let changes: i64 = store
        .conn
        .query_row("SELECT total_changes()", [], |r| r.get(0))
        .unwrap();
    assert_eq!(changes, 0);
}

#[test]
fn pragmas_are_wal_and_full() {
    let (_dir, store) = store();
    let mode: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: i64 = store
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "FULL");
}

#[test]
fn a_failed_commit_applies_nothing_and_the_same_flush_can_be_retried() {
    let (_dir, mut store) = store();
    let device = |readings| DeviceUpdate {
        device: "d".into(),
        seen_ms: 1,
        readings,
        ..DeviceUpdate::default()
    };
    store
        .commit(&Flush {
            marks: vec![("d".into(), 1)],
            devices: vec![device(1)],
            ..Flush::default()
        })
        .unwrap();
    // Simulate a full disk: the file may not grow.
    let pages: i64 = store
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    store
        .conn
        .execute_batch(&format!("PRAGMA max_page_count = {pages}"))
        .unwrap();
    let big = Flush {
        marks: vec![("d".into(), 50)],
        devices: vec![device(5)],
        dead_letters: (0..50)
            .map(|i| DeadLetter {
                received_ms: i,
                topic: "t".into(),
                device: None,
                reason: "r".into(),
                detail: String::new(),
                payload: vec![7; MAX_DEAD_LETTER_PAYLOAD_BYTES],
            })
            .collect(),
        ..Flush::default()
    };
    let err = store.commit(&big).unwrap_err();
    assert!(
        matches!(&err, StateError::Sqlite(e) if e.sqlite_error_code() == Some(ErrorCode::DiskFull)),
        "{err:?}"
    );
    assert!(store.conn.is_autocommit(), "no transaction left open");
    let reader = store.reader().unwrap();
    assert_eq!(store.load_marks().unwrap()["d"], 1);
    assert_eq!(reader.devices().unwrap()[0].readings_total, 1);
    assert!(reader.dead_letter_counts().unwrap().is_empty());

    store
        .conn
        .execute_batch("PRAGMA max_page_count = 1000000")
        .unwrap();
    store.commit(&big).unwrap();
    assert_eq!(store.load_marks().unwrap()["d"], 50);
    assert_eq!(reader.devices().unwrap()[0].readings_total, 6);
    assert_eq!(reader.dead_letter_counts().unwrap()["r"], 50);
}
