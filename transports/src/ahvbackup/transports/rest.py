"""The `rest` data path: read a snapshot disk as an image over HTTP ranges.

The hypervisor stages the disk (AHV: an image cloned from the snapshot) and hands over a URL and
an authenticated client; this module only moves bytes. Each `read_into` is one ranged GET whose
body is streamed straight into the caller's buffer; the job keeps several in flight.
"""

from __future__ import annotations

__all__ = ["RestDataPath", "RestDiskReader"]

import logging

import httpx
import trio

from ahvbackup.core.drivers import DataPath, DiskReader, HttpSource, HypervisorSession
from ahvbackup.core.errors import DataPathError
from ahvbackup.core.ledger import ReleaseStack
from ahvbackup.core.model import DiskSnapshot

log = logging.getLogger("ahvbackup.datapath.rest")

ATTEMPTS = 4
RETRY_STATUS = {429, 500, 502, 503, 504}


class RestDiskReader(DiskReader):
    def __init__(self, source: HttpSource, *, label: str) -> None:
        self.source = source
        self.size = source.size
        self.label = label

    async def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise DataPathError(
                f"rest: disk {self.label}: read of {length} bytes at {offset} is past its end "
                f"({self.size} bytes)"
            )
        delay = 0.5
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await self._get(offset, buf)
                return
            except (httpx.TransportError, _Retryable) as err:
                if attempt == ATTEMPTS:
                    raise DataPathError(
                        f"rest: disk {self.label}: range {offset}+{length} failed after "
                        f"{attempt} attempts: {err}"
                    ) from err
                log.debug("rest: %s range %d+%d: %s; retrying in %.1fs",
                          self.label, offset, length, err, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 8.0)

    async def _get(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf) - 1
        headers = {"Range": f"bytes={offset}-{end}"}
        async with self.source.client.stream("GET", self.source.url, headers=headers) as resp:
            if resp.status_code in RETRY_STATUS:
                raise _Retryable(f"HTTP {resp.status_code}")
            if resp.status_code != 206:
                raise DataPathError(
                    f"rest: disk {self.label}: range request answered HTTP {resp.status_code} "
                    f"instead of 206 (is Range supported by {self.source.url}?)"
                )
            want = f"bytes {offset}-{end}/"
            got = resp.headers.get("content-range", "")
            if not got.startswith(want):
                raise DataPathError(
                    f"rest: disk {self.label}: asked for {want}..., server sent {got!r}"
                )
            pos = 0
            async for chunk in resp.aiter_raw():
                n = len(chunk)
                if pos + n > len(buf):
                    raise DataPathError(f"rest: disk {self.label}: server sent more than asked")
                buf[pos : pos + n] = chunk
                pos += n
            if pos != len(buf):
                raise _Retryable(f"short body: {pos} of {len(buf)} bytes")


class _Retryable(Exception):
    pass


class RestDataPath(DataPath):
    name = "rest"
    summary = "image download over HTTP ranges (works everywhere Prism does)"

    async def open(
        self, session: HypervisorSession, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> DiskReader:
        source = await session.stage_http(disk, stack=stack)
        if source.size < disk.size:
            raise DataPathError(
                f"rest: disk {disk.disk.label}: staged image is {source.size} bytes, "
                f"the snapshot says {disk.size}"
            )
        return RestDiskReader(source, label=disk.disk.label)
