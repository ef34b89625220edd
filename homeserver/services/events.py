"""Reading events: an in-memory LRU in front of the events table."""

from collections import OrderedDict
from collections.abc import Iterable

from homeserver.core.events import Pdu
from storage.events import EventsStore


class EventCache:
    """The most recently used events by id (immutable, so never stale)."""

    def __init__(self, max_size: int = 50_000) -> None:
        self._events: OrderedDict[str, Pdu] = OrderedDict()
        self._max_size = max_size

    def get(self, event_id: str) -> Pdu | None:
        pdu = self._events.get(event_id)
        if pdu is not None:
            self._events.move_to_end(event_id)
        return pdu

    def put(self, pdu: Pdu) -> None:
        self._events[pdu.event_id] = pdu
        if len(self._events) > self._max_size:
            self._events.popitem(last=False)

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
            fetched = await self._store.get_events(missing)
            for pdu in fetched.values():
                self._cache.put(pdu)
            found.update(fetched)
        return found

    async def get_event(self, event_id: str) -> Pdu | None:
        return (await self.get_events([event_id])).get(event_id)
