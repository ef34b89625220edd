"""Batched, durable event persistence.

Events are queued as they are built and written in one transaction per
batch; each sender's request completes only once its event has committed.
A batch is what was queued in one turn of the reactor (the write starts on
the next turn), and while one batch is being written the next accumulates,
so concurrent senders share transactions instead of queueing for the writer
one by one. A small batch is a ``quick`` write: on SQLite it commits on the
reactor thread when the writer thread is idle (see storage/database.py).
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from storage.events import EventsStore, EventToPersist

logger = logging.getLogger(__name__)

MAX_BATCH = 200
MAX_FAILED = 10_000
# A batch is written inline (``quick``) up to this many events and state rows.
QUICK_EVENTS = 50
QUICK_STATE_ROWS = 1_000


class PersistError(Exception):
    """An event could not be stored (or follows one that could not)."""


class EventPersister:
    def __init__(
        self, store: EventsStore, call_soon: Callable[[Callable[[], Any]], Any] | None = None
    ) -> None:
        self._store = store
        # Runs the drain on the next reactor turn (so one turn's events share a
        # batch); without it, at once.
        self._call_soon = call_soon or (lambda f: f())
        self._queue: list[tuple[EventToPersist, defer.Deferred[None]]] = []
        # Event ids whose persisting failed (most recent last): anything built on
        # them is refused too, however late it is queued.
        self._failed: OrderedDict[str, None] = OrderedDict()
        self._running = False
        # Called with each committed batch, in stream order, on the reactor:
        # ``on_stored`` with every event (the in-memory caches), then
        # ``on_persisted`` with those in the rooms' timelines (not outliers or
        # rejected events from other servers: federation, presence, relations,
        # the user directory); then the senders' requests complete (their
        # responses leave at once); then ``on_announced`` with every event
        # (unread counts, then waking syncs). All in one reactor turn, so no
        # other request runs in between.
        self.on_stored: list[Callable[[list[EventToPersist]], Any]] = []
        self.on_announced: list[Callable[[list[EventToPersist]], Any]] = []
        self.on_persisted: list[Callable[[list[EventToPersist]], Any]] = []
        # Called with the room ids of a failed batch so their caches reload.
        self.on_failed: list[Callable[[set[str]], Any]] = []

    def persist(self, item: EventToPersist) -> "defer.Deferred[None]":
        d: defer.Deferred[None] = defer.Deferred()
        failed = [p for p in item.pdu.prev_event_ids if p in self._failed]
        if failed:
            # Built on an event that was never stored: it must not be stored either.
            self._failed[item.pdu.event_id] = None
            d.errback(PersistError(f"{item.pdu.event_id} follows {failed[0]}, which failed"))
            return d
        self._queue.append((item, d))
        if not self._running:
            self._running = True
            self._call_soon(lambda: defer.ensureDeferred(self._drain()))
        return d

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                items = [item for item, _ in batch]
                try:
                    await self._store.persist_events(items, quick=_is_quick(items))
                except Exception as e:
                    self._fail(batch, e)
                    continue
                self._run_hooks(self.on_stored, items)
                self._run_hooks(self.on_persisted, [item for item in items if item.in_timeline])
                for _, d in batch:
                    d.callback(None)
                self._run_hooks(self.on_announced, items)
        finally:
            self._running = False

    @staticmethod
    def _run_hooks(hooks: list[Callable[[list[EventToPersist]], Any]],
                   items: list[EventToPersist]) -> None:
        for hook in hooks if items else ():
            try:
                hook(items)
            except Exception:
                logger.exception("after-persist hook failed")

    def _fail(self, batch: list[tuple[EventToPersist, defer.Deferred[None]]], error: Exception) -> None:
        """A failed batch fails its events and every queued event built on them."""
        logger.error("persisting %d events failed: %r", len(batch), error)
        rooms = {item.pdu.room_id for item, _ in batch}
        dependent = [(i, d) for i, d in self._queue if i.pdu.room_id in rooms]
        self._queue = [(i, d) for i, d in self._queue if i.pdu.room_id not in rooms]
        for item, _ in batch + dependent:
            self._failed[item.pdu.event_id] = None
        while len(self._failed) > MAX_FAILED:
            self._failed.popitem(last=False)
        for callback in self.on_failed:
            callback(rooms)
        for _, d in batch + dependent:
            d.errback(error)


def _is_quick(items: list[EventToPersist]) -> bool:
    """Whether a batch is small enough to write on the reactor thread."""
    if len(items) > QUICK_EVENTS:
        return False
    state_rows = sum(len(item.state_after) for item in items if item.state_after)
    return state_rows <= QUICK_STATE_ROWS
