"""Coalescing concurrent calls: one fetch per key, every caller gets its result.

Key fetches and ``/.well-known`` look-ups are asked for by many requests at
once; only the first starts the work, the others wait for the same result.
"""

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")


class InFlight(Generic[T]):
    def __init__(self) -> None:
        self._waiters: dict[Hashable, list[defer.Deferred[T]]] = {}

    def busy(self, key: Hashable) -> bool:
        return key in self._waiters

    async def run(self, key: Hashable, func: Callable[[], Awaitable[T]]) -> T:
        """``await func()`` unless a call for ``key`` is already running: then its result."""
        waiters = self._waiters.get(key)
        if waiters is not None:
            d: defer.Deferred[T] = defer.Deferred()
            waiters.append(d)
            return await d
        self._waiters[key] = waiters = []
        outcome: Any
        try:
            result = await func()
            outcome = result
        except BaseException:
            outcome = Failure()
            raise
        finally:
            del self._waiters[key]
            for d in waiters:
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(outcome)
        return result
