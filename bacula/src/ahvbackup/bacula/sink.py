"""The ``bacula`` sink: disk streams go to Bacula instead of a repository.

Two ways out, one per Bacula path:

- metaplugin (`attach_emitter`): each disk stream becomes the virtual file
  ``@ahvbackup/<cluster>/<vm>/<backup id>/disks/<label>.ahvd`` and the manifest
  ``.../<backup id>/vm.json`` (named per backup, so that Bacula's "most recent" restore
  selection of the newest backup holds every link of its chain; backups taken before had no
  ``<backup id>`` folder and still restore). One file
  is sent at a time. A disk whose turn it is is sent *as it is read*, so reading from Prism and
  sending to Bacula overlap. Bacula wants a file's size in its STAT before the data, and a
  stream's exact size is only known once it is written (zero detection and the encoder decide
  the record layout), so a streamed disk is announced with size -1, "unknown", as Bacula's own
  bpipe plugin does (see `UNKNOWN_SIZE` for what Bacula does with it); a stream that ends
  within `LOOKAHEAD` bytes, or before its turn, is announced with its exact size. Disks read
  while another file is being sent (``concurrent_disks``) are buffered to a spool file under
  ``working_dir`` meanwhile and sent from it when their turn comes, catching up and then
  streaming. A disk that fails before its turn never reaches Bacula; one that fails while it
  is streamed is ended there (its stream has no trailer, and restore refuses it) and its VM
  gets no vm.json. ``vm.json`` is sent last, at commit: its presence in a job means every disk
  of that VM is in the job too, complete.
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
from ahvbackup.core.stream import StreamHeader

from .handlers import FileEmitter, JobMessages

log = logging.getLogger("ahvbackup.bacula.sink")

SPOOL_READ = 1 << 20
#: the STAT size of a stream sent before its end is known. Bacula 15.0.3 takes it as it is
#: (pluginlib/metaplugin_attributes.cpp read_scan_stat_command stores it in st_size), reads
#: the data up to its end of data whatever the size (metaplugin.cpp perform_read_data), always
#: reads a command plugin's data (filed/backup.c save_file: cmd_plugin), counts JobBytes from
#: the bytes sent (backup.c send_data), never applies FileSet sparse/offsets to a plugin's
#: file (filed/fd_plugins.c: only the plugin's own save_pkt flags) and hands the size back
#: unchanged in the STAT of the restore, which the restore does not use. What shows it: the
#: catalog's size of that file (LStat; bconsole's restore tree prints -1) and a Verify
#: VolumeToCatalog, which reports the size as different. The exact size of every stream is in
#: vm.json and in the job log's "VM backed up: ... stored=" line.
UNKNOWN_SIZE = -1
#: a stream that ends within this many bytes is sent with its exact size (copied in memory
#: first); a longer one is streamed from there on, with UNKNOWN_SIZE
LOOKAHEAD = 8 << 20
#: items of a streamed disk queued between the encoder and the file daemon
LIVE_QUEUE = 2
#: how long a failed or cancelled disk may take to end its file's data cleanly
DRAIN_SECONDS = 2.0
#: manifests kept per VM in the record of sent backups (enough for any chain Bacula keeps)
SENT_KEPT = 200
_io = trio.CapacityLimiter(4)


def virtual_part(name: str) -> str:
    """A VM or cluster name made usable as one component of a virtual path (the file name
    it restores to, so the same mapping as every other file name made from a remote name)."""
    return safe_name(name)


class _EmitterWriter(BackupWriter):
    """One VM to the metaplugin: its disk streams (streamed, or spooled while they wait for
    their turn), then vm.json."""

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
        # created when a disk has to wait for its turn (and removed with abort/commit)
        self.spool = sink.spool_root / safe_name(f"{backup_id}-{vm.uuid}")

    def vpath(self, *leaf: str) -> str:
        """``<cluster>/<vm>/<backup id>/<leaf>``: each backup's files are named apart, so
        Bacula's "most recent" restore selection holds every link of a chain."""
        assert self.sink.path_of is not None
        cluster = virtual_part(self.vm.cluster_name or self.vm.cluster_uuid)
        return self.sink.path_of(cluster, virtual_part(self.vm.name),
                                 virtual_part(self.backup_id), *leaf)

    async def write_disk(self, label: str, chunks: AsyncIterator[bytes | memoryview]) -> int:
        fname = self.vpath("disks", f"{safe_name(label)}.ahvd")
        stream = _DiskStream(self, label, chunks)
        slot = self.sink.send_slot
        held = _try_acquire(slot)
        try:
            # buffer until the stream ends, or it is our turn and the lookahead is full
            while not stream.done and not (held and stream.buffered >= LOOKAHEAD):
                await stream.buffer_next(to_memory=held and stream.spool is None)
                held = held or _try_acquire(slot)
            if not held:
                await slot.acquire()
                held = True  # no checkpoint in between: the slot is ours once acquired
            if stream.spool is not None:
                log.info("VM %s disk %s: its turn came after %d bytes were spooled%s",
                         self.vm.name, label, stream.buffered,
                         " (the whole stream)" if stream.done else "; catching up, then streaming")
            sent = await self._send(fname, stream)
        finally:
            if held:
                slot.release()
            stream.close()
        if sent != stream.total:
            raise SinkError(f"VM {self.vm.name} disk {label}: sent {sent} of {stream.total} "
                            "bytes")
        self.stored[label] = sent
        return sent

    async def _send(self, fname: str, stream: _DiskStream) -> int:
        """Send the stream as one file: what is buffered, then (when it has not ended yet) the
        encoder's items as they come, through a small queue, so that reading and sending
        overlap. The sending runs shielded and ends its file's data at a packet boundary
        (`stop`) when the reading fails or is cancelled: a cancellation in the middle of a
        packet, or an error packet inside a file's data (metaplugin.cpp perform_read_data stops
        the backend), would break the protocol for every other VM of the job."""
        size = stream.buffered if stream.done else UNKNOWN_SIZE
        tx, rx = trio.open_memory_channel[bytes](LIVE_QUEUE)
        result: list[int] = []
        try:
            async with trio.open_nursery() as nursery:
                sender: trio.CancelScope = await nursery.start(self._sender, fname, size,
                                                               stream, rx, result)
                try:
                    async with tx:
                        if not stream.done:
                            async for chunk in stream.chunks:
                                await tx.send(bytes(chunk))  # the encoder reuses its buffer
                                stream.total += len(chunk)
                            stream.done = True
                    await stream.sent.wait()
                except BaseException:
                    stream.stop = True  # the data ends after the item being sent
                    # a file daemon that does not read any more cannot hold up the cleanup
                    sender.deadline = trio.current_time() + DRAIN_SECONDS
                    raise
        except BaseExceptionGroup as group:  # the one error, as the caller would see it
            inner: BaseException = group
            while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
                inner = inner.exceptions[0]
            raise inner from None
        return result[0]

    async def _sender(self, fname: str, size: int, stream: _DiskStream,
                      rx: trio.MemoryReceiveChannel[bytes], result: list[int],
                      task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
        with trio.CancelScope(shield=True) as scope:
            task_status.started(scope)
            try:
                async with contextlib.aclosing(stream.data(rx)) as data:
                    result.append(await self.emitter.file(fname, size=size, mtime=self.created,
                                                          chunks=data))
                if stream.stop and self.sink.messages is not None:
                    await self.sink.messages.warning(
                        f"{fname}: the disk stream stopped after {result[0]} bytes were sent "
                        "(its reading failed or was cancelled); that file of this job is "
                        "incomplete (restore refuses it) and its VM has no vm.json in this job")
            finally:
                stream.sent.set()

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


def _try_acquire(slot: trio.Semaphore) -> bool:
    try:
        slot.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True


class _DiskStream:
    """One disk stream on its way to the file daemon: what was read before its turn (in
    memory up to `LOOKAHEAD` when it is its turn, else in a spool file), then the rest as the
    encoder produces it. The encoder reuses an item's buffer once the next one is asked for, so
    an item is copied whenever it is kept."""

    def __init__(self, writer: _EmitterWriter, label: str,
                 chunks: AsyncIterator[bytes | memoryview]) -> None:
        self.writer = writer
        self.label = label
        self.chunks = chunks.__aiter__()
        self.head: list[bytes] = []
        self.spool: Path | None = None
        self._file: BinaryIO | None = None
        self.buffered = 0  # bytes in head or in the spool file
        self.total = 0  # bytes taken from the encoder
        self.done = False  # the encoder's stream ended
        self.stop = False  # the reading failed: end the data where it is
        self.sent = trio.Event()

    async def buffer_next(self, *, to_memory: bool) -> None:
        """Take the next item into the buffer (or note the end of the stream)."""
        try:
            chunk = await self.chunks.__anext__()
        except StopAsyncIteration:
            self.done = True
            return
        if to_memory:
            self.head.append(bytes(chunk))
        else:
            await self._spill(chunk)
        self.buffered += len(chunk)
        self.total += len(chunk)

    async def _spill(self, chunk: bytes | memoryview) -> None:
        w = self.writer
        path = w.spool / f"{safe_name(self.label)}.ahvd"
        try:
            if self._file is None:
                w.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._file = await trio.to_thread.run_sync(open, path, "wb", limiter=_io)
                self.spool = path
                log.info("VM %s disk %s: another file is being sent; spooling to %s meanwhile",
                         w.vm.name, self.label, path)
            await trio.to_thread.run_sync(self._file.write, chunk, limiter=_io)
        except OSError as err:
            raise SinkError(f"VM {w.vm.name} disk {self.label}: cannot spool the stream to "
                            f"{path} ({err.strerror}); working_dir needs room for the disk "
                            "streams read while another one is being sent") from err

    async def data(self, queue: trio.MemoryReceiveChannel[bytes]
                   ) -> AsyncIterator[bytes | memoryview]:
        """The file's data: the buffer, then the queue; it ends early on `stop`."""
        if self.spool is not None:
            assert self._file is not None
            self._file.flush()
            async with contextlib.aclosing(_read_file(self.spool)) as blocks:
                async for block in blocks:
                    if self.stop:
                        return
                    yield block
        while self.head and not self.stop:
            yield self.head.pop(0)
        async with queue:
            async for item in queue:
                if self.stop:
                    return
                yield item

    def close(self) -> None:
        """Drop the buffer (synchronous: it runs in cancelled code too)."""
        self.head.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)


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
        #: one disk stream at a time goes to the file daemon (FIFO); the others spool meanwhile
        self.send_slot = trio.Semaphore(1)
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

    def recorded(self, header: StreamHeader) -> Manifest | None:
        """The manifest of the backup a stream belongs to, when this host sent it (the
        record of sent backups): the VM's configuration, for a restore that creates the VM."""
        path = self.sent_root / safe_name(header.vm_uuid) / f"{safe_name(header.backup_id)}.json"
        try:
            return Manifest.from_bytes(path.read_bytes(), name=str(path))
        except FileNotFoundError:
            return None
        except (OSError, ManifestError) as err:
            log.warning("bacula sink: %s is unreadable (%s); restoring without it", path, err)
            return None

    def open_stream(self, backup: StoredBackup, label: str) -> BinaryIO:
        raise SinkError("sink=bacula: restore through Bacula (bconsole restore), which hands "
                        "the streams to the backend or to 'ahvbackup bpipe restore'")
