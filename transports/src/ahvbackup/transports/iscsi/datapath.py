"""The `iscsi` data path: read a snapshot disk through a volume group over our own initiator.

The hypervisor stages the disk (`HypervisorSession.stage_iscsi`: a VG cloned from the snapshot
disk, our IQN attached, each step on the cleanup ledger first); this module discovers the target
on the portal, logs in, checks the LUN is as large as the API said, and reads with several
commands in flight. The session lives in a trio system task so that `open` can return a reader
that the job closes later (logout), whichever task it reads from.
"""

from __future__ import annotations

__all__ = ["IscsiDataPath", "IscsiDiskReader", "initiator_iqn"]

import logging
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import trio

from ahvbackup.core.drivers import DataPath, DiskReader, HypervisorSession, IscsiSource
from ahvbackup.core.errors import DataPathError
from ahvbackup.core.ledger import ReleaseStack
from ahvbackup.core.model import DiskSnapshot

from .initiator import IscsiSession, discover
from .login import ChapCredentials

log = logging.getLogger("ahvbackup.datapath.iscsi")

QUEUE_DEPTH = 16
MAX_TRANSFER = 1 << 20
_SYSTEM_IQN = Path("/etc/iscsi/initiatorname.iscsi")
_IQN = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")


def initiator_iqn(config: Any) -> str:
    """Our IQN: `iscsi_initiator` when set; else the host's (/etc/iscsi/initiatorname.iscsi);
    else one generated once and kept in state_dir, so attachments stay recognisable."""
    value = str(getattr(config, "iscsi_initiator", "auto") or "auto")
    if value != "auto":
        if not _IQN.match(value):
            raise DataPathError(f"iscsi_initiator: not an iSCSI name (iqn./eui./naa.) "
                                f"(got {value!r})")
        return value
    try:
        for line in _SYSTEM_IQN.read_text().splitlines():
            key, _, name = line.strip().partition("=")
            if key == "InitiatorName" and _IQN.match(name.strip()):
                return name.strip()
    except OSError:
        pass
    state = Path(config.state_dir) / "iscsi_initiator"
    try:
        name = state.read_text().strip()
        if _IQN.match(name):
            return name
    except OSError:
        pass
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()) or "host"
    name = f"iqn.2024-01.org.ahvbackup:{host}-{secrets.token_hex(4)}"
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(name + "\n")
    tmp.replace(state)
    return name


class IscsiDiskReader(DiskReader):
    """Reads one LUN; `aclose` logs out. Reads need not be block-aligned."""

    def __init__(self, source: IscsiSource, *, initiator: str, label: str,
                 queue_depth: int = QUEUE_DEPTH, max_transfer: int = MAX_TRANSFER) -> None:
        self.source = source
        self.size = source.size
        self.label = label
        self._initiator = initiator
        self._queue_depth = queue_depth
        self._max_transfer = max_transfer
        self._session: IscsiSession | None = None
        self._error: BaseException | None = None
        self._ready = trio.Event()
        self._closing = trio.Event()
        self._closed = trio.Event()

    async def start(self) -> None:
        trio.lowlevel.spawn_system_task(self._host, name=f"iscsi session {self.label}")
        try:
            await self._ready.wait()
        except BaseException:
            self._closing.set()
            raise
        if self._error is not None:
            raise self._error
        assert self._session is not None
        have = self._session.size
        if have < self.size:
            await self.aclose()
            raise DataPathError(
                f"iscsi: disk {self.label}: LUN {self.source.lun} of {self.source.target_iqn} "
                f"holds {have} bytes, but the API said the disk has {self.size}; refusing to "
                "back up a truncated disk")

    async def _host(self) -> None:
        src = self.source
        chap = None
        if src.chap is not None:
            chap = ChapCredentials(src.chap[0], src.chap[1])
        try:
            async with IscsiSession.connect(
                portal=src.portal, target_iqn=src.target_iqn, initiator_iqn=self._initiator,
                chap=chap, lun=src.lun, queue_depth=self._queue_depth,
                max_transfer=self._max_transfer,
            ) as session:
                self._session = session
                self._ready.set()
                await self._closing.wait()
        except Exception as err:  # handed to the job's task, which raises it
            self._error = err
        finally:
            self._session = None
            self._ready.set()
            self._closed.set()

    async def read_into(self, offset: int, buf: memoryview) -> None:
        session = self._session
        if session is None:
            raise self._error or DataPathError(f"iscsi: disk {self.label}: session is closed")
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise DataPathError(f"iscsi: disk {self.label}: read of {length} bytes at {offset} "
                                f"is past its end ({self.size} bytes)")
        bs = session.capacity.block_size if session.capacity else 512
        if offset % bs == 0 and length % bs == 0:
            await session.read_into(offset, buf)
            return
        start = offset - offset % bs
        end = -(-(offset + length) // bs) * bs
        bounce = bytearray(end - start)
        await session.read_into(start, memoryview(bounce))
        buf[:] = memoryview(bounce)[offset - start : offset - start + length]

    async def aclose(self) -> None:
        self._closing.set()
        with trio.move_on_after(30):
            await self._closed.wait()


class IscsiDataPath(DataPath):
    name = "iscsi"
    summary = "iSCSI through a volume group on the data services IP (user-space initiator)"

    async def open(
        self, session: HypervisorSession, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> DiskReader:
        me = initiator_iqn(self.config)
        source = await session.stage_iscsi(disk, initiator_iqn=me, stack=stack)
        found = await discover(source.portal, initiator_iqn=me)
        match = next((t for t in found if t.iqn == source.target_iqn), None)
        if match is None:
            raise DataPathError(
                f"iscsi: disk {disk.disk.label}: portal {source.portal[0]}:{source.portal[1]} "
                f"does not offer {source.target_iqn} to {me} (offers: "
                f"{', '.join(t.iqn for t in found) or 'nothing'})")
        if match.portals:
            host, port, _tpgt = match.portals[0]
            source = IscsiSource(portal=(host, port), target_iqn=source.target_iqn,
                                 lun=source.lun, size=source.size, chap=source.chap)
        log.debug("iscsi: disk %s: %s at %s:%d as %s", disk.disk.label, source.target_iqn,
                  source.portal[0], source.portal[1], me)
        reader = IscsiDiskReader(source, initiator=me, label=disk.disk.label)
        await reader.start()
        return reader
