"""Token-bucket rate limiting from the ``rc_*`` settings.

A refused action raises 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``.
State is in memory per process: limits are per process, as in Synapse.
"""

from typing import Any

from homeserver.errors import MatrixError
from homeserver.services.clock import Clock


class Ratelimiter:
    def __init__(self, clock: Clock, per_second: float, burst_count: float) -> None:
        self._clock = clock
        self.per_second = per_second
        self.burst_count = burst_count
        # key -> (tokens used, time of last update in ms)
        self._buckets: dict[Any, tuple[float, int]] = {}

    def check(self, key: Any, cost: float = 1.0, update: bool = True) -> None:
        """Take ``cost`` from ``key``'s bucket, or raise M_LIMIT_EXCEEDED."""
        if self.per_second <= 0 and self.burst_count <= 0:
            return
        now = self._clock.time_msec()
        used, last = self._buckets.get(key, (0.0, now))
        used = max(0.0, used - (now - last) / 1000.0 * self.per_second)
        if used + cost > self.burst_count:
            wait_s = (used + cost - self.burst_count) / self.per_second if self.per_second else 3600
            raise MatrixError(
                "M_LIMIT_EXCEEDED", "Too many requests", retry_after_ms=max(1, int(wait_s * 1000))
            )
        if update:
            self._buckets[key] = (used + cost, now)
        if len(self._buckets) > 100_000:
            self._prune(now)

    def _prune(self, now: int) -> None:
        for key, (used, last) in list(self._buckets.items()):
            if used - (now - last) / 1000.0 * self.per_second <= 0:
                del self._buckets[key]


def ratelimiter_from_config(clock: Clock, setting: dict[str, Any]) -> Ratelimiter:
    return Ratelimiter(clock, float(setting.get("per_second", 0)), float(setting.get("burst_count", 0)))
