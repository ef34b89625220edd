-- Other servers' signing keys, as fetched directly or through a notary.
-- Kept after expiry: old events stay verifiable (Synapse does the same).
CREATE TABLE remote_server_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    verify_key TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts BIGINT,
    fetched_from TEXT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
