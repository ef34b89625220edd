"""The device-list stream: whose devices changed, for /sync and /keys/changes.

The stream gets an entry (durably, see ``storage/e2e_keys.py``) whenever a
local user's device keys or cross-signing keys change, a device with keys is
deleted, or a user's joined state in a room changes. ``changes_for`` turns the
entries between two positions into the spec's ``{changed, left}`` for one
user, from the rooms they are in now:

- ``changed``: users sharing a room with them whose keys changed, and users
  they newly share a room with (a join by either side);
- ``left``: users they shared a room with through a room somebody left, and
  now share none with.

Recent entries are kept in memory (the latest ``RECENT_ENTRIES``, loaded at
start-up, plus everything since), so a /sync never reaches the database for
this unless its token is older than that window; a /sync whose token is at
the current position does no work at all.

Key changes are written by the end-to-end keys service through ``write``;
membership changes are recorded here from every persisted batch of events.
When an entry becomes visible, syncs of the user and of the rooms involved are
woken.
"""

import bisect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import attrs
from twisted.internet import defer

from homeserver.core.events import MEMBER
from homeserver.services.account_data import StreamWriter
from storage.e2e_keys import JOIN, KEYS, LEAVE, OWN, DeviceListsStore, StreamEntry

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
        persister = getattr(hs, "persister", None)
        if persister is not None:
            persister.on_persisted.append(self.on_persisted)

    @property
    def position(self) -> int:
        return self._stream.position

    def is_mine(self, user_id: str) -> bool:
        return user_id.startswith("@") and user_id.partition(":")[2] == self.server_name

    # --- writing ---------------------------------------------------------------------------
    async def write(
        self,
        user_id: str,
        kind: str,
        write: Callable[[int], Awaitable[tuple[R, bool]]],
    ) -> R:
        """Run ``write(stream_id)``, a transaction announcing a ``kind`` change of ``user_id``.

        ``write`` returns (its result, whether it added the stream row); the
        change becomes visible (and wakes syncs) once every earlier one has.
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
        return result

    def on_persisted(self, items: list[Any]) -> None:
        """The persister's hook: record joins and leaves (in the background)."""
        members = [item for item in items if item.pdu.type == MEMBER]
        if members:
            defer.ensureDeferred(self._record_memberships(members)).addErrback(
                lambda f: logger.error(
                    "recording membership changes in the device-list stream failed",
                    exc_info=(f.type, f.value, f.getTracebackObject()),
                )
            )

    async def _record_memberships(self, items: list[Any]) -> None:
        rows: list[tuple[str, str, str]] = []
        for item in items:
            pdu = item.pdu
            joined = pdu.content.get("membership") == "join"
            if joined != await self._was_joined(item):
                rows.append((pdu.state_key, JOIN if joined else LEAVE, pdu.room_id))
        if not rows:
            return
        stream_id = self._stream.allocate()
        try:
            await self.store.add_entries(stream_id, rows)
        except BaseException:
            self._stream.finish(stream_id)
            raise
        entries = [StreamEntry(stream_id, *row) for row in rows]
        self._stream.finish(
            stream_id,
            _Visible(entries, sorted({r[2] for r in rows}), sorted({r[0] for r in rows})),
        )

    async def _was_joined(self, item: Any) -> bool:
        """Whether the member event's user was joined before it."""
        if item.prev_state_group is None:
            return False
        state = await self.hs.state_groups.get(item.prev_state_group)
        event_id = state.get((MEMBER, item.pdu.state_key))
        if event_id is None:
            return False
        event = await self.hs.events.get_event(event_id)
        return event is not None and event.content.get("membership") == "join"

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
        if since >= self._floor:
            start = bisect.bisect_right(self._recent_ids, since)
            end = bisect.bisect_right(self._recent_ids, upto)
            return self._recent[start:end]
        return await self.store.entries_between(since, upto)

    async def _joined_rooms(self, user_id: str) -> list[str]:
        rooms = await self.hs.user_rooms.get(user_id)
        return [room_id for room_id, (m, _, _) in rooms.items() if m == "join"]

    async def changes_for(self, user_id: str, since: int, upto: int) -> dict[str, list[str]]:
        """``{changed, left}`` for ``user_id`` between stream positions (since, upto]."""
        upto = min(upto, self.position)
        if since >= upto:
            return {"changed": [], "left": []}
        entries = await self._entries(since, upto)
        if not entries:
            return {"changed": [], "left": []}
        hs = self.hs
        my_rooms = await self._joined_rooms(user_id)
        my_room_set = set(my_rooms)
        rooms: dict[str, Any] = {}

        async def joined_members(room_id: str) -> Iterable[str]:
            room = rooms.get(room_id)
            if room is None:
                room = rooms[room_id] = await hs.room_states.get(room_id)
            if room is None:
                return ()
            return room.users_with_membership("join")

        my_room_changes = {e.room_id for e in entries if e.user_id == user_id and e.room_id}
        changed: set[str] = set()
        maybe_left: set[str] = set()
        self_changed = False  # the user's own devices or keys (their other devices care)
        for entry in entries:
            other = entry.user_id
            if entry.kind == KEYS or entry.kind == OWN:
                if other == user_id:
                    self_changed = True
                elif entry.kind == KEYS:
                    changed.add(other)
            elif entry.kind == JOIN:
                if entry.room_id not in my_room_set:
                    continue
                if other == user_id:
                    changed.update(await joined_members(entry.room_id))
                else:
                    changed.add(other)
            elif entry.kind == LEAVE:
                if other == user_id:
                    maybe_left.update(await joined_members(entry.room_id))
                elif entry.room_id in my_room_set or entry.room_id in my_room_changes:
                    maybe_left.add(other)
        for room_id in my_rooms:
            if room_id not in rooms:
                rooms[room_id] = await hs.room_states.get(room_id)
        mine = [rooms[r] for r in my_rooms if rooms.get(r) is not None]

        def shares_room(other: str) -> bool:
            return any(room.members.get(other) == "join" for room in mine)

        left = sorted(u for u in maybe_left if u != user_id and not shares_room(u))
        changed_list = sorted(u for u in changed if u != user_id and shares_room(u))
        if self_changed:
            changed_list.append(user_id)
        return {"changed": changed_list, "left": left}
