"""Forward-only schema deltas, applied at start-up and recorded in the database.

Each delta is ``schema/NNNN_name.sql``; an engine-specific twin
``NNNN_name.sqlite.sql`` or ``NNNN_name.postgres.sql`` replaces it on that engine.
A database whose schema version is newer than the code's is refused.
"""

import logging
import re
import time
from importlib import resources
from typing import Any

logger = logging.getLogger(__name__)

_DELTA_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(sqlite|postgres))?\.sql$")


class SchemaError(Exception):
    """The database cannot be used with this version of the server."""


def _deltas(engine_name: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every delta, the engine's variant preferred."""
    dialect = "sqlite" if engine_name == "sqlite3" else "postgres"
    chosen: dict[int, tuple[str, str, bool]] = {}
    for entry in resources.files("storage.schema").iterdir():
        m = _DELTA_NAME.match(entry.name)
        if not m:
            continue
        version, name, variant = int(m.group(1)), m.group(2), m.group(3)
        if variant is not None and variant != dialect:
            continue
        current = chosen.get(version)
        if current is not None and current[0] != name:
            raise SchemaError(f"two schema deltas numbered {version:04d}")
        if current is None or variant is not None:
            chosen[version] = (name, entry.read_text(), variant is not None)
    return [(v, n, sql) for v, (n, sql, _) in sorted(chosen.items())]


def code_schema_version(engine_name: str = "sqlite3") -> int:
    deltas = _deltas(engine_name)
    return deltas[-1][0] if deltas else 0


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def prepare_schema(conn: Any, engine: Any) -> None:
    """Create or upgrade the schema inside one transaction (blocking)."""
    deltas = _deltas(engine.name)
    latest = deltas[-1][0] if deltas else 0
    cur = conn.cursor()
    sqlite = engine.name == "sqlite3"
    if sqlite:
        cur.execute("BEGIN IMMEDIATE")  # psycopg opens its transaction implicitly
    try:
        if not sqlite:
            # Several server processes may start at once against one database.
            cur.execute("SELECT pg_advisory_xact_lock(727274)")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE CHECK (lock = 'X'),"
            " version INTEGER NOT NULL)"
        )
        cur.execute(
            "CREATE TABLE IF NOT EXISTS applied_schema_deltas ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ts BIGINT NOT NULL)"
        )
        cur.execute("SELECT version FROM schema_version")
        row = cur.fetchone()
        current = row[0] if row else 0
        if current > latest:
            raise SchemaError(
                f"the database is at schema version {current}, newer than this server "
                f"supports ({latest}); run a newer version of the server"
            )
        for version, name, sql in deltas:
            if version <= current:
                continue
            logger.info("applying schema delta %04d_%s", version, name)
            for statement in _statements(sql):
                cur.execute(statement)
            cur.execute(
                engine.convert(
                    "INSERT INTO applied_schema_deltas (version, name, applied_ts) VALUES (?, ?, ?)"
                ),
                (version, name, int(time.time() * 1000)),
            )
        if current == 0:
            cur.execute(engine.convert("INSERT INTO schema_version (version) VALUES (?)"), (latest,))
        elif latest > current:
            cur.execute(engine.convert("UPDATE schema_version SET version = ?"), (latest,))
        if sqlite:
            cur.execute("COMMIT")
        else:
            conn.commit()
    except BaseException:
        if sqlite:
            cur.execute("ROLLBACK")
        else:
            conn.rollback()
        raise
    finally:
        cur.close()
