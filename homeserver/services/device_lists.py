"""The device-list stream: whose devices changed, for /sync and /keys/changes.

The stream gets an entry (durably, in the same transaction as the change, see
``storage/e2e_keys.py``) whenever a local user's device keys or cross-signing
keys change or a device with keys is deleted, and when another server tells
us of such a change for one of its users (``on_remote_change``).
``changes_for`` turns a window of the stream into the spec's
``{changed, left}`` for one user:

- ``changed``: users sharing a room with them whose keys changed (the user
  themselves too: their other devices care), and, given the window in the
  events stream as well, users they newly share a room with (either side
  joined);
- ``left``: users they shared a room with at the start of the window, through
  a room somebody left during it, and now share none with.

Room membership changes come from the events stream itself (the rooms' state
at the window's start against their current state), so they reach a /sync in
the same response as the membership event, and are as durable as the events.

Recent entries are kept in memory (the latest ``RECENT_ENTRIES``, loaded at
start-up, plus everything since), so a /sync never reaches the database for
key changes unless its token is older than that window; a /sync whose token
is at the current positions does no work at all. When an entry becomes
visible, the syncs of the user and of everyone in their rooms are woken.
"""

import bisect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs

from homeserver.core.events import MEMBER
from homeserver.services.account_data import StreamWriter
from homeserver.services.memberships import joined_rooms
from storage.e2e_keys import KEYS, OWN, DeviceListsStore, StreamEntry, add_stream_rows

logger = logging.getLogger(__name__)

RECENT_ENTRIES = 50_000
R = TypeVar("R")


@attrs.frozen
class _Visible:
    entries: list[StreamEntry]
    wake_rooms: list[str]
    wake_users: list[str]


class DeviceListsService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.server_name: str = hs.server_name
        self.store = DeviceListsStore(hs.database)
        self._stream = StreamWriter(self.store.position_blocking(), self._on_visible)
        recent = self.store.recent_blocking(RECENT_ENTRIES)
        if len(recent) < RECENT_ENTRIES:
            self._floor = 0
        else:
            # The oldest stream id may be only partly loaded: drop it.
            self._floor = recent[0].stream_id
            recent = [e for e in recent if e.stream_id > self._floor]
        self._recent: list[StreamEntry] = recent
        self._recent_ids: list[int] = [e.stream_id for e in recent]

    @property
    def position(self) -> int:
        return self._stream.position

    # --- writing ---------------------------------------------------------------------------
    async def write(
        self,
        user_id: str,
        kind: str,
        write: Callable[[int], Awaitable[tuple[R, bool]]],
    ) -> R:
        """Run ``write(stream_id)``, a transaction announcing a ``kind`` change of ``user_id``
        (``KEYS``: everyone sharing a room with them is told; ``OWN``: only they are).

        ``write`` returns (its result, whether it added the stream row). It
        must move the stream's stored position to ``stream_id`` either way
        (``storage.e2e_keys.add_stream_rows`` does). The change becomes
        visible, and wakes syncs, once every earlier one has.
        """
        wake_rooms = await self._joined_rooms(user_id) if kind == KEYS else []
        stream_id = self._stream.allocate()
        try:
            result, changed = await write(stream_id)
        except BaseException:
            self._stream.finish(stream_id)
            raise
        visible = None
        if changed:
            visible = _Visible([StreamEntry(stream_id, user_id, kind)], wake_rooms, [user_id])
        self._stream.finish(stream_id, visible)
        if changed and kind == KEYS:
            self._tell_other_servers(user_id, stream_id, wake_rooms)
        return result

    def _tell_other_servers(self, user_id: str, stream_id: int, room_ids: list[str]) -> None:
        """An m.device_list_update for one of our users to every server sharing a room
        with them. No prev_id: the receiver fetches the whole list again
        (``/user/devices``, which carries the cross-signing keys too)."""
        hs = self.hs
        if not hs.federation_sender.is_mine(user_id):
            return
        servers: set[str] = set()
        for room_id in room_ids:
            servers |= hs.federation_sender.remote_servers_in_room(room_id)
        content = {"user_id": user_id, "device_id": "", "stream_id": stream_id, "prev_id": []}
        for server in sorted(servers):
            hs.federation_sender.send_edu(server, "m.device_list_update", content,
                                          key=("device_list", user_id))

    async def on_remote_change(self, user_id: str) -> bool:
        """A user of another server changed their devices or cross-signing keys (an
        m.device_list_update or m.signing_key_update from their server): local users
        sharing a room with them see them in ``changed``, like a local user's change.

        Nothing is recorded for a user in none of our rooms (False): nobody here
        would be told, and such entries would only fill the stream.
        """
        if not await self._joined_rooms(user_id):
            return False

        async def write(stream_id: int) -> tuple[None, bool]:
            await self.store.db.run_interaction(
                "remote_device_list_change", add_stream_rows, stream_id, [(user_id, KEYS, "")]
            )
            return None, True

        await self.write(user_id, KEYS, write)
        return True

    def _on_visible(self, batches: list[_Visible]) -> None:
        rooms: set[str] = set()
        users: set[str] = set()
        for batch in batches:
            for entry in batch.entries:
                self._recent.append(entry)
                self._recent_ids.append(entry.stream_id)
            rooms.update(batch.wake_rooms)
            users.update(batch.wake_users)
        if len(self._recent) > 2 * RECENT_ENTRIES:
            cut = len(self._recent) - RECENT_ENTRIES
            # Keep whole stream ids: move the cut to the start of one.
            while cut > 0 and self._recent_ids[cut] == self._recent_ids[cut - 1]:
                cut -= 1
            if cut > 0:
                self._floor = self._recent_ids[cut - 1]
                del self._recent[:cut]
                del self._recent_ids[:cut]
        self.hs.notifier.wake(room_ids=rooms, user_ids=users)

    # --- reading ---------------------------------------------------------------------------
    async def _entries(self, since: int, upto: int) -> list[StreamEntry]:
        if since >= upto:
            return []
        if since >= self._floor:
            start = bisect.bisect_right(self._recent_ids, since)
            end = bisect.bisect_right(self._recent_ids, upto)
            return self._recent[start:end]
        return await self.store.entries_between(since, upto)

    async def _joined_rooms(self, user_id: str) -> list[str]:
        return await joined_rooms(self.hs, user_id, user_id.partition(":")[2] != self.server_name)

    async def changes_for(
        self,
        user_id: str,
        since: int,
        upto: int,
        since_events: int | None = None,
        upto_events: int | None = None,
    ) -> dict[str, list[str]]:
        """``{changed, left}`` for ``user_id`` between device-list positions (since, upto].

        With the window's events stream positions too, users newly sharing a
        room and users no longer sharing any are included (from membership
        changes in (since_events, upto_events]).
        """
        entries = await self._entries(since, min(upto, self.position))
        membership_window = (
            since_events is not None and upto_events is not None and since_events < upto_events
        )
        if not entries and not membership_window:
            return {"changed": [], "left": []}
        hs = self.hs
        changed: set[str] = set()
        maybe_left: set[str] = set()
        self_changed = False
        for entry in entries:
            if entry.user_id == user_id:
                self_changed = True
            elif entry.kind == KEYS:
                changed.add(entry.user_id)
            # OWN entries of other users are not for this user.
        memberships = await hs.user_rooms.get(user_id)
        mine = []
        for room_id, (membership, _, _) in list(memberships.items()):
            if membership == "join":
                room = await hs.room_states.get(room_id)
                if room is not None:
                    mine.append(room)
        if membership_window:
            assert since_events is not None and upto_events is not None
            await self._membership_changes(
                user_id, memberships, since_events, upto_events, changed, maybe_left
            )

        def shares_room(other: str) -> bool:
            return any(room.members.get(other) == "join" for room in mine)

        changed_list = sorted(u for u in changed if u != user_id and shares_room(u))
        if self_changed:
            changed_list.append(user_id)
        left = sorted(u for u in maybe_left if u != user_id and not shares_room(u))
        return {"changed": changed_list, "left": left}

    async def _membership_changes(
        self,
        user_id: str,
        memberships: dict[str, tuple[str, int, str]],
        since_events: int,
        upto_events: int,
        changed: set[str],
        maybe_left: set[str],
    ) -> None:
        """Add whom ``user_id`` newly shares a room with to ``changed``, and whom they
        may no longer share any with to ``maybe_left``: rooms' member state at
        ``since_events`` against their current state."""
        hs = self.hs
        for room_id, (membership, stream, _) in list(memberships.items()):
            if membership != "join" and stream <= since_events:
                continue  # not in the room during the window
            if stream > upto_events:
                continue  # the user's own change is for a later sync
            room = await hs.room_states.get(room_id)
            if room is None or room.last_stream <= since_events:
                continue  # nothing happened in the room
            group = await self._state_group_at(room, since_events)
            if group == room.state_group:
                continue  # no state change, so no membership change
            before = await hs.state_groups.get(group)
            was_joined = await self._joined_in(before, user_id)
            is_joined = membership == "join"
            if not was_joined and is_joined:
                changed.update(room.users_with_membership("join"))
            elif was_joined and not is_joined:
                maybe_left.update(await self._joined_members(before))
            elif was_joined and is_joined:
                # Others' joins and leaves: member events that differ from ``before``.
                moved = [
                    pdu
                    for (event_type, _), pdu in room.state.items()
                    if event_type == MEMBER and before.get((MEMBER, pdu.state_key)) != pdu.event_id
                ]
                earlier = await hs.events.get_events(
                    [
                        before[(MEMBER, p.state_key)]
                        for p in moved
                        if (MEMBER, p.state_key) in before
                    ]
                )
                for pdu in moved:
                    old_id = before.get((MEMBER, pdu.state_key))
                    old = earlier.get(old_id) if old_id is not None else None
                    joined_before = old is not None and old.content.get("membership") == "join"
                    joined_now = pdu.content.get("membership") == "join"
                    if joined_now and not joined_before:
                        changed.add(pdu.state_key)
                    elif joined_before and not joined_now:
                        maybe_left.add(pdu.state_key)

    async def _state_group_at(self, room: Any, position: int) -> int | None:
        """The room's state group after its last event at or before ``position``."""
        recent = room.recent
        if recent and recent[0][0] <= position:
            return next(g for stream, _, g in reversed(recent) if stream <= position)
        return await self.hs.events_store.get_state_group_before(room.room_id, position)

    async def _joined_in(self, state: dict[tuple[str, str], str], user_id: str) -> bool:
        event_id = state.get((MEMBER, user_id))
        if event_id is None:
            return False
        event = await self.hs.events.get_event(event_id)
        return event is not None and event.content.get("membership") == "join"

    async def _joined_members(self, state: dict[tuple[str, str], str]) -> list[str]:
        ids = [event_id for (event_type, _), event_id in state.items() if event_type == MEMBER]
        events = await self.hs.events.get_events(ids)
        return [e.state_key for e in events.values() if e.content.get("membership") == "join"]


__all__ = ["KEYS", "OWN", "DeviceListsService"]
