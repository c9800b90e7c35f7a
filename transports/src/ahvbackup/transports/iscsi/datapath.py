"""The `iscsi` data path: read a snapshot disk through a volume group over our own initiator.

The hypervisor stages a backup's disks once per VM (`stage`, `HypervisorSession.stage_iscsi_vm`:
one VG cloned from all of the snapshot's disks, a LUN each, our IQN attached, each step on the
cleanup ledger first; `open` stages a lone disk the same way); this module discovers the target
on the portal, logs in to the disk's LUN, checks it is as large as the API said, and reads with
several commands in flight. The session lives in the job's own task, for the `async with` block of
`open`, and logs out when the block ends.
"""

from __future__ import annotations

__all__ = ["IscsiDataPath", "IscsiDiskReader", "IscsiVmStage", "initiator_iqn"]

import logging
import re
import secrets
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from ahvbackup.core.drivers import (
    DataPath,
    DiskReader,
    HypervisorSession,
    IscsiSource,
    VmStage,
)
from ahvbackup.core.errors import DataPathError
from ahvbackup.core.ledger import ReleaseStack
from ahvbackup.core.model import DiskSnapshot

from .errors import IscsiConnectionError, IscsiTargetNotOffered
from .initiator import DiscoveredTarget, IscsiSession, discover
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
    """Reads one LUN of a logged-in session. Reads need not be block-aligned."""

    def __init__(self, session: IscsiSession, *, size: int, label: str) -> None:
        self._session = session
        self.size = size
        self.label = label

    async def read_into(self, offset: int, buf: memoryview) -> None:
        session = self._session
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


async def _offered(source: IscsiSource, *, initiator: str, label: str) -> DiscoveredTarget:
    """The disk's target as the portal's discovery lists it; `IscsiTargetNotOffered` when it
    is not listed or nothing answers there (nothing has been read yet)."""
    where = f"{source.portal[0]}:{source.portal[1]}"
    try:
        found = await discover(source.portal, initiator_iqn=initiator)
    except IscsiConnectionError as err:
        raise IscsiTargetNotOffered(
            f"iscsi: disk {label}: no iSCSI target answers at {where} ({err})") from err
    match = next((t for t in found if t.iqn == source.target_iqn), None)
    if match is None:
        raise IscsiTargetNotOffered(
            f"iscsi: disk {label}: portal {where} does not offer {source.target_iqn} to "
            f"{initiator} (offers: {', '.join(t.iqn for t in found) or 'nothing'})")
    return match


@asynccontextmanager
async def _read(source: IscsiSource, *, initiator: str,
                disk: DiskSnapshot) -> AsyncIterator[DiskReader]:
    """Log in to the disk's LUN (the portal the target's discovery names) and read it."""
    match = await _offered(source, initiator=initiator, label=disk.disk.label)
    if match.portals:
        host, port, _tpgt = match.portals[0]
        source = IscsiSource(portal=(host, port), target_iqn=source.target_iqn,
                             lun=source.lun, size=source.size, chap=source.chap)
    log.debug("iscsi: disk %s: %s LUN %d at %s:%d as %s", disk.disk.label, source.target_iqn,
              source.lun, source.portal[0], source.portal[1], initiator)
    chap = ChapCredentials(source.chap[0], source.chap[1]) if source.chap else None
    async with IscsiSession.connect(
        portal=source.portal, target_iqn=source.target_iqn, initiator_iqn=initiator,
        chap=chap, lun=source.lun, queue_depth=QUEUE_DEPTH, max_transfer=MAX_TRANSFER,
    ) as iscsi:
        if iscsi.size < source.size:
            raise DataPathError(
                f"iscsi: disk {disk.disk.label}: LUN {source.lun} of {source.target_iqn} "
                f"holds {iscsi.size} bytes, but the API said the disk has {source.size}; "
                "refusing to back up a truncated disk")
        yield IscsiDiskReader(iscsi, size=source.size, label=disk.disk.label)


class IscsiVmStage(VmStage):
    """One VM's disks behind one staged target, a LUN each: each disk's reader logs in to
    its own LUN (our initiator binds a session to one LUN), so the Prism calls are made once
    per VM and only the iSCSI logins are per disk."""

    def __init__(self, sources: Mapping[str, IscsiSource], *, initiator: str) -> None:
        self._sources = sources  # by disk uuid
        self._initiator = initiator

    def open(self, disk: DiskSnapshot, *,
             stack: ReleaseStack) -> AbstractAsyncContextManager[DiskReader]:
        del stack  # everything remote was staged, and recorded, with the VM
        source = self._sources.get(disk.disk.uuid)
        if source is None:
            raise DataPathError(f"iscsi: disk {disk.disk.label} was not staged with its VM")
        return _read(source, initiator=self._initiator, disk=disk)


class IscsiDataPath(DataPath):
    name = "iscsi"
    summary = "iSCSI through a volume group on the data services IP (user-space initiator)"

    @asynccontextmanager
    async def open(
        self, session: HypervisorSession, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> AsyncIterator[DiskReader]:
        me = initiator_iqn(self.config)
        source = await session.stage_iscsi(disk, initiator_iqn=me, stack=stack)
        async with _read(source, initiator=me, disk=disk) as reader:
            yield reader

    @asynccontextmanager
    async def stage(
        self, session: HypervisorSession, disks: Sequence[DiskSnapshot], *, stack: ReleaseStack
    ) -> AsyncIterator[VmStage]:
        """One volume group for all of the VM's disks (`HypervisorSession.stage_iscsi_vm`)."""
        me = initiator_iqn(self.config)
        sources = await session.stage_iscsi_vm(disks, initiator_iqn=me, stack=stack)
        yield IscsiVmStage({d.disk.uuid: s for d, s in zip(disks, sources, strict=True)},
                           initiator=me)
