"""Events from other servers: the checks on receipt, then into the room.

Spec (server-server API, "Checks performed on receipt of a PDU"), in order:

1. format, 2. signatures (keys fetched as needed), 3. content hash (a
   mismatch is processed redacted) — ``check_signed``;
4. auth against the event's own auth events (fetched with ``/event_auth``
   when missing; failure rejects it);
5. auth against the state before the event, from the state after each of
   its ``prev_events`` (missing ones fetched with ``/get_missing_events``, or
   their state with ``/state`` when the gap is too big), resolved where they
   differ (failure rejects it);
6. auth against the room's current state (failure soft-fails it: stored, not
   shown to clients, not an extremity).

Events reach a room one at a time (a lock per room). Everything read from the
database or other servers is read first; the last step, which moves the
room's in-memory state on and queues the event for persisting, is
synchronous, so it cannot interleave with our own users' sends.
"""

import heapq
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer

from crypto.signing import SignatureError
from homeserver.core.auth import AuthError, check_auth_events_are_valid, check_auth_rules
from homeserver.core.auth_events import auth_state_keys_for_pdu
from homeserver.core.events import CREATE, Pdu, StateKey
from homeserver.core.power_levels import PowerLevels, domain_of
from homeserver.core.room_versions import RoomVersion
from homeserver.core.state_res import effective_auth_event_ids
from homeserver.core.validation import EventFormatError
from homeserver.services.federation_client import FederationError, build_path
from homeserver.services.federation_reads import acl_allows
from homeserver.services.rooms.dag import unconflicted
from homeserver.services.rooms.sender import relation_of
from homeserver.services.rooms.state import RoomState
from storage.events import NO_STATE_GROUP, SNAPSHOT_INTERVAL, EventToPersist

logger = logging.getLogger(__name__)

FEDERATION = "/_matrix/federation/v1"
MISSING_EVENTS_LIMIT = 10
REDACTION = "m.room.redaction"


class PduRejected(Exception):
    """An event failed a check that drops it (format, signatures, missing auth)."""


def topological(pdus: Iterable[Pdu]) -> list[Pdu]:
    """Events ordered so that each comes after the auth and prev events it cites
    among them (Kahn's algorithm, ties by depth then id; linear in the events
    and their references, so a 500-member room's state sorts at once)."""
    by_id = {p.event_id: p for p in pdus}
    waiting_on: dict[str, int] = {}
    children: dict[str, list[str]] = {}
    for pdu in by_id.values():
        cited = {c for c in (*pdu.auth_event_ids, *pdu.prev_event_ids) if c in by_id}
        cited.discard(pdu.event_id)
        waiting_on[pdu.event_id] = len(cited)
        for c in cited:
            children.setdefault(c, []).append(pdu.event_id)
    ready = [(p.depth, p.event_id) for p in by_id.values() if waiting_on[p.event_id] == 0]
    heapq.heapify(ready)
    ordered: list[Pdu] = []
    while ready:
        _, event_id = heapq.heappop(ready)
        ordered.append(by_id[event_id])
        for child in children.get(event_id, ()):
            waiting_on[child] -= 1
            if waiting_on[child] == 0:
                heapq.heappush(ready, (by_id[child].depth, child))
    if len(ordered) < len(by_id):  # a cycle (forged events): the rest by depth
        placed = {p.event_id for p in ordered}
        ordered.extend(sorted((p for p in by_id.values() if p.event_id not in placed),
                              key=lambda p: (p.depth, p.event_id)))
    return ordered


def keyed(pdus: Iterable[Pdu]) -> dict[StateKey, Pdu]:
    return {p.state_tuple: p for p in pdus if p.is_state}


class FederationEventHandler:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self._locks: dict[str, defer.DeferredLock] = {}
        # Events redacted before we had them (in memory: after a restart such a
        # late event is shown unredacted until its redaction is re-sent).
        self._redacted_before_seen: set[str] = set()
        # Writes of events from transactions, not yet awaited (``settle``).
        self._unsettled: list[defer.Deferred[None]] = []

    def room_lock(self, room_id: str) -> defer.DeferredLock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = defer.DeferredLock()
        return lock

    # --- checks 1-3 ------------------------------------------------------------------------
    async def check_signed(self, data: Any, room_version: RoomVersion) -> Pdu:
        """Format, signatures and content hash; raise PduRejected to drop the event."""
        try:
            pdu, hash_ok = await self.hs.keyring.verify_received_pdu(data, room_version)
        except (EventFormatError, SignatureError) as e:
            raise PduRejected(str(e)) from e
        if not hash_ok:
            logger.warning("content hash of %s does not match: using it redacted", pdu.event_id)
        return pdu

    # --- a PDU from a transaction ------------------------------------------------------------
    async def receive_pdu(self, origin: str, data: Any) -> str | None:
        """Handle one PDU of an inbound transaction; the error to report, or None."""
        room_id = data.get("room_id") if isinstance(data, dict) else None
        if not isinstance(room_id, str):
            return "PDU has no room_id"
        room = await self.hs.room_states.get(room_id)
        if room is None:
            return f"this server is not in room {room_id}"
        if not acl_allows(room.get("m.room.server_acl"), origin):
            return "Server is banned from the room by its ACL"  # (spec: Server ACLs)
        try:
            pdu = await self.check_signed(data, room.room_version)
        except PduRejected as e:
            logger.info("dropping a PDU from %s: %s", origin, e)
            return str(e)
        async with self.room_lock(room_id):
            try:
                await self.handle_new_pdu(origin, room, pdu, settle_later=True)
            except PduRejected as e:
                logger.info("dropping %s from %s: %s", pdu.event_id, origin, e)
                return str(e)
        return None

    async def handle_new_pdu(
        self, origin: str, room: RoomState, pdu: Pdu, fetch_missing: bool = True,
        settle_later: bool = False,
    ) -> None:
        """Checks 4-6 and persisting, for an event that passed checks 1-3.
        The caller holds the room's lock. With ``settle_later`` an event that
        follows the room's tip may still be being written on return: ``settle``
        waits for it (a transaction's events then share database transactions)."""
        if self.hs.event_cache.get(pdu.event_id) is not None:
            return  # stored already (or being stored)
        if await self._follows_tip(room, pdu, settle_later):
            return
        if await self._known(pdu.event_id):
            return
        missing = await self._prevs_without_state(pdu)
        if missing and fetch_missing:
            await self._fetch_missing_events(origin, room, pdu)
            missing = await self._prevs_without_state(pdu)
        remote_states = {
            prev: await self._remote_state_after(origin, room, prev) for prev in missing
        }
        await self.ensure_auth_events(origin, room, pdu)
        await self._check_and_persist(room, pdu, remote_states)

    async def settle(self) -> None:
        """Wait until every event taken in so far is stored; raise if one failed."""
        while self._unsettled:
            pending, self._unsettled = self._unsettled, []
            await defer.gatherResults(pending, consumeErrors=True)

    async def _follows_tip(self, room: RoomState, pdu: Pdu, settle_later: bool = False) -> bool:
        """The usual case, with no database read: an event whose prev events are the
        room's extremities and whose auth events are in its current state. Then
        the state before it is the current state, in memory, and so are its auth
        events (the current state holds no rejected event). False: it needs the
        general path.

        An event citing our tip is recent, so had we stored it, the event cache
        would hold it (rejected and soft-failed ones included).
        """
        target = await self._redaction_target(pdu) if pdu.type == REDACTION else None
        if set(pdu.prev_event_ids) != set(room.extremities):
            return False
        current = {p.event_id: p for p in room.state.values()}
        if any(a not in current for a in effective_auth_event_ids(pdu)):
            return False
        reason = self._auth_against_own_auth_events(pdu, current, set())
        if reason is None:
            reason = self.auth_against_state(pdu, room.state)
        if reason is not None:
            await self._persist_rejected(room, pdu, reason)
            return True
        self._note_redaction(pdu, target)
        item = self.hs.room_sender._advance(room, pdu, None, None)
        item.redacted_target = self._effective_redaction(pdu, target, room.state)
        written = self.hs.persister.persist(item)
        if settle_later and pdu.event_id not in self._redacted_before_seen:
            self._unsettled.append(written)
            return True
        state_now = dict(room.state)
        await written
        await self._apply_earlier_redactions(pdu, state_now)
        return True

    async def _known(self, event_id: str) -> bool:
        if self.hs.event_cache.get(event_id) is not None:
            return True
        return bool(await self.hs.events_store.have_events([event_id]))

    async def _prevs_without_state(self, pdu: Pdu) -> list[str]:
        # The event cache also holds outliers (no state): the store says which have
        # state; the cache only vouches for events not stored yet (being persisted).
        prevs = list(pdu.prev_event_ids)
        have = await self.hs.events_store.have_events(prevs)
        return [p for p in prevs
                if not (have[p][0] if p in have else self.hs.event_cache.get(p) is not None)]

    # --- fetching what is missing ---------------------------------------------------------------
    async def _fetch_missing_events(self, origin: str, room: RoomState, pdu: Pdu) -> None:
        """Ask the origin for the events between our extremities and this one."""
        path = build_path(FEDERATION + "/get_missing_events/{}", room.room_id)
        body = {
            "earliest_events": list(room.extremities),
            "latest_events": [pdu.event_id],
            "limit": MISSING_EVENTS_LIMIT,
            "min_depth": 0,
        }
        try:
            answer = await self.hs.federation_client.post_json(origin, path, body)
        except FederationError as e:
            logger.info("get_missing_events from %s failed: %s", origin, e)
            return
        events = answer.get("events") if isinstance(answer, dict) else None
        checked = await self._check_all(events if isinstance(events, list) else [], room)
        for event in topological(checked):
            if event.event_id == pdu.event_id:
                continue
            try:
                await self.handle_new_pdu(origin, room, event, fetch_missing=False)
            except PduRejected as e:
                logger.info("missing event %s from %s dropped: %s", event.event_id, origin, e)

    async def _check_all(self, datas: list[Any], room: RoomState) -> list[Pdu]:
        return await self.check_all_for_room(datas, room.room_id, room.room_version)

    async def check_all_for_room(
        self, datas: list[Any], room_id: str, room_version: RoomVersion
    ) -> list[Pdu]:
        """Checks 1-3 for events fetched from another server, dropping failures."""
        checked = []
        for data in datas:
            try:
                pdu = await self.check_signed(data, room_version)
            except PduRejected as e:
                logger.info("dropping a fetched event: %s", e)
                continue
            if pdu.room_id == room_id:  # (a room-12 create event has no room_id field)
                checked.append(pdu)
        return checked

    async def _remote_state_after(
        self, origin: str, room: RoomState, event_id: str
    ) -> dict[StateKey, str]:
        """The state after an event we lack, as the origin tells it (``/state``),
        its events stored as outliers."""
        try:
            answer = await self.hs.federation_client.get_json(
                origin, build_path(FEDERATION + "/state/{}", room.room_id), {"event_id": event_id}
            )
            event_answer = await self.hs.federation_client.get_json(
                origin, build_path(FEDERATION + "/event/{}", event_id)
            )
        except FederationError as e:
            raise PduRejected(f"could not fetch the state at {event_id}: {e}") from e
        state = await self._check_all(list_field(answer, "pdus"), room)
        chain = await self._check_all(list_field(answer, "auth_chain"), room)
        prev = await self._check_all(list_field(event_answer, "pdus")[:1], room)
        await self.persist_outliers(room.room_version, chain + state + prev)
        # Rejected events change no state (the state after one is the state before it).
        have = await self.hs.events_store.have_events(p.event_id for p in state + prev)
        accepted = {eid for eid, (_, rejected) in have.items() if not rejected}
        after = {p.state_tuple: p.event_id for p in state
                 if p.is_state and p.event_id in accepted}
        for p in prev:
            if p.event_id == event_id and p.is_state and p.event_id in accepted:
                after[p.state_tuple] = p.event_id
        return after

    async def ensure_auth_events(self, origin: str, room: RoomState, pdu: Pdu) -> None:
        needed = list(effective_auth_event_ids(pdu))
        have = await self.hs.events_store.have_events(needed)
        missing = [a for a in needed if a not in have and self.hs.event_cache.get(a) is None]
        if not missing:
            return
        try:
            answer = await self.hs.federation_client.get_json(
                origin, build_path(FEDERATION + "/event_auth/{}/{}", room.room_id, pdu.event_id)
            )
        except FederationError as e:
            raise PduRejected(f"could not fetch its auth events: {e}") from e
        chain = await self._check_all(list_field(answer, "auth_chain"), room)
        await self.persist_outliers(room.room_version, chain)
        have = await self.hs.events_store.have_events(missing)
        if any(a not in have for a in missing):
            raise PduRejected("some of its auth events could not be found")

    async def persist_outliers(self, room_version: RoomVersion, pdus: list[Pdu]) -> set[str]:
        """Store events whose state we do not know (auth chains, state from other
        servers), each checked against its own auth events (failures stored
        rejected). Returns the ids of the rejected."""
        have = await self.hs.events_store.have_events(p.event_id for p in pdus)
        new = [p for p in topological({p.event_id: p for p in pdus}.values())
               if p.event_id not in have]
        if not new:
            return set()
        by_id = {p.event_id: p for p in new}
        cited = {a for p in new for a in effective_auth_event_ids(p)} - by_id.keys()
        by_id.update(await self.hs.events.get_events(cited))
        rejected = {eid for eid, (_, was_rejected) in have.items() if was_rejected}
        items = []
        for pdu in new:
            reason = self._auth_against_own_auth_events(pdu, by_id, rejected)
            if reason is not None:
                rejected.add(pdu.event_id)
            items.append(EventToPersist(
                pdu=pdu, stream_ordering=self.hs.stream_ids.next(), state_group=NO_STATE_GROUP,
                prev_state_group=None, prev_chain_length=0, outlier=True,
                rejected_reason=reason, room_version_id=room_version.identifier,
            ))
            self.hs.event_cache.put(pdu)
        await defer.gatherResults([self.hs.persister.persist(i) for i in items], consumeErrors=True)
        return rejected & by_id.keys()

    async def check_own_auth_events(self, pdu: Pdu) -> str | None:
        """Check 4 with the auth events read from the store; the reason it fails."""
        auth_ids = effective_auth_event_ids(pdu)
        auth_by_id = await self.hs.events.get_events(auth_ids)
        have = await self.hs.events_store.have_events(auth_ids)
        rejected = {eid for eid, (_, r) in have.items() if r}
        return self._auth_against_own_auth_events(pdu, auth_by_id, rejected)

    @staticmethod
    def _auth_against_own_auth_events(
        pdu: Pdu, by_id: Mapping[str, Pdu], rejected: set[str]
    ) -> str | None:
        """Check 4; the reason it fails, or None."""
        try:
            check_auth_events_are_valid(pdu, by_id, rejected)
            auth = keyed(by_id[a] for a in effective_auth_event_ids(pdu) if a in by_id)
            check_auth_rules(pdu, auth)
        except AuthError as e:
            return str(e)
        return None

    # --- checks 4-6 and into the room -----------------------------------------------------------
    async def _check_and_persist(
        self, room: RoomState, pdu: Pdu, remote_states: dict[str, dict[StateKey, str]]
    ) -> None:
        hs = self.hs
        reason = await self.check_own_auth_events(pdu)
        if reason is not None:
            await self._persist_rejected(room, pdu, reason)
            return
        target = await self._redaction_target(pdu)
        self._note_redaction(pdu, target)

        prevs = list(pdu.prev_event_ids)
        if set(prevs) == set(room.extremities) and not remote_states:
            # It follows our tip: the state before it is the room's current state.
            reason = self.auth_against_state(pdu, room.state)
            if reason is not None:
                await self._persist_rejected(room, pdu, reason)
                return
            item = hs.room_sender._advance(room, pdu, None, None)
            item.redacted_target = self._effective_redaction(pdu, target, room.state)
            state_now = dict(room.state)
            await hs.persister.persist(item)
            await self._apply_earlier_redactions(pdu, state_now)
            return

        state_sets = await self._states_after(prevs, remote_states)
        state_before = await self._resolve(room, state_sets)
        before_pdus = await hs.events.get_events(state_before.values())
        state_before_pdus = {k: before_pdus[v] for k, v in state_before.items() if v in before_pdus}
        reason = self.auth_against_state(pdu, state_before_pdus)
        if reason is not None:
            await self._persist_rejected(room, pdu, reason)
            return
        state_after = dict(state_before)
        if pdu.is_state:
            state_after[pdu.state_tuple] = pdu.event_id
        # The room's DAG, in case the new extremities need resolving (load it now:
        # the last step must not wait).
        if [e for e in room.extremities if e not in prevs]:
            await hs.room_dags.get(room.room_id)
        after_pdus = {**state_before_pdus, **({pdu.state_tuple: pdu} if pdu.is_state else {})}
        item = self._take_into_room(room, pdu, prevs, state_sets, state_after, after_pdus, target)
        await hs.persister.persist(item)
        if not item.outlier:
            await self._apply_earlier_redactions(pdu, after_pdus)

    def _note_redaction(self, pdu: Pdu, target: Pdu | None) -> None:
        if pdu.type == REDACTION and pdu.redacts and target is None:
            self._redacted_before_seen.add(pdu.redacts)

    async def _apply_earlier_redactions(self, pdu: Pdu, state: Mapping[StateKey, Pdu]) -> None:
        """A redaction of this event may have arrived before it (another server's
        order): then the event is stored redacted now."""
        if pdu.event_id not in self._redacted_before_seen:
            return
        self._redacted_before_seen.discard(pdu.event_id)
        store = self.hs.events_store
        for redaction_id in await store.get_redactions_of(pdu.event_id):
            redaction = await self.hs.events.get_event(redaction_id)
            if redaction is not None and self._effective_redaction(redaction, pdu, state) is pdu:
                await store.redact_stored(pdu, redaction_id)
                self.hs.event_cache.put(pdu.with_redacted_because(redaction_id))
                return

    def _take_into_room(
        self,
        room: RoomState,
        pdu: Pdu,
        prevs: list[str],
        state_sets: list[tuple[int | None, dict[StateKey, str]]],
        state_after: dict[StateKey, str],
        after_pdus: dict[StateKey, Pdu],
        target: Pdu | None,
    ) -> EventToPersist:
        """The synchronous last step: soft-fail check, new current state, extremities."""
        hs = self.hs
        stream = hs.stream_ids.next()
        # Its state group: the one of its single prev if it changes nothing, else new.
        group, snapshot = stream, state_after
        if not pdu.is_state and len(state_sets) == 1 and state_sets[0][0] is not None:
            group, snapshot = state_sets[0][0], None
        else:
            hs.state_groups.put(group, state_after)
        relates_to, rel_type, key = relation_of(pdu.content)
        item = EventToPersist(
            pdu=pdu, stream_ordering=stream, state_group=group, prev_state_group=None,
            prev_chain_length=0, state_after=snapshot, relates_to_id=relates_to,
            relation_type=rel_type, relation_key=key,
        )
        hs.event_cache.put(pdu)
        soft_fail = self.auth_against_state(pdu, room.state)
        if soft_fail is not None:
            logger.info("soft-failing %s: %s", pdu.event_id, soft_fail)
            item.outlier = True
            hs.room_dags.on_built(pdu)
            return item
        item.redacted_target = self._effective_redaction(pdu, target, after_pdus)
        hs.room_dags.on_built(pdu)
        extremities = [e for e in room.extremities if e not in prevs] + [pdu.event_id]
        current = room.state_ids()
        if len(extremities) == 1:
            new_current = state_after
        else:
            new_current = unconflicted([current, state_after]) or hs.room_dags.get_loaded(
                room.room_id
            ).resolve(room.room_version, [current, state_after])
        dag = hs.room_dags.get_loaded(room.room_id)
        delta: dict[StateKey, Pdu | None] = {}
        for k, event_id in new_current.items():
            if k not in room.state or room.state[k].event_id != event_id:
                new_pdu = after_pdus.get(k)
                if new_pdu is None or new_pdu.event_id != event_id:
                    new_pdu = dag.events.get(event_id) if dag is not None else None
                if new_pdu is None:
                    new_pdu = hs.event_cache.get(event_id)
                if new_pdu is None:
                    logger.error("resolved state names unknown event %s", event_id)
                    continue
                delta[k] = new_pdu
        for new_pdu in delta.values():
            if new_pdu is not None:
                room.apply_state(new_pdu)
        own_key_only = pdu.is_state and list(delta) == [pdu.state_tuple]
        if not (own_key_only and delta[pdu.state_tuple] is pdu):
            item.current_state_delta = delta
        room.extremities = extremities
        room.depth = max(room.depth, pdu.depth)
        if new_current == state_after:
            room.state_group = group
            # The chain length of a reused group is not known here: make the next
            # state event start a snapshot.
            room.chain_length = 0 if snapshot is not None else SNAPSHOT_INTERVAL
        else:
            room.state_group = None  # the next event writes the resolved state's group
        return item

    @staticmethod
    def auth_against_state(pdu: Pdu, state: Mapping[StateKey, Pdu]) -> str | None:
        auth = {k: state[k] for k in auth_state_keys_for_pdu(pdu) if k in state}
        if (CREATE, "") in state:
            auth[(CREATE, "")] = state[(CREATE, "")]
        try:
            check_auth_rules(pdu, auth)
        except AuthError as e:
            return str(e)
        return None

    async def _persist_rejected(self, room: RoomState, pdu: Pdu, reason: str) -> None:
        logger.info("rejecting %s: %s", pdu.event_id, reason)
        self.hs.event_cache.put(pdu)  # so that a repeat is known without a read
        self.hs.room_dags.on_built(pdu, rejected=True)
        await self.hs.persister.persist(EventToPersist(
            pdu=pdu, stream_ordering=self.hs.stream_ids.next(), state_group=NO_STATE_GROUP,
            prev_state_group=None, prev_chain_length=0, outlier=True, rejected_reason=reason,
        ))

    async def _states_after(
        self, prevs: list[str], remote_states: dict[str, dict[StateKey, str]]
    ) -> list[tuple[int | None, dict[StateKey, str]]]:
        """(state group or None, state map) after each prev event."""
        positions = await self.hs.events_store.get_event_positions(
            [p for p in prevs if p not in remote_states]
        )
        sets: list[tuple[int | None, dict[StateKey, str]]] = []
        for prev in prevs:
            if prev in remote_states:
                sets.append((None, remote_states[prev]))
            elif prev in positions and positions[prev][1] != NO_STATE_GROUP:
                group = positions[prev][1]
                sets.append((group, await self.hs.state_groups.get(group)))
        if not sets:
            raise PduRejected("the state before it is unknown")
        return sets

    async def _resolve(
        self, room: RoomState, state_sets: list[tuple[int | None, dict[StateKey, str]]]
    ) -> dict[StateKey, str]:
        maps = [s for _, s in state_sets]
        merged = unconflicted(maps)
        if merged is not None:
            return merged
        dag = await self.hs.room_dags.get(room.room_id)
        return dag.resolve(room.room_version, maps)

    # --- redactions -----------------------------------------------------------------------------
    async def _redaction_target(self, pdu: Pdu) -> Pdu | None:
        if pdu.type != REDACTION or not pdu.redacts:
            return None
        target = await self.hs.events.get_event(pdu.redacts)
        return target if target is not None and target.room_id == pdu.room_id else None

    @staticmethod
    def _effective_redaction(
        pdu: Pdu, target: Pdu | None, state: Mapping[StateKey, Pdu]
    ) -> Pdu | None:
        """The event a redaction takes effect on: its sender's server sent the
        target, or the sender has the power to redact others' events."""
        if target is None:
            return None
        if domain_of(target.sender) == domain_of(pdu.sender):
            return target
        power = PowerLevels(state.get(("m.room.power_levels", "")), state[(CREATE, "")])
        if power.user_level(pdu.sender) >= power.named("redact"):
            return target
        return None


def list_field(answer: Any, name: str) -> list[Any]:
    """``answer[name]`` if the answer is an object and that is a list, else []."""
    value = answer.get(name) if isinstance(answer, dict) else None
    return value if isinstance(value, list) else []
