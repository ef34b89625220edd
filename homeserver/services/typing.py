"""Typing notifications: who is typing in each room, in memory only.

Typing is ephemeral: nothing is written to the database, and a restart forgets
it. Each change of a room's typing set takes the next position of the typing
stream and wakes the room's sleeping /syncs; a sync sends the room's whole
set (clients replace theirs with it) when it changed after the sync's token.
Timeouts run on the clock through one timer for every deadline.
"""

import heapq
import logging
from collections.abc import Callable, Hashable
from typing import Any

from homeserver.errors import MatrixError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MS = 30_000  # when a client says typing: true without a timeout
MAX_TIMEOUT_MS = 5 * 60_000  # a crashed client's typing shows for at most this long


class DeadlineQueue:
    """Keys that fall due at times on the clock (ms), behind a single reactor timer.

    ``schedule`` makes a key due no later than the given time; ``on_due(key)``
    runs once it is due and decides itself whether the key's deadline has
    really passed (it may schedule the key again).
    """

    def __init__(self, clock: Any, on_due: Callable[[Any], None]) -> None:
        self._clock = clock
        self._on_due = on_due
        self._heap: list[tuple[int, int, Hashable]] = []
        self._due: dict[Hashable, int] = {}
        self._counter = 0  # breaks ties so keys never need to be comparable
        self._timer: Any = None
        self._timer_at = 0

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, key: Hashable, when_ms: int) -> None:
        current = self._due.get(key)
        if current is not None and current <= when_ms:
            return  # due earlier already: on_due will schedule it again
        self._due[key] = when_ms
        self._counter += 1
        heapq.heappush(self._heap, (when_ms, self._counter, key))
        self._arm()

    def cancel(self, key: Hashable) -> None:
        self._due.pop(key, None)  # its heap entry is skipped when it comes up

    def stop(self) -> None:
        """Cancel the timer (server shutdown, tests)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # cancelled or superseded
        if not heap:
            self.stop()
            return
        due = heap[0][0]
        if self._timer is not None and self._timer.active() and self._timer_at <= due:
            return
        self.stop()
        delay_ms = max(0, due - self._clock.time_msec()) + 1
        self._timer = self._clock.call_later(delay_ms / 1000, self._fire)
        self._timer_at = due

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.time_msec()
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if self._due.get(key) != when:
                continue
            del self._due[key]
            try:
                self._on_due(key)
            except Exception:
                logger.exception("deadline handler failed for %r", key)
        self._arm()


class TypingService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.position = 0
        # room -> {user: expiry (ms)}, in the order they started typing
        self._typing: dict[str, dict[str, int]] = {}
        # room -> position of the last change of its typing set
        self._changed_at: dict[str, int] = {}
        self._deadlines = DeadlineQueue(hs.clock, self._on_due)

    async def set_typing(
        self, user_id: str, room_id: str, typing: bool, timeout_ms: int | None = None
    ) -> None:
        """Start (for ``timeout_ms``) or stop typing; only joined members may (403)."""
        room = await self.hs.room_states.get(room_id)
        if room is None or room.members.get(user_id) != "join":
            raise MatrixError("M_FORBIDDEN", "You are not joined to this room")
        if typing:
            self.start(user_id, room_id, timeout_ms)
        else:
            self.stop(user_id, room_id)
        # Federation: the room's other servers hear of it (they time typing out themselves).
        sender = getattr(self.hs, "federation_sender", None)
        if sender is not None:
            sender.on_typing(room_id, user_id, typing)

    def start(self, user_id: str, room_id: str, timeout_ms: int | None = None) -> None:
        """``user_id`` is typing in the room (no membership check: federation uses it too)."""
        if timeout_ms is None:
            timeout_ms = DEFAULT_TIMEOUT_MS
        expiry = self.hs.clock.time_msec() + max(0, min(timeout_ms, MAX_TIMEOUT_MS))
        users = self._typing.setdefault(room_id, {})
        is_new = user_id not in users
        users[user_id] = expiry
        self._deadlines.schedule((room_id, user_id), expiry)
        if is_new:
            self._changed(room_id)

    def stop(self, user_id: str, room_id: str) -> None:
        users = self._typing.get(room_id)
        if not users or users.pop(user_id, None) is None:
            return
        if not users:
            del self._typing[room_id]
        self._deadlines.cancel((room_id, user_id))
        self._changed(room_id)

    def typing_users(self, room_id: str) -> list[str]:
        return list(self._typing.get(room_id, ()))

    def typing_event(self, room_id: str, since_pos: int | None) -> dict[str, Any] | None:
        """The room's m.typing event if its set changed after ``since_pos``.

        ``since_pos`` None (an initial sync) gives the event when anyone is
        typing. A position beyond ours is a token from before a restart: it
        is answered like an initial sync.
        """
        if since_pos is None or since_pos > self.position:
            users = self._typing.get(room_id)
            return _event(list(users)) if users else None
        changed = self._changed_at.get(room_id)
        if changed is None or changed <= since_pos:
            return None
        return _event(self.typing_users(room_id))

    def shutdown(self) -> None:
        self._deadlines.stop()

    def _changed(self, room_id: str) -> None:
        self.position += 1
        self._changed_at[room_id] = self.position
        self.hs.notifier.wake(room_ids=[room_id])

    def _on_due(self, key: tuple[str, str]) -> None:
        room_id, user_id = key
        expiry = self._typing.get(room_id, {}).get(user_id)
        if expiry is None:
            return
        if expiry > self.hs.clock.time_msec():
            self._deadlines.schedule(key, expiry)
        else:
            self.stop(user_id, room_id)


def _event(user_ids: list[str]) -> dict[str, Any]:
    return {"type": "m.typing", "content": {"user_ids": user_ids}}
