"""Reading room history: /messages, /context and single events, visibility enforced."""

from typing import Any

from homeserver.core.events import HISTORY_VISIBILITY, MEMBER, Pdu
from homeserver.errors import MatrixError
from homeserver.services.filtering import EventFilter
from homeserver.services.tokens import pagination_token, parse_pagination_token
from homeserver.services.visibility import filter_visible

Row = tuple[int, str, int]
MAX_BACKFILL_ROUNDS = 3  # per /messages request


class PaginationService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs

    async def _check_can_read(self, user_id: str, room_id: str) -> None:
        room = await self.hs.room_states.get(room_id)
        if room is None:
            raise MatrixError("M_FORBIDDEN", "You are not a member of this room")
        if room.membership(user_id) is None and room.content_of(
            HISTORY_VISIBILITY, "history_visibility") != "world_readable":
            raise MatrixError("M_FORBIDDEN", "You are not a member of this room")

    async def _page(
        self, user_id: str, room_id: str, after: int | None, upto: int, descending: bool,
        limit: int, event_filter: EventFilter,
    ) -> tuple[list[tuple[Pdu, Row]], bool]:
        """Visible, filtered events; True if the history goes on past them."""
        store = self.hs.events_store
        wanted: list[tuple[Pdu, Row]] = []
        batch = max(limit + 1, 20)
        while len(wanted) <= limit:
            rows = await store.get_room_events(room_id, after, upto, batch, descending)
            if not rows:
                return wanted, False
            events = await self.hs.events.get_events(r[1] for r in rows)
            pairs = [(events[r[1]], r) for r in rows if r[1] in events]
            visible = {p.event_id for p in await filter_visible(
                self.hs, user_id, room_id, [(p, r[2]) for p, r in pairs])}
            for pdu, row in pairs:
                if pdu.event_id in visible and event_filter.allows(pdu):
                    wanted.append((pdu, row))
            if len(rows) < batch:
                return wanted[:limit], len(wanted) > limit
            if descending:
                upto = rows[-1][0] - 1
            else:
                after = rows[-1][0]
        return wanted[:limit], True

    async def messages(
        self, user_id: str, device_id: str | None, room_id: str, from_token: str | None,
        to_token: str | None, direction: str, limit: int, event_filter: EventFilter,
    ) -> dict[str, Any]:
        await self._check_can_read(user_id, room_id)
        now = self.hs.notifier.position
        backwards = direction == "b"
        if from_token is None:
            start = now if backwards else 0
        else:
            start = min(parse_pagination_token(from_token), now)
        stop = None if to_token is None else parse_pagination_token(to_token)
        if backwards:
            page, more = await self._page(user_id, room_id, stop, start, True, limit, event_filter)
            rounds = 0
            while (not more and stop is None and rounds < MAX_BACKFILL_ROUNDS
                   and await self.hs.backfill.backfill(room_id, limit)):
                rounds += 1
                # We reached the start of what we have: other servers have more.
                page, more = await self._page(user_id, room_id, stop, start, True, limit,
                                              event_filter)
        else:
            page, more = await self._page(user_id, room_id, start, stop if stop is not None
                                          else now, False, limit, event_filter)
        pdus = [p for p, _ in page]
        result: dict[str, Any] = {
            "chunk": await self.hs.client_events.serialize_events(pdus, user_id, device_id),
            "start": pagination_token(start),
        }
        if page and more:
            last = page[-1][1][0]
            result["end"] = pagination_token(last - 1 if backwards else last)
        if event_filter.lazy_load_members and pdus:
            result["state"] = await self._members_of(user_id, device_id, room_id,
                                                     {p.sender for p in pdus})
        return result

    async def _members_of(self, user_id: str, device_id: str | None, room_id: str,
                          senders: set[str]) -> list[dict[str, Any]]:
        room = await self.hs.room_states.get(room_id)
        members = [room.get(MEMBER, s) for s in senders]
        return await self.hs.client_events.serialize_events(
            [m for m in members if m is not None], user_id, device_id, bundle_aggregations=False)

    async def get_visible_event(self, user_id: str, room_id: str, event_id: str) -> tuple[Pdu, int]:
        """The event and its stream ordering, or 404 if it is unknown or hidden."""
        pdu = await self.hs.events.get_event(event_id)
        positions = await self.hs.events_store.get_event_positions([event_id])
        if pdu is None or pdu.room_id != room_id or event_id not in positions:
            raise MatrixError("M_NOT_FOUND", "Event not found")
        stream, group = positions[event_id]
        if not await filter_visible(self.hs, user_id, room_id, [(pdu, group)]):
            raise MatrixError("M_NOT_FOUND", "Event not found")
        return pdu, stream

    async def context(
        self, user_id: str, device_id: str | None, room_id: str, event_id: str, limit: int,
        event_filter: EventFilter,
    ) -> dict[str, Any]:
        await self._check_can_read(user_id, room_id)
        pdu, stream = await self.get_visible_event(user_id, room_id, event_id)
        before_count = limit // 2
        after_count = limit - before_count
        before, _ = await self._page(user_id, room_id, None, stream - 1, True, before_count,
                                     event_filter)
        after, _ = await self._page(user_id, room_id, stream, self.hs.notifier.position, False,
                                    after_count, event_filter)
        serialize = self.hs.client_events.serialize_events
        last_stream = after[-1][1][0] if after else stream
        first_stream = before[-1][1][0] if before else stream
        state_group = after[-1][1][2] if after else None
        if state_group is None:
            positions = await self.hs.events_store.get_event_positions([event_id])
            state_group = positions[event_id][1]
        state_map = await self.hs.state_groups.get(state_group)
        all_pdus = [pdu] + [p for p, _ in before] + [p for p, _ in after]
        if event_filter.lazy_load_members:
            senders = {p.sender for p in all_pdus}
            state_map = {k: v for k, v in state_map.items() if k[0] != MEMBER or k[1] in senders}
        state_events = await self.hs.events.get_events(state_map.values())
        return {
            "event": (await serialize([pdu], user_id, device_id))[0],
            "events_before": await serialize([p for p, _ in before], user_id, device_id),
            "events_after": await serialize([p for p, _ in after], user_id, device_id),
            "start": pagination_token(first_stream - 1),
            "end": pagination_token(last_stream),
            "state": await serialize(list(state_events.values()), user_id, device_id,
                                     bundle_aggregations=False),
        }
