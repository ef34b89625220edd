-- Account data of local users (spec "Client Config"), global and per room,
-- and room tags (the m.tag room account data). One row per
-- (user, room, type): a change overwrites the row with a new stream_id, so
-- MAX(stream_id) is the account data stream's position at start-up.
-- room_id is '' for global account data. content is the JSON object.

CREATE TABLE account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    data_type TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
CREATE INDEX account_data_stream ON account_data (stream_id);
