-- Local accounts, their devices and the secrets that authenticate them.
-- No secret is stored in clear: passwords as bcrypt hashes, access and login
-- tokens (high-entropy random strings) as the SHA-256 hex of the token.

CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    -- bcrypt; NULL when the account has no password (guests, appservice
    -- users, deactivated accounts)
    password_hash TEXT,
    created_ts BIGINT NOT NULL,
    is_admin BOOLEAN NOT NULL DEFAULT FALSE,
    is_guest BOOLEAN NOT NULL DEFAULT FALSE,
    deactivated BOOLEAN NOT NULL DEFAULT FALSE,
    -- the user asked for their content to be erased when deactivating
    erased BOOLEAN NOT NULL DEFAULT FALSE,
    locked BOOLEAN NOT NULL DEFAULT FALSE,
    suspended BOOLEAN NOT NULL DEFAULT FALSE,
    -- Synapse's user_type ("bot", "support", ...), NULL for a normal user
    user_type TEXT,
    -- the id of the application service that registered this user
    appservice_id TEXT,
    -- the global profile (the profile service owns these two)
    displayname TEXT,
    avatar_url TEXT
);

CREATE TABLE devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    created_ts BIGINT NOT NULL,
    last_seen_ts BIGINT,
    last_seen_ip TEXT,
    last_seen_user_agent TEXT,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE access_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    -- NULL for a token that belongs to no device
    device_id TEXT,
    created_ts BIGINT NOT NULL
);
CREATE INDEX access_tokens_user_device ON access_tokens (user_id, device_id);

-- m.login.token: single-use, short-lived.
CREATE TABLE login_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    expiry_ts BIGINT NOT NULL
);
CREATE INDEX login_tokens_user ON login_tokens (user_id);

-- Registration tokens (m.login.registration_token), managed by server admins.
-- pending: UIA sessions that completed the token stage but not registration.
CREATE TABLE registration_tokens (
    token TEXT PRIMARY KEY,
    uses_allowed INTEGER,
    pending INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    expiry_time BIGINT
);

-- User-interactive authentication sessions.
CREATE TABLE ui_auth_sessions (
    session_id TEXT PRIMARY KEY,
    -- what the session authorises, e.g. "POST /register"
    operation TEXT NOT NULL,
    -- the user the session authenticates (NULL while registering)
    user_id TEXT,
    created_ts BIGINT NOT NULL,
    -- JSON: stage type -> result of the completed stage
    completed TEXT NOT NULL,
    -- JSON: the operation's parameters saved from the first request
    -- (never a password)
    data TEXT NOT NULL
);
CREATE INDEX ui_auth_sessions_created ON ui_auth_sessions (created_ts);
