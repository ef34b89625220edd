"""Building, authorising and persisting events of our own users.

``build`` is synchronous: it reads the room's in-memory state, builds and
signs the PDU, runs the auth rules and moves the in-memory state on. Nothing
can interleave with it on the reactor thread, so two concurrent sends in one
room always chain (the second's prev_event is the first). Persisting is then
queued; ``send`` returns once the event is durable.
"""

from collections import OrderedDict
from typing import Any

from twisted.internet import defer

from homeserver.core.auth import AuthError, check_auth_rules
from homeserver.core.auth_events import auth_state_keys
from homeserver.core.builder import build_event, reference_hash_b64
from homeserver.core.events import CREATE, Pdu
from homeserver.core.room_versions import RoomVersion
from homeserver.core.validation import EventFormatError, EventSizeError
from homeserver.errors import MatrixError
from homeserver.services.rooms.state import RoomState
from storage.events import SNAPSHOT_INTERVAL, EventToPersist

TXN_CACHE_SIZE = 100_000
TXN_MEMORY_MS = 60 * 60 * 1000  # how long a transaction id is remembered


def relation_of(content: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(parent event id, rel_type, annotation key) of an event's m.relates_to."""
    relates = content.get("m.relates_to")
    if isinstance(relates, dict):
        event_id, rel_type = relates.get("event_id"), relates.get("rel_type")
        if isinstance(event_id, str) and isinstance(rel_type, str):
            key = relates.get("key") if rel_type == "m.annotation" else None
            return event_id, rel_type, key if isinstance(key, str) else None
    return None, None, None


class RoomEventSender:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self._txns: OrderedDict[tuple[str, str | None, str], str] = OrderedDict()
        self._last_create_ts = 0
        # Requests waiting on a send with the same transaction id still in flight.
        self._pending_txns: dict[tuple[str, str | None, str], list[defer.Deferred[Pdu | None]]] = {}

    # --- building ----------------------------------------------------------------
    def _reference_hash(self, room: RoomState, event_id: str) -> str:
        pdu = self.hs.event_cache.get(event_id)
        if pdu is None:
            raise MatrixError("M_UNKNOWN", f"event {event_id} not in cache", 500)
        return reference_hash_b64(pdu)

    def build(
        self,
        room: RoomState,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None = None,
        redacts: str | None = None,
        device_id: str | None = None,
        txn_id: str | None = None,
        redacted_target: Pdu | None = None,
    ) -> EventToPersist:
        """Build, sign and authorise an event and advance the room's state."""
        pdu = self.build_unattached(room, sender, event_type, content, state_key, redacts)
        item = self._advance(room, pdu, device_id, txn_id)
        item.redacted_target = redacted_target
        return item

    def build_unattached(
        self,
        room: RoomState,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None = None,
        redacts: str | None = None,
    ) -> Pdu:
        """Build, sign and authorise an event on the room's tip, leaving the room
        as it is (an invite that another server must countersign first)."""
        version = room.room_version
        state_map = room.state
        auth_keys = auth_state_keys(version, event_type, sender, state_key, content)
        auth_ids = [state_map[k].event_id for k in auth_keys if k in state_map]
        try:
            pdu = build_event(
                version,
                server_name=self.hs.server_name,
                signing_key=self.hs.server_keys.signing_key,
                event_type=event_type,
                sender=sender,
                content=content,
                room_id=room.room_id,
                prev_events=room.extremities,
                auth_events=auth_ids,
                depth=room.depth + 1,
                origin_server_ts=self.hs.clock.time_msec(),
                state_key=state_key,
                redacts=redacts,
                reference_hashes=(lambda e: self._reference_hash(room, e))
                if version.event_id_in_pdu else None,
            )
        except EventSizeError as e:
            raise MatrixError("M_TOO_LARGE", str(e), 413) from e
        except EventFormatError as e:
            raise MatrixError("M_BAD_JSON", str(e)) from e
        auth_events = {k: state_map[k] for k in auth_keys if k in state_map}
        if not version.create_event_in_auth_events:
            auth_events[(CREATE, "")] = room.create_event
        try:
            check_auth_rules(pdu, auth_events)
        except AuthError as e:
            raise MatrixError("M_FORBIDDEN", str(e)) from e
        return pdu

    def build_create_event(
        self, version: RoomVersion, sender: str, content: dict[str, Any], room_id: str | None
    ) -> tuple[RoomState, EventToPersist]:
        """The first event of a new room, and the new room's in-memory state.

        In room 12 the room id is the create event's hash, so two identical
        creations by one user in the same millisecond would name the same
        room: each create event gets a timestamp later than the previous one.
        """
        ts = max(self.hs.clock.time_msec(), self._last_create_ts + 1)
        self._last_create_ts = ts
        pdu = build_event(
            version,
            server_name=self.hs.server_name,
            signing_key=self.hs.server_keys.signing_key,
            event_type=CREATE,
            sender=sender,
            content=content,
            room_id=room_id,
            prev_events=[],
            auth_events=[],
            depth=1,
            origin_server_ts=ts,
            state_key="",
            reference_hashes=(lambda e: "") if version.event_id_in_pdu else None,  # cites nothing
        )
        try:
            check_auth_rules(pdu, {})
        except AuthError as e:
            raise MatrixError("M_BAD_JSON", str(e)) from e
        room = RoomState(pdu.room_id, version)
        return room, self._advance(room, pdu, None, None)

    def _advance(
        self, room: RoomState, pdu: Pdu, device_id: str | None, txn_id: str | None
    ) -> EventToPersist:
        stream = self.hs.stream_ids.next()
        prev_group, prev_length = room.state_group, room.chain_length
        state_after = None
        if pdu.is_state or prev_group is None:
            # A new state group: a state event, or the first event after state
            # resolution changed the room's state (which then has no group).
            if pdu.is_state:
                room.apply_state(pdu)
            if prev_group is None or prev_length + 1 >= SNAPSHOT_INTERVAL:
                state_after = room.state_ids()
                room.chain_length = 0
            else:
                room.chain_length = prev_length + 1
            room.state_group = stream
            self.hs.state_groups.put(stream, state_after or room.state_ids())
            self.hs.room_dags.on_built(pdu)
        room.extremities = [pdu.event_id]
        room.depth = max(room.depth, pdu.depth)
        self.hs.event_cache.put(pdu, (device_id, txn_id) if txn_id is not None else None)
        relates_to, rel_type, key = relation_of(pdu.content)
        return EventToPersist(
            pdu=pdu,
            stream_ordering=stream,
            state_group=room.state_group,
            prev_state_group=prev_group,
            prev_chain_length=prev_length,
            state_after=state_after,
            device_id=device_id,
            txn_id=txn_id,
            relates_to_id=relates_to,
            relation_type=rel_type,
            relation_key=key,
        )

    # --- sending -------------------------------------------------------------------
    async def get_room(self, room_id: str) -> RoomState:
        room = await self.hs.room_states.get(room_id)
        if room is None:
            raise MatrixError("M_NOT_FOUND", f"Unknown room {room_id}")
        return room

    async def send(
        self,
        sender: str,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None = None,
        redacts: str | None = None,
        device_id: str | None = None,
        txn_id: str | None = None,
        redacted_target: Pdu | None = None,
    ) -> Pdu:
        """Send an event as a local user; returns it once it is durable.

        With ``txn_id``, a retry of the same (sender, device, txn_id) returns
        the first event instead of sending a second.
        """
        if txn_id is None:
            room = await self.get_room(room_id)
            item = self.build(room, sender, event_type, content, state_key, redacts, device_id,
                              redacted_target=redacted_target)
            await self.hs.persister.persist(item)
            return item.pdu
        key = (sender, device_id, txn_id)
        waiters = self._pending_txns.get(key)
        if waiters is not None:  # the same transaction is in flight: share its result
            waiter: defer.Deferred[Pdu | None] = defer.Deferred()
            waiters.append(waiter)
            pdu = await waiter
            if pdu is not None:
                return pdu
            # It failed; try again as if this were the first attempt.
            return await self.send(sender, room_id, event_type, content, state_key, redacts,
                                   device_id, txn_id, redacted_target)
        # Claim the transaction id before the first await, so a concurrent
        # retry waits for this attempt instead of racing it.
        self._pending_txns[key] = []
        pdu = None
        try:
            pdu = await self._previous_send(key)
            if pdu is None:
                room = await self.get_room(room_id)
                item = self.build(room, sender, event_type, content, state_key, redacts,
                                  device_id, txn_id, redacted_target)
                await self.hs.persister.persist(item)
                pdu = item.pdu
                self._remember_txn(key, pdu.event_id)
        finally:
            for waiter in self._pending_txns.pop(key, []):
                waiter.callback(pdu)
        return pdu

    async def previous_send(
        self, sender: str, device_id: str | None, txn_id: str
    ) -> Pdu | None:
        """The event an earlier request with this transaction id sent, if any."""
        return await self._previous_send((sender, device_id, txn_id))

    async def _previous_send(self, key: tuple[str, str | None, str]) -> Pdu | None:
        """The event an earlier request with this transaction id sent, if any.

        Answered from memory: transaction ids of the last TXN_MEMORY_MS are
        loaded at start-up (``load_recent_txn_ids``) and kept as events are
        sent, so a new transaction id costs no database read. (Clients retry
        within seconds; the spec lets servers forget old transaction ids.)
        """
        event_id = self._txns.get(key)
        if event_id is None:
            return None
        return await self.hs.events.get_event(event_id)

    def load_recent_txn_ids(self, rows: list[tuple[str, str | None, str, str]]) -> None:
        for sender, device_id, txn_id, event_id in rows:
            self._remember_txn((sender, device_id, txn_id), event_id)

    def _remember_txn(self, key: tuple[str, str | None, str], event_id: str) -> None:
        self._txns[key] = event_id
        if len(self._txns) > TXN_CACHE_SIZE:
            self._txns.popitem(last=False)
