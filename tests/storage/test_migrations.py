"""Schema deltas applied to a database that already holds data, on SQLite and PostgreSQL.

0016_events_rowid: on SQLite the ``events`` table is rebuilt with
``stream_ordering INTEGER PRIMARY KEY`` (the rowid), ``event_push_actions``
becomes a WITHOUT ROWID table keyed by (user_id, stream_ordering) and
``forward_extremities`` a WITHOUT ROWID table; on both engines
``events_relations`` becomes partial (WHERE relates_to_id IS NOT NULL) and the
unused ``events_txn`` index goes.
A database made at schema version 15 and filled with rows must come out of the
upgrade with every row and column as it was.
"""

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from storage import Database, DatabaseConfig, schema_runner
from tests.support.postgres import throwaway_database

EVENT_COLUMNS = (
    "stream_ordering", "event_id", "room_id", "type", "state_key", "sender", "depth",
    "origin_server_ts", "state_group", "json", "device_id", "txn_id", "outlier",
    "rejected_reason", "redacted_by", "relates_to_id", "relation_type", "relation_key",
)

# Every column set in some row, NULL in another; one outlier with a negative
# stream ordering (backfilled/outlier events are numbered downwards), one
# relation of each kind.
EVENTS = [
    (1, "$create", "!r:hs", "m.room.create", "", "@a:hs", 1, 1_700_000_000_000, 1,
     '{"type":"m.room.create"}', None, None, False, None, None, None, None, None),
    (2, "$msg", "!r:hs", "m.room.message", None, "@a:hs", 2, 1_700_000_000_001, 1,
     '{"body":"hi"}', "DEV", "txn1", False, None, "$redaction", None, None, None),
    (3, "$reaction", "!r:hs", "m.reaction", None, "@b:hs", 3, 1_700_000_000_002, 1,
     '{"k":"\\ud83d\\udc4d"}', "DEV2", "txn2", False, None, None, "$msg", "m.annotation", "👍"),
    (4, "$thread", "!r:hs", "m.room.message", None, "@b:hs", 4, 1_700_000_000_003, 2,
     "{}", None, None, False, "auth_error", None, "$msg", "m.thread", None),
    (-3, "$outlier", "!other:remote", "m.room.member", "@c:remote", "@c:remote", 9,
     1_600_000_000_000, 0, "{}", None, None, True, None, None, None, None, None),
    (9_007_199_254_740_993, "$big", "!r:hs", "m.room.message", None, "@a:hs", 5,
     1_700_000_000_004, 3, "{}", None, None, False, None, None, "$thread", "m.reference", None),
]

EXTREMITIES = [("!r:hs", "$msg"), ("!r:hs", "$thread"), ("!s:hs", "$other")]
PUSH_ACTIONS = [
    ("@b:hs", "!r:hs", 2, "$msg", "main", True, '["notify"]', 1_700_000_000_001),
    ("@a:hs", "!r:hs", 3, "$reaction", "main", False, '["notify"]', 1_700_000_000_002),
    ("@a:hs", "!r:hs", 4, "$thread", "$msg", False, "[]", 1_700_000_000_003),
]
PUSH_COLUMNS = ("user_id", "room_id", "stream_ordering", "event_id", "thread_id",
                "highlight", "actions", "ts")

INDEXES = {"events_room_stream", "events_relations"}  # events_txn dropped: unused


@contextmanager
def schema_upto(version: int) -> Iterator[None]:
    """Only the deltas numbered up to ``version`` exist while inside."""
    original = schema_runner._deltas

    def truncated(engine_name: str) -> list[tuple[int, str, str]]:
        return [d for d in original(engine_name) if d[0] <= version]

    schema_runner._deltas = truncated
    try:
        yield
    finally:
        schema_runner._deltas = original


def _insert_rows(txn: Any) -> None:
    marks = ", ".join("?" * len(EVENT_COLUMNS))
    txn.executemany(
        f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({marks})", EVENTS
    )
    marks = ", ".join("?" * len(PUSH_COLUMNS))
    txn.executemany(
        f"INSERT INTO event_push_actions ({', '.join(PUSH_COLUMNS)}) VALUES ({marks})",
        PUSH_ACTIONS,
    )
    txn.executemany(
        "INSERT INTO forward_extremities (room_id, event_id) VALUES (?, ?)", EXTREMITIES
    )


def _normalise(rows: list[tuple[Any, ...]], bool_columns: tuple[int, ...]) -> list[tuple]:
    """SQLite hands BOOLEANs back as 0/1."""
    return [
        tuple(bool(v) if i in bool_columns else v for i, v in enumerate(row)) for row in rows
    ]


class MigrationTestsMixin:
    """Subclasses give ``make_config`` and the engine-specific checks."""

    timeout = 60

    def setUp(self) -> None:
        self._stack = ExitStack()
        self.config = self.make_config()

    def tearDown(self) -> None:
        self._stack.close()

    async def _open(self) -> Database:
        db = Database(reactor, self.config)
        db.open()
        return db

    async def _at_version_15_with_rows(self) -> None:
        with schema_upto(15):
            db = await self._open()
        try:
            rows = await db.select("v", "SELECT version FROM schema_version")
            self.assertEqual(rows, [(15,)])
            applied = await db.select("d", "SELECT max(version) FROM applied_schema_deltas")
            self.assertEqual(applied, [(15,)])
            await db.run_interaction("fill", _insert_rows)
        finally:
            await db.close()

    async def _upgraded(self) -> Database:
        await self._at_version_15_with_rows()
        db = await self._open()
        return db

    def test_upgrade_keeps_every_row_and_column(self):
        async def go():
            db = await self._upgraded()
            try:
                version = await db.select("v", "SELECT version FROM schema_version")
                self.assertEqual(version, [(schema_runner.code_schema_version(db.engine.name),)])
                self.assertGreaterEqual(version[0][0], 16)
                applied = await db.select(
                    "d", "SELECT version, name FROM applied_schema_deltas WHERE version = 16"
                )
                self.assertEqual(applied, [(16, "events_rowid")])

                rows = await db.select(
                    "e", f"SELECT {', '.join(EVENT_COLUMNS)} FROM events ORDER BY stream_ordering"
                )
                outlier = EVENT_COLUMNS.index("outlier")
                self.assertEqual(
                    _normalise(rows, (outlier,)),
                    sorted(EVENTS, key=lambda e: e[0]),
                )
                push = await db.select(
                    "p", f"SELECT {', '.join(PUSH_COLUMNS)} FROM event_push_actions"
                    " ORDER BY stream_ordering"
                )
                self.assertEqual(_normalise(push, (PUSH_COLUMNS.index("highlight"),)),
                                 PUSH_ACTIONS)
                extremities = await db.select(
                    "x", "SELECT room_id, event_id FROM forward_extremities ORDER BY room_id, event_id"
                )
                self.assertEqual(extremities, EXTREMITIES)

                # The relations index answers what the relations queries ask.
                children = await db.select(
                    "c", "SELECT event_id FROM events WHERE relates_to_id = ?"
                    " ORDER BY stream_ordering", ("$msg",)
                )
                self.assertEqual(children, [("$reaction",), ("$thread",)])
                parents = await db.select(
                    "p", "SELECT DISTINCT relates_to_id FROM events"
                    " WHERE relates_to_id IS NOT NULL ORDER BY relates_to_id"
                )
                self.assertEqual(parents, [("$msg",), ("$thread",)])
            finally:
                await db.close()
        return defer.ensureDeferred(go())

    def test_keys_still_unique_and_new_rows_go_in(self):
        async def go():
            db = await self._upgraded()
            try:
                def dup_stream(txn):
                    txn.execute(
                        "INSERT INTO events (stream_ordering, event_id, room_id, type, sender,"
                        " depth, origin_server_ts, state_group, json)"
                        " VALUES (2, '$other', '!r:hs', 't', '@a:hs', 1, 1, 1, '{}')"
                    )

                def dup_event_id(txn):
                    txn.execute(
                        "INSERT INTO events (stream_ordering, event_id, room_id, type, sender,"
                        " depth, origin_server_ts, state_group, json)"
                        " VALUES (100, '$msg', '!r:hs', 't', '@a:hs', 1, 1, 1, '{}')"
                    )

                def dup_push(txn):
                    txn.execute(
                        "INSERT INTO event_push_actions (user_id, room_id, stream_ordering,"
                        " event_id, thread_id, highlight, actions, ts)"
                        " VALUES ('@b:hs', '!r:hs', 2, '$msg', 'main', FALSE, '[]', 1)"
                    )

                for write in (dup_stream, dup_event_id, dup_push):
                    with self.assertRaises(Exception) as cm:
                        await db.run_interaction(write.__name__, write)
                    self.assertIn("unique", str(cm.exception).lower(), write.__name__)

                def new_event(txn):
                    txn.execute(
                        "INSERT INTO events (stream_ordering, event_id, room_id, type, sender,"
                        " depth, origin_server_ts, state_group, json, relates_to_id,"
                        " relation_type) VALUES (10, '$new', '!r:hs', 'm.reaction', '@a:hs',"
                        " 6, 1, 3, '{}', '$create', 'm.annotation')"
                    )

                await db.run_interaction("new", new_event)
                rows = await db.select(
                    "n", "SELECT event_id FROM events WHERE relates_to_id = ?", ("$create",)
                )
                self.assertEqual(rows, [("$new",)])
                count = await db.select("n", "SELECT count(*) FROM events")
                self.assertEqual(count, [(len(EVENTS) + 1,)])
            finally:
                await db.close()
            # Opening again changes nothing.
            again = await self._open()
            try:
                count = await again.select("n", "SELECT count(*) FROM events")
                self.assertEqual(count, [(len(EVENTS) + 1,)])
            finally:
                await again.close()
        return defer.ensureDeferred(go())

    def test_indexes_after_upgrade(self):
        async def go():
            db = await self._upgraded()
            try:
                await self.check_indexes(db)
            finally:
                await db.close()
        return defer.ensureDeferred(go())

    def test_fresh_database_has_the_same_events_schema_as_an_upgraded_one(self):
        """A database created at the latest version (every delta in one go on an
        empty database) and one upgraded from 15 with rows end up alike."""
        async def go():
            fresh = await self._open()
            try:
                fresh_shape = await self.events_shape(fresh)
            finally:
                await fresh.close()
            self.config = self.make_config()
            db = await self._upgraded()
            try:
                self.assertEqual(await self.events_shape(db), fresh_shape)
            finally:
                await db.close()
        return defer.ensureDeferred(go())


class SqliteMigrationTests(MigrationTestsMixin, unittest.TestCase):
    def make_config(self) -> DatabaseConfig:
        directory = self._stack.enter_context(tempfile.TemporaryDirectory())
        self.path = Path(directory) / "hs.db"
        return DatabaseConfig("sqlite3", {"database": str(self.path)})

    async def events_shape(self, db: Database) -> Any:
        table = await db.select("t", "SELECT sql FROM sqlite_master WHERE name = 'events'")
        indexes = await db.select(
            "i", "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name IN ('events', 'event_push_actions') ORDER BY name"
        )
        push = await db.select(
            "p", "SELECT sql FROM sqlite_master WHERE name = 'event_push_actions'"
        )
        return table, indexes, push

    def test_version_15_really_is_the_old_layout(self):
        """The starting point the other tests upgrade from: BIGINT PRIMARY KEY, a
        separate primary-key index, a full events_relations."""
        async def go():
            await self._at_version_15_with_rows()
            conn = sqlite3.connect(self.path)
            try:
                info = {r[1]: r for r in conn.execute("PRAGMA table_info(events)")}
                self.assertEqual(info["stream_ordering"][2], "BIGINT")
                sql = conn.execute(
                    "SELECT sql FROM sqlite_master WHERE name = 'events_relations'"
                ).fetchone()[0]
                self.assertNotIn("WHERE", sql.upper())
                # The BIGINT key is not the rowid: rowids were assigned 1, 2, 3...
                rows = conn.execute("SELECT rowid, stream_ordering FROM events").fetchall()
                self.assertTrue(any(r != s for r, s in rows))
            finally:
                conn.close()
        return defer.ensureDeferred(go())

    async def check_indexes(self, db: Database) -> None:
        info = await db.select("t", "SELECT name, type, pk FROM pragma_table_info('events')")
        self.assertEqual([r[0] for r in info], list(EVENT_COLUMNS))
        self.assertIn(("stream_ordering", "INTEGER", 1), info)
        self.assertEqual([r for r in info if r[2]], [("stream_ordering", "INTEGER", 1)])
        # stream_ordering is the rowid itself (negative and > 2**53 ones too).
        rows = await db.select("r", "SELECT rowid, stream_ordering FROM events")
        self.assertEqual(len(rows), len(EVENTS))
        for rowid, stream in rows:
            self.assertEqual(rowid, stream)

        indexes = dict(await db.select(
            "i", "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name = 'events'"
        ))
        self.assertTrue(INDEXES <= set(indexes), indexes)
        # Besides ours, only event_id's UNIQUE: no index for the primary key any more.
        autos = [n for n in indexes if n.startswith("sqlite_autoindex")]
        self.assertEqual(len(autos), 1, indexes)
        index_columns = await db.select("c", f"SELECT name FROM pragma_index_info('{autos[0]}')")
        self.assertEqual(index_columns, [("event_id",)])
        self.assertIn("WHERE RELATES_TO_ID IS NOT NULL", indexes["events_relations"].upper())
        self.assertNotIn("WHERE", indexes["events_room_stream"].upper())
        self.assertNotIn("events_txn", indexes)
        partial = dict(
            await db.select("p", "SELECT name, partial FROM pragma_index_list('events')")
        )
        self.assertEqual(partial["events_relations"], 1)
        self.assertEqual(partial["events_room_stream"], 0)

        # The queries of storage/relations.py still find children through the index.
        for sql, args in [
            ("SELECT event_id FROM events WHERE relates_to_id = ?", ("$msg",)),
            ("SELECT sender, relation_key FROM events WHERE relates_to_id = ?"
             " AND relation_type = 'm.annotation' AND type = 'm.reaction'"
             " AND redacted_by IS NULL AND relation_key IS NOT NULL"
             " AND outlier = FALSE AND rejected_reason IS NULL", ("$msg",)),
            ("SELECT relates_to_id, event_id FROM events WHERE relates_to_id IN (?, ?)"
             " AND redacted_by IS NULL AND outlier = FALSE AND rejected_reason IS NULL",
             ("$msg", "$thread")),
            ("SELECT DISTINCT relates_to_id FROM events WHERE relates_to_id IS NOT NULL", ()),
        ]:
            plan = await db.select("plan", "EXPLAIN QUERY PLAN " + sql, args)
            details = " ".join(str(r[-1]) for r in plan)
            self.assertIn("INDEX events_relations", details, sql)

        # event_push_actions: one b-tree keyed by (user_id, stream_ordering).
        push_sql = (await db.select(
            "p", "SELECT sql FROM sqlite_master WHERE name = 'event_push_actions'"
        ))[0][0]
        self.assertIn("WITHOUT ROWID", push_sql.upper())
        extremities_sql = (await db.select(
            "x", "SELECT sql FROM sqlite_master WHERE name = 'forward_extremities'"
        ))[0][0]
        self.assertIn("WITHOUT ROWID", extremities_sql.upper())
        push_indexes = await db.select(
            "p", "SELECT name FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name = 'event_push_actions' AND sql IS NOT NULL"
        )
        self.assertEqual(push_indexes, [])
        pk = await db.select(
            "k", "SELECT name FROM pragma_table_info('event_push_actions') WHERE pk > 0"
            " ORDER BY pk"
        )
        self.assertEqual(pk, [("user_id",), ("stream_ordering",)])
        plan = await db.select(
            "plan", "EXPLAIN QUERY PLAN SELECT room_id FROM event_push_actions"
            " WHERE user_id = ? AND stream_ordering < ? ORDER BY stream_ordering DESC", ("@a:hs", 9)
        )
        self.assertIn("PRIMARY KEY", " ".join(str(r[-1]) for r in plan))
        integrity = await db.select("ic", "PRAGMA integrity_check")
        self.assertEqual(integrity, [("ok",)])
        fk = await db.select("fk", "PRAGMA foreign_key_check")
        self.assertEqual(fk, [])


class PostgresMigrationTests(MigrationTestsMixin, unittest.TestCase):
    def make_config(self) -> DatabaseConfig:
        return DatabaseConfig("psycopg", self._stack.enter_context(throwaway_database()))

    async def events_shape(self, db: Database) -> Any:
        columns = await db.select(
            "c", "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_name = 'events'"
            " ORDER BY ordinal_position"
        )
        indexes = await db.select(
            "i", "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE tablename IN ('events', 'event_push_actions') ORDER BY indexname"
        )
        return columns, indexes

    async def check_indexes(self, db: Database) -> None:
        indexes = dict(await db.select(
            "i", "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events'"
        ))
        self.assertTrue(INDEXES <= set(indexes), indexes)
        self.assertIn("WHERE (relates_to_id IS NOT NULL)", indexes["events_relations"])
        self.assertNotIn("WHERE", indexes["events_room_stream"])
        self.assertNotIn("events_txn", indexes)
        # The primary key is unchanged on PostgreSQL.
        self.assertIn("events_pkey", indexes)
        self.assertIn("(stream_ordering)", indexes["events_pkey"])

        # The planner may use the partial index for relates_to_id = $1 (implied NOT NULL).
        def plan(txn, sql, args):
            txn.execute("SET LOCAL enable_seqscan = off")
            txn.execute("SET LOCAL enable_bitmapscan = off")
            return txn.execute("EXPLAIN " + sql, args).fetchall()

        for sql, args in [
            ("SELECT event_id FROM events WHERE relates_to_id = ?", ("$msg",)),
            ("SELECT relates_to_id, event_id FROM events WHERE relates_to_id IN (?, ?)",
             ("$msg", "$thread")),
        ]:
            rows = await db.run_read("plan", plan, sql, args)
            self.assertIn("events_relations", " ".join(r[0] for r in rows), sql)
