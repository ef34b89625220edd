-- Fewer b-trees written per event on SQLite, where each is a page in the WAL
-- at every commit:
-- * stream_ordering becomes the table's rowid (INTEGER PRIMARY KEY). As
--   BIGINT PRIMARY KEY it was a separate unique index beside the rowid.
-- * events_relations holds only events that relate to another (edits,
--   reactions, replies in threads): plain messages no longer touch it.
-- * events_txn (sender, device_id, txn_id) is gone: no query used it (recent
--   transaction ids are loaded at start-up by time, idempotent sends are
--   answered from memory).
CREATE TABLE events_by_rowid (
    stream_ordering INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT,
    sender TEXT NOT NULL,
    depth BIGINT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    state_group BIGINT NOT NULL,
    json TEXT NOT NULL,
    device_id TEXT,
    txn_id TEXT,
    outlier BOOLEAN NOT NULL DEFAULT FALSE,
    rejected_reason TEXT,
    redacted_by TEXT,
    relates_to_id TEXT,
    relation_type TEXT,
    relation_key TEXT
);
INSERT INTO events_by_rowid (stream_ordering, event_id, room_id, type, state_key, sender,
    depth, origin_server_ts, state_group, json, device_id, txn_id, outlier, rejected_reason,
    redacted_by, relates_to_id, relation_type, relation_key)
SELECT stream_ordering, event_id, room_id, type, state_key, sender,
    depth, origin_server_ts, state_group, json, device_id, txn_id, outlier, rejected_reason,
    redacted_by, relates_to_id, relation_type, relation_key
FROM events;
DROP TABLE events;
ALTER TABLE events_by_rowid RENAME TO events;
CREATE INDEX events_room_stream ON events (room_id, stream_ordering);
CREATE INDEX events_relations ON events (relates_to_id, relation_type)
    WHERE relates_to_id IS NOT NULL;

-- event_push_actions (a row per notified member per event, the busiest table
-- by rows written) becomes one b-tree instead of three: kept in the order of
-- its key (WITHOUT ROWID), and keyed by (user_id, stream_ordering), which is
-- unique on its own (a stream ordering is one event) and serves every query
-- (a user's notifications by stream ordering), so no second index.
CREATE TABLE event_push_actions_by_user (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    highlight BOOLEAN NOT NULL,
    actions TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, stream_ordering)
) WITHOUT ROWID;
INSERT INTO event_push_actions_by_user (user_id, room_id, stream_ordering, event_id,
    thread_id, highlight, actions, ts)
SELECT user_id, room_id, stream_ordering, event_id, thread_id, highlight, actions, ts
FROM event_push_actions;
DROP TABLE event_push_actions;
ALTER TABLE event_push_actions_by_user RENAME TO event_push_actions;

-- forward_extremities (a room's latest events, one UPDATE per event sent) is
-- kept in its key's order too: one b-tree instead of a table and its key index.
CREATE TABLE forward_extremities_by_room (
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
) WITHOUT ROWID;
INSERT INTO forward_extremities_by_room (room_id, event_id)
SELECT room_id, event_id FROM forward_extremities;
DROP TABLE forward_extremities;
ALTER TABLE forward_extremities_by_room RENAME TO forward_extremities;
