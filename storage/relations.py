"""Queries over event relations (edits, reactions, threads, references)."""

from collections.abc import Sequence
from typing import Any

from storage.database import Database, Txn

_LIVE = "outlier = FALSE AND rejected_reason IS NULL"


class RelationsStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def parents_with_relations(self) -> set[str]:
        rows = await self.db.select(
            "relation_parents",
            "SELECT DISTINCT relates_to_id FROM events WHERE relates_to_id IS NOT NULL",
        )
        return {r[0] for r in rows}

    async def children(
        self, parent_ids: Sequence[str]
    ) -> list[tuple[str, str, str, str, str, int, int]]:
        """(parent, rel_type, event_id, sender, type, stream, origin_server_ts) of every
        unredacted child of the parents."""
        if not parent_ids:
            return []
        marks = ",".join("?" * len(parent_ids))
        return await self.db.select(
            "relation_children",
            "SELECT relates_to_id, relation_type, event_id, sender, type, stream_ordering,"
            f" origin_server_ts FROM events WHERE relates_to_id IN ({marks})"
            f" AND redacted_by IS NULL AND {_LIVE}",
            list(parent_ids),
        )

    async def page(
        self, room_id: str, parent_id: str, rel_type: str | None, event_type: str | None,
        after: int | None, upto: int | None, limit: int, descending: bool,
    ) -> list[tuple[int, str, int]]:
        """(stream, event_id, state_group) of a parent's children in (after, upto]."""
        clauses = ["room_id = ?", "relates_to_id = ?", _LIVE]
        args: list[Any] = [room_id, parent_id]
        for column, value in (("relation_type", rel_type), ("type", event_type)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if after is not None:
            clauses.append("stream_ordering > ?")
            args.append(after)
        if upto is not None:
            clauses.append("stream_ordering <= ?")
            args.append(upto)
        args.append(limit)
        order = "DESC" if descending else "ASC"
        return await self.db.select(
            "relations_page",
            "SELECT stream_ordering, event_id, state_group FROM events WHERE "
            + " AND ".join(clauses) + f" ORDER BY stream_ordering {order} LIMIT ?",
            args,
        )

    async def annotations(self, parent_id: str) -> set[tuple[str, str]]:
        """(sender, key) of the live reactions to an event."""
        rows = await self.db.select(
            "annotations",
            "SELECT sender, relation_key FROM events WHERE relates_to_id = ?"
            " AND relation_type = 'm.annotation' AND type = 'm.reaction'"
            f" AND redacted_by IS NULL AND relation_key IS NOT NULL AND {_LIVE}",
            (parent_id,),
        )
        return {(sender, key) for sender, key in rows}

    async def thread_roots(
        self, room_id: str, participant: str | None, before: int | None, limit: int
    ) -> list[tuple[str, int]]:
        """(root event id, latest activity stream) of a room's threads, latest first."""
        return await self.db.run_read(
            "thread_roots", self._thread_roots_txn, room_id, participant, before, limit)

    def _thread_roots_txn(
        self, txn: Txn, room_id: str, participant: str | None, before: int | None, limit: int
    ) -> list[tuple[str, int]]:
        having = "" if before is None else " HAVING MAX(stream_ordering) < ?"
        args: list[Any] = [room_id]
        participant_clause = ""
        if participant is not None:
            participant_clause = (
                " AND relates_to_id IN (SELECT relates_to_id FROM events WHERE room_id = ?"
                " AND relation_type = 'm.thread' AND sender = ?"
                " UNION SELECT event_id FROM events WHERE room_id = ? AND sender = ?)"
            )
            args += [room_id, participant, room_id, participant]
        if before is not None:
            args.append(before)
        args.append(limit)
        return txn.execute(
            "SELECT relates_to_id, MAX(stream_ordering) AS latest FROM events"
            f" WHERE room_id = ? AND relation_type = 'm.thread' AND {_LIVE}"
            + participant_clause + " GROUP BY relates_to_id" + having
            + " ORDER BY latest DESC LIMIT ?",
            args,
        ).fetchall()
