"""Progress on a terminal: a one-line meter on stderr while a job moves bytes."""

from __future__ import annotations

__all__ = ["Meter"]

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class Meter:
    """Counts bytes; `running()` redraws one stderr line twice a second when it is a TTY."""

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.done = 0
        self.total = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._start = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n

    def line(self) -> str:
        secs = max(time.monotonic() - self._start, 1e-9)
        mib = self.done / (1 << 20)
        total = f" of {self.total / (1 << 20):,.0f} MiB" if self.total else " MiB"
        return f"{self.label}: {mib:,.0f}{total}, {self.done / secs / 1e6:,.1f} MB/s"

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Meter]:
        if not self.enabled:
            yield self
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._draw)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()

    async def _draw(self) -> None:
        while True:
            sys.stderr.write("\r\033[K" + self.line())
            sys.stderr.flush()
            await trio.sleep(0.5)
