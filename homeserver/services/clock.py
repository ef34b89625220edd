"""Time, through the reactor, so tests can drive it with a fake clock."""

from collections.abc import Callable
from typing import Any


class Clock:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def time_msec(self) -> int:
        return int(self._reactor.seconds() * 1000)

    def call_later(self, delay_s: float, func: Callable[..., Any], *args: Any) -> Any:
        return self._reactor.callLater(delay_s, func, *args)
