"""Room aliases hosted by this server, and which rooms are in the published directory.

Aliases live in ``room_aliases`` (schema 0004); a room's directory visibility
is ``rooms.is_public`` (schema 0003). The directory service decides who may
change them; these are the queries only.
"""

import json
from typing import Any

import attrs

from storage.database import Database, Txn


@attrs.frozen
class AliasRecord:
    room_alias: str
    room_id: str
    creator: str
    servers: list[str]


def _servers(raw: Any) -> list[str]:
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [s for s in value if isinstance(s, str)] if isinstance(value, list) else []


class DirectoryStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- aliases ---------------------------------------------------------------
    async def get_alias(self, room_alias: str) -> AliasRecord | None:
        rows = await self.db.select(
            "get_alias",
            "SELECT room_id, creator, servers FROM room_aliases WHERE room_alias = ?",
            (room_alias,),
        )
        if not rows:
            return None
        room_id, creator, servers = rows[0]
        return AliasRecord(room_alias, room_id, creator, _servers(servers))

    async def create_alias(
        self, room_alias: str, room_id: str, creator: str, servers: list[str], now_ms: int
    ) -> bool:
        """Add the alias; False (and nothing written) when it exists already."""

        def txn_fn(txn: Txn) -> bool:
            txn.execute(
                "INSERT INTO room_aliases (room_alias, room_id, creator, servers, created_ts)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (room_alias) DO NOTHING",
                (room_alias, room_id, creator, json.dumps(servers), now_ms),
            )
            return txn.rowcount == 1

        return await self.db.run_interaction("create_alias", txn_fn)

    async def delete_alias(self, room_alias: str) -> str | None:
        """Remove the alias; the room it pointed to, or None if there was none."""

        def txn_fn(txn: Txn) -> str | None:
            row = txn.execute(
                "SELECT room_id FROM room_aliases WHERE room_alias = ?", (room_alias,)
            ).fetchone()
            if row is None:
                return None
            txn.execute("DELETE FROM room_aliases WHERE room_alias = ?", (room_alias,))
            return row[0]

        return await self.db.run_interaction("delete_alias", txn_fn)

    async def get_aliases_for_room(self, room_id: str) -> list[str]:
        rows = await self.db.select(
            "aliases_for_room",
            "SELECT room_alias FROM room_aliases WHERE room_id = ? ORDER BY room_alias",
            (room_id,),
        )
        return [r[0] for r in rows]

    # --- published room directory ---------------------------------------------------
    async def get_room_is_public(self, room_id: str) -> bool | None:
        """Whether the room is published; None when this server does not know the room."""
        rows = await self.db.select(
            "room_is_public", "SELECT is_public FROM rooms WHERE room_id = ?", (room_id,)
        )
        return bool(rows[0][0]) if rows else None

    async def set_room_is_public(self, room_id: str, is_public: bool) -> bool:
        """Publish or unpublish the room; False when the room is unknown."""

        def txn_fn(txn: Txn) -> bool:
            txn.execute("UPDATE rooms SET is_public = ? WHERE room_id = ?", (is_public, room_id))
            return txn.rowcount == 1

        return await self.db.run_interaction("set_room_is_public", txn_fn)

    async def get_public_room_ids(self) -> list[str]:
        rows = await self.db.select(
            "public_room_ids", "SELECT room_id FROM rooms WHERE is_public = ?", (True,)
        )
        return [r[0] for r in rows]


__all__ = ["AliasRecord", "DirectoryStore"]
