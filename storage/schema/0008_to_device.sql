-- Send-to-device messages waiting for delivery to a local device. A message
-- is deleted once the device has synced with a token past its stream_id.

CREATE TABLE device_inbox (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    sender TEXT NOT NULL,
    message_type TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, stream_id)
);

-- The to-device stream's position. Messages are deleted once delivered, so
-- MAX(device_inbox.stream_id) can go back; this single row never does.
CREATE TABLE to_device_stream (
    stream_id BIGINT NOT NULL
);
INSERT INTO to_device_stream (stream_id) VALUES (0);

-- Transaction ids of PUT /sendToDevice, for idempotent retries: one row per
-- (sender, sending device or token, txn id), kept for a day.
CREATE TABLE to_device_txns (
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (sender, sender_device, txn_id)
);
CREATE INDEX to_device_txns_created ON to_device_txns (created_ts);
