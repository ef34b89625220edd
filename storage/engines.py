"""The two database engines: how to connect, and their few SQL differences.

Queries are written once with ``?`` placeholders; the PostgreSQL engine turns
them into ``%s`` (and doubles literal ``%``), so the same text runs on both.
"""

import re
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # sqlite3 is imported when a SQLite database is opened, not on PostgreSQL
    import sqlite3


@attrs.frozen
class SqliteEngine:
    path: str
    synchronous: str = "NORMAL"
    name = "sqlite3"
    supports_returning = True

    def connect(self) -> "sqlite3.Connection":
        import sqlite3

        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a
        # transaction is exactly one run_interaction call.
        conn = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA cache_size=-16000")  # 16 MB page cache per connection
        return conn

    def convert(self, sql: str) -> str:
        return sql

    def begin_sql(self, write: bool) -> str:
        # IMMEDIATE takes the write lock up front, so two writers never
        # deadlock upgrading from a read lock.
        return "BEGIN IMMEDIATE" if write else "BEGIN"

    def is_retryable(self, error: BaseException) -> bool:
        import sqlite3

        return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


_PLACEHOLDER = re.compile(r"\?")


@attrs.frozen
class PostgresEngine:
    conninfo: str
    min_size: int = 2
    max_size: int = 10
    name = "psycopg"
    supports_returning = True

    def convert(self, sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))

    def begin_sql(self, write: bool) -> str:
        return "BEGIN"

    def is_retryable(self, error: BaseException) -> bool:
        import psycopg.errors

        return isinstance(
            error, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected
        )


def postgres_conninfo(args: dict[str, Any]) -> str:
    """Build a libpq conninfo string from Synapse-style ``database.args``."""
    from psycopg.conninfo import make_conninfo

    keys = {
        "dbname": args.get("dbname") or args.get("database"),
        "user": args.get("user"),
        "password": args.get("password"),
        "host": args.get("host"),
        "port": str(args["port"]) if args.get("port") is not None else None,
    }
    return make_conninfo("", **{k: v for k, v in keys.items() if v is not None})
