"""What one metaplugin restore job received, held until every file is in.

Bacula hands a restore's files in its own order (volume order: usually oldest job first, but
nothing promises it), and a chain (full + incrementals) arrives as several jobs' files in one
restore. So each disk stream is spooled to a file under ``working_dir`` as it arrives, checked
as it passes (checksums, trailer, digest: a damaged stream fails its own file at once), and
each ``vm.json`` is kept. Once every file is in, `RestoreSpool` is the sink the ordinary
restore job reads: its `backups` are the manifests received, its `open_stream` the spooled
streams, so a chain is resolved, checked and applied exactly as the command line restores it
(each range written once, from the newest link that has it).

Streams are keyed by what they say they are (VM, backup, disk in the stream header), not by
their file names, so backups taken before files were named per backup restore the same way.
"""

from __future__ import annotations

__all__ = ["RestoreSpool", "SpooledStream", "sweep_spools"]

import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import trio

from ahvbackup.core.drivers import BackupWriter, Sink, StoredBackup
from ahvbackup.core.errors import SinkError
from ahvbackup.core.ledger import owner_alive
from ahvbackup.core.manifest import Manifest
from ahvbackup.core.model import VmInfo
from ahvbackup.core.stream import StreamHeader

from .apply import Item, StreamFeed

log = logging.getLogger("ahvbackup.bacula.restore")

PREFIX = "ahvbackup-restore-"
#: a vm.json larger than this is not one of ours
MANIFEST_MAX = 16 << 20
_io = trio.CapacityLimiter(2)


@dataclass(frozen=True)
class SpooledStream:
    """One received disk stream: its file in the spool, its header, and the restore file
    (where applied) it came as."""

    path: Path
    header: StreamHeader
    fname: str
    size: int


def sweep_spools(working_dir: Path) -> None:
    """Remove the spool folders of restore jobs whose process is gone (killed)."""
    for folder in working_dir.glob(f"{PREFIX}*") if working_dir.is_dir() else ():
        pid = folder.name.removeprefix(PREFIX)
        if pid.isdigit() and not owner_alive(int(pid)) and not folder.is_symlink():
            log.info("removing the spool of an interrupted restore: %s", folder)
            shutil.rmtree(folder, ignore_errors=True)


class RestoreSpool(Sink):
    """The streams and manifests of one restore job (read-only: a sink to restore from)."""

    name = "bacula-restore"
    summary = "the files of one Bacula restore job, spooled"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.root = Path(config.working_dir) / f"{PREFIX}{os.getpid()}"
        self.streams: dict[tuple[str, str, str], SpooledStream] = {}  # vm, backup, disk
        self.manifests: dict[tuple[str, str], Manifest] = {}  # vm, backup
        self.manifest_files: dict[tuple[str, str], str] = {}  # vm, backup -> restore fname
        self._order: dict[str, None] = {}  # vm uuids, in order of arrival
        self._count = 0

    # receiving ----------------------------------------------------------------------------
    async def take_stream(self, fname: str, data: AsyncIterator[memoryview]) -> SpooledStream:
        """Spool and check one ``.ahvd`` file; a damaged one is removed and its error raised."""
        if not self._count:
            await trio.to_thread.run_sync(sweep_spools, self.root.parent)
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._count += 1
        path = self.root / f"{self._count:06d}.ahvd"

        async def ignore(item: Item) -> None:
            pass

        feed = StreamFeed(ignore, name=fname, keyless=True)
        size = 0
        f = await trio.to_thread.run_sync(open, path, "wb", limiter=_io)
        try:
            try:
                async for block in data:
                    await feed.feed(block)
                    await trio.to_thread.run_sync(f.write, block, limiter=_io)
                    size += len(block)
                header = feed.end()
            finally:
                f.close()
        except OSError as err:
            path.unlink(missing_ok=True)
            raise SinkError(f"{fname}: cannot spool the stream to {path} ({err.strerror}); "
                            "working_dir needs room for the disk streams of a restore") from err
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        got = SpooledStream(path=path, header=header, fname=fname, size=size)
        key = (header.vm_uuid, header.backup_id, header.disk_uuid)
        old = self.streams.pop(key, None)
        if old is not None:  # the same stream twice (marked in two jobs): keep one
            old.path.unlink(missing_ok=True)
        self.streams[key] = got
        self._order.setdefault(header.vm_uuid)
        return got

    def take_manifest(self, fname: str, doc: bytes) -> Manifest:
        manifest = Manifest.from_bytes(doc, name=fname)
        self.manifests[(manifest.vm.uuid, manifest.backup_id)] = manifest
        self.manifest_files[(manifest.vm.uuid, manifest.backup_id)] = fname
        self._order.setdefault(manifest.vm.uuid)
        return manifest

    def close(self) -> None:
        """Remove the spool (every stream in it)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.streams.clear()

    # the sink a restore job reads -----------------------------------------------------------
    async def begin(self, vm: VmInfo, *, backup_id: str, level: str) -> BackupWriter:
        raise SinkError("a restore job's spool is read-only")

    async def backups(self, vm: str | None = None) -> list[StoredBackup]:
        found = [StoredBackup.of(m) for m in self.manifests.values()
                 if vm is None or vm in (m.vm.uuid, m.vm.name)]
        return sorted(found, key=lambda b: (b.created, b.backup_id))

    def stream_of(self, backup: StoredBackup, label: str) -> SpooledStream | None:
        entry = backup.manifest.disk(label=label)
        if entry is None:
            return None
        return self.streams.get((backup.vm_uuid, backup.backup_id, entry.uuid))

    def open_stream(self, backup: StoredBackup, label: str) -> BinaryIO:
        got = self.stream_of(backup, label)
        if got is None:
            raise SinkError(f"backup {backup.backup_id} ({backup.vm_name}/{label}): its disk "
                            "stream is not in this restore job")
        try:
            return open(got.path, "rb")
        except OSError as err:
            raise SinkError(f"{got.fname}: the spooled stream is unreadable "
                            f"({err.strerror})") from err

    def vm_uuids(self) -> list[str]:
        """Every VM something was received for, in order of arrival."""
        return list(self._order)

    def streams_of(self, vm_uuid: str) -> list[SpooledStream]:
        """The streams received for a VM, oldest backup first."""
        got = [s for (vm, _, _), s in self.streams.items() if vm == vm_uuid]
        return sorted(got, key=lambda s: (s.header.backup_id, s.header.disk_index))

    def manifests_of(self, vm_uuid: str) -> list[Manifest]:
        """The manifests received for a VM, oldest first."""
        got = [m for (vm, _), m in self.manifests.items() if vm == vm_uuid]
        return sorted(got, key=lambda m: (m.created, m.backup_id))

    def drop(self, stream: SpooledStream) -> None:
        with contextlib.suppress(OSError):
            stream.path.unlink()
