"""Allocating stream orderings.

Stream orderings are handed out when an event is built (so the room's
in-memory state can move on before the write commits) and become visible to
readers in order, once persisted. This allocator serves one writer process;
several processes writing one PostgreSQL database need a shared sequence and
per-writer positions, which the multi-process work adds.
"""


class StreamIdAllocator:
    def __init__(self, current: int) -> None:
        self._next = current + 1
        self.persisted_upto = current

    def next(self) -> int:
        value = self._next
        self._next += 1
        return value

    def mark_persisted(self, position: int) -> None:
        if position > self.persisted_upto:
            self.persisted_upto = position
