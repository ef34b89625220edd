-- End-to-end encryption keys of local devices and users, and the device-list
-- stream /sync and /keys/changes follow. Keys are stored as the JSON the
-- client uploaded; signatures added later through /keys/signatures/upload are
-- rows of their own, merged in when the keys are served.

-- A device's identity keys (POST /keys/upload device_keys), as uploaded.
CREATE TABLE e2e_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- One-time keys waiting to be claimed; a claimed key is deleted. Claimed in
-- upload order (uploaded_ts, then key_id within one upload).
CREATE TABLE e2e_one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    uploaded_ts BIGINT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);
CREATE INDEX e2e_one_time_keys_order
    ON e2e_one_time_keys (user_id, device_id, algorithm, uploaded_ts, key_id);

-- At most one fallback key per device and algorithm; handed out when the
-- one-time keys have run out, and then marked used (never deleted by a claim).
CREATE TABLE e2e_fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    used BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Cross-signing keys: key_type is master, self_signing or user_signing;
-- public_key is the unpadded base64 ed25519 key (the key id's suffix).
CREATE TABLE e2e_cross_signing_keys (
    user_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- Signatures uploaded with /keys/signatures/upload: signer_key_id (e.g.
-- "ed25519:<self-signing public key>" or "ed25519:<device id>") of
-- signer_user_id signed target_key_id (a device id, or a master public key)
-- of target_user_id.
CREATE TABLE e2e_cross_signing_signatures (
    target_user_id TEXT NOT NULL,
    target_key_id TEXT NOT NULL,
    signer_user_id TEXT NOT NULL,
    signer_key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user_id, target_key_id, signer_user_id, signer_key_id)
);
CREATE INDEX e2e_cross_signing_signatures_signer
    ON e2e_cross_signing_signatures (signer_user_id, signer_key_id);

-- The device-list stream. kind:
--   keys   user_id's device keys or cross-signing keys changed (everyone
--          sharing a room with them is told)
--   own    a change only user_id is told about (their user-signing key,
--          their signatures of other users' master keys)
-- room_id is '' (room membership changes come from the events stream); it is
-- there for per-room announcements, should they be needed.
CREATE TABLE device_lists_stream (
    stream_id BIGINT NOT NULL,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    room_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (stream_id, user_id, kind, room_id)
);

-- The stream's position: old rows may be pruned some day, this never goes back.
CREATE TABLE device_lists_position (
    stream_id BIGINT NOT NULL
);
INSERT INTO device_lists_position (stream_id) VALUES (0);
