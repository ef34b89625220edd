"""Throw-away PostgreSQL databases for tests.

The server at HOMESERVER_TEST_POSTGRES (default: postgres@127.0.0.1:5432, trust
auth, database "test") must be reachable: in CI a missing PostgreSQL fails the
run; elsewhere, set HOMESERVER_TEST_POSTGRES=skip to skip PostgreSQL tests.
"""

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ADMIN_DSN = os.environ.get(
    "HOMESERVER_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)


def postgres_available() -> bool:
    return ADMIN_DSN != "skip"


@contextmanager
def throwaway_database() -> Iterator[dict[str, object]]:
    """Create a fresh database; yield Synapse-style ``database.args`` for it; drop it."""
    if not postgres_available():
        pytest.skip("PostgreSQL tests disabled (HOMESERVER_TEST_POSTGRES=skip)")
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    name = f"hs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(ADMIN_DSN)
    args = {
        "dbname": name,
        "user": params.get("user", "postgres"),
        "host": params.get("host", "127.0.0.1"),
        "port": int(params.get("port", 5432)),
        "cp_min": 1,
        "cp_max": 4,
    }
    try:
        yield args
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
