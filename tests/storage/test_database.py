"""The database layer on SQLite and PostgreSQL: transactions, schema, shutdown."""

import sqlite3
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from storage import Database, DatabaseConfig, SchemaError
from storage.database import CHECKPOINT_EVERY
from storage.schema_runner import code_schema_version
from tests.support.postgres import throwaway_database


class DatabaseTestsMixin:
    """Run against ``self.make_config()``; subclasses pick the engine."""

    def setUp(self) -> None:
        self._stack = ExitStack()
        self.config = self.make_config()
        self.db = Database(reactor, self.config)
        self.db.open()

    async def _close(self) -> None:
        if not self.db._closing:
            await self.db.close()

    def tearDown(self):
        d = defer.ensureDeferred(self._close())
        d.addBoth(lambda r: (self._stack.close(), r)[1])
        return d

    def run_async(self, coro):
        return defer.ensureDeferred(coro)

    # --- tests -------------------------------------------------------------
    def test_schema_is_applied_and_recorded(self):
        async def go():
            rows = await self.db.select("v", "SELECT version FROM schema_version")
            self.assertEqual(rows, [(code_schema_version(self.db.engine.name),)])
            deltas = await self.db.select("d", "SELECT version, name FROM applied_schema_deltas")
            self.assertIn((1, "server_keys"), deltas)
            # Opening again applies nothing new and keeps the data.
            again = Database(reactor, self.config)
            again.open()
            await again.close()
        return self.run_async(go())

    def test_newer_schema_is_refused(self):
        async def go():
            await self.db.run_interaction(
                "bump", lambda txn: txn.execute("UPDATE schema_version SET version = version + 1")
            )
            await self.db.close()
            newer = Database(reactor, self.config)
            with self.assertRaises(SchemaError) as cm:
                newer.open()
            self.assertIn("newer than this server supports", str(cm.exception))
            newer._stop_pools()
        return self.run_async(go())

    def test_failed_transaction_writes_nothing(self):
        def write_then_fail(txn):
            txn.execute(
                "INSERT INTO remote_server_keys (server_name, key_id, verify_key, valid_until_ts,"
                " fetched_from, key_json) VALUES (?, ?, ?, ?, ?, ?)",
                ("a.example", "ed25519:1", "k", 1, "a.example", "{}"),
            )
            txn.call_after(self.fail, "after-commit hook ran for a rolled back transaction")
            raise ValueError("boom")

        async def go():
            with self.assertRaises(ValueError):
                await self.db.run_interaction("fail", write_then_fail)
            rows = await self.db.select("n", "SELECT count(*) FROM remote_server_keys")
            self.assertEqual(rows, [(0,)])
        return self.run_async(go())

    def test_concurrent_writes_all_land_and_hooks_run_after_commit(self):
        committed = []

        def insert(txn, i):
            txn.execute(
                "INSERT INTO remote_server_keys (server_name, key_id, verify_key, valid_until_ts,"
                " fetched_from, key_json) VALUES (?, ?, ?, ?, ?, ?)",
                (f"s{i}.example", "ed25519:1", "k", i, "x", "{}"),
            )
            txn.call_after(committed.append, i)

        async def go():
            await defer.gatherResults(
                [defer.ensureDeferred(self.db.run_interaction("w", insert, i)) for i in range(40)]
            )
            self.assertEqual(sorted(committed), list(range(40)))
            reads = await defer.gatherResults([
                defer.ensureDeferred(self.db.select("r", "SELECT count(*) FROM remote_server_keys"))
                for _ in range(10)
            ])
            self.assertEqual(reads, [[(40,)]] * 10)
        return self.run_async(go())

    def test_percent_and_placeholders_mean_the_same_on_both_engines(self):
        async def go():
            rows = await self.db.select("p", "SELECT ? || '%' || ?", ("50", "!"))
            self.assertEqual(rows, [("50%!",)])
        return self.run_async(go())

    def test_close_waits_for_transactions_in_flight(self):
        def slow_insert(txn):
            time.sleep(0.3)
            txn.execute(
                "INSERT INTO remote_server_keys (server_name, key_id, verify_key, valid_until_ts,"
                " fetched_from, key_json) VALUES ('slow.example', 'ed25519:1', 'k', 1, 'x', '{}')"
            )
            return "done"

        async def go():
            pending = defer.ensureDeferred(self.db.run_interaction("slow", slow_insert))
            await self.db.close()
            self.assertEqual(await pending, "done")
            with self.assertRaises(RuntimeError):
                await self.db.select("late", "SELECT 1")
            reopened = Database(reactor, self.config)
            reopened.open()
            rows = await reopened.select("n", "SELECT server_name FROM remote_server_keys")
            await reopened.close()
            self.assertEqual(rows, [("slow.example",)])
        return self.run_async(go())


def _insert_key(txn, name="q.example"):
    txn.execute(
        "INSERT INTO remote_server_keys (server_name, key_id, verify_key, valid_until_ts,"
        " fetched_from, key_json) VALUES (?, ?, ?, ?, ?, ?)",
        (name, "ed25519:1", "k", 1, "x", "{}"),
    )
    return threading.current_thread()


class SqliteDatabaseTests(DatabaseTestsMixin, unittest.TestCase):
    def make_config(self) -> DatabaseConfig:
        directory = self._stack.enter_context(tempfile.TemporaryDirectory())
        self.path = Path(directory) / "hs.db"
        return DatabaseConfig("sqlite3", {"database": str(self.path)})

    def test_a_quick_write_commits_on_the_reactor_thread_when_the_writer_is_idle(self):
        async def go():
            d = defer.ensureDeferred(self.db.run_interaction("q", _insert_key, quick=True))
            self.assertTrue(d.called, "an idle writer: the write is done before returning")
            self.assertIs(await d, threading.current_thread())
            rows = await self.db.select("n", "SELECT server_name FROM remote_server_keys")
            self.assertEqual(rows, [("q.example",)])
            # Not quick: the writer thread.
            thread = await self.db.run_interaction("t", _insert_key, "t.example")
            self.assertIsNot(thread, threading.current_thread())
        return self.run_async(go())

    def test_a_quick_write_waits_on_the_writer_thread_while_another_process_writes(self):
        """SQLite's write lock held elsewhere: the reactor never blocks on it; the
        write goes to the writer thread and lands once the lock is released."""
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")

        async def go():
            d = defer.ensureDeferred(self.db.run_interaction("q", _insert_key, quick=True))
            self.assertFalse(d.called)
            ticks = []
            for _ in range(3):  # the reactor keeps turning meanwhile
                await deferLater(reactor, 0.05, lambda: ticks.append(1))
            self.assertEqual(len(ticks), 3)
            self.assertFalse(d.called)
            other.execute("COMMIT")
            self.assertIsNot(await d, threading.current_thread())
            rows = await self.db.select("n", "SELECT count(*) FROM remote_server_keys")
            self.assertEqual(rows, [(1,)])
        return self.run_async(go())

    def test_quick_writes_commit_in_order_with_other_writes(self):
        """Quick and ordinary writes interleaved: every one lands, in the order issued."""
        def append(txn, i):
            txn.execute(
                "INSERT INTO remote_server_keys (server_name, key_id, verify_key, valid_until_ts,"
                " fetched_from, key_json) VALUES (?, ?, ?, ?, ?, ?)",
                (f"s{i}.example", "ed25519:1", "k", i, "x", "{}"),
            )
            row = txn.execute("SELECT count(*) FROM remote_server_keys").fetchone()
            return row[0]

        async def go():
            counts = await defer.gatherResults([
                defer.ensureDeferred(self.db.run_interaction("w", append, i, quick=i % 3 != 0))
                for i in range(30)
            ])
            self.assertEqual(counts, list(range(1, 31)))  # each saw exactly those before it
        return self.run_async(go())

    def test_the_wal_stays_small_under_quick_writes(self):
        """Quick writes never checkpoint on the reactor, but every CHECKPOINT_EVERY
        of them one goes to the writer thread, which does: the WAL stays near
        SQLite's 1,000-page checkpoint size instead of growing with every write."""
        wal = Path(str(self.path) + "-wal")
        payload = "x" * 3000  # about a page per write

        def insert(txn, i):
            txn.execute(
                "INSERT INTO remote_server_keys (server_name, key_id, verify_key, valid_until_ts,"
                " fetched_from, key_json) VALUES (?, ?, ?, ?, ?, ?)",
                (f"s{i}", "ed25519:1", "k", i, "x", payload),
            )
            return threading.current_thread()

        async def go():
            threads_used = set()
            largest = 0
            for i in range(8 * CHECKPOINT_EVERY):
                threads_used.add(await self.db.run_interaction("q", insert, i, quick=True))
                largest = max(largest, wal.stat().st_size if wal.exists() else 0)
            self.assertEqual(len(threads_used), 2)  # mostly the reactor, now and then the writer
            # 1,600 writes of 2+ pages each would be over 12 MB of WAL unchecked.
            self.assertLess(largest, 8 * 1024 * 1024)
            rows = await self.db.select("n", "SELECT count(*) FROM remote_server_keys")
            self.assertEqual(rows, [(8 * CHECKPOINT_EVERY,)])
        return self.run_async(go())


class PostgresDatabaseTests(DatabaseTestsMixin, unittest.TestCase):
    def make_config(self) -> DatabaseConfig:
        return DatabaseConfig("psycopg", self._stack.enter_context(throwaway_database()))
