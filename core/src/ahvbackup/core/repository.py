"""The `directory` sink: the embedded default repository on a local (or mounted) filesystem.

Layout::

    <repository>/<vm uuid>/<backup id>/manifest.json
    <repository>/<vm uuid>/<backup id>/<disk label>.ahvd     one disk stream each

A backup is written into ``.partial-<backup id>-<pid>`` beside its final place and renamed into
place only after every stream and the manifest are on disk (fsynced), so an interrupted backup
never looks complete; the next run removes partial folders whose process is gone.

Consolidation replaces a backup in place (same id): the old folder is first renamed to
``.replaced-<backup id>-<pid>``, the new one renamed in, then the old one removed. A process
killed between the two renames leaves the old folder, which the next sweep puts back.
Removing a backup renames it to ``.removing-...`` first, so it stops being listed at once.
"""

from __future__ import annotations

__all__ = ["DirectorySink", "new_backup_id"]

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import trio

from .drivers import BackupWriter, Sink, StoredBackup
from .errors import SinkError
from .fsutil import atomic_write_json, fsync_dir
from .model import VmInfo

log = logging.getLogger("ahvbackup.repository")

MANIFEST = "manifest.json"
STREAM_SUFFIX = ".ahvd"
_io_limiter = trio.CapacityLimiter(4)


def new_backup_id() -> str:
    """Sortable by time, unique across concurrent jobs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class _DirectoryBackupWriter(BackupWriter):
    def __init__(
        self, sink: DirectorySink, vm: VmInfo, backup_id: str, level: str, *,
        replace: bool = False,
    ) -> None:
        self.replace = replace
        self.vm = vm
        self.backup_id = backup_id
        self.level = level
        self.final = sink.root / vm.uuid / backup_id
        self.partial = sink.root / vm.uuid / f".partial-{backup_id}-{os.getpid()}"
        self.partial.mkdir(parents=True, mode=0o700)
        self.stored: dict[str, int] = {}

    async def write_disk(self, label: str, chunks: AsyncIterator[bytes | memoryview]) -> int:
        path = self.partial / f"{label}{STREAM_SUFFIX}"
        total = 0
        f = await trio.to_thread.run_sync(open, path, "wb", limiter=_io_limiter)
        try:
            async for chunk in chunks:
                await trio.to_thread.run_sync(f.write, chunk, limiter=_io_limiter)
                total += len(chunk)
            await trio.to_thread.run_sync(_flush_sync, f, limiter=_io_limiter)
        finally:
            f.close()
        self.stored[label] = total
        return total

    async def commit(self, manifest: Mapping[str, Any]) -> StoredBackup:
        doc = dict(manifest)
        atomic_write_json(self.partial / MANIFEST, doc)
        fsync_dir(self.partial)
        if self.replace and self.final.exists():
            old = self.final.with_name(f".replaced-{self.backup_id}-{os.getpid()}")
            os.rename(self.final, old)
            os.rename(self.partial, self.final)
            fsync_dir(self.final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.partial, self.final)
        fsync_dir(self.final.parent)
        log.debug("repository: backup %s of %s committed", self.backup_id, self.vm.name)
        return _stored(self.final, doc)

    async def abort(self) -> None:
        await trio.to_thread.run_sync(shutil.rmtree, self.partial, True)

    def open_written(self, label: str) -> BinaryIO:
        """Read back a stream written in this (uncommitted) backup, e.g. to verify it."""
        return open(self.partial / f"{label}{STREAM_SUFFIX}", "rb")  # noqa: SIM115


def _flush_sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _stored(path: Path, doc: Mapping[str, Any]) -> StoredBackup:
    return StoredBackup(
        backup_id=doc["backup_id"],
        vm_uuid=doc["vm"]["uuid"],
        vm_name=doc["vm"]["name"],
        level=doc["level"],
        created=float(doc["created"]),
        disks=tuple(d["label"] for d in doc["disks"] if d.get("stream")),
        bytes_stored=sum(int(d.get("bytes_stored", 0)) for d in doc["disks"]),
        manifest=doc,
    )


class DirectorySink(Sink):
    name = "directory"
    summary = "local directory repository (the embedded default)"
    keeps_chains = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.root = Path(config.repository)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise SinkError(f"repository {self.root}: cannot create it ({err.strerror})") from err

    async def begin(self, vm: VmInfo, *, backup_id: str, level: str) -> BackupWriter:
        return _DirectoryBackupWriter(self, vm, backup_id, level)

    async def begin_replace(self, vm: VmInfo, *, backup_id: str, level: str) -> BackupWriter:
        """Write a new version of an existing backup (same id); it replaces the old one at
        commit (consolidation)."""
        return _DirectoryBackupWriter(self, vm, backup_id, level, replace=True)

    async def remove(self, backup: StoredBackup) -> None:
        """Remove one complete backup."""
        path = self.path_of(backup)
        doomed = path.with_name(f".removing-{backup.backup_id}-{os.getpid()}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        except OSError as err:
            raise SinkError(
                f"repository: cannot remove backup {backup.backup_id} ({err.strerror})"
            ) from err
        fsync_dir(path.parent)
        await trio.to_thread.run_sync(shutil.rmtree, doomed, True)

    def sweep_partials(self) -> list[Path]:
        """Remove partial backups whose writer process is gone; returns what was removed."""
        removed = []
        for old in self.root.glob("*/.replaced-*"):
            old_id, old_pid = old.name[len(".replaced-"):].rsplit("-", 1)
            if old_pid.isdigit() and int(old_pid) != os.getpid() and not Path(
                f"/proc/{old_pid}"
            ).exists():
                final = old.with_name(old_id)
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(old, final)
                removed.append(old)
        for doomed in self.root.glob("*/.removing-*"):
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(doomed)
        for partial in self.root.glob("*/.partial-*"):
            try:
                pid = int(partial.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(partial, ignore_errors=True)
                removed.append(partial)
        return removed

    async def backups(self, vm: str | None = None) -> list[StoredBackup]:
        found = []
        for manifest in self.root.glob(f"*/*/{MANIFEST}"):
            if manifest.parent.name.startswith("."):
                continue
            try:
                doc = json.loads(manifest.read_text())
                item = _stored(manifest.parent, doc)
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("repository: %s is unreadable (%s); skipped", manifest, err)
                continue
            if vm is None or vm in (item.vm_uuid, item.vm_name):
                found.append(item)
        return sorted(found, key=lambda b: (b.created, b.backup_id))

    def path_of(self, backup: StoredBackup) -> Path:
        return self.root / backup.vm_uuid / backup.backup_id

    def open_stream(self, backup: StoredBackup, label: str) -> BinaryIO:
        path = self.path_of(backup) / f"{label}{STREAM_SUFFIX}"
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller owns it
        except FileNotFoundError:
            raise SinkError(
                f"backup {backup.backup_id} of {backup.vm_name}: stream for disk {label} is missing "
                f"({path})"
            ) from None
