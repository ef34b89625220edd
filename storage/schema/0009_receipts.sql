-- Read receipts (m.read, m.read.private): one row per user, room, receipt type
-- and thread ('' for an unthreaded receipt). stream_id is the position in the
-- receipts stream that /sync tokens refer to; event_stream is the stream
-- ordering of the event the receipt points at, so receipts only move forward.

CREATE TABLE receipts (
    room_id TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_stream BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    stream_id BIGINT NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX receipts_user ON receipts (user_id, room_id);
CREATE INDEX receipts_stream ON receipts (stream_id);
