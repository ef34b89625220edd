"""Read receipts: the latest m.read / m.read.private of each user per room and thread.

The receipts service writes them in batches (one transaction per batch, in
receipts-stream order) and keeps each room's receipts in memory; this module
only reads and writes rows. ``thread_id`` is ``''`` for an unthreaded receipt.
"""

from collections.abc import Sequence

import attrs

from storage.database import Database, Txn

UNTHREADED = ""


@attrs.frozen
class StoredReceipt:
    room_id: str
    receipt_type: str
    user_id: str
    thread_id: str  # UNTHREADED, "main" or a thread root's event id
    event_id: str
    event_stream: int  # stream ordering of the event the receipt points at
    ts: int
    stream_id: int  # position in the receipts stream


class ReceiptsStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    def max_stream_id_txn(self, txn: Txn) -> int:
        row = txn.execute("SELECT MAX(stream_id) FROM receipts").fetchone()
        return (row[0] if row else None) or 0

    async def write_receipts(self, receipts: Sequence[StoredReceipt]) -> None:
        """Insert or replace receipts, in one transaction."""
        await self.db.run_interaction("write_receipts", self._write_txn, receipts)

    def _write_txn(self, txn: Txn, receipts: Sequence[StoredReceipt]) -> None:
        txn.executemany(
            "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id,"
            " event_stream, ts, stream_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE SET"
            " event_id = excluded.event_id, event_stream = excluded.event_stream,"
            " ts = excluded.ts, stream_id = excluded.stream_id",
            [
                (
                    r.room_id,
                    r.receipt_type,
                    r.user_id,
                    r.thread_id,
                    r.event_id,
                    r.event_stream,
                    r.ts,
                    r.stream_id,
                )
                for r in receipts
            ],
        )

    async def get_room_receipts(self, room_id: str) -> list[StoredReceipt]:
        rows = await self.db.select(
            "room_receipts",
            "SELECT receipt_type, user_id, thread_id, event_id, event_stream, ts, stream_id"
            " FROM receipts WHERE room_id = ?",
            (room_id,),
        )
        return [StoredReceipt(room_id, *row) for row in rows]
