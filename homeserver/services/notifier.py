"""Waking whoever waits for new events, from memory.

Every committed batch of events advances the stream position; waiters (for
example a long-polling /sync) register for a set of rooms and are woken as
soon as an event lands in one of them, never by polling.
"""

from collections.abc import Iterable
from typing import Any

from twisted.internet import defer

from storage.events import EventToPersist


class Notifier:
    def __init__(self, clock: Any, current_position: int) -> None:
        self._clock = clock
        self.position = current_position
        self._waiters_by_room: dict[str, set[defer.Deferred[int]]] = {}

    def on_persisted(self, items: list[EventToPersist]) -> None:
        rooms: set[str] = set()
        for item in items:
            if item.stream_ordering > self.position:
                self.position = item.stream_ordering
            rooms.add(item.pdu.room_id)
        woken: set[defer.Deferred[int]] = set()
        for room_id in rooms:
            woken.update(self._waiters_by_room.pop(room_id, ()))
        for d in woken:
            if not d.called:
                d.callback(self.position)

    async def wait_for_events(self, room_ids: Iterable[str], since: int, timeout_ms: int) -> int:
        """Return the stream position once an event newer than ``since`` lands in one of
        ``room_ids``, or after ``timeout_ms``."""
        if self.position > since or timeout_ms <= 0:
            return self.position
        d: defer.Deferred[int] = defer.Deferred()
        rooms = list(room_ids)
        for room_id in rooms:
            self._waiters_by_room.setdefault(room_id, set()).add(d)
        timer = self._clock.call_later(timeout_ms / 1000, lambda: d.called or d.callback(self.position))
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()
            for room_id in rooms:
                waiters = self._waiters_by_room.get(room_id)
                if waiters is not None:
                    waiters.discard(d)
                    if not waiters:
                        del self._waiters_by_room[room_id]
