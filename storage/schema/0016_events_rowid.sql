-- events_relations holds only events that relate to another (edits, reactions,
-- replies in threads): plain messages no longer write it. events_txn goes: no
-- query used it. (On SQLite the table is also rebuilt with stream_ordering as
-- its rowid: the .sqlite twin.)
DROP INDEX events_txn;
DROP INDEX events_relations;
CREATE INDEX events_relations ON events (relates_to_id, relation_type)
    WHERE relates_to_id IS NOT NULL;
