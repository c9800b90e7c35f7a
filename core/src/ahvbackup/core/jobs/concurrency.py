"""Running work items under a concurrency limit, in order, in one place."""

from __future__ import annotations

__all__ = ["each_limited"]

from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio

T = TypeVar("T")


async def each_limited(items: Iterable[T], limit: int,
                       work: Callable[[T], Awaitable[None]]) -> None:
    """`work(item)` for every item, started in order, at most `limit` running at once.

    The slot is taken before an item starts and given back when it ends, here, so no caller
    hands a semaphore to a callee to release. The first exception cancels the rest (a nursery).
    """
    slots = trio.Semaphore(max(1, limit))

    async def one(item: T) -> None:
        try:
            await work(item)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for item in items:
            await slots.acquire()
            nursery.start_soon(one, item)
