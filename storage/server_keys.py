"""Other servers' signing keys (``remote_server_keys``), kept forever.

One row per (server, key id): the public key, until when it may be used
(``valid_until_ts``; for an old key its ``expired_ts``), who we got it from
and the whole signed key document it came in (a notary serves that again).
"""

import attrs

from storage.database import Database, Txn


@attrs.frozen
class StoredServerKey:
    server_name: str
    key_id: str
    verify_key: str  # unpadded base64
    valid_until_ts: int  # for old keys: expired_ts
    expired_ts: int | None
    fetched_from: str
    key_json: str  # the signed /_matrix/key/v2/server document it was listed in


class ServerKeyStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def get_server_keys(self, server_name: str) -> list[StoredServerKey]:
        rows = await self.db.select(
            "get_server_keys",
            "SELECT server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_from,"
            " key_json FROM remote_server_keys WHERE server_name = ?",
            (server_name,),
        )
        return [StoredServerKey(*row) for row in rows]

    async def store_server_keys(self, keys: list[StoredServerKey]) -> None:
        """Insert or update keys; a stored key is only replaced by a document that
        keeps it valid at least as long (a stale notary answer never shortens it),
        or that newly reports it expired."""
        if keys:
            await self.db.run_interaction("store_server_keys", self._store_txn, keys)

    @staticmethod
    def _store_txn(txn: Txn, keys: list[StoredServerKey]) -> None:
        for key in keys:
            row = txn.execute(
                "SELECT valid_until_ts, expired_ts FROM remote_server_keys"
                " WHERE server_name = ? AND key_id = ?",
                (key.server_name, key.key_id),
            ).fetchone()
            values = (
                key.verify_key,
                key.valid_until_ts,
                key.expired_ts,
                key.fetched_from,
                key.key_json,
                key.server_name,
                key.key_id,
            )
            if row is None:
                txn.execute(
                    "INSERT INTO remote_server_keys (verify_key, valid_until_ts, expired_ts,"
                    " fetched_from, key_json, server_name, key_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
            elif key.valid_until_ts >= row[0] or (key.expired_ts is not None and row[1] is None):
                txn.execute(
                    "UPDATE remote_server_keys SET verify_key = ?, valid_until_ts = ?,"
                    " expired_ts = ?, fetched_from = ?, key_json = ?"
                    " WHERE server_name = ? AND key_id = ?",
                    values,
                )
