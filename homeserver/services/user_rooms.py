"""Each local user's rooms and membership in them, kept in memory.

Loaded from the database on a user's first /sync, then updated from every
persisted membership event, so a sync never asks the database which rooms
its user is in.
"""

from typing import Any

from storage.events import EventsStore, EventToPersist

Membership = tuple[str, int, str]  # (membership, stream ordering, event id)


class UserRooms:
    def __init__(self, store: EventsStore) -> None:
        self._store = store
        self._users: dict[str, dict[str, Membership]] = {}

    async def get(self, user_id: str) -> dict[str, Membership]:
        rooms = self._users.get(user_id)
        if rooms is None:
            rooms = await self._store.get_user_memberships(user_id)
            # A membership persisted while we were loading is already in the map.
            rooms = self._users.setdefault(user_id, rooms)
        return rooms

    def on_persisted(self, items: list[EventToPersist]) -> None:
        for item in items:
            members = [item.pdu] if item.pdu.type == "m.room.member" else []
            if item.current_state_delta:
                # State resolution (or a join over federation) can change other
                # users' memberships than the event's own.
                members += [p for (t, _), p in item.current_state_delta.items()
                            if t == "m.room.member" and p is not None and p is not item.pdu]
            for pdu in members:
                rooms = self._users.get(pdu.state_key)
                if rooms is not None:
                    rooms[pdu.room_id] = (
                        pdu.content.get("membership", "leave"), item.stream_ordering,
                        pdu.event_id,
                    )

    def forget(self, user_id: str, room_id: str) -> None:
        rooms = self._users.get(user_id)
        if rooms is not None:
            rooms.pop(room_id, None)

    def joined_rooms(self, rooms: dict[str, Membership]) -> list[str]:
        return [r for r, (m, _, _) in rooms.items() if m == "join"]


class StateGroupCache:
    """Full state maps of state groups, built from cached ancestors (LRU)."""

    def __init__(self, store: EventsStore, max_size: int = 5000) -> None:
        from collections import OrderedDict

        self._store = store
        self._groups: OrderedDict[int, dict[tuple[str, str], str]] = OrderedDict()
        self._max_size = max_size

    def put(self, group: int, state: dict[tuple[str, str], str]) -> None:
        self._groups[group] = state
        if len(self._groups) > self._max_size:
            self._groups.popitem(last=False)

    async def get(self, group: int | None) -> dict[tuple[str, str], str]:
        if group is None:
            return {}
        state = self._groups.get(group)
        if state is not None:
            self._groups.move_to_end(group)
            return state
        # Walk back to a cached ancestor or a snapshot, then apply deltas forward.
        chain: list[dict[tuple[str, str], str]] = []
        base: dict[tuple[str, str], str] = {}
        current: int | None = group
        while current is not None:
            cached = self._groups.get(current)
            if cached is not None:
                base = cached
                break
            delta = await self._store.get_state_group_delta(current)
            if delta is None:
                break
            prev_group, entries = delta
            chain.append(entries)
            current = prev_group
        state = dict(base)
        for entries in reversed(chain):
            state.update(entries)
        self.put(group, state)
        return state


__all__: list[Any] = ["StateGroupCache", "UserRooms"]
