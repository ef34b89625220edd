-- The federation sender: how far each destination server has received our
-- events, its back-off, and to-device messages waiting for it.
--
-- PDUs are not copied anywhere: a destination that fell behind (a restart, a
-- long outage) catches up by reading our own events after its position from
-- the events table.

CREATE TABLE federation_destinations (
    destination TEXT PRIMARY KEY,
    -- the stream ordering of the newest of our events the destination has
    -- acknowledged (or that never needed to go to it)
    last_successful_stream_ordering BIGINT NOT NULL,
    -- back-off: when the last failure was and how long to wait after it (ms)
    retry_last_ts BIGINT NOT NULL DEFAULT 0,
    retry_interval_ms BIGINT NOT NULL DEFAULT 0
);

-- m.direct_to_device EDUs for remote users, kept until the destination has
-- acknowledged a transaction carrying them. content is the EDU's content.
CREATE TABLE federation_outbox_to_device (
    id BIGINT PRIMARY KEY,
    destination TEXT NOT NULL,
    content TEXT NOT NULL,
    created_ts BIGINT NOT NULL
);
CREATE INDEX federation_outbox_to_device_destination
    ON federation_outbox_to_device (destination, id);
