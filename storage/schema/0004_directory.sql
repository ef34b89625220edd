-- Room aliases this server hosts (#localpart:our.server -> room id). Whether
-- a room is listed in the published room directory is rooms.is_public.

CREATE TABLE room_aliases (
    room_alias TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    -- the user who created the alias; may delete it later
    creator TEXT NOT NULL,
    -- JSON array of server names that knew the room when the alias was made
    servers TEXT NOT NULL DEFAULT '[]',
    created_ts BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX room_aliases_room ON room_aliases (room_id);
