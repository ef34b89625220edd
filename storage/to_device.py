"""Send-to-device messages waiting for local devices, and /sendToDevice transaction ids.

A PUT /sendToDevice is one transaction: its transaction id, one inbox row
per recipient device (all under the request's stream id) and the stream's
position. A row is deleted once its device has synced with a token at or
past its stream id.
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from storage.database import Database, Txn

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

ALL_DEVICES = "*"
_BATCH = 500  # user ids per IN (...) list


@attrs.frozen
class StoredToDevice:
    stream_id: int
    sender: str
    message_type: str
    content: dict[str, Any]


def _devices_of(txn: Txn, user_ids: list[str]) -> dict[str, set[str]]:
    devices: dict[str, set[str]] = {}
    for start in range(0, len(user_ids), _BATCH):
        chunk = user_ids[start : start + _BATCH]
        marks = ", ".join("?" * len(chunk))
        for user_id, device_id in txn.execute(
            f"SELECT user_id, device_id FROM devices WHERE user_id IN ({marks})", chunk
        ).fetchall():
            devices.setdefault(user_id, set()).add(device_id)
    return devices


class ToDeviceStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- start-up (blocking) ---------------------------------------------------------------
    def position_blocking(self) -> int:
        def txn_fn(txn: Txn) -> int:
            recorded = txn.execute("SELECT MAX(stream_id) FROM to_device_stream").fetchone()[0]
            pending = txn.execute("SELECT MAX(stream_id) FROM device_inbox").fetchone()[0]
            return max(recorded or 0, pending or 0)

        return self.db.run_blocking(txn_fn)

    def pending_devices_blocking(self) -> dict[tuple[str, str], int]:
        """(user, device) -> highest stream id, for every device with messages waiting."""
        rows = self.db.run_blocking(
            lambda txn: txn.execute(
                "SELECT user_id, device_id, MAX(stream_id) FROM device_inbox"
                " GROUP BY user_id, device_id"
            ).fetchall()
        )
        return {(r[0], r[1]): r[2] for r in rows}

    # --- sending ---------------------------------------------------------------------------
    async def add_messages(
        self,
        sender: str,
        sender_device: str,
        txn_id: str,
        now_ms: int,
        stream_id: int,
        message_type: str,
        messages: Mapping[str, Mapping[str, dict[str, Any]]],
    ) -> list[tuple[str, str]] | None:
        """Store the messages for local users' existing devices ("*": all of them).

        Returns the (user, device) pairs that got a message, or None when the
        transaction id was used before (nothing is stored then).
        """

        def txn_fn(txn: Txn) -> list[tuple[str, str]] | None:
            txn.execute(
                "INSERT INTO to_device_txns (sender, sender_device, txn_id, created_ts)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (sender, sender_device, txn_id, now_ms),
            )
            if txn.rowcount == 0:
                return None
            devices = _devices_of(txn, list(messages))
            rows = []
            for user_id, by_device in messages.items():
                existing = devices.get(user_id, set())
                wanted: dict[str, dict[str, Any]] = {}
                if ALL_DEVICES in by_device:
                    wanted = dict.fromkeys(existing, by_device[ALL_DEVICES])
                for device_id, content in by_device.items():
                    if device_id != ALL_DEVICES and device_id in existing:
                        wanted[device_id] = content
                for device_id, content in wanted.items():
                    rows.append(
                        (
                            user_id,
                            device_id,
                            stream_id,
                            sender,
                            message_type,
                            _json_encoder.encode(content),
                        )
                    )
            txn.executemany(
                "INSERT INTO device_inbox"
                " (user_id, device_id, stream_id, sender, message_type, content)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            txn.execute(
                "UPDATE to_device_stream SET stream_id = ? WHERE stream_id < ?",
                (stream_id, stream_id),
            )
            return [(r[0], r[1]) for r in rows]

        return await self.db.run_interaction("add_to_device_messages", txn_fn)

    # --- delivering ------------------------------------------------------------------------
    async def fetch(
        self,
        user_id: str,
        device_id: str,
        delete_upto: int | None,
        after: int,
        upto: int,
        limit: int | None,
    ) -> list[StoredToDevice]:
        """Delete the device's messages <= ``delete_upto``; return those in (after, upto]."""

        def txn_fn(txn: Txn) -> list[StoredToDevice]:
            if delete_upto is not None:
                txn.execute(
                    "DELETE FROM device_inbox"
                    " WHERE user_id = ? AND device_id = ? AND stream_id <= ?",
                    (user_id, device_id, delete_upto),
                )
            if upto <= after:
                return []
            sql = (
                "SELECT stream_id, sender, message_type, content FROM device_inbox"
                " WHERE user_id = ? AND device_id = ? AND stream_id > ? AND stream_id <= ?"
                " ORDER BY stream_id"
            )
            args: list[Any] = [user_id, device_id, after, upto]
            if limit is not None:
                sql += " LIMIT ?"
                args.append(limit)
            return [
                StoredToDevice(r[0], r[1], r[2], json.loads(r[3]))
                for r in txn.execute(sql, args).fetchall()
            ]

        if delete_upto is None:
            return await self.db.run_read("get_to_device_messages", txn_fn)
        return await self.db.run_interaction("take_to_device_messages", txn_fn)

    # --- housekeeping ----------------------------------------------------------------------
    async def delete_devices(self, user_id: str, device_ids: Iterable[str]) -> None:
        ids = list(device_ids)
        await self.db.run_interaction(
            "delete_device_inbox",
            lambda txn: txn.executemany(
                "DELETE FROM device_inbox WHERE user_id = ? AND device_id = ?",
                [(user_id, d) for d in ids],
            ),
        )

    async def delete_txns_before(self, before_ms: int) -> None:
        await self.db.run_interaction(
            "delete_to_device_txns",
            lambda txn: txn.execute(
                "DELETE FROM to_device_txns WHERE created_ts < ?", (before_ms,)
            ),
        )
