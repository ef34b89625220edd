"""An in-process HomeServer (no HTTP) for service-level tests, on SQLite or PostgreSQL."""

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import reactor

from crypto.keys import generate_signing_key
from homeserver.config import load_config
from homeserver.services.server import HomeServer
from storage import Database, DatabaseConfig
from tests.support.postgres import throwaway_database


def make_homeserver(
    stack: ExitStack, directory: Path, engine: str, **config: Any
) -> HomeServer:
    if engine == "sqlite3":
        database = {"name": "sqlite3", "args": {"database": str(directory / "hs.db")}}
    else:
        database = {"name": "psycopg", "args": stack.enter_context(throwaway_database())}
    path = directory / "hs.yaml"
    path.write_text(yaml.safe_dump({"server_name": "test.local", "database": database, **config}))
    cfg = load_config([path])
    db = Database(reactor, DatabaseConfig(cfg.database_engine, cfg.database_args))
    db.open()
    max_stream = db.run_blocking(
        lambda txn: txn.execute("SELECT MAX(stream_ordering) FROM events").fetchone()[0] or 0
    )
    return HomeServer(cfg, reactor, db, [generate_signing_key()], max_stream)


async def add_user(hs: HomeServer, localpart: str) -> str:
    """A local user row, as registration would leave it (no password)."""
    user_id = f"@{localpart}:{hs.server_name}"
    await hs.database.run_interaction(
        "add_user",
        lambda txn: txn.execute(
            "INSERT INTO users (user_id, created_ts) VALUES (?, ?)", (user_id, 0)
        ),
    )
    return user_id


async def close_homeserver(hs: HomeServer) -> None:
    """Stop the services' timers and close the database, as shutdown does."""
    # First the federation sender, as shutdown does: a transaction still in
    # flight must not schedule a retry when it finds the database closed.
    sender = getattr(hs, "federation_sender", None)
    if sender is not None and hasattr(sender, "shutdown"):
        sender.shutdown()
    for name in ("presence", "typing"):
        service = getattr(hs, name, None)
        if service is not None:
            service.shutdown()
    await hs.push.flushed()
    await hs.database.close()
