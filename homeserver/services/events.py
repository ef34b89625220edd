"""Reading events: an in-memory LRU in front of the events table."""

from collections import OrderedDict
from collections.abc import Iterable

from homeserver.core.events import Pdu
from storage.events import EventsStore


class EventCache:
    """The most recently used events by id, with the (device, txn_id) they were sent with.

    Events are immutable except for redaction, which replaces the cached entry.
    """

    def __init__(self, max_size: int = 50_000) -> None:
        self._events: OrderedDict[str, Pdu] = OrderedDict()
        self._txn_ids: dict[str, tuple[str, str]] = {}
        self._max_size = max_size

    def get(self, event_id: str) -> Pdu | None:
        pdu = self._events.get(event_id)
        if pdu is not None:
            self._events.move_to_end(event_id)
        return pdu

    def txn_id_of(self, event_id: str) -> tuple[str, str] | None:
        return self._txn_ids.get(event_id)

    def put(self, pdu: Pdu, txn_id: tuple[str, str] | None = None) -> None:
        self._events[pdu.event_id] = pdu
        self._events.move_to_end(pdu.event_id)
        if txn_id is not None:
            self._txn_ids[pdu.event_id] = txn_id
        if len(self._events) > self._max_size:
            old_id, _ = self._events.popitem(last=False)
            self._txn_ids.pop(old_id, None)

    def clear(self) -> None:
        self._events.clear()
        self._txn_ids.clear()

    def __len__(self) -> int:
        return len(self._events)


class EventsService:
    def __init__(self, store: EventsStore, cache: EventCache) -> None:
        self._store = store
        self._cache = cache

    async def get_events(self, event_ids: Iterable[str]) -> dict[str, Pdu]:
        found: dict[str, Pdu] = {}
        missing = []
        for event_id in event_ids:
            pdu = self._cache.get(event_id)
            if pdu is None:
                missing.append(event_id)
            else:
                found[event_id] = pdu
        if missing:
            fetched, txn_ids = await self._store.get_events_with_txn_ids(missing)
            for event_id, pdu in fetched.items():
                self._cache.put(pdu, txn_ids.get(event_id))
            found.update(fetched)
        return found

    async def get_event(self, event_id: str) -> Pdu | None:
        return (await self.get_events([event_id])).get(event_id)
