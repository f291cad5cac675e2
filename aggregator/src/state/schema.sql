-- Per-device high-water mark: every seq at or below it was processed.
CREATE TABLE marks (
    device TEXT PRIMARY KEY,
    seq INTEGER NOT NULL CHECK (seq >= 0)
) STRICT, WITHOUT ROWID;

-- The device registry. Totals are sums of the ingest's deltas; the status
-- columns come from the newest status message (by its time_ms).
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    online INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
    status_time_ms INTEGER,
    agent_version TEXT,
    labels TEXT NOT NULL DEFAULT '{}',      -- JSON object of strings
    buffer_rows INTEGER NOT NULL DEFAULT 0,
    dropped_total INTEGER NOT NULL DEFAULT 0,
    readings_total INTEGER NOT NULL DEFAULT 0,
    batches_total INTEGER NOT NULL DEFAULT 0,
    duplicates_total INTEGER NOT NULL DEFAULT 0,
    gaps_total INTEGER NOT NULL DEFAULT 0,
    gap_readings_total INTEGER NOT NULL DEFAULT 0,
    last_gap_at_ms INTEGER,
    last_seq INTEGER
) STRICT, WITHOUT ROWID;

-- Each sensor's newest reading, by (time_ms, seq).
CREATE TABLE last_values (
    device TEXT NOT NULL,
    sensor TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    value TEXT NOT NULL,                     -- JSON: 21.5, true, "RUN"
    kind TEXT NOT NULL,                      -- f32, f64, int, bool, str
    PRIMARY KEY (device, sensor)
) STRICT, WITHOUT ROWID;

-- Skipped sequence ranges, the newest MAX_GAPS_PER_DEVICE per device.
CREATE TABLE gaps (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    detected_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX gaps_by_device ON gaps (device, id);

-- Rejected messages, the newest MAX_DEAD_LETTERS; ids are never reused.
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    topic TEXT NOT NULL,
    device TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    payload BLOB NOT NULL,                   -- the first MAX_DEAD_LETTER_PAYLOAD_BYTES
    payload_len INTEGER NOT NULL             -- the original length
) STRICT;

-- Opaque state of other stages, committed with the marks it goes with
-- (the rule engine's alert states: key 'rules').
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT, WITHOUT ROWID;
