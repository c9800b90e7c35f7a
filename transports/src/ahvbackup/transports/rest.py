"""The `rest` data path: read a snapshot disk as an image over HTTP ranges.

The hypervisor stages the disk (AHV: an image cloned from the snapshot) and hands over a URL,
credentials and a TLS context; this module only moves bytes. Each `read_into` is one ranged GET
on a kept-alive connection of its own, run in a worker thread so that TLS decryption happens in
C with the GIL released and the body lands in the caller's buffer through `readinto`, with no
intermediate copies. The job keeps several reads in flight.
"""

from __future__ import annotations

__all__ = ["RestDataPath", "RestDiskReader"]

import http.client
import logging
import threading
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ahvbackup.core.drivers import DataPath, DiskReader, HttpSource, HypervisorSession
from ahvbackup.core.errors import DataPathError
from ahvbackup.core.ledger import ReleaseStack
from ahvbackup.core.model import DiskSnapshot

log = logging.getLogger("ahvbackup.datapath.rest")

ATTEMPTS = 4
RETRY_STATUS = {429, 500, 502, 503, 504}
TIMEOUT = 120.0
MAX_CONNECTIONS = 16


class _Retryable(Exception):
    """A transient failure of one range read: the connection dropped, the server was busy."""


class RestDiskReader(DiskReader):
    def __init__(self, source: HttpSource, *, label: str) -> None:
        self.source = source
        self.size = source.size
        self.label = label
        url = urllib.parse.urlsplit(source.url)
        self._https = url.scheme == "https"
        self._host = url.hostname or ""
        self._port = url.port or (443 if self._https else 80)
        self._path = url.path + (f"?{url.query}" if url.query else "")
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._threads = trio.CapacityLimiter(MAX_CONNECTIONS)

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
                # not abandoned on cancel: the thread writes into `buf`, which is reused after
                await trio.to_thread.run_sync(self._get, offset, buf, limiter=self._threads)
            except _Retryable as err:
                if attempt == ATTEMPTS:
                    raise DataPathError(
                        f"rest: disk {self.label}: range {offset}+{length} failed after "
                        f"{attempt} attempts: {err}"
                    ) from err
                log.debug("rest: %s range %d+%d: %s; retrying in %.1fs",
                          self.label, offset, length, err, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 8.0)
            else:
                return

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=TIMEOUT, context=self.source.ssl_context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=TIMEOUT)

    def _get(self, offset: int, buf: memoryview) -> None:
        """One ranged GET into `buf` (blocking; runs in a worker thread)."""
        end = offset + len(buf) - 1
        conn = self._connection()
        keep = False
        try:
            conn.request("GET", self._path, headers={**self.source.headers,
                                                     "Range": f"bytes={offset}-{end}"})
            resp = conn.getresponse()
            if resp.status in RETRY_STATUS:
                resp.read()
                raise _Retryable(f"HTTP {resp.status}")
            if resp.status != 206:
                resp.read()
                raise DataPathError(
                    f"rest: disk {self.label}: range request answered HTTP {resp.status} "
                    f"instead of 206 (does {self.source.url} support ranges?)"
                )
            want = f"bytes {offset}-{end}/"
            got = resp.getheader("Content-Range", "")
            if not got.startswith(want):
                raise DataPathError(
                    f"rest: disk {self.label}: asked for {want}..., the server sent {got!r}"
                )
            pos = 0
            while pos < len(buf):
                n = resp.readinto(buf[pos:])
                if not n:
                    raise _Retryable(f"short body: {pos} of {len(buf)} bytes")
                pos += n
            if resp.read(1):
                raise DataPathError(f"rest: disk {self.label}: the server sent more than asked")
            keep = not resp.will_close
        except (OSError, http.client.HTTPException) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from err
        finally:
            if keep:
                with self._lock:
                    self._idle.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


#: each range is an HTTP request Prism must route and authenticate: fewer, larger ones
MIN_READ = 4 << 20


class RestDataPath(DataPath):
    name = "rest"
    summary = "image download over HTTP ranges (works everywhere Prism does)"

    def read_size(self) -> int:
        return max(super().read_size(), MIN_READ)

    @asynccontextmanager
    async def open(
        self, session: HypervisorSession, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> AsyncIterator[DiskReader]:
        source = await session.stage_http(disk, stack=stack)
        if source.size < disk.size:
            raise DataPathError(
                f"rest: disk {disk.disk.label}: staged image is {source.size} bytes, "
                f"the snapshot says {disk.size}"
            )
        reader = RestDiskReader(source, label=disk.disk.label)
        try:
            yield reader
        finally:
            reader.close()
