"""Persisting and reading events, state groups and room membership.

An event's state group is the state after it. A state event starts a new
group whose id is the event's stream ordering and which stores only the
delta from the group before it (a full snapshot every SNAPSHOT_INTERVAL links,
so reading a group never walks a long chain). A non-state event shares the
group of the state before it.
"""

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from homeserver.core.events import CREATE, MEMBER, REDACTION, Pdu, StateKey
from homeserver.core.room_versions import get_room_version
from storage.database import Database, Txn

SNAPSHOT_INTERVAL = 50
# The state_group of an event whose state is unknown here: an outlier (an auth
# or state event fetched from another server) or a rejected event.
NO_STATE_GROUP = 0
# How many of a room's latest events its in-memory state keeps (for /sync).
RECENT_EVENTS = 100

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@attrs.define(slots=True)
class EventToPersist:
    """One event and where it sits in the room, decided by the room service."""

    pdu: Pdu
    stream_ordering: int
    state_group: int  # the state after this event
    prev_state_group: int | None  # the state before it (None for the create event)
    prev_chain_length: int  # chain length of prev_state_group
    # For a state event: the full state after it, written when a snapshot is due.
    state_after: dict[StateKey, str] | None = None
    device_id: str | None = None
    txn_id: str | None = None
    relates_to_id: str | None = None
    relation_type: str | None = None
    relation_key: str | None = None
    room_kind: str | None = None  # create events only: e.g. "dm"
    # For an m.room.redaction that takes effect: the event it redacts.
    redacted_target: Pdu | None = None
    # Events from other servers (homeserver/services/federation_events.py):
    # an outlier is stored but not part of the room's timeline (state_group is
    # NO_STATE_GROUP unless it was soft-failed, when it is the state after it);
    # a rejected event is stored only so that it is known to be rejected.
    outlier: bool = False
    rejected_reason: str | None = None
    # Forks resolved: the room's current state changes by this delta instead of
    # by the event's own key (None removes a key).
    current_state_delta: dict[StateKey, Pdu | None] | None = None
    # An invite, knock or rejection in a room this server is not in: recorded in
    # room_memberships though the room's state is unknown.
    out_of_room_membership: bool = False
    # A remote room's version, for the rooms row of the first event stored in it.
    room_version_id: str | None = None
    # History fetched from other servers (negative stream orderings, before all
    # else): shown by /messages, changes neither current state nor extremities.
    backfilled: bool = False

    @property
    def in_timeline(self) -> bool:
        """A new event in the room as clients see it (not an outlier, not
        rejected, not history fetched later)."""
        return not self.outlier and self.rejected_reason is None and not self.backfilled


@attrs.frozen
class RoomRecord:
    room_id: str
    room_version: str
    current_state: dict[StateKey, str]
    forward_extremities: list[str]
    max_depth: int
    state_group: int  # the group of the room's current state
    state_group_chain_length: int
    kind: str | None
    # The latest events, oldest first: (stream_ordering, event_id, state_group).
    recent: list[tuple[int, str, int]]


def encode_pdu(pdu: Pdu) -> str:
    return _json_encoder.encode(pdu.data)


class EventsStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- writing -------------------------------------------------------------
    async def persist_events(self, events: Sequence[EventToPersist], quick: bool = False) -> None:
        """Write a batch of events in one transaction (all or nothing); ``quick``:
        a small batch, which may be written on the reactor thread (SQLite)."""
        await self.db.run_interaction("persist_events", self._persist_txn, events, quick=quick)

    def _persist_txn(self, txn: Txn, events: Sequence[EventToPersist]) -> None:
        event_rows = []
        for e in events:
            pdu = e.pdu
            event_rows.append((
                e.stream_ordering, pdu.event_id, pdu.room_id, pdu.type, pdu.state_key, pdu.sender,
                pdu.depth, pdu.origin_server_ts, e.state_group, encode_pdu(pdu), e.device_id,
                e.txn_id, e.relates_to_id, e.relation_type, e.relation_key, e.outlier,
                e.rejected_reason,
            ))
        for e in events:
            self._ensure_room_txn(txn, e)
        txn.executemany(
            "INSERT INTO events (stream_ordering, event_id, room_id, type, state_key, sender,"
            " depth, origin_server_ts, state_group, json, device_id, txn_id, relates_to_id,"
            " relation_type, relation_key, outlier, rejected_reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            event_rows,
        )
        # room -> (extremities this batch removes, extremities it adds)
        extremities: dict[str, tuple[set[str], set[str]]] = {}
        for e in events:
            pdu = e.pdu
            if e.out_of_room_membership:
                self._upsert_membership_txn(txn, pdu, e.stream_ordering)
                continue
            if e.rejected_reason is not None or e.state_group == NO_STATE_GROUP:
                continue  # no state of its own, and it changes nothing
            if e.state_after is not None or (pdu.is_state and e.state_group != e.prev_state_group):
                self._persist_state_group_txn(txn, e)
            if e.outlier or e.backfilled:
                continue  # soft-failed or history: the room's current state is unchanged
            if e.current_state_delta is not None:
                self._apply_current_state_delta_txn(
                    txn, pdu.room_id, e.current_state_delta, None
                )
            elif pdu.is_state:
                self._apply_current_state_delta_txn(
                    txn, pdu.room_id, {pdu.state_tuple: pdu}, e.stream_ordering
                )
            if pdu.type == REDACTION and pdu.redacts:
                txn.execute(
                    "INSERT INTO redactions (event_id, redacts) VALUES (?, ?)"
                    " ON CONFLICT (event_id) DO NOTHING",
                    (pdu.event_id, pdu.redacts),
                )
            if e.redacted_target is not None:
                # The original content is never served again: the stored JSON
                # becomes the redacted event (still valid: signatures and the
                # reference hash cover the redacted form).
                target = e.redacted_target
                txn.execute(
                    "UPDATE events SET json = ?, redacted_by = ? WHERE event_id = ?",
                    (_json_encoder.encode(target.redacted().data), pdu.event_id, target.event_id),
                )
            # The new event replaces its prev_events as the room's extremity.
            removed, added = extremities.setdefault(pdu.room_id, (set(), set()))
            for prev in pdu.prev_event_ids:
                if prev in added:
                    added.discard(prev)  # written and superseded in this batch
                else:
                    removed.add(prev)
            added.add(pdu.event_id)
        for room_id, (removed, added) in extremities.items():
            self._move_extremities_txn(txn, room_id, removed, added)

    @staticmethod
    def _move_extremities_txn(txn: Txn, room_id: str, removed: set[str], added: set[str]) -> None:
        """A batch's net change to a room's forward extremities: usually one
        event replacing one, a single UPDATE."""
        if len(removed) == 1 and len(added) == 1:
            (old,), (new,) = removed, added
            txn.execute(
                "UPDATE forward_extremities SET event_id = ? WHERE room_id = ? AND event_id = ?",
                (new, room_id, old),
            )
            if txn.rowcount == 1:
                return
            removed = set()
        txn.executemany(
            "DELETE FROM forward_extremities WHERE room_id = ? AND event_id = ?",
            [(room_id, event_id) for event_id in removed],
        )
        txn.executemany(
            "INSERT INTO forward_extremities (room_id, event_id) VALUES (?, ?)",
            [(room_id, event_id) for event_id in added],
        )

    async def get_min_stream_ordering(self) -> int:
        rows = await self.db.select("min_stream", "SELECT MIN(stream_ordering) FROM events")
        return rows[0][0] or 0

    async def promote_outliers(self, rows: list[tuple[str, int, int]]) -> None:
        """Make stored outliers part of the timeline as history:
        (event id, new stream ordering, state group)."""
        def txn_fn(txn: Txn) -> None:
            txn.executemany(
                "UPDATE events SET stream_ordering = ?, state_group = ?, outlier = FALSE"
                " WHERE event_id = ? AND outlier = TRUE AND rejected_reason IS NULL",
                [(stream, group, event_id) for event_id, stream, group in rows],
            )
        await self.db.run_interaction("promote_outliers", txn_fn)

    def _ensure_room_txn(self, txn: Txn, e: EventToPersist) -> None:
        """The rooms row: from the create event, or (a remote room known only by an
        invite or its first events) from the room version given."""
        pdu = e.pdu
        if pdu.type == CREATE and pdu.state_key == "":
            txn.execute(
                "INSERT INTO rooms (room_id, room_version, creator, created_ts, kind)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (room_id) DO UPDATE"
                " SET creator = excluded.creator, created_ts = excluded.created_ts",
                (pdu.room_id, pdu.room_version.identifier, pdu.sender, pdu.origin_server_ts,
                 e.room_kind),
            )
        elif e.room_version_id is not None:
            txn.execute(
                "INSERT INTO rooms (room_id, room_version, creator, created_ts)"
                " VALUES (?, ?, '', 0) ON CONFLICT (room_id) DO NOTHING",
                (pdu.room_id, e.room_version_id),
            )

    def _persist_state_group_txn(self, txn: Txn, e: EventToPersist) -> None:
        """The state group of the state after the event: a delta of the event's own
        key from the group before it, or a snapshot (``state_after``)."""
        pdu = e.pdu
        if e.state_after is not None:
            entries: Iterable[tuple[StateKey, str]] = e.state_after.items()
            prev_group, chain_length = None, 0
        else:
            entries = [((pdu.type, pdu.state_key), pdu.event_id)]
            prev_group, chain_length = e.prev_state_group, e.prev_chain_length + 1
        txn.execute(
            "INSERT INTO state_groups (id, room_id, prev_group, chain_length) VALUES (?, ?, ?, ?)",
            (e.state_group, pdu.room_id, prev_group, chain_length),
        )
        txn.executemany(
            "INSERT INTO state_group_entries (state_group, type, state_key, event_id)"
            " VALUES (?, ?, ?, ?)",
            [(e.state_group, t, sk, eid) for (t, sk), eid in entries],
        )

    def _apply_current_state_delta_txn(
        self, txn: Txn, room_id: str, delta: dict[StateKey, Pdu | None], stream: int | None
    ) -> None:
        """Change the room's current state (and the membership table with it).

        ``stream`` is the stream ordering of the event causing the change; a
        member event that comes back into the state through state resolution
        keeps its own.
        """
        for (event_type, state_key), pdu in delta.items():
            if pdu is None:
                txn.execute(
                    "DELETE FROM current_state WHERE room_id = ? AND type = ? AND state_key = ?",
                    (room_id, event_type, state_key),
                )
                continue
            txn.execute(
                "INSERT INTO current_state (room_id, type, state_key, event_id) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = excluded.event_id",
                (room_id, event_type, state_key, pdu.event_id),
            )
            if event_type == MEMBER:
                self._upsert_membership_txn(txn, pdu, stream)

    def _upsert_membership_txn(self, txn: Txn, pdu: Pdu, stream: int | None) -> None:
        if stream is None:
            row = txn.execute(
                "SELECT stream_ordering FROM events WHERE event_id = ?", (pdu.event_id,)
            ).fetchone()
            stream = row[0] if row else 0
        txn.execute(
            "INSERT INTO room_memberships (room_id, user_id, membership, event_id,"
            " stream_ordering, forgotten) VALUES (?, ?, ?, ?, ?, FALSE)"
            " ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,"
            " event_id = excluded.event_id, stream_ordering = excluded.stream_ordering,"
            " forgotten = FALSE",
            (pdu.room_id, pdu.state_key, pdu.membership, pdu.event_id, stream),
        )

    # --- reading -------------------------------------------------------------
    async def get_max_stream_ordering(self) -> int:
        rows = await self.db.select("max_stream", "SELECT MAX(stream_ordering) FROM events")
        return rows[0][0] or 0

    async def get_events(self, event_ids: Iterable[str]) -> dict[str, Pdu]:
        return (await self.get_events_with_txn_ids(event_ids))[0]

    async def get_events_with_txn_ids(
        self, event_ids: Iterable[str]
    ) -> tuple[dict[str, Pdu], dict[str, tuple[str, str]]]:
        """The events, and (device_id, txn_id) of those sent with a transaction id."""
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return {}, {}
        return await self.db.run_read("get_events", self._get_events_txn, ids)

    def _get_events_txn(
        self, txn: Txn, event_ids: list[str]
    ) -> tuple[dict[str, Pdu], dict[str, tuple[str, str]]]:
        found: dict[str, Pdu] = {}
        txn_ids: dict[str, tuple[str, str]] = {}
        for i in range(0, len(event_ids), 500):
            chunk = event_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            txn.execute(
                "SELECT e.event_id, e.json, r.room_version, e.redacted_by, e.device_id, e.txn_id"
                " FROM events e"
                " JOIN rooms r USING (room_id)"
                f" WHERE e.event_id IN ({marks})",
                chunk,
            )
            for event_id, data, version, redacted_by, device_id, txn_id in txn.fetchall():
                pdu = Pdu(get_room_version(version), event_id, json.loads(data))
                found[event_id] = pdu.with_redacted_because(redacted_by) if redacted_by else pdu
                if txn_id is not None:
                    txn_ids[event_id] = (device_id, txn_id)
        return found, txn_ids

    async def load_room(self, room_id: str) -> RoomRecord | None:
        return await self.db.run_read("load_room", self._load_room_txn, room_id)

    def _load_room_txn(self, txn: Txn, room_id: str) -> RoomRecord | None:
        row = txn.execute(
            "SELECT room_version, kind FROM rooms WHERE room_id = ?", (room_id,)
        ).fetchone()
        if row is None:
            return None
        state = {
            (t, sk): eid
            for t, sk, eid in txn.execute(
                "SELECT type, state_key, event_id FROM current_state WHERE room_id = ?", (room_id,)
            ).fetchall()
        }
        extremities = [
            r[0]
            for r in txn.execute(
                "SELECT event_id FROM forward_extremities WHERE room_id = ? ORDER BY event_id",
                (room_id,),
            ).fetchall()
        ]
        latest = txn.execute(
            "SELECT depth, state_group FROM events WHERE room_id = ?"
            " AND outlier = FALSE AND rejected_reason IS NULL"
            " ORDER BY stream_ordering DESC LIMIT 1",
            (room_id,),
        ).fetchone()
        if latest is None:
            return None  # only outliers: a remote room we are invited to, not in
        depth, group = latest
        max_depth = txn.execute(
            "SELECT MAX(depth) FROM events WHERE room_id = ?", (room_id,)
        ).fetchone()[0]
        (chain_length,) = txn.execute(
            "SELECT chain_length FROM state_groups WHERE id = ?", (group,)
        ).fetchone()
        recent = txn.execute(
            "SELECT stream_ordering, event_id, state_group FROM events WHERE room_id = ?"
            " AND outlier = FALSE AND rejected_reason IS NULL"
            " ORDER BY stream_ordering DESC LIMIT ?",
            (room_id, RECENT_EVENTS),
        ).fetchall()
        return RoomRecord(
            room_id, row[0], state, extremities, max_depth, group, chain_length, row[1],
            [tuple(r) for r in reversed(recent)],
        )

    async def get_state_group(self, group: int) -> dict[StateKey, str]:
        return await self.db.run_read("get_state_group", self._state_group_txn, group)

    def _state_group_txn(self, txn: Txn, group: int) -> dict[StateKey, str]:
        chain: list[int] = []
        current: int | None = group
        while current is not None:
            chain.append(current)
            row = txn.execute(
                "SELECT prev_group FROM state_groups WHERE id = ?", (current,)
            ).fetchone()
            current = row[0] if row else None
        state: dict[StateKey, str] = {}
        for g in reversed(chain):  # oldest (the snapshot) first, newer deltas win
            for t, sk, eid in txn.execute(
                "SELECT type, state_key, event_id FROM state_group_entries WHERE state_group = ?",
                (g,),
            ).fetchall():
                state[(t, sk)] = eid
        return state

    async def get_room_version_id(self, room_id: str) -> str | None:
        rows = await self.db.select(
            "room_version", "SELECT room_version FROM rooms WHERE room_id = ?", (room_id,)
        )
        return rows[0][0] if rows else None

    async def get_rooms_for_user(self, user_id: str, membership: str = "join") -> list[str]:
        rows = await self.db.select(
            "rooms_for_user",
            "SELECT room_id FROM room_memberships WHERE user_id = ? AND membership = ?",
            (user_id, membership),
        )
        return [r[0] for r in rows]

    async def get_memberships_for_user(self, user_id: str) -> dict[str, tuple[str, bool]]:
        rows = await self.db.select(
            "memberships_for_user",
            "SELECT room_id, membership, forgotten FROM room_memberships WHERE user_id = ?",
            (user_id,),
        )
        return {room_id: (membership, bool(forgotten)) for room_id, membership, forgotten in rows}

    async def forget_room(self, user_id: str, room_id: str) -> None:
        await self.db.run_interaction(
            "forget_room",
            lambda txn: txn.execute(
                "UPDATE room_memberships SET forgotten = TRUE WHERE user_id = ? AND room_id = ?",
                (user_id, room_id),
            ),
        )

    async def get_membership_events_before(
        self, room_id: str, stream_ordering: int
    ) -> list[str]:
        """Event ids of each user's latest member event at or before a stream position."""
        rows = await self.db.select(
            "members_at",
            "SELECT e.event_id FROM events e JOIN ("
            "  SELECT state_key, MAX(stream_ordering) AS so FROM events"
            "  WHERE room_id = ? AND type = 'm.room.member' AND stream_ordering <= ?"
            "  AND outlier = FALSE AND rejected_reason IS NULL GROUP BY state_key"
            ") latest ON e.stream_ordering = latest.so",
            (room_id, stream_ordering),
        )
        return [r[0] for r in rows]

    def recent_txn_ids_txn(self, txn: Txn, since_ts: int) -> list[tuple[str, str | None, str, str]]:
        """(sender, device_id, txn_id, event_id) of events sent with a transaction id
        since a time, oldest first (for start-up, via Database.run_blocking)."""
        return txn.execute(
            "SELECT sender, device_id, txn_id, event_id FROM events"
            " WHERE txn_id IS NOT NULL AND origin_server_ts >= ? ORDER BY stream_ordering",
            (since_ts,),
        ).fetchall()


    async def get_event_state_group(self, event_id: str) -> int | None:
        rows = await self.db.select(
            "event_state_group", "SELECT state_group FROM events WHERE event_id = ?", (event_id,)
        )
        return rows[0][0] if rows else None

    async def get_state_group_delta(
        self, group: int
    ) -> tuple[int | None, dict[StateKey, str]] | None:
        """(prev_group, entries) of one state group; None if it does not exist."""
        return await self.db.run_read("state_group_delta", self._state_group_delta_txn, group)

    def _state_group_delta_txn(
        self, txn: Txn, group: int
    ) -> tuple[int | None, dict[StateKey, str]] | None:
        row = txn.execute("SELECT prev_group FROM state_groups WHERE id = ?", (group,)).fetchone()
        if row is None:
            return None
        entries = {
            (t, sk): eid
            for t, sk, eid in txn.execute(
                "SELECT type, state_key, event_id FROM state_group_entries WHERE state_group = ?",
                (group,),
            ).fetchall()
        }
        return row[0], entries

    async def get_room_events(
        self,
        room_id: str,
        after: int | None,
        upto: int | None,
        limit: int,
        descending: bool = True,
    ) -> list[tuple[int, str, int]]:
        """(stream_ordering, event_id, state_group) of a room's events in (after, upto],
        newest first when ``descending``; at most ``limit``."""
        clauses = ["room_id = ?", "outlier = FALSE", "rejected_reason IS NULL"]
        args: list[Any] = [room_id]
        if after is not None:
            clauses.append("stream_ordering > ?")
            args.append(after)
        if upto is not None:
            clauses.append("stream_ordering <= ?")
            args.append(upto)
        order = "DESC" if descending else "ASC"
        args.append(limit)
        rows = await self.db.select(
            "room_events",
            "SELECT stream_ordering, event_id, state_group FROM events WHERE "
            + " AND ".join(clauses)
            + f" ORDER BY stream_ordering {order} LIMIT ?",
            args,
        )
        return [(so, eid, sg) for so, eid, sg in rows]

    async def get_state_group_before(self, room_id: str, stream_ordering: int) -> int | None:
        """The room's state group just before a stream position (after the event at or
        before it)."""
        rows = await self.db.select(
            "state_group_before",
            "SELECT state_group FROM events WHERE room_id = ? AND stream_ordering <= ?"
            " AND outlier = FALSE AND rejected_reason IS NULL"
            " ORDER BY stream_ordering DESC LIMIT 1",
            (room_id, stream_ordering),
        )
        return rows[0][0] if rows else None

    async def get_user_memberships(self, user_id: str) -> dict[str, tuple[str, int, str]]:
        """room id -> (membership, stream ordering, event id), forgotten rooms left out."""
        rows = await self.db.select(
            "user_memberships",
            "SELECT room_id, membership, stream_ordering, event_id FROM room_memberships"
            " WHERE user_id = ? AND forgotten = FALSE",
            (user_id,),
        )
        return {room_id: (m, so, eid) for room_id, m, so, eid in rows}

    async def get_event_positions(self, event_ids: list[str]) -> dict[str, tuple[int, int]]:
        """event id -> (stream_ordering, state_group)."""
        if not event_ids:
            return {}
        marks = ",".join("?" * len(event_ids))
        rows = await self.db.select(
            "event_positions",
            f"SELECT event_id, stream_ordering, state_group FROM events WHERE event_id IN ({marks})",
            event_ids,
        )
        return {eid: (so, sg) for eid, so, sg in rows}

    async def get_room_state_events(self, room_id: str) -> tuple[list[Pdu], set[str]]:
        """Every state event stored for a room (timeline, outliers and rejected ones)
        and the ids of the rejected, for the room's auth DAG."""
        return await self.db.run_read("room_state_events", self._room_state_events_txn, room_id)

    def _room_state_events_txn(self, txn: Txn, room_id: str) -> tuple[list[Pdu], set[str]]:
        row = txn.execute("SELECT room_version FROM rooms WHERE room_id = ?", (room_id,)).fetchone()
        if row is None:
            return [], set()
        version = get_room_version(row[0])
        events, rejected = [], set()
        for event_id, data, reason in txn.execute(
            "SELECT event_id, json, rejected_reason FROM events"
            " WHERE room_id = ? AND state_key IS NOT NULL",
            (room_id,),
        ).fetchall():
            events.append(Pdu(version, event_id, json.loads(data)))
            if reason is not None:
                rejected.add(event_id)
        return events, rejected

    async def have_events(self, event_ids: Iterable[str]) -> dict[str, tuple[bool, bool]]:
        """event id -> (has state: the state after it is known, rejected) of those stored."""
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = await self.db.select(
            "have_events",
            f"SELECT event_id, state_group, rejected_reason FROM events WHERE event_id IN ({marks})",
            ids,
        )
        return {eid: (sg != NO_STATE_GROUP, reason is not None) for eid, sg, reason in rows}

    async def get_redactions_of(self, event_id: str) -> list[str]:
        """Ids of the accepted redaction events in the timeline that redact this event."""
        rows = await self.db.select(
            "redactions_of",
            "SELECT r.event_id FROM redactions r JOIN events e USING (event_id)"
            " WHERE r.redacts = ? AND e.rejected_reason IS NULL AND e.outlier = FALSE",
            (event_id,),
        )
        return [r[0] for r in rows]

    async def redact_stored(self, target: Pdu, redaction_id: str) -> None:
        """Store an already-persisted event redacted (its redaction came first)."""
        await self.db.run_interaction(
            "redact_stored",
            lambda txn: txn.execute(
                "UPDATE events SET json = ?, redacted_by = ? WHERE event_id = ?",
                (_json_encoder.encode(target.redacted().data), redaction_id, target.event_id),
            ),
        )
