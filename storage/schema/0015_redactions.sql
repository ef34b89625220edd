-- What each m.room.redaction event redacts, so that an event arriving after its
-- redaction (from another server, out of order) is stored redacted.
CREATE TABLE redactions (
    event_id TEXT PRIMARY KEY,
    redacts TEXT NOT NULL
);
CREATE INDEX redactions_redacts ON redactions (redacts);
