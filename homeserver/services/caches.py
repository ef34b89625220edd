"""An LRU cache whose loads never overwrite a newer invalidation.

A reader notes the key's ``generation`` before it loads and passes it to
``put``; an ``invalidate`` in between moves the generation on, so the value
loaded before the change is not stored (the next read loads again).
"""

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class GenerationLru(Generic[K, V]):
    def __init__(self, max_size: int) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._generation: dict[K, int] = {}
        self._max_size = max_size

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def generation(self, key: K) -> int:
        return self._generation.get(key, 0)

    def put(self, key: K, generation: int, value: V) -> None:
        if self._generation.get(key, 0) != generation:
            return  # changed while loading: the next read loads again
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._max_size:
            old, _ = self._entries.popitem(last=False)
            self._generation.pop(old, None)

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)
        self._generation[key] = self._generation.get(key, 0) + 1
        if len(self._generation) > 4 * self._max_size:
            # Forget the counters of keys nobody has cached (they restart at 0; a
            # load in flight for one of them may then store a stale value, dropped
            # again by that key's next invalidation).
            self._generation = {k: g for k, g in self._generation.items() if k in self._entries}
