"""The `auto` data path: iSCSI where the cluster offers it, REST for every other disk.

iSCSI is the faster path, so it is tried first, but only where it can work: when nothing
answers on the cluster's iSCSI portal, every disk is read over REST; when the portal answers
but does not offer a disk's target (another iSCSI service on that address, a target that does
not list us), that disk is read over REST, with a warning naming it and why. Nothing of the
disk has been read at that point. Any later iSCSI failure (login, a short LUN, a read) is an
error as with `data_path=iscsi`: falling back then would hide a real problem.
"""

from __future__ import annotations

__all__ = ["AutoDataPath"]

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from ahvbackup.core.drivers import DataPath, DiskReader, HypervisorSession, VmStage
from ahvbackup.core.ledger import ReleaseStack
from ahvbackup.core.model import DiskSnapshot

from .iscsi.datapath import IscsiDataPath
from .iscsi.errors import IscsiTargetNotOffered
from .rest import RestDataPath

log = logging.getLogger("ahvbackup.datapath.auto")

#: how long the portal probe waits for a TCP connection
PROBE_SECONDS = 3.0


class AutoDataPath(DataPath):
    name = "auto"
    summary = "iscsi where the cluster's iSCSI portal offers the disk, else rest"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.iscsi = IscsiDataPath(config)
        self.rest = RestDataPath(config)
        self._use_iscsi: bool | None = None  # decided at the first disk, once per job
        self._deciding = trio.Lock()

    def read_size(self) -> int:
        # the job asks once, for every disk: the iSCSI size (a REST fallback reads the same
        # pieces, with more requests)
        return self.iscsi.read_size()

    @asynccontextmanager
    async def open(
        self, session: HypervisorSession, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> AsyncIterator[DiskReader]:
        async with AsyncExitStack() as opened:
            if not await self._iscsi_answers(session):
                reader = await opened.enter_async_context(self.rest.open(session, disk,
                                                                         stack=stack))
            else:
                try:
                    reader = await opened.enter_async_context(self.iscsi.open(session, disk,
                                                                              stack=stack))
                except IscsiTargetNotOffered as err:
                    # the staged volume group stays on `stack`, released with the disk's rest
                    log.warning("data_path=auto: reading disk %s (vmdisk %s) over rest, as "
                                "iSCSI cannot: %s", disk.disk.label, disk.disk.uuid, err)
                    reader = await opened.enter_async_context(self.rest.open(session, disk,
                                                                             stack=stack))
            yield reader

    @asynccontextmanager
    async def stage(
        self, session: HypervisorSession, disks: Sequence[DiskSnapshot], *, stack: ReleaseStack
    ) -> AsyncIterator[VmStage]:
        """iSCSI answering: the VM's disks staged together as `iscsi` does (a disk the VM's
        target does not offer is opened as `open` does); else every disk over rest."""
        if not await self._iscsi_answers(session):
            async with self.rest.stage(session, disks, stack=stack) as staged:
                yield staged
            return
        async with self.iscsi.stage(session, disks, stack=stack) as staged:
            yield _Fallback(staged, self, session)

    async def _iscsi_answers(self, session: HypervisorSession) -> bool:
        async with self._deciding:
            if self._use_iscsi is None:
                self._use_iscsi = await _probe(session)
            return self._use_iscsi


class _Fallback(VmStage):
    """Each staged disk over the VM's iSCSI target; where that target is not offered, over a
    volume group of the disk's own (as `AutoDataPath.open`), and else over rest."""

    def __init__(self, staged: VmStage, auto: AutoDataPath, session: HypervisorSession) -> None:
        self._staged, self._auto, self._session = staged, auto, session

    @asynccontextmanager
    async def open(self, disk: DiskSnapshot, *, stack: ReleaseStack,
                   ) -> AsyncIterator[DiskReader]:
        async with AsyncExitStack() as opened:
            try:
                reader = await opened.enter_async_context(self._staged.open(disk, stack=stack))
            except IscsiTargetNotOffered as err:
                log.debug("data_path=auto: disk %s: the VM's target is not offered (%s); "
                          "staging the disk on its own", disk.disk.label, err)
                reader = await opened.enter_async_context(
                    self._auto.open(self._session, disk, stack=stack))
            yield reader


async def _probe(session: HypervisorSession) -> bool:
    """Whether something accepts connections on the cluster's iSCSI portal (logged either way)."""
    portal = await session.iscsi_portal()
    if portal is None:
        log.info("data_path=auto: the cluster has no iSCSI portal; using rest")
        return False
    where = f"{portal[0]}:{portal[1]}"
    why = f"no answer within {PROBE_SECONDS:g} s"
    with trio.move_on_after(PROBE_SECONDS):
        try:
            stream = await trio.open_tcp_stream(*portal)
        except OSError as err:
            why = err.strerror or str(err)
        else:
            await stream.aclose()
            log.info("data_path=auto: using iscsi (portal %s); rest for a disk it does not "
                     "offer", where)
            return True
    log.info("data_path=auto: using rest (nothing answers on iSCSI at %s: %s)", where, why)
    return False
