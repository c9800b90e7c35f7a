"""A token bucket on trio's clock: `max_bandwidth_mbps` on the bytes a DR push puts on the wire.

Time comes from `trio.current_time` and waits are `trio.sleep_until`, so a test on
`trio.testing.MockClock` measures the cap exactly.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]

import trio


class TokenBucket:
    """At most `rate` bytes a second on average, with up to `burst` bytes sent at once after
    an idle spell. `take(n)` waits until `n` bytes may go, so by time t at most
    ``rate * t + burst`` bytes went (frames are never split for the bucket)."""

    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"TokenBucket needs a positive rate and burst (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None

    @classmethod
    def mbps(cls, mbps: int, *, burst: int = 64 << 10) -> TokenBucket | None:
        """The bucket of a `max_bandwidth_mbps` value (megabits a second); None for 0, no cap."""
        return cls(rate=mbps * 1_000_000 / 8, burst=burst) if mbps > 0 else None

    async def take(self, n: int) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        deficit = n - self._tokens
        if deficit > 0:
            until = now + deficit / self.rate
            await trio.sleep_until(until)
            self._tokens, self._stamp = 0.0, until
        else:
            self._tokens -= n
