"""Account data of local users: global (room_id '') and per room, m.tag included.

Each (user, room, type) is one row holding the latest content and the stream
id of the change that wrote it. Rows are overwritten, never deleted, so the
largest stream id in the table is the stream's position.
"""

import json
from typing import Any

import attrs

from storage.database import Database, Txn

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

GLOBAL = ""  # the room_id of global account data


@attrs.frozen
class AccountDataRow:
    room_id: str  # GLOBAL for global account data
    data_type: str
    stream_id: int
    content: dict[str, Any]


class AccountDataStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    def max_stream_id_blocking(self) -> int:
        """The stream's position, for start-up (blocking)."""
        return self.db.run_blocking(
            lambda txn: txn.execute("SELECT MAX(stream_id) FROM account_data").fetchone()[0] or 0
        )

    async def get_user_account_data(self, user_id: str) -> list[AccountDataRow]:
        """Every piece of the user's account data, global and per room."""
        rows = await self.db.select(
            "get_user_account_data",
            "SELECT room_id, data_type, stream_id, content FROM account_data WHERE user_id = ?",
            (user_id,),
        )
        return [AccountDataRow(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    async def set_account_data(
        self, user_id: str, room_id: str, data_type: str, stream_id: int, content: dict[str, Any]
    ) -> None:
        """Write one piece of account data (replacing what was there) under ``stream_id``."""
        encoded = _json_encoder.encode(content)

        def txn_fn(txn: Txn) -> None:
            txn.execute(
                "INSERT INTO account_data (user_id, room_id, data_type, stream_id, content)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (user_id, room_id, data_type)"
                " DO UPDATE SET stream_id = excluded.stream_id, content = excluded.content"
                " WHERE account_data.stream_id < excluded.stream_id",
                (user_id, room_id, data_type, stream_id, encoded),
            )

        await self.db.run_interaction("set_account_data", txn_fn)
