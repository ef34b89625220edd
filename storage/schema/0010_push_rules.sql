-- Push rules a user defined, in priority order within each kind (a higher
-- priority is more important). conditions / pattern / actions are JSON.
CREATE TABLE push_rules (
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    priority INTEGER NOT NULL,
    conditions TEXT,
    pattern TEXT,
    actions TEXT NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (user_id, kind, rule_id)
);

-- A user's changes to the server-default rules: NULL keeps the default.
CREATE TABLE push_rule_defaults (
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    enabled BOOLEAN,
    actions TEXT,
    PRIMARY KEY (user_id, kind, rule_id)
);

-- Every event that notified a local user (the actions of the push rule that
-- matched), for unread counts and GET /notifications. thread_id is 'main' or
-- the thread root's event id.
CREATE TABLE event_push_actions (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    highlight BOOLEAN NOT NULL,
    actions TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, stream_ordering)
);
CREATE INDEX event_push_actions_user ON event_push_actions (user_id, stream_ordering);

-- The latest event a user sent in each room and thread: sending an event
-- marks everything before it in that thread as read.
CREATE TABLE push_read_marks (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, thread_id)
);
