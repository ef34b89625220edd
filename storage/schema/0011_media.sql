-- The media repository (docs/media.md).

-- Stored content, addressed by its SHA-256 (hex): identical uploads share
-- one stored copy. A row goes when no media row refers to its hash any more.
CREATE TABLE media_content (
    sha256 TEXT PRIMARY KEY,
    length BIGINT NOT NULL,
    created_ts BIGINT NOT NULL
);

-- Every mxc://origin/media_id this server serves: local uploads (origin is
-- this server), ids made by POST /create that are not uploaded yet (sha256
-- NULL, unused_expires_ts set), and cached remote media.
-- authenticated: uploaded (or cached) while enable_authenticated_media was
-- on, so the legacy unauthenticated endpoints answer 404 for it.
CREATE TABLE media (
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    user_id TEXT,
    media_type TEXT,
    upload_name TEXT,
    media_length BIGINT,
    sha256 TEXT,
    created_ts BIGINT NOT NULL,
    unused_expires_ts BIGINT,
    last_access_ts BIGINT,
    quarantined_by TEXT,
    safe_from_quarantine BOOLEAN NOT NULL DEFAULT FALSE,
    authenticated BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (origin, media_id)
);
CREATE INDEX media_by_user ON media (user_id, created_ts);
CREATE INDEX media_by_sha256 ON media (sha256);
CREATE INDEX media_by_access ON media (origin, last_access_ts);
CREATE INDEX media_pending ON media (unused_expires_ts);

-- Thumbnails, per content hash: width x height and method are the box that
-- was asked for (a thumbnail_sizes entry, or the request's own with
-- dynamic_thumbnails), actual_* what the image is.
CREATE TABLE media_thumbnails (
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    method TEXT NOT NULL,
    animated BOOLEAN NOT NULL,
    content_type TEXT NOT NULL,
    actual_width INTEGER NOT NULL,
    actual_height INTEGER NOT NULL,
    length BIGINT NOT NULL,
    PRIMARY KEY (sha256, width, height, method, animated)
);
