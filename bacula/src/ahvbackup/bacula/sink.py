"""The ``bacula`` sink: disk streams go to Bacula instead of a repository.

Two ways out, one per Bacula path:

- metaplugin (`attach_emitter`): each disk stream becomes the virtual file
  ``@ahvbackup/<cluster>/<vm>/disks/<label>.ahvd`` and the manifest ``.../vm.json``. Bacula wants
  a file's size in its STAT before the data, and the stream's exact size is only known once it
  is written (zero detection and the encoder decide the record layout), so each stream is
  spooled to a file under ``working_dir`` first and sent from there; a disk that fails while
  being read therefore never reaches Bacula half written. ``vm.json`` is sent last, at commit:
  its presence in a job means every disk of that VM is in the job too.
- bpipe (`attach_pipe`): exactly one disk stream is written to a file descriptor (stdout of
  ``ahvbackup bpipe backup``), as it is produced.

Incrementals need the manifest of the backup they build on. Bacula keeps the catalog and the
data, out of our reach from inside a job, so the sink keeps its own record of what it handed to
Bacula: each committed manifest under ``state_dir/bacula-sent/<vm uuid>/<backup id>.json``
(`backups` lists those). It records what was *sent*; a job Bacula failed after that, or a
backup Bacula pruned, still looks present here, and the chain checks at restore are what catch
such a gap. Streams cannot be opened here: restores go through Bacula (the backend's restore
handlers, or ``ahvbackup bpipe restore``).
"""

from __future__ import annotations

__all__ = ["BaculaSink", "virtual_part"]

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import trio

from ahvbackup.core.containment import safe_name
from ahvbackup.core.drivers import BackupWriter, Sink, StoredBackup
from ahvbackup.core.errors import SinkError
from ahvbackup.core.fsutil import atomic_write_bytes
from ahvbackup.core.manifest import Manifest, ManifestError
from ahvbackup.core.model import VmInfo

from .handlers import FileEmitter, JobMessages

log = logging.getLogger("ahvbackup.bacula.sink")

SPOOL_READ = 1 << 20
#: manifests kept per VM in the record of sent backups (enough for any chain Bacula keeps)
SENT_KEPT = 200
_io = trio.CapacityLimiter(4)


def virtual_part(name: str) -> str:
    """A VM or cluster name made usable as one component of a virtual path (the file name
    it restores to, so the same mapping as every other file name made from a remote name)."""
    return safe_name(name)


class _EmitterWriter(BackupWriter):
    """One VM to the metaplugin: spooled disk streams, then vm.json."""

    def __init__(self, sink: BaculaSink, vm: VmInfo, backup_id: str, level: str) -> None:
        assert sink.emitter is not None
        assert sink.path_of is not None
        self.sink = sink
        self.emitter: FileEmitter = sink.emitter
        self.vm = vm
        self.backup_id = backup_id
        self.level = level
        self.created = time.time()
        self.stored: dict[str, int] = {}
        self.spool = sink.spool_root / safe_name(f"{backup_id}-{vm.uuid}")
        try:
            self.spool.mkdir(parents=True, mode=0o700)
        except OSError as err:
            raise SinkError(f"working_dir: cannot create the spool folder {self.spool} "
                            f"({err.strerror})") from err

    def vpath(self, *leaf: str) -> str:
        assert self.sink.path_of is not None
        cluster = virtual_part(self.vm.cluster_name or self.vm.cluster_uuid)
        return self.sink.path_of(cluster, virtual_part(self.vm.name), *leaf)

    async def write_disk(self, label: str, chunks: AsyncIterator[bytes | memoryview]) -> int:
        path = self.spool / f"{safe_name(label)}.ahvd"
        total = 0
        try:
            f = await trio.to_thread.run_sync(open, path, "wb", limiter=_io)
            try:
                async for chunk in chunks:
                    await trio.to_thread.run_sync(f.write, chunk, limiter=_io)
                    total += len(chunk)
            finally:
                await trio.to_thread.run_sync(f.close, limiter=_io)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise SinkError(f"VM {self.vm.name} disk {label}: cannot spool the stream to {path} "
                            f"({err.strerror}); working_dir needs room for the largest disk "
                            "streams written at once") from err
        try:
            sent = await self.emitter.file(self.vpath("disks", f"{safe_name(label)}.ahvd"),
                                           size=total, mtime=self.created,
                                           chunks=_read_file(path))
        finally:
            path.unlink(missing_ok=True)
        if sent != total:
            raise SinkError(f"VM {self.vm.name} disk {label}: sent {sent} of {total} bytes")
        self.stored[label] = total
        return total

    async def commit(self, manifest: Manifest) -> StoredBackup:
        doc = manifest.to_bytes()
        await self.emitter.file(self.vpath("vm.json"), size=len(doc), mtime=self.created,
                                chunks=_once(doc))
        await self.abort()
        self.sink.record_sent(self.vm, manifest)
        return StoredBackup.of(manifest)

    async def abort(self) -> None:
        """Disks already sent stay in the Bacula job (they cannot be taken back); without
        vm.json they are recognisably incomplete, and the handlers report the VM as failed."""
        await trio.to_thread.run_sync(shutil.rmtree, self.spool, True)


class _PipeWriter(BackupWriter):
    """One disk stream to a file descriptor, as it is produced (bpipe)."""

    def __init__(self, sink: BaculaSink, vm: VmInfo, backup_id: str, level: str) -> None:
        self.sink = sink
        self.vm = vm
        self.backup_id = backup_id
        self.level = level
        self.created = time.time()
        self.stored: dict[str, int] = {}

    async def write_disk(self, label: str, chunks: AsyncIterator[bytes | memoryview]) -> int:
        fd = self.sink.pipe_fd
        assert fd is not None
        if self.sink.pipe_used:
            raise SinkError(f"bpipe: a second disk stream ({self.vm.name} {label}) cannot go to "
                            "the same pipe; select one VM and one disk per Plugin line")
        self.sink.pipe_used = True
        total = 0
        async for chunk in chunks:
            try:
                await trio.to_thread.run_sync(_write_all, fd, chunk, limiter=self.sink.pipe_lock)
            except OSError as err:
                why = "the reader of the pipe went away" if err.errno == errno.EPIPE \
                    else err.strerror
                raise SinkError(f"VM {self.vm.name} disk {label}: writing the stream failed "
                                f"after {total} bytes ({why})") from err
            total += len(chunk)
        self.stored[label] = total
        return total

    async def commit(self, manifest: Manifest) -> StoredBackup:
        self.sink.record_sent(self.vm, manifest)
        return StoredBackup.of(manifest)

    async def abort(self) -> None:
        """Nothing to take back: the stream is cut short and its trailer is missing, which
        every reader of the format detects; the command's exit status reports it."""


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    f = await trio.to_thread.run_sync(open, path, "rb", limiter=_io)
    try:
        while True:
            block = await trio.to_thread.run_sync(f.read, SPOOL_READ, limiter=_io)
            if not block:
                return
            yield block
    finally:
        f.close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class BaculaSink(Sink):
    name = "bacula"
    summary = "Bacula: metaplugin virtual files or one bpipe stream (inside a Bacula job)"
    keeps_chains = True
    works_only_inside = "a Bacula job"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.emitter: FileEmitter | None = None
        self.path_of: Callable[..., str] | None = None
        self.messages: JobMessages | None = None
        self.pipe_fd: int | None = None
        self.pipe_used = False
        self.pipe_lock = trio.CapacityLimiter(1)
        self.spool_root = Path(config.working_dir) / f"ahvbackup-spool-{os.getpid()}"
        self.sent_root = Path(config.state_dir) / "bacula-sent"
        self._vms: set[str] = set()

    def attach_emitter(self, emitter: FileEmitter, *, path_of: Callable[..., str],
                       messages: JobMessages | None = None) -> None:
        """Send streams as metaplugin virtual files; `path_of(cluster, vm, ...)` names them."""
        self.emitter, self.path_of, self.messages = emitter, path_of, messages

    def attach_pipe(self, fd: int) -> None:
        """Write the one disk stream of a bpipe job to `fd`."""
        self.pipe_fd = fd

    async def begin(self, vm: VmInfo, *, backup_id: str, level: str) -> BackupWriter:
        if self.pipe_fd is not None:
            self._vms.add(vm.uuid)
            if len(self._vms) > 1:
                raise SinkError(f"bpipe: the selection matched more than one VM (also {vm.name});"
                                " a bpipe Plugin line backs up one disk of one VM")
            return _PipeWriter(self, vm, backup_id, level)
        if self.emitter is not None:
            return _EmitterWriter(self, vm, backup_id, level)
        raise SinkError("sink=bacula works only inside a Bacula job (the metaplugin backend "
                        "ahvbackup-bacula-backend, or 'ahvbackup bpipe backup'); use "
                        "sink=directory on the command line")

    def cleanup(self) -> None:
        """Remove this process's spool folder."""
        shutil.rmtree(self.spool_root, ignore_errors=True)

    def record_sent(self, vm: VmInfo, manifest: Manifest) -> None:
        """Remember a backup handed to Bacula (what the next incremental builds on)."""
        folder = self.sent_root / safe_name(vm.uuid)
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_bytes(folder / f"{safe_name(manifest.backup_id)}.json",
                               manifest.to_bytes())
            for old in sorted(folder.glob("*.json"))[:-SENT_KEPT]:
                old.unlink(missing_ok=True)
        except OSError as err:
            raise SinkError(f"state_dir: cannot record backup {manifest.backup_id} of "
                            f"{vm.name} in {folder} ({err.strerror}); the next backup of this "
                            "VM will be a full") from err

    async def backups(self, vm: str | None = None) -> list[StoredBackup]:
        """Backups this host handed to Bacula (its record), oldest first; `vm` is a UUID or
        name. Bacula's catalog is the authority: list it with bconsole (list jobs)."""
        found = []
        for path in self.sent_root.glob("*/*.json"):
            try:
                item = StoredBackup.of(Manifest.from_bytes(path.read_bytes(), name=str(path)))
            except (OSError, ManifestError) as err:
                log.warning("bacula sink: %s is unreadable (%s); skipped", path, err)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if vm is None or vm in (item.vm_uuid, item.vm_name):
                found.append(item)
        return sorted(found, key=lambda b: (b.created, b.backup_id))

    def open_stream(self, backup: StoredBackup, label: str) -> BinaryIO:
        raise SinkError("sink=bacula: restore through Bacula (bconsole restore), which hands "
                        "the streams to the backend or to 'ahvbackup bpipe restore'")
