"""/sync: everything new for one device since its token, long-polled.

Positions of every stream are snapshotted when a sync starts and that snapshot
is the ``next_batch`` token, so nothing that lands during the computation is
skipped (it is newer than the token) or repeated. An empty incremental sync
waits on the notifier for the user and their rooms; if any stream moved while
it was computing, it recomputes instead of sleeping.
"""

from typing import Any

import attrs

from homeserver.core.events import MEMBER, Pdu
from homeserver.services.filtering import SyncFilter
from homeserver.services.rooms.state import RoomState
from homeserver.services.tokens import StreamToken, pagination_token
from homeserver.services.visibility import filter_visible

MAX_HEROES = 5
TO_DEVICE_LIMIT = 100  # to-device messages per sync

Row = tuple[int, str, int]  # (stream_ordering, event_id, state_group)


@attrs.frozen
class SyncRequest:
    user_id: str
    device_id: str | None
    since: StreamToken | None
    timeout_ms: int
    full_state: bool
    filter: SyncFilter
    set_presence: str | None = None


class SyncService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs

    # --- positions ---------------------------------------------------------------------
    def current_token(self) -> StreamToken:
        hs = self.hs
        return StreamToken(
            events=hs.notifier.position,
            typing=hs.typing.position,
            receipts=hs.receipts.position,
            account_data=hs.account_data.position,
            to_device=hs.to_device.position,
            presence=hs.presence.position,
            device_lists=hs.device_lists.position,
        )

    # --- the request ---------------------------------------------------------------------
    async def sync(self, request: SyncRequest) -> dict[str, Any]:
        hs = self.hs
        await hs.presence.on_sync(request.user_id, request.set_presence)
        deadline = hs.clock.time_msec() + request.timeout_ms
        while True:
            now = self.current_token()
            result, empty = await self._compute(request, now)
            remaining = deadline - hs.clock.time_msec()
            if not empty or request.since is None or request.full_state or remaining <= 0:
                return result
            if self.current_token() != now:
                continue  # something landed while computing: compute again
            rooms = await hs.user_rooms.get(request.user_id)
            await hs.notifier.wait(request.user_id, rooms.keys(), remaining)
            if self.current_token() == now and hs.clock.time_msec() >= deadline:
                return result  # timed out with nothing new
            # Something new, or a wake-up that brought nothing (a presence change
            # woke the user before this request began waiting): look again.

    async def _compute(self, req: SyncRequest, now: StreamToken) -> tuple[dict[str, Any], bool]:
        hs = self.hs
        since = req.since
        memberships = await hs.user_rooms.get(req.user_id)
        join: dict[str, Any] = {}
        invite: dict[str, Any] = {}
        leave: dict[str, Any] = {}
        knock: dict[str, Any] = {}
        for room_id, (membership, stream, event_id) in list(memberships.items()):
            if stream > now.events or not req.filter.allows_room(room_id):
                continue  # the membership is newer than this sync's snapshot
            changed = since is None or stream > since.events
            if membership == "join":
                entry = await self._joined_room(req, room_id, now, newly_joined=(
                    since is not None and stream > since.events))
                if entry is not None:
                    join[room_id] = entry
            elif membership == "invite" and changed:
                invite[room_id] = {"invite_state": {
                    "events": await self._stripped_state(room_id, event_id)}}
            elif membership == "knock" and changed:
                knock[room_id] = {"knock_state": {
                    "events": await self._stripped_state(room_id, event_id)}}
            elif membership in ("leave", "ban") and (
                (since is not None and changed) or (since is None and req.filter.include_leave)
            ):
                entry = await self._left_room(req, room_id, stream, now, event_id)
                if entry is not None:
                    leave[room_id] = entry

        rooms = {k: v for k, v in (("join", join), ("invite", invite), ("leave", leave),
                                   ("knock", knock)) if v}
        result: dict[str, Any] = {"next_batch": str(now)}
        if rooms:
            result["rooms"] = rooms
        extras, to_device_reached = await self._global_extras(req, now)
        if to_device_reached < now.to_device:
            # A capped to-device batch stops the token where it stopped.
            result["next_batch"] = str(now.copy_with(to_device=to_device_reached))
        result.update(extras)
        empty = not rooms and "device_lists" not in extras and not any(
            (v.get("events") if isinstance(v, dict) else v) for v in extras.values()
        )
        # End-to-end keys: the device's one-time key counts and unused fallback key
        # algorithms, in every response (they never make a sync non-empty).
        if req.device_id is not None:
            result.update(await hs.e2e_keys.sync_fields(req.user_id, req.device_id))
        return result, empty

    # --- rooms ----------------------------------------------------------------------------
    async def _rows(self, room: RoomState, after: int | None, upto: int, limit: int) -> list[Row]:
        """Newest-first rows in (after, upto], at most ``limit``, from memory when possible.

        ``room.recent`` is a contiguous tail of the room's events, so it answers
        alone when it holds ``limit`` matching rows, or when ``after`` is inside it.
        """
        recent = room.recent
        if recent:
            rows = [r for r in reversed(recent) if r[0] <= upto and (after is None or r[0] > after)]
            if len(rows) >= limit or (after is not None and after >= recent[0][0]):
                return rows[:limit]
        return await self.hs.events_store.get_room_events(room.room_id, after, upto, limit)

    async def _timeline(
        self, req: SyncRequest, room: RoomState, after: int | None, upto: int
    ) -> tuple[list[Pdu], list[Row], bool]:
        """The visible, filtered timeline in (after, upto], oldest first, and ``limited``."""
        limit = req.filter.timeline_limit
        wanted: list[tuple[Pdu, Row]] = []
        cursor = upto
        limited = False
        batch = max(limit + 1, 20)
        while True:
            rows = await self._rows(room, after, cursor, batch)
            if not rows:
                break
            events = await self.hs.events.get_events(r[1] for r in rows)
            pairs = [(events[r[1]], r) for r in rows if r[1] in events]
            visible = await filter_visible(
                self.hs, req.user_id, room.room_id, [(p, r[2]) for p, r in pairs]
            )
            visible_ids = {p.event_id for p in visible}
            for pdu, row in pairs:
                if pdu.event_id in visible_ids and req.filter.timeline.allows(pdu):
                    wanted.append((pdu, row))
            if len(wanted) > limit:
                limited = True
                break
            if len(rows) < batch:
                break
            cursor = rows[-1][0] - 1
        if len(wanted) > limit:
            wanted = wanted[:limit]
        if limit == 0:
            limited = limited or bool(wanted)
            wanted = []
        wanted.reverse()
        return [p for p, _ in wanted], [r for _, r in wanted], limited

    async def _state_at(self, room: RoomState, position: int) -> dict[tuple[str, str], str]:
        """The room's state after its last event at or before ``position``."""
        recent = room.recent
        if recent and recent[0][0] <= position:
            group = next(g for stream, _, g in reversed(recent) if stream <= position)
        else:
            group = await self.hs.events_store.get_state_group_before(room.room_id, position)
        if group is None:
            # The room's history here starts later (we joined it over federation):
            # the state after its first event, without that event itself.
            first = await self.hs.events_store.get_room_events(
                room.room_id, position, None, 1, descending=False)
            if not first:
                return {}
            state = dict(await self.hs.state_groups.get(first[0][2]))
            return {k: v for k, v in state.items() if v != first[0][1]}
        return await self.hs.state_groups.get(group)

    async def _joined_room(
        self, req: SyncRequest, room_id: str, now: StreamToken, newly_joined: bool
    ) -> dict[str, Any] | None:
        hs = self.hs
        room = await hs.room_states.get(room_id)
        if room is None:
            return None
        since = req.since
        initial = since is None or newly_joined or req.full_state
        after = None if since is None else since.events
        if since is not None and not initial and room.last_stream <= since.events:
            timeline: list[Pdu] = []
            rows: list[Row] = []
            limited = False
        else:
            timeline, rows, limited = await self._timeline(req, room, after, now.events)
        start = (rows[0][0] - 1) if rows else now.events
        if initial:
            state_map = await self._state_at(room, start)
        elif limited:
            at_start = await self._state_at(room, start)
            at_since = await self._state_at(room, since.events)
            state_map = {k: v for k, v in at_start.items() if at_since.get(k) != v}
        else:
            state_map = {}
        state_events = await self._filter_state(req, state_map, timeline)
        ephemeral = await self._ephemeral(req, room_id, now)
        account_data = await self._room_account_data(req, room_id, now)
        if not initial and not timeline and not state_events and not ephemeral and not account_data:
            return None
        serialize = hs.client_events.serialize_events
        entry: dict[str, Any] = {
            "timeline": {
                "events": await serialize(timeline, req.user_id, req.device_id, False,
                                          req.filter.event_fields),
                "limited": limited,
                "prev_batch": pagination_token(start),
            },
            "state": {"events": await serialize(state_events, req.user_id, req.device_id, False,
                                                req.filter.event_fields,
                                                bundle_aggregations=False)},
            "ephemeral": {"events": ephemeral},
            "account_data": {"events": account_data},
        }
        if initial or any(p.type == MEMBER for p in timeline) or state_events:
            entry["summary"] = self._summary(room, req.user_id)
        counts = await hs.push.unread_counts(
            req.user_id, room_id, thread_counts=req.filter.timeline.unread_thread_notifications)
        entry["unread_notifications"] = counts.get("unread_notifications", {})
        if req.filter.timeline.unread_thread_notifications:
            entry["unread_thread_notifications"] = counts.get("unread_thread_notifications", {})
        return entry

    async def _filter_state(
        self, req: SyncRequest, state_map: dict[tuple[str, str], str], timeline: list[Pdu]
    ) -> list[Pdu]:
        state_filter = req.filter.state
        timeline_ids = {p.event_id for p in timeline}
        keys = state_map.keys()
        if state_filter.lazy_load_members:
            senders = {p.sender for p in timeline} | {req.user_id}
            senders |= {p.state_key for p in timeline if p.type == MEMBER}
            keys = [k for k in keys if k[0] != MEMBER or k[1] in senders]
        ids = [state_map[k] for k in keys if state_map[k] not in timeline_ids]
        events = await self.hs.events.get_events(ids)
        return [events[i] for i in ids if i in events and state_filter.allows(events[i])]

    def _summary(self, room: RoomState, user_id: str) -> dict[str, Any]:
        joined = [u for u, m in room.members.items() if m == "join"]
        invited = [u for u, m in room.members.items() if m == "invite"]
        summary: dict[str, Any] = {
            "m.joined_member_count": len(joined),
            "m.invited_member_count": len(invited),
        }
        if room.get("m.room.name") is None and room.get("m.room.canonical_alias") is None:
            heroes = sorted(u for u in joined + invited if u != user_id)[:MAX_HEROES]
            summary["m.heroes"] = heroes
        return summary

    async def _stripped_state(self, room_id: str, membership_event_id: str) -> list[dict[str, Any]]:
        hs = self.hs
        room = await hs.room_states.get(room_id)
        membership = await hs.events.get_event(membership_event_id)
        if hs.federation_membership.is_resident(room):
            stripped = room.stripped_state()
        else:
            # A room elsewhere: what its server sent with the invite (or knock).
            unsigned = membership.data.get("unsigned", {}) if membership is not None else {}
            stripped = unsigned.get("invite_room_state") or unsigned.get("knock_room_state") or []
        if membership is not None:
            stripped = [e for e in stripped
                        if (e.get("type"), e.get("state_key")) != (membership.type,
                                                                  membership.state_key)]
            stripped.append(hs.client_events.serialize(membership, include_room_id=False))
        return stripped

    async def _left_room(
        self, req: SyncRequest, room_id: str, left_at: int, now: StreamToken, event_id: str
    ) -> dict[str, Any] | None:
        room = await self.hs.room_states.get(room_id)
        if room is None:
            # A room elsewhere we were only invited to (or knocked on): the leave is
            # all there is to show.
            membership = await self.hs.events.get_event(event_id)
            if membership is None:
                return None
            serialize = self.hs.client_events.serialize_events
            return {
                "timeline": {"events": await serialize([membership], req.user_id,
                                                       req.device_id, False),
                             "limited": False, "prev_batch": pagination_token(left_at - 1)},
                "state": {"events": []},
                "account_data": {"events": await self._room_account_data(req, room_id, now)},
            }
        after = None if req.since is None else req.since.events
        timeline, rows, limited = await self._timeline(req, room, after, left_at)
        start = (rows[0][0] - 1) if rows else left_at
        state_map = await self._state_at(room, start) if req.since is None or limited else {}
        state_events = await self._filter_state(req, state_map, timeline)
        serialize = self.hs.client_events.serialize_events
        return {
            "timeline": {
                "events": await serialize(timeline, req.user_id, req.device_id, False),
                "limited": limited,
                "prev_batch": pagination_token(start),
            },
            "state": {"events": await serialize(state_events, req.user_id, req.device_id, False,
                                                bundle_aggregations=False)},
            "account_data": {"events": await self._room_account_data(req, room_id, now)},
        }

    # --- ephemeral and per-user streams ------------------------------------------------------
    async def _ephemeral(self, req: SyncRequest, room_id: str, now: StreamToken) -> list[Any]:
        hs = self.hs
        events: list[Any] = []
        since = req.since
        event = hs.typing.typing_event(room_id, None if since is None else since.typing)
        if event is not None:
            events.append(event)
        event = await hs.receipts.receipt_event(
            req.user_id, room_id, None if since is None else since.receipts, now.receipts)
        if event is not None:
            events.append(event)
        return req.filter.ephemeral.filter(events)

    async def _room_account_data(self, req: SyncRequest, room_id: str, now: StreamToken) -> list[Any]:
        since = 0 if req.since is None else req.since.account_data
        events = await self.hs.account_data.room_changes(req.user_id, room_id, since, now.account_data)
        return req.filter.room_account_data.filter(events)

    async def _global_extras(
        self, req: SyncRequest, now: StreamToken
    ) -> tuple[dict[str, Any], int]:
        """Account data, presence, to-device and device lists; and the to-device
        position actually reached (below ``now`` when the batch was capped)."""
        hs = self.hs
        since = req.since
        extras: dict[str, Any] = {}
        events = await hs.account_data.global_changes(
            req.user_id, 0 if since is None else since.account_data, now.account_data)
        if since is None and not any(e.get("type") == "m.push_rules" for e in events):
            # Clients expect their push rules in the first sync, changed or not.
            events = [*events, {"type": "m.push_rules",
                                "content": hs.push.push_rules_content(req.user_id)}]
        extras["account_data"] = {"events": req.filter.account_data.filter(events)}
        events = await hs.presence.updates_for(
            req.user_id, None if since is None else since.presence, now.presence)
        extras["presence"] = {"events": req.filter.presence.filter(events)}
        reached = now.to_device
        if req.device_id is not None:
            messages = await hs.to_device.messages_for(
                req.user_id, req.device_id, 0 if since is None else since.to_device,
                now.to_device, limit=TO_DEVICE_LIMIT)
            extras["to_device"] = {"events": list(messages)}
            reached = messages.position
        if since is not None:
            changes = await hs.device_lists.changes_for(
                req.user_id, since.device_lists, now.device_lists,
                since_events=since.events, upto_events=now.events)
            if changes.get("changed") or changes.get("left"):
                extras["device_lists"] = changes
        return extras, reached
