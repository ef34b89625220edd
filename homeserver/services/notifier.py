"""Waking whoever waits for new data, from memory.

A long-polling /sync registers for its user and the user's rooms; it is woken
as soon as anything lands for one of them: an event in a room (events,
typing, receipts) or something for the user (invites, to-device messages,
account data, presence). Never by polling.
"""

from collections.abc import Iterable
from typing import Any

from twisted.internet import defer

from storage.events import EventToPersist


class Notifier:
    def __init__(self, clock: Any, current_position: int) -> None:
        self._clock = clock
        self.position = current_position  # the events stream, persisted up to here
        self._by_room: dict[str, set[defer.Deferred[None]]] = {}
        self._by_user: dict[str, set[defer.Deferred[None]]] = {}

    def on_persisted(self, items: list[EventToPersist]) -> None:
        rooms: set[str] = set()
        users: set[str] = set()
        for item in items:
            if item.stream_ordering > self.position:
                self.position = item.stream_ordering
            pdu = item.pdu
            rooms.add(pdu.room_id)
            if pdu.type == "m.room.member":
                users.add(pdu.state_key)  # invites and kicks reach users not in the room
        self.wake(rooms, users)

    def wake(self, room_ids: Iterable[str] = (), user_ids: Iterable[str] = ()) -> None:
        woken: set[defer.Deferred[None]] = set()
        for room_id in room_ids:
            woken.update(self._by_room.pop(room_id, ()))
        for user_id in user_ids:
            woken.update(self._by_user.pop(user_id, ()))
        for d in woken:
            if not d.called:
                d.callback(None)

    async def wait(self, user_id: str, room_ids: Iterable[str], timeout_ms: int) -> None:
        """Return when something lands for the user or their rooms, or after the timeout."""
        if timeout_ms <= 0:
            return
        d: defer.Deferred[None] = defer.Deferred()
        rooms = list(room_ids)
        for room_id in rooms:
            self._by_room.setdefault(room_id, set()).add(d)
        self._by_user.setdefault(user_id, set()).add(d)
        timer = self._clock.call_later(timeout_ms / 1000, lambda: d.called or d.callback(None))
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()
            for key, table in [(r, self._by_room) for r in rooms] + [(user_id, self._by_user)]:
                waiters = table.get(key)
                if waiters is not None:
                    waiters.discard(d)
                    if not waiters:
                        del table[key]
