"""What the federation sender keeps: one position per destination, durable to-device EDUs.

``federation_destinations`` holds, per destination server, the stream
ordering up to which it has our events, and its back-off. PDUs themselves
are never copied: ``catch_up_events`` reads them back from ``events``.
``federation_outbox_to_device`` holds m.direct_to_device EDUs until the
destination acknowledges a transaction that carried them.
"""

import json
from collections.abc import Iterable
from typing import Any

import attrs

from storage.database import Database, Txn

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_SCAN_PAGE = 1000  # events read per query while looking for a destination's events
_MEMBER = "m.room.member"


@attrs.define
class DestinationRow:
    destination: str
    last_successful_stream_ordering: int
    retry_last_ts: int = 0
    retry_interval_ms: int = 0


@attrs.frozen
class OutboxToDevice:
    id: int
    destination: str
    content: dict[str, Any]


@attrs.frozen
class CatchUpEvent:
    stream_ordering: int
    room_id: str
    pdu_json: dict[str, Any]  # the PDU as stored (its federation form)


def _like_suffix(domain: str) -> str:
    """A LIKE pattern (escape ``\\``) matching ids whose server part is ``domain``."""
    escaped = domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "%:" + escaped


def domain_of(user_id: str) -> str:
    return user_id.partition(":")[2]


class FederationSenderStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- start-up (blocking) ---------------------------------------------------------------
    def load_blocking(self) -> tuple[dict[str, DestinationRow], list[OutboxToDevice]]:
        """Every destination's row, and every to-device EDU still waiting (in id order)."""

        def txn_fn(txn: Txn) -> tuple[dict[str, DestinationRow], list[OutboxToDevice]]:
            rows = txn.execute(
                "SELECT destination, last_successful_stream_ordering, retry_last_ts,"
                " retry_interval_ms FROM federation_destinations"
            ).fetchall()
            destinations = {r[0]: DestinationRow(r[0], r[1], r[2], r[3]) for r in rows}
            outbox = [
                OutboxToDevice(r[0], r[1], json.loads(r[2]))
                for r in txn.execute(
                    "SELECT id, destination, content FROM federation_outbox_to_device ORDER BY id"
                ).fetchall()
            ]
            return destinations, outbox

        return self.db.run_blocking(txn_fn)

    # --- positions and back-off --------------------------------------------------------------
    async def add_destination(self, destination: str, position: int) -> None:
        """Start tracking a destination at ``position`` (nothing if it is tracked already)."""
        await self.db.run_interaction(
            "add_federation_destination",
            lambda txn: txn.execute(
                "INSERT INTO federation_destinations (destination, last_successful_stream_ordering)"
                " VALUES (?, ?) ON CONFLICT (destination) DO NOTHING",
                (destination, position),
            ),
        )

    async def set_retry(self, destination: str, last_ts: int, interval_ms: int) -> None:
        await self.db.run_interaction(
            "set_federation_retry",
            lambda txn: txn.execute(
                "UPDATE federation_destinations SET retry_last_ts = ?, retry_interval_ms = ?"
                " WHERE destination = ?",
                (last_ts, interval_ms, destination),
            ),
        )

    async def transaction_sent(
        self, destination: str, position: int, to_device_ids: Iterable[int]
    ) -> None:
        """The destination acknowledged a transaction: move its position, clear its
        back-off and forget the to-device EDUs the transaction carried (one commit)."""
        ids = list(to_device_ids)

        def txn_fn(txn: Txn) -> None:
            txn.execute(
                "INSERT INTO federation_destinations (destination, last_successful_stream_ordering)"
                " VALUES (?, ?) ON CONFLICT (destination) DO UPDATE SET"
                " last_successful_stream_ordering = CASE"
                "  WHEN federation_destinations.last_successful_stream_ordering"
                "   > excluded.last_successful_stream_ordering"
                "  THEN federation_destinations.last_successful_stream_ordering"
                "  ELSE excluded.last_successful_stream_ordering END,"
                " retry_last_ts = 0, retry_interval_ms = 0",
                (destination, position),
            )
            txn.executemany(
                "DELETE FROM federation_outbox_to_device WHERE id = ?", [(i,) for i in ids]
            )

        await self.db.run_interaction("federation_transaction_sent", txn_fn)

    # --- to-device ---------------------------------------------------------------------------
    async def add_to_device(
        self, outbox_id: int, destination: str, content: dict[str, Any], now_ms: int
    ) -> None:
        await self.db.run_interaction(
            "add_federation_to_device",
            lambda txn: txn.execute(
                "INSERT INTO federation_outbox_to_device (id, destination, content, created_ts)"
                " VALUES (?, ?, ?, ?)",
                (outbox_id, destination, _json_encoder.encode(content), now_ms),
            ),
        )

    def max_to_device_id_blocking(self) -> int:
        return self.db.run_blocking(
            lambda txn: (
                txn.execute("SELECT MAX(id) FROM federation_outbox_to_device").fetchone()[0] or 0
            )
        )

    # --- catching up ---------------------------------------------------------------------------
    async def catch_up_events(
        self, destination: str, our_server: str, after: int, upto: int, limit: int
    ) -> tuple[list[CatchUpEvent], int]:
        """Our own events in (after, upto] that ``destination`` should have, oldest first.

        An event is for the destination when one of its users is joined to the
        room now and joined no later than the event, or when the event is a
        membership event about one of its users. Returns at most ``limit``
        events and how far the scan got (``upto`` once nothing is left).
        """
        return await self.db.run_read(
            "federation_catch_up",
            self._catch_up_txn,
            destination,
            our_server,
            after,
            upto,
            limit,
        )

    def _catch_up_txn(
        self, txn: Txn, destination: str, our_server: str, after: int, upto: int, limit: int
    ) -> tuple[list[CatchUpEvent], int]:
        joined_since: dict[str, int] = {}
        for room_id, user_id, stream in txn.execute(
            "SELECT room_id, user_id, stream_ordering FROM room_memberships"
            " WHERE membership = 'join' AND user_id LIKE ? ESCAPE '\\'",
            (_like_suffix(destination),),
        ).fetchall():
            if domain_of(user_id) == destination:
                joined_since[room_id] = min(stream, joined_since.get(room_id, stream))
        found: list[CatchUpEvent] = []
        position = after
        while position < upto and len(found) < limit:
            rows = txn.execute(
                "SELECT stream_ordering, room_id, type, state_key, sender, json FROM events"
                " WHERE stream_ordering > ? AND stream_ordering <= ?"
                " AND sender LIKE ? ESCAPE '\\' AND outlier = ?"
                " ORDER BY stream_ordering LIMIT ?",
                (position, upto, _like_suffix(our_server), False, _SCAN_PAGE),
            ).fetchall()
            if not rows:
                return found, upto
            for stream, room_id, event_type, state_key, sender, data in rows:
                position = stream
                if domain_of(sender) != our_server:
                    continue
                since = joined_since.get(room_id)
                about_them = (
                    event_type == _MEMBER
                    and isinstance(state_key, str)
                    and domain_of(state_key) == destination
                )
                if (since is not None and stream >= since) or about_them:
                    found.append(CatchUpEvent(stream, room_id, json.loads(data)))
                    if len(found) >= limit:
                        return found, stream
            if len(rows) < _SCAN_PAGE:
                return found, upto
        return found, position
