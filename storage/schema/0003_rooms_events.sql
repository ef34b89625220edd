-- Rooms, events, state. Every event has a stream_ordering: the position of
-- the event in this server's event stream, which /sync tokens refer to.

CREATE TABLE rooms (
    room_id TEXT PRIMARY KEY,
    room_version TEXT NOT NULL,
    creator TEXT NOT NULL,
    is_public BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts BIGINT NOT NULL,
    -- a policy this server applies to its own users: "dm" refuses a third member
    kind TEXT
);

CREATE TABLE events (
    stream_ordering BIGINT PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT,
    sender TEXT NOT NULL,
    depth BIGINT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    -- the state group of the state after this event
    state_group BIGINT NOT NULL,
    -- the PDU as it travels between servers (canonical key order not required)
    json TEXT NOT NULL,
    -- sender's device and transaction id, for idempotent sends and local echo
    device_id TEXT,
    txn_id TEXT,
    outlier BOOLEAN NOT NULL DEFAULT FALSE,
    rejected_reason TEXT,
    -- the event id of the redaction that redacted this event, if any
    redacted_by TEXT,
    relates_to_id TEXT,
    relation_type TEXT,
    -- m.annotation's "key" (the emoji of a reaction)
    relation_key TEXT
);
CREATE INDEX events_room_stream ON events (room_id, stream_ordering);
CREATE INDEX events_relations ON events (relates_to_id, relation_type);
CREATE INDEX events_txn ON events (sender, device_id, txn_id);

-- State groups: the state after an event, stored as a delta from the
-- previous group (or as a full snapshot when prev_group is NULL).
CREATE TABLE state_groups (
    id BIGINT PRIMARY KEY,
    room_id TEXT NOT NULL,
    prev_group BIGINT,
    chain_length INTEGER NOT NULL
);
CREATE TABLE state_group_entries (
    state_group BIGINT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (state_group, type, state_key)
);

-- The room's current state, one row per (type, state_key).
CREATE TABLE current_state (
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
);

-- Every user's membership of every room (local and remote users), current.
CREATE TABLE room_memberships (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    membership TEXT NOT NULL,
    event_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    forgotten BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_memberships_user ON room_memberships (user_id, membership);

-- The room's forward extremities: events with no children yet.
CREATE TABLE forward_extremities (
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);

-- Stream positions that more than one process must agree on.
CREATE TABLE stream_positions (
    stream_name TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
