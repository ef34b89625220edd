"""The database API: transactions run on threads, short SQLite writes inline.

``run_interaction`` runs a function inside one transaction on a worker thread
and returns its result to the reactor. SQLite has one writer thread (writes
are serialised, as SQLite requires) and a pool of reader connections (WAL lets
reads run beside the writer). PostgreSQL uses a psycopg connection pool.

A SQLite write the caller marks ``quick`` (a batch of a few events) runs on
the reactor thread itself when the writer thread has nothing in hand: it
takes tens of microseconds, less than the two thread hand-offs it saves. It
never waits for a lock there: if another process holds SQLite's write lock,
it goes to the writer thread and waits there. Nor does it checkpoint the WAL
(copying pages back into the database file): every CHECKPOINT_EVERY quick
writes, one goes to the writer thread instead, whose commits checkpoint as
SQLite does by default (past 1,000 WAL pages), so the WAL stays small.
"""

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from storage.engines import PostgresEngine, SqliteEngine, postgres_conninfo
from storage.schema_runner import SchemaError, prepare_schema

if TYPE_CHECKING:  # imported by SqliteEngine.connect: PostgreSQL never loads it
    import sqlite3

logger = logging.getLogger(__name__)

R = TypeVar("R")
MAX_RETRIES = 5
# Quick writes on the reactor thread between two on the writer thread (which
# checkpoints the WAL when it has grown past SQLite's default 1,000 pages).
CHECKPOINT_EVERY = 200


@attrs.frozen
class DatabaseConfig:
    engine: str  # "sqlite3" or "psycopg"
    args: dict[str, Any]


class Txn:
    """A cursor inside one transaction; queries use ``?`` placeholders on both engines."""

    def __init__(self, cursor: Any, engine: SqliteEngine | PostgresEngine) -> None:
        self._cursor = cursor
        self._engine = engine
        self.after_commit: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    @property
    def engine_name(self) -> str:
        return self._engine.name

    def execute(self, sql: str, args: Sequence[Any] = ()) -> "Txn":
        self._cursor.execute(self._engine.convert(sql), tuple(args))
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if not isinstance(rows, list):
            rows = list(rows)  # any sequence is a row: no copy of each
        if rows:
            self._cursor.executemany(self._engine.convert(sql), rows)

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def call_after(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the reactor once this transaction has committed."""
        self.after_commit.append((func, args))


class Database:
    """One database, SQLite or PostgreSQL, behind the same transaction API."""

    def __init__(self, reactor: Any, config: DatabaseConfig) -> None:
        self._reactor = reactor
        self._closing = False
        self._in_flight = 0
        self._writer_busy = 0  # writes handed to the writer thread, not yet back
        self._inline_writes = 0  # quick writes since the writer thread last wrote
        self._idle: defer.Deferred[None] | None = None
        if config.engine == "sqlite3":
            synchronous = str(config.args.get("synchronous", "normal")).upper()
            self.engine: SqliteEngine | PostgresEngine = SqliteEngine(
                config.args.get("database", "homeserver.db"), synchronous
            )
            self._writer_pool = ThreadPool(1, 1, name="db-writer")
            self._reader_pool = ThreadPool(1, 4, name="db-reader")
            self._local = threading.local()
            self._connections: list[sqlite3.Connection] = []
            self._connections_lock = threading.Lock()
            self._pg_pool = None
            # The reactor thread's own writer connection, for quick writes.
            self._inline_conn: sqlite3.Connection | None = None
        else:
            from psycopg_pool import ConnectionPool

            cp_min = int(config.args.get("cp_min", 2))
            cp_max = int(config.args.get("cp_max", 10))
            self.engine = PostgresEngine(postgres_conninfo(config.args), cp_min, cp_max)
            self._pg_pool = ConnectionPool(
                self.engine.conninfo, min_size=cp_min, max_size=cp_max, open=False,
                kwargs={"autocommit": False},
            )
            self._writer_pool = ThreadPool(1, cp_max, name="db-pg")
            self._reader_pool = self._writer_pool

    # --- lifecycle ------------------------------------------------------------
    def open(self) -> None:
        """Connect and bring the schema up to date (blocking; call before serving)."""
        if self._pg_pool is not None:
            self._pg_pool.open(wait=True, timeout=30)
            with self._pg_pool.connection() as conn:
                prepare_schema(conn, self.engine)
        else:
            conn = self._sqlite_connection()
            prepare_schema(conn, self.engine)
        self._writer_pool.start()
        if self._reader_pool is not self._writer_pool:
            self._reader_pool.start()
        self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_pools)

    def _stop_pools(self) -> None:
        for pool in {id(self._writer_pool): self._writer_pool,
                     id(self._reader_pool): self._reader_pool}.values():
            if pool.started:
                pool.stop()

    async def close(self) -> None:
        """Refuse new work, let transactions in flight finish, then disconnect."""
        self._closing = True
        if self._in_flight:
            self._idle = defer.Deferred()
            await self._idle
        self._stop_pools()
        if self._pg_pool is not None:
            self._pg_pool.close()
        else:
            with self._connections_lock:
                for conn in self._connections:
                    conn.close()
                self._connections.clear()
        logger.info("database closed")

    # --- connections ------------------------------------------------------------
    def _sqlite_connection(self) -> "sqlite3.Connection":
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_sqlite_connection()
            self._local.conn = conn
        return conn

    def _new_sqlite_connection(self) -> "sqlite3.Connection":
        assert isinstance(self.engine, SqliteEngine)
        conn = self.engine.connect()
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _run_sqlite(self, write: bool, func: Callable[..., R], *args: Any) -> tuple[R, Txn]:
        return self._run_sqlite_on(self._sqlite_connection(), write, func, *args)

    def _run_sqlite_on(
        self, conn: "sqlite3.Connection", write: bool, func: Callable[..., R], *args: Any
    ) -> tuple[R, Txn]:
        for attempt in range(MAX_RETRIES):
            cursor = conn.cursor()
            txn = Txn(cursor, self.engine)
            try:
                cursor.execute(self.engine.begin_sql(write))
                result = func(txn, *args)
                cursor.execute("COMMIT")
                return result, txn
            except BaseException as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if self.engine.is_retryable(e) and attempt < MAX_RETRIES - 1:
                    continue
                raise
            finally:
                cursor.close()
        raise AssertionError("unreachable")

    def _run_postgres(self, write: bool, func: Callable[..., R], *args: Any) -> tuple[R, Txn]:
        assert self._pg_pool is not None
        with self._pg_pool.connection() as conn:
            for attempt in range(MAX_RETRIES):
                cursor = conn.cursor()
                txn = Txn(cursor, self.engine)
                try:
                    result = func(txn, *args)
                    conn.commit()
                    return result, txn
                except BaseException as e:
                    conn.rollback()
                    if self.engine.is_retryable(e) and attempt < MAX_RETRIES - 1:
                        continue
                    raise
                finally:
                    cursor.close()
        raise AssertionError("unreachable")

    # --- transactions -------------------------------------------------------------
    async def _run(self, write: bool, desc: str, func: Callable[..., R], *args: Any) -> R:
        if self._closing:
            raise RuntimeError(f"database is closing; refused {desc}")
        pool = self._writer_pool if write else self._reader_pool
        runner = self._run_sqlite if self._pg_pool is None else self._run_postgres
        self._in_flight += 1
        if write:
            self._writer_busy += 1
        try:
            result, txn = await threads.deferToThreadPool(
                self._reactor, pool, runner, write, func, *args
            )
        finally:
            self._in_flight -= 1
            if write:
                self._writer_busy -= 1
                self._inline_writes = 0
            if self._in_flight == 0 and self._idle is not None:
                idle, self._idle = self._idle, None
                idle.callback(None)
        for after, after_args in txn.after_commit:
            after(*after_args)
        return result

    def _run_inline(self, func: Callable[..., R], *args: Any) -> tuple[R, Txn] | None:
        """A write on the reactor thread, or None if SQLite's write lock is taken
        (by another process: our own writer thread is idle when this is called)."""
        import sqlite3

        if self._inline_conn is None:
            self._inline_conn = self._new_sqlite_connection()
            self._inline_conn.execute("PRAGMA busy_timeout=0")
            self._inline_conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread's job
        try:
            return self._run_sqlite_on(self._inline_conn, True, func, *args)
        except sqlite3.OperationalError as e:
            if self.engine.is_retryable(e):
                return None
            raise

    def run_blocking(self, func: Callable[..., R], *args: Any) -> R:
        """Run a transaction on the calling thread: for start-up, before serving."""
        runner = self._run_sqlite if self._pg_pool is None else self._run_postgres
        result, _ = runner(True, func, *args)
        return result

    async def run_interaction(
        self, desc: str, func: Callable[..., R], *args: Any, quick: bool = False
    ) -> R:
        """Run ``func(txn, *args)`` in one read-write transaction.

        ``quick``: a short write (well under a millisecond) that may run on the
        reactor thread on SQLite, when the writer thread is idle.
        """
        if (quick and self._pg_pool is None and self._writer_busy == 0 and not self._closing
                and self._inline_writes < CHECKPOINT_EVERY):
            done = self._run_inline(func, *args)
            if done is not None:
                result, txn = done
                self._inline_writes += 1
                for after, after_args in txn.after_commit:
                    after(*after_args)
                return result
        return await self._run(True, desc, func, *args)

    async def run_read(self, desc: str, func: Callable[..., R], *args: Any) -> R:
        """Run ``func(txn, *args)`` in a read-only transaction (concurrent on SQLite)."""
        return await self._run(False, desc, func, *args)

    async def select(self, desc: str, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.run_read(desc, lambda txn: txn.execute(sql, args).fetchall())


__all__ = ["Database", "DatabaseConfig", "SchemaError", "Txn"]
