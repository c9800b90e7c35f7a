"""The `directory` sink: the embedded default repository on a local (or mounted) filesystem.

Layout::

    <repository>/<vm uuid>/<backup id>/manifest.json
    <repository>/<vm uuid>/<backup id>/<disk label>.ahvd     one disk stream each

A job for a tenant (``tenant=``) is given ``<repository>/tenants/<tenant>`` as its root (see
`ahvbackup.core.tenancy`): the root is marked with the tenant's name, a root inside another
tenant's folder is refused, and the ``tenants`` folder is never listed as a VM's.

A backup is written into ``.partial-<backup id>-<pid>`` beside its final place and renamed into
place only after every stream and the manifest are on disk (fsynced), so an interrupted backup
never looks complete; the next run removes partial folders whose process is gone.

Consolidation replaces a backup in place (same id): the old folder is first renamed to
``.replaced-<backup id>-<pid>``, the new one renamed in, then the old one removed. A process
killed between the two renames leaves the old folder, which the next sweep puts back.
Removing a backup renames it to ``.removing-...`` first, so it stops being listed at once.
"""

from __future__ import annotations

__all__ = ["DirectorySink", "new_backup_id", "stream_name"]

import contextlib
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import trio

from .containment import safe_name
from .drivers import BackupWriter, DamagedBackup, Inventory, Sink, StoredBackup
from .errors import SinkError
from .fsutil import atomic_write_bytes, ensure_dir, fsync_dir, io_failure
from .manifest import Manifest, ManifestError
from .model import VmInfo
from .tenancy import TENANTS, check_repository, mark_repository

log = logging.getLogger("ahvbackup.repository")

MANIFEST = "manifest.json"
STREAM_SUFFIX = ".ahvd"
MAX_MANIFEST = 64 << 20  # a VM with thousands of disks stays far below this
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
        folder = sink.root / safe_name(vm.uuid)
        self.final = folder / safe_name(backup_id)
        self.partial = folder / f".partial-{safe_name(backup_id)}-{os.getpid()}"
        self.partial.mkdir(parents=True, mode=0o700)
        self.stored: dict[str, int] = {}

    async def write_disk(self, label: str, chunks: AsyncIterator[bytes | memoryview]) -> int:
        path = self.partial / stream_name(label)
        total = 0
        try:
            f = await trio.to_thread.run_sync(open, path, "wb", limiter=_io_limiter)
            try:
                async for chunk in chunks:
                    await trio.to_thread.run_sync(f.write, chunk, limiter=_io_limiter)
                    total += len(chunk)
                await trio.to_thread.run_sync(_flush_sync, f, limiter=_io_limiter)
            finally:
                with contextlib.suppress(OSError):  # a full disk fails the flush in close too
                    f.close()
        except OSError as err:
            raise SinkError(f"repository: disk {label}: {io_failure(path, err)}") from err
        self.stored[label] = total
        return total

    async def commit(self, manifest: Manifest) -> StoredBackup:
        try:
            atomic_write_bytes(self.partial / MANIFEST, manifest.to_bytes())
        except OSError as err:
            raise SinkError(f"repository: {io_failure(self.partial / MANIFEST, err)}") from err
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
        return StoredBackup.of(manifest)

    async def abort(self) -> None:
        await trio.to_thread.run_sync(shutil.rmtree, self.partial, True)

    def open_written(self, label: str) -> BinaryIO:
        """Read back a stream written in this (uncommitted) backup, e.g. to verify it."""
        return open(self.partial / stream_name(label), "rb")


def _flush_sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def stream_name(label: str) -> str:
    """The file of a disk's stream in its backup folder."""
    return f"{safe_name(label)}{STREAM_SUFFIX}"


class DirectorySink(Sink):
    name = "directory"
    summary = "local directory repository (the embedded default)"
    keeps_chains = True
    manages_backups = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        tenant: str | None = getattr(config, "tenant", None)  # bare test configs lack it
        check_repository(Path(config.repository), tenant)
        self.root = ensure_dir(Path(config.repository), key="repository")
        if tenant:
            mark_repository(self.root, tenant)

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
        removed = self._finish_replacements()
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
        return (await trio.to_thread.run_sync(self._scan, vm)).backups

    async def damaged(self, vm: str | None = None) -> list[DamagedBackup]:
        return (await trio.to_thread.run_sync(self._scan, vm)).damaged

    def _finish_replacements(self) -> list[Path]:
        """A replacement (consolidation) killed between its two renames left the old version
        aside as `.replaced-<id>-<pid>`: put it back when no new version took its place, else
        drop it. Listing does this too, so a restore never misses the newest backup."""
        done = []
        for old in self.root.glob("*/.replaced-*"):
            old_id, old_pid = old.name[len(".replaced-"):].rsplit("-", 1)
            if old_pid.isdigit() and int(old_pid) != os.getpid() and not Path(
                f"/proc/{old_pid}"
            ).exists():
                final = old.with_name(old_id)
                try:
                    if final.exists():
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.rename(old, final)
                except OSError as err:  # a read-only repository: listed as it is
                    log.warning("repository: cannot put back %s (%s)", old, err.strerror)
                    continue
                done.append(old)
        return done

    def _scan(self, vm: str | None) -> Inventory:
        """Every backup folder: complete (its manifest reads and fits its place) or damaged."""
        self._finish_replacements()
        out = Inventory()
        own = self.root / safe_name(vm) if vm is not None else None
        try:
            # a VM asked for by uuid is read from its own folder alone: a job asks for each of
            # its VMs, and reading every VM's manifests each time grows with the square of them
            # (a manifest copied in from elsewhere does not fit its place there, and is damaged)
            vm_dirs = [own] if own is not None and own.is_dir() else sorted(
                p for p in self.root.iterdir() if not p.name.startswith(".") and p.name != TENANTS)
        except OSError as err:
            raise SinkError(f"repository {self.root}: cannot list it ({err.strerror})") from err
        by_id: dict[str, list[StoredBackup]] = {}
        for vm_dir in vm_dirs:
            try:
                folders = sorted(p for p in vm_dir.iterdir() if not p.name.startswith("."))
            except NotADirectoryError:
                out.damaged.append(DamagedBackup(vm_dir.name, "", str(vm_dir),
                                                 "a file where a VM folder belongs"))
                continue
            except OSError as err:
                out.damaged.append(DamagedBackup(vm_dir.name, "", str(vm_dir),
                                                 f"cannot list it ({err.strerror})",
                                                 unreadable=True))
                continue
            for folder in folders:
                item = self._read(folder, out)
                if item is not None:
                    by_id.setdefault(item.backup_id, []).append(item)
        for backup_id, items in by_id.items():
            if len(items) > 1:  # a manifest copied over another's: neither can be trusted
                places = ", ".join(str(self.path_of(b)) for b in items)
                for b in items:
                    out.damaged.append(DamagedBackup(safe_name(b.vm_uuid), backup_id,
                                                     str(self.path_of(b)),
                                                     f"backup id {backup_id} is in {places}"))
                continue
            out.backups.extend(items)
        if vm is not None:
            out.backups = [b for b in out.backups if vm in (b.vm_uuid, b.vm_name)]
            of_vm = {safe_name(vm), *(safe_name(b.vm_uuid) for b in out.backups)}
            out.damaged = [d for d in out.damaged if d.vm in of_vm]
        out.backups.sort(key=lambda b: (b.created, b.backup_id))
        return out

    def _read(self, folder: Path, out: Inventory) -> StoredBackup | None:
        path = folder / MANIFEST
        vm = folder.parent.name

        def damaged(reason: str, *, unreadable: bool = False) -> None:
            log.warning("repository: %s: %s", path, reason)
            out.damaged.append(DamagedBackup(vm, folder.name, str(path), reason,
                                             unreadable=unreadable))

        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                damaged("not a regular file", unreadable=True)
                return None
            if info.st_size > MAX_MANIFEST:
                damaged(f"{info.st_size} bytes, more than a manifest can be")
                return None
            data = path.read_bytes()
        except FileNotFoundError:
            damaged("no manifest.json (an incomplete or foreign folder)")
            return None
        except OSError as err:
            damaged(f"cannot read it ({err.strerror})", unreadable=True)
            return None
        try:
            manifest = Manifest.from_bytes(data, name=str(path))
        except ManifestError as err:
            damaged(str(err).removeprefix(f"{path}: "))
            return None
        wrong = [f"{what} {have!r} (the folder is {want!r})" for what, have, want in (
            ("backup_id", safe_name(manifest.backup_id), folder.name),
            ("vm.uuid", safe_name(manifest.vm.uuid), vm)) if have != want]
        if wrong:
            damaged("the manifest belongs elsewhere: " + "; ".join(wrong))
            return None
        # every stream in the folder is in the manifest and the other way round: a disk
        # dropped from the manifest would otherwise restore as "ok" without it
        named = {stream_name(d.label) for d in manifest.streams}
        try:
            present = {p.name for p in folder.iterdir() if p.name.endswith(STREAM_SUFFIX)}
        except OSError as err:
            damaged(f"cannot list the folder ({err.strerror})", unreadable=True)
            return None
        if named != present:
            extra, missing = sorted(present - named), sorted(named - present)
            damaged("streams and manifest disagree: "
                    + "; ".join([*(f"{n} is not in the manifest" for n in extra),
                                 *(f"{n} is missing" for n in missing)]))
            return None
        return StoredBackup.of(manifest)

    def path_of(self, backup: StoredBackup) -> Path:
        return self.root / safe_name(backup.vm_uuid) / safe_name(backup.backup_id)

    def open_stream(self, backup: StoredBackup, label: str) -> BinaryIO:
        path = self.path_of(backup) / stream_name(label)
        try:
            return open(path, "rb")  # the caller owns it
        except FileNotFoundError:
            raise SinkError(f"backup {backup.backup_id} of {backup.vm_name}: stream for disk "
                            f"{label} is missing ({path})") from None
