-- Schema version 2: alert history and the notification outbox (added to
-- a version 1 file by the upgrade at open).

-- Every alert transition, in commit order; `id` is the SSE event id.
-- `body` is the transition as JSON. The newest MAX_ALERT_HISTORY are kept
-- (older ones only once no notification of theirs is pending).
CREATE TABLE IF NOT EXISTS alert_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    number INTEGER NOT NULL,
    rule TEXT NOT NULL,
    device TEXT NOT NULL,
    sensor TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,                     -- pending, firing, resolved
    event_time_ms INTEGER NOT NULL,
    processing_time_ms INTEGER NOT NULL,
    committed_ms INTEGER NOT NULL,
    body TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS alert_history_by_device ON alert_history (device, id);
CREATE INDEX IF NOT EXISTS alert_history_by_rule ON alert_history (rule, id);
CREATE INDEX IF NOT EXISTS alert_history_by_fingerprint ON alert_history (fingerprint, id);

-- One notification per (transition or repeat, sink), written in the same
-- transaction as its transition; delivered in id order per fingerprint.
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    history_id INTEGER NOT NULL,
    sink TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    repeat INTEGER NOT NULL DEFAULT 0,       -- 0: the transition; n: n-th repeat
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_attempt_ms INTEGER,
    last_error TEXT,
    done_ms INTEGER                          -- delivered or dead-lettered at
) STRICT;
CREATE INDEX IF NOT EXISTS outbox_by_sink_status ON outbox (sink, status, id);
CREATE INDEX IF NOT EXISTS outbox_by_history ON outbox (history_id);
CREATE INDEX IF NOT EXISTS outbox_by_fingerprint ON outbox (sink, status, fingerprint, id);
-- The transitions' own notifications (not repeats), for the repeat scheduler.
CREATE INDEX IF NOT EXISTS outbox_firsts ON outbox (sink, history_id) WHERE repeat = 0;
