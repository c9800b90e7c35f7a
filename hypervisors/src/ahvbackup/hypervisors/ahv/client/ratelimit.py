"""A token bucket that holds Prism to `prism_rate_rpm` requests a minute.

Prism Central throttles busy clients with 429s that cost whole seconds each; pacing ourselves
is cheaper. One bucket is shared by the PC client and every PE client of a connection, so the
whole job stays under the limit. It sleeps with trio, so tests run it on a mock clock.
"""

from __future__ import annotations

__all__ = ["RateLimitedTransport", "TokenBucket", "default_burst"]

import httpx
import trio


def default_burst(rate_rpm: int) -> int:
    """A small burst: a tenth of a minute's allowance, between 1 and 10 requests."""
    return max(1, min(10, rate_rpm // 10))


class TokenBucket:
    """`rate_rpm` tokens a minute, at most `burst` saved up; `rate_rpm=0` means unlimited.

    Waiters are served in arrival order (a fair `trio.Lock`), so a burst of concurrent
    callers is spread evenly instead of racing.
    """

    def __init__(self, rate_rpm: int, *, burst: int | None = None) -> None:
        if rate_rpm < 0:
            raise ValueError(f"rate_rpm must be 0 (unlimited) or positive, got {rate_rpm}")
        self.rate_rpm = rate_rpm
        self.burst = burst if burst is not None else default_burst(rate_rpm)
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")
        self._tokens = float(self.burst)
        self._stamp: float | None = None
        self._lock = trio.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate_rpm == 0

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            gained = (now - self._stamp) * self.rate_rpm / 60.0
            self._tokens = min(float(self.burst), self._tokens + gained)
        self._stamp = now

    async def acquire(self) -> None:
        """Take one token, sleeping until one is available."""
        if self.unlimited:
            return
        async with self._lock:
            self._refill(trio.current_time())
            if self._tokens < 1.0:
                await trio.sleep((1.0 - self._tokens) * 60.0 / self.rate_rpm)
                self._refill(trio.current_time())
            self._tokens -= 1.0


class RateLimitedTransport(httpx.AsyncBaseTransport):
    """Takes a token from `bucket` before every request sent through `inner` (retries too)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, bucket: TokenBucket) -> None:
        self.inner = inner
        self.bucket = bucket

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self.bucket.acquire()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
