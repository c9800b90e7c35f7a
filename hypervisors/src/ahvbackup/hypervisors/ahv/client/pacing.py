"""When to look at a Prism task again: shaped by how long tasks of its kind took.

Every poll is a request under `prism_rate_rpm`, so polling a task that cannot be done yet wastes
the budget the next VM needs. The first look waits as long as the last task of the same kind
(`expect`, e.g. "vg create") took to be seen done; only a task slower than that is polled again,
backing off. A task seen done at the first look lets the next one look a little sooner, never
sooner than the caller's `poll`.
"""

from __future__ import annotations

__all__ = ["TaskPacer"]

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

#: after a task seen done at its first look, the next first look comes this much sooner
_SOONER = 0.9
#: a re-poll after a miss waits at least this share of the first wait, growing by _BACKOFF
_RETRY_SHARE = 0.5
_BACKOFF = 1.5


class TaskPacer:
    """Expected durations by task kind, learned over one connection."""

    def __init__(self) -> None:
        self._expected: dict[str, float] = {}

    def expected(self, expect: str, *, poll: float) -> float:
        return self._expected.get(expect, poll)

    async def until(
        self, look: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, expect: str,
        poll: float, poll_cap: float, seen: list[T],
    ) -> None:
        """Call `look` (first after the expected duration) until `done` says so; every
        answer is appended to `seen` (so a caller's timeout still has the last one)."""
        started = trio.current_time()
        first = min(poll_cap, self.expected(expect, poll=poll))
        delay = first
        looks = 0
        while True:
            await trio.sleep(delay)
            asked = trio.current_time()
            seen.append(await look())
            looks += 1
            if done(seen[-1]):
                took = asked - started
                self._expected[expect] = (max(poll, first * _SOONER) if looks == 1
                                          else min(poll_cap, took))
                return
            delay = min(poll_cap, max(poll, first * _RETRY_SHARE) if looks == 1
                        else delay * _BACKOFF)
