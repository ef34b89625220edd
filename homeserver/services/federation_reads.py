"""What other servers may read of our rooms: events, state at an event, auth chains,
backfill and missing events (spec server-server "Retrieving events", "Backfilling
and retrieving missing events", "Retrieving event authorisation information").

Authorisation, for every read:

1. the room must be known (404 ``M_NOT_FOUND`` otherwise, as for unknown events
   and events of another room);
2. the room's ``m.room.server_acl`` must not deny the origin, and the origin must
   have or have had a member in the room: one of its users is, in the current
   state, joined, or has left or been banned (403 ``M_FORBIDDEN`` otherwise);
3. each event is checked with ``server_may_see``: from the state after the event
   (its state group, as for users in ``visibility.py``), ``world_readable`` and
   ``shared`` history is visible, ``invited`` history needs one of the origin's
   users invited or joined at that event, ``joined`` history one joined; a
   server always sees its own users' membership events.

``/event`` and the state/auth reads answer 403 for an event the origin may not
see. ``/backfill`` and ``/get_missing_events`` return such events redacted, so
the origin can still walk the graph but learns no content (what Synapse does).

The state "at" an event is the state before it (spec: "prior to considering any
state changes induced by the requested event"). Auth chains are computed from
the events' ``auth_events`` and kept per event in memory (events never change
their auth events, and a room's chains share most of their events).
"""

import heapq
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from homeserver.core.events import CREATE, HISTORY_VISIBILITY, MEMBER, Pdu
from homeserver.errors import MatrixError

SERVER_ACL = "m.room.server_acl"
# The spec's default for /get_missing_events, and the most we answer.
MISSING_EVENTS_DEFAULT_LIMIT = 10
MISSING_EVENTS_MAX_LIMIT = 20
BACKFILL_MAX_LIMIT = 500
# Memberships that mean a server has (or had) a user in the room.
_WAS_MEMBER = ("join", "leave", "ban")

StateMap = dict[tuple[str, str], str]


def server_of(user_id: str) -> str:
    return user_id.split(":", 1)[1] if ":" in user_id else ""


def _glob(pattern: str) -> re.Pattern[str]:
    parts = ["." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


def acl_allows(acl: Pdu | None, server_name: str) -> bool:
    """The spec's server ACL check (client-server "Server Access Control Lists")."""
    if acl is None:
        return True
    content = acl.content
    host = server_name.rsplit(":", 1)[0] if not server_name.endswith("]") else server_name
    if host.startswith("[") and "]" in host:
        host = host[: host.index("]") + 1]
    is_ip = bool(re.fullmatch(r"[0-9.]+", host)) or host.startswith("[")
    if is_ip and content.get("allow_ip_literals", True) is False:
        return False
    deny = content.get("deny", [])
    allow = content.get("allow", [])
    deny = deny if isinstance(deny, list) else []
    allow = allow if isinstance(allow, list) else []
    if any(isinstance(p, str) and _glob(p).fullmatch(host) for p in deny):
        return False
    return any(isinstance(p, str) and _glob(p).fullmatch(host) for p in allow)


class FederationReads:
    def __init__(self, hs: Any, max_cached_chains: int = 20_000) -> None:
        self.hs = hs
        self._chains: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._max_cached_chains = max_cached_chains

    # --- authorisation ---------------------------------------------------------
    async def _room_for(self, origin: str, room_id: str) -> Any:
        """The room's RoomState if the origin may read it at all."""
        room = await self.hs.room_states.get(room_id)
        if room is None:
            raise MatrixError("M_NOT_FOUND", f"Unknown room {room_id}")
        if not acl_allows(room.get(SERVER_ACL), origin):
            raise MatrixError("M_FORBIDDEN", f"Server {origin} is denied by the room's ACL")
        if not any(
            server_of(user) == origin and membership in _WAS_MEMBER
            for user, membership in room.members.items()
        ):
            raise MatrixError("M_FORBIDDEN", f"Server {origin} is not in room {room_id}")
        return room

    async def server_may_see(self, origin: str, events: Iterable[Pdu]) -> dict[str, bool]:
        """event id -> whether ``origin`` may see it per history visibility (the room
        gate of ``_room_for`` is the caller's). Events without state (outliers) are
        not visible."""
        events = list(events)
        positions = await self.hs.events_store.get_event_positions([e.event_id for e in events])
        states: dict[int, StateMap] = {}
        needed: set[str] = set()
        for pdu in events:
            group = positions.get(pdu.event_id, (0, None))[1]
            if group is None or group in states:
                continue
            state = await self.hs.state_groups.get(group)
            states[group] = state
            for (event_type, state_key), event_id in state.items():
                is_visibility = event_type == HISTORY_VISIBILITY and state_key == ""
                if is_visibility or (event_type == MEMBER and server_of(state_key) == origin):
                    needed.add(event_id)
        state_events = await self.hs.events.get_events(needed)
        result: dict[str, bool] = {}
        for pdu in events:
            group = positions.get(pdu.event_id, (0, None))[1]
            result[pdu.event_id] = group is not None and self._visible(
                origin, pdu, states[group], state_events
            )
        return result

    @staticmethod
    def _visible(origin: str, pdu: Pdu, state: StateMap, events: dict[str, Pdu]) -> bool:
        if pdu.type == MEMBER and server_of(pdu.state_key or "") == origin:
            return True
        hv = events.get(state.get((HISTORY_VISIBILITY, ""), ""))
        visibility = hv.content.get("history_visibility", "shared") if hv else "shared"
        if visibility in ("world_readable", "shared"):
            return True
        memberships = {
            events[event_id].membership
            for (event_type, state_key), event_id in state.items()
            if event_type == MEMBER and server_of(state_key) == origin and event_id in events
        }
        if "join" in memberships:
            return True
        return visibility == "invited" and "invite" in memberships

    async def _visible_event(self, origin: str, room_id: str | None, event_id: str) -> Pdu:
        """The event, if it exists (in ``room_id`` when given) and origin may see it."""
        pdu = await self.hs.events.get_event(event_id)
        if pdu is None or (room_id is not None and pdu.room_id != room_id):
            raise MatrixError("M_NOT_FOUND", f"Unknown event {event_id}")
        await self._room_for(origin, pdu.room_id)
        if not (await self.server_may_see(origin, [pdu]))[event_id]:
            raise MatrixError("M_FORBIDDEN", f"Server {origin} may not see {event_id}")
        return pdu

    async def _redact_invisible(self, origin: str, events: list[Pdu]) -> list[Pdu]:
        visible = await self.server_may_see(origin, events)
        return [pdu if visible[pdu.event_id] else pdu.redacted() for pdu in events]

    # --- auth chains -----------------------------------------------------------
    async def auth_chain_ids(self, event_ids: Iterable[str]) -> set[str]:
        """Every event in the auth chains of the given events (the given events
        themselves only as far as they are auth events of one another)."""
        event_ids = list(event_ids)
        await self._fill_chains(event_ids)
        chain: set[str] = set()
        for event_id in event_ids:
            chain.update(self._chains.get(event_id, ()))
        return chain

    @staticmethod
    def _auth_ids(pdu: Pdu) -> tuple[str, ...]:
        """The event's auth events; from room 12 the create event is one implicitly
        (it is not listed: the room id names it)."""
        ids = pdu.auth_event_ids
        if pdu.room_version.room_id_is_create_event_hash and pdu.type != CREATE:
            create_id = "$" + pdu.room_id[1:]
            if create_id not in ids:
                ids = (*ids, create_id)
        return ids

    async def _fill_chains(self, event_ids: list[str]) -> None:
        # Fetch every uncached ancestor, level by level.
        events: dict[str, Pdu] = {}
        frontier = {e for e in event_ids if e not in self._chains}
        while frontier:
            fetched = await self.hs.events.get_events(frontier)
            events.update(fetched)
            frontier = {
                a
                for pdu in fetched.values()
                for a in self._auth_ids(pdu)
                if a not in events and a not in self._chains
            }
        # Compute the chains bottom-up (iterative post-order; a cycle, which
        # valid events cannot have, just ends the walk).
        computed: dict[str, frozenset[str]] = {}

        def known(event_id: str) -> frozenset[str] | None:
            chain = computed.get(event_id)
            return chain if chain is not None else self._chains.get(event_id)

        for root in event_ids:
            if known(root) is not None or root not in events:
                continue
            stack: list[tuple[str, bool]] = [(root, False)]
            on_stack: set[str] = set()
            while stack:
                event_id, expanded = stack.pop()
                if known(event_id) is not None:
                    continue
                pdu = events[event_id]
                if not expanded:
                    on_stack.add(event_id)
                    stack.append((event_id, True))
                    for a in self._auth_ids(pdu):
                        if a in events and known(a) is None and a not in on_stack:
                            stack.append((a, False))
                    continue
                chain: set[str] = set()
                for a in self._auth_ids(pdu):
                    if a in events or a in self._chains:
                        chain.add(a)
                        chain.update(known(a) or ())
                computed[event_id] = frozenset(chain)
                on_stack.discard(event_id)
        for event_id, chain in computed.items():
            self._chains[event_id] = chain
            self._chains.move_to_end(event_id)
        for event_id in event_ids:
            if event_id in self._chains:
                self._chains.move_to_end(event_id)
        while len(self._chains) > self._max_cached_chains:
            self._chains.popitem(last=False)

    async def ordered(self, event_ids: Iterable[str]) -> list[Pdu]:
        """The stored events among these ids, oldest first (by depth, then stream)."""
        event_ids = list(event_ids)
        events = await self.hs.events.get_events(event_ids)
        positions = await self.hs.events_store.get_event_positions(list(events))
        return sorted(
            events.values(),
            key=lambda p: (p.depth, positions.get(p.event_id, (0, 0))[0], p.event_id),
        )

    # --- state at an event -----------------------------------------------------
    async def state_ids_before(self, pdu: Pdu) -> StateMap:
        """The room state before ``pdu`` (empty before the create event)."""
        if pdu.type == CREATE and pdu.state_key == "":
            return {}
        positions = await self.hs.events_store.get_event_positions([pdu.event_id])
        group = positions.get(pdu.event_id, (0, None))[1]
        if group is None:
            raise MatrixError("M_NOT_FOUND", f"The state at {pdu.event_id} is not known")
        if not pdu.is_state:
            return dict(await self.hs.state_groups.get(group))
        # A state event's group is a delta from the state before it, unless it is
        # a snapshot: then the state before it is the state after its prev event.
        delta = await self.hs.events_store.get_state_group_delta(group)
        if delta is not None and delta[0] is not None:
            return dict(await self.hs.state_groups.get(delta[0]))
        prev = await self.hs.events_store.get_event_positions(list(pdu.prev_event_ids))
        prev_groups = [(so, sg) for so, sg in prev.values() if sg is not None]
        if not prev_groups:
            raise MatrixError("M_NOT_FOUND", f"The state at {pdu.event_id} is not known")
        return dict(await self.hs.state_groups.get(max(prev_groups)[1]))

    # --- the endpoints ---------------------------------------------------------
    async def get_event(self, origin: str, event_id: str) -> Pdu:
        """GET /event/{eventId}."""
        return await self._visible_event(origin, None, event_id)

    async def get_state_ids(
        self, origin: str, room_id: str, event_id: str
    ) -> tuple[list[str], list[str]]:
        """GET /state_ids: (state event ids before the event, their auth chain ids)."""
        pdu = await self._visible_event(origin, room_id, event_id)
        state = list((await self.state_ids_before(pdu)).values())
        chain = await self.auth_chain_ids(state)
        return state, sorted(chain)

    async def get_state(
        self, origin: str, room_id: str, event_id: str
    ) -> tuple[list[Pdu], list[Pdu]]:
        """GET /state: (state events before the event, their auth chain), oldest first."""
        state_ids, chain_ids = await self.get_state_ids(origin, room_id, event_id)
        return await self.ordered(state_ids), await self.ordered(chain_ids)

    async def get_event_auth(self, origin: str, room_id: str, event_id: str) -> list[Pdu]:
        """GET /event_auth: the event's full auth chain, oldest first."""
        await self._visible_event(origin, room_id, event_id)
        return await self.ordered(await self.auth_chain_ids([event_id]))

    async def backfill(
        self, origin: str, room_id: str, event_ids: list[str], limit: int
    ) -> list[Pdu]:
        """GET /backfill: the given events and their ancestors through prev_events,
        deepest first, at most ``limit`` (which counts the given events)."""
        await self._room_for(origin, room_id)
        limit = max(0, min(limit, BACKFILL_MAX_LIMIT))
        # A max-heap on depth (ties: event id, for a stable answer).
        queue: list[tuple[int, str]] = []
        pending: dict[str, Pdu] = {}
        seen: set[str] = set()
        result: list[Pdu] = []

        async def push(ids: Iterable[str]) -> None:
            new = [e for e in ids if e not in seen]
            seen.update(new)
            for pdu in (await self.hs.events.get_events(new)).values():
                if pdu.room_id == room_id:
                    pending[pdu.event_id] = pdu
                    heapq.heappush(queue, (-pdu.depth, pdu.event_id))

        await push(event_ids)
        while queue and len(result) < limit:
            _, event_id = heapq.heappop(queue)
            pdu = pending.pop(event_id)
            result.append(pdu)
            await push(pdu.prev_event_ids)
        return await self._redact_invisible(origin, result)

    async def get_missing_events(
        self,
        origin: str,
        room_id: str,
        earliest_events: list[str],
        latest_events: list[str],
        limit: int = MISSING_EVENTS_DEFAULT_LIMIT,
        min_depth: int = 0,
    ) -> list[Pdu]:
        """POST /get_missing_events: the ancestors of ``latest_events`` through
        prev_events, breadth first, not walking into or past ``earliest_events``
        and leaving out events below ``min_depth``; the ``limit`` (at most 20)
        nearest to ``latest_events``, answered oldest first."""
        await self._room_for(origin, room_id)
        limit = max(0, min(limit, MISSING_EVENTS_MAX_LIMIT))
        seen = set(earliest_events) | set(latest_events)
        latest = await self.hs.events.get_events(latest_events)
        front = [p for p in latest.values() if p.room_id == room_id]
        found: list[Pdu] = []
        while front and len(found) < limit:
            wanted = [e for p in front for e in p.prev_event_ids if e not in seen]
            wanted = list(dict.fromkeys(wanted))
            seen.update(wanted)
            fetched = await self.hs.events.get_events(wanted)
            front = []
            for event_id in wanted:
                pdu = fetched.get(event_id)
                if pdu is None or pdu.room_id != room_id or pdu.depth < min_depth:
                    continue
                if len(found) >= limit:
                    break
                found.append(pdu)
                front.append(pdu)
        ordered = await self.ordered(p.event_id for p in found)
        return await self._redact_invisible(origin, ordered)
