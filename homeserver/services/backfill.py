"""History from other servers: ``/messages`` backfills when it reaches the start of
what we have of a room (spec "Backfilling and retrieving missing events").

Backfilled events are checked like any received event (signatures, hashes,
their own auth events) and stored with negative stream orderings, counting
down, so that they sort before everything this server saw live and never
appear in an incremental ``/sync``. The state at them is not fetched: they
share one state group, the room's earliest known state without any of our
users' memberships, so history visibility treats our users as not yet in the
room (``shared`` and ``world_readable`` history is visible, ``joined`` and
``invited`` history is not) and never shows more than the room allows.
Events we already hold as outliers (the room's state from the join) are
promoted into the timeline.
"""

import logging
from typing import Any

from twisted.internet import defer

from homeserver.core.events import CREATE, MEMBER, Pdu
from homeserver.core.power_levels import domain_of
from homeserver.services.federation_client import FederationError, build_path
from homeserver.services.federation_events import PduRejected, topological
from storage.events import EventToPersist

logger = logging.getLogger(__name__)

BACKFILL_LIMIT = 100


class BackfillService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self._next: int | None = None  # the next (negative) stream ordering
        self._complete: set[str] = set()  # rooms whose history we hold from the start

    async def _allocate(self) -> int:
        if self._next is None:
            self._next = min(await self.hs.events_store.get_min_stream_ordering(), 0) - 1
        value = self._next
        self._next -= 1
        return value

    async def backfill(self, room_id: str, limit: int) -> bool:
        """Fetch older events of a room from another server; True if any arrived."""
        hs = self.hs
        if room_id in self._complete:
            return False
        room = await hs.room_states.get(room_id)
        if room is None:
            return False
        oldest = await hs.events_store.get_room_events(room_id, None, None, 1, descending=False)
        if not oldest:
            return False
        oldest_pdu = await hs.events.get_event(oldest[0][1])
        if oldest_pdu is None or oldest_pdu.type == CREATE:
            self._complete.add(room_id)
            return False
        servers = sorted({domain_of(u) for u, m in room.members.items() if m == "join"}
                         - {hs.server_name, ""})
        events = hs.federation_events
        async with events.room_lock(room_id):
            for server in servers:
                try:
                    answer = await hs.federation_client.get_json(
                        server, build_path("/_matrix/federation/v1/backfill/{}", room_id),
                        {"v": [oldest_pdu.event_id], "limit": str(min(limit, BACKFILL_LIMIT))},
                    )
                except FederationError as e:
                    logger.info("backfill of %s from %s failed: %s", room_id, server, e)
                    continue
                pdus = answer.get("pdus") if isinstance(answer, dict) else None
                checked = await events.check_all_for_room(
                    pdus if isinstance(pdus, list) else [], room_id, room.room_version)
                added = await self._store(room_id, checked, oldest[0][2], server)
                if not added:
                    self._complete.add(room_id)
                return added
        return False

    async def _store(self, room_id: str, pdus: list[Pdu], oldest_group: int, origin: str) -> bool:
        hs = self.hs
        events = hs.federation_events
        have = await hs.events_store.have_events(p.event_id for p in pdus)
        # (has state, rejected): outliers we hold have no state and were accepted.
        outliers = [p for p in pdus if have.get(p.event_id) == (False, False)]
        new = [p for p in pdus if p.event_id not in have]
        if not new and not outliers:
            return False
        room = await hs.room_states.get(room_id)
        accepted = []
        for pdu in topological(new):
            try:
                await events.ensure_auth_events(origin, room, pdu)
            except PduRejected as e:
                logger.info("backfilled %s dropped: %s", pdu.event_id, e)
                continue
            reason = await events.check_own_auth_events(pdu)
            if reason is not None:
                logger.info("backfilled %s rejected: %s", pdu.event_id, reason)
                continue
            accepted.append(pdu)
        # Newest first, so that the oldest gets the lowest stream ordering.
        streams = {}
        for pdu in sorted(accepted + outliers, key=lambda p: p.depth, reverse=True):
            streams[pdu.event_id] = await self._allocate()
        # The state group they share: the earliest known state without our users.
        state = dict(await hs.state_groups.get(oldest_group))
        for key in [k for k in state if k[0] == MEMBER and domain_of(k[1]) == hs.server_name]:
            del state[key]
        group = oldest_group
        if accepted:
            group = min(streams[p.event_id] for p in accepted)
            hs.state_groups.put(group, state)
            items = []
            for pdu in accepted:
                hs.event_cache.put(pdu)
                stream = streams[pdu.event_id]
                items.append(EventToPersist(
                    pdu=pdu, stream_ordering=stream, state_group=group,
                    prev_state_group=None if stream == group else group, prev_chain_length=0,
                    state_after=state if stream == group else None, backfilled=True,
                ))
            await defer.gatherResults([hs.persister.persist(i) for i in items],
                                      consumeErrors=True)
        if outliers:
            await hs.events_store.promote_outliers(
                [(p.event_id, streams[p.event_id], group) for p in outliers])
        return True


__all__ = ["BackfillService"]
