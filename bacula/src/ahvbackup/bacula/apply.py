"""Applying a disk stream that arrives in pieces (D packets, a pipe) onto a raw disk image.

Used by both Bacula paths at restore: the metaplugin hands us a ``.ahvd`` file's blocks, bpipe
hands ``ahvbackup bpipe restore`` the stream on stdin. A full stream creates the image through
the configured restore target; an incremental or differential stream is written into the image
the earlier streams of its chain left, and only when that image is the one it was taken
against. A sidecar ``<image>.chain.json`` records what was applied, so restoring a chain out of
order, or an incremental onto nothing, fails with a message instead of producing a wrong disk.

A stream is only good once its trailer checked out; if it does not (damaged, truncated), the
image is removed, so nothing partial is passed off as restored.
"""

from __future__ import annotations

__all__ = ["AppliedStream", "StreamApplier", "apply_stream", "chain_file"]

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ahvbackup.core.drivers import DiskWriter, RestoreRequest, RestoreTarget, VmRestore
from ahvbackup.core.errors import ConfigError, StreamFormatError, TargetError
from ahvbackup.core.fsutil import atomic_write_json
from ahvbackup.core.jobs.restore import refuse_vm_keys
from ahvbackup.core.model import DiskInfo
from ahvbackup.core.stream import Decoder, Record, StreamHeader, Trailer
from ahvbackup.targets.raw import RawDiskWriter, RawImage, image_parts

log = logging.getLogger("ahvbackup.bacula.restore")


def chain_file(image: Path) -> Path:
    return image.with_name(image.name + ".chain.json")


@dataclass
class AppliedStream:
    """What one applied stream did."""

    kind: str = ""
    vm_name: str = ""
    label: str = ""
    path: Path | None = None
    data_bytes: int = 0
    zero_bytes: int = 0
    digest: str = ""
    backup_ids: list[str] = field(default_factory=list)  # the chain now in the image


class StreamApplier:
    """Feed a stream's bytes in any pieces (`feed`), then `finish`; `abort` on any failure."""

    def __init__(self, *, target: RestoreTarget, dest: Path, vm_name: str | None = None,
                 name: str = "") -> None:
        """Images go where `target` puts them under `dest` (raw: ``<dest>/<vm>/<label>.raw``);
        `vm_name` overrides the VM folder name (default: the name in the stream)."""
        refuse_vm_keys(target)
        if target.needs_cluster:
            raise ConfigError(f"target: {target.name!r} restores to a cluster, which this "
                              "version does not do through Bacula yet (restore to files, "
                              "then import)")
        self.target = target
        self.dest = dest
        self.vm_name = vm_name
        self.decoder = Decoder(name=name)
        self.out = AppliedStream()
        self._pending = bytearray()
        self._vm: VmRestore | None = None  # a full's own restore (an incremental has none)
        self._writer: DiskWriter | None = None
        self._image: RawImage | None = None  # an incremental's image, which its chain left
        self._chain: list[str] = []
        self._failed = False

    # feeding ----------------------------------------------------------------------------
    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                want = self.decoder.want
                if want == 0:
                    self.decoder.at_eof(extra=True)
                if self._pending or len(view) < want:
                    take = min(want - len(self._pending), len(view))
                    self._pending += view[:take]
                    view = view[take:]
                    if len(self._pending) == want:
                        await self._handle(self.decoder.take(self._pending))
                        self._pending = bytearray()
                else:
                    await self._handle(self.decoder.take(view[:want]))
                    view = view[want:]
        except BaseException:
            await self.abort()
            raise

    async def finish(self) -> AppliedStream:
        """End of input: the stream must be complete; the image is closed and recorded."""
        try:
            if self.decoder.want:
                self.decoder.truncated_in(len(self._pending))
            if self._writer is None:
                raise StreamFormatError(  # noqa: TRY301 - abort() below must run for it too
                    f"{self.decoder.name}: the stream is empty")
            path = Path(await self._writer.finish())
            if self._vm is not None:
                await self._vm.commit()
            self._writer = self._vm = self._image = None
        except BaseException:
            await self.abort()
            raise
        h = self.decoder.header
        assert h is not None
        self._chain.append(h.backup_id)
        atomic_write_json(chain_file(path), {
            "vm_uuid": h.vm_uuid, "disk_uuid": h.disk_uuid, "disk_size": h.disk_size,
            "backup_ids": self._chain, "snapshot_id": h.snapshot_id, "stream_id": h.stream_id,
        })
        self.out.path = path
        self.out.backup_ids = list(self._chain)
        return self.out

    async def abort(self) -> None:
        """Remove what this stream was writing (a full's new image; an incremental's image,
        which is no longer the earlier point and not yet the new one)."""
        if self._failed:
            return
        self._failed = True
        with trio.CancelScope(shield=True):
            if self._vm is not None:
                await self._vm.abort()
                log.error("%s: restore failed; its image was removed", self.decoder.name)
            elif self._image is not None:
                path = await trio.to_thread.run_sync(self._image.close)
                path.unlink(missing_ok=True)
                chain_file(path).unlink(missing_ok=True)
                log.error("%s: restore failed; removed %s", self.decoder.name, path)
        self._writer = self._vm = self._image = None

    # decoded items ------------------------------------------------------------------------
    async def _handle(self, item: StreamHeader | Record | Trailer | None) -> None:
        if isinstance(item, StreamHeader):
            await self._open(item)
        elif isinstance(item, Record):
            assert self._writer is not None
            if item.data is not None:
                await self._writer.write(item.offset, item.data)
                self.out.data_bytes += item.length
            else:
                await self._writer.zero(item.offset, item.length)
                self.out.zero_bytes += item.length
        elif isinstance(item, Trailer):
            self.out.digest = item.digest_hex

    async def _open(self, h: StreamHeader) -> None:
        vm = self.vm_name or h.vm_name or h.vm_uuid
        self.out.kind, self.out.vm_name, self.out.label = h.kind, vm, h.disk_label
        disk = DiskInfo(uuid=h.disk_uuid, bus=h.disk_bus or "scsi", index=h.disk_index,
                        size=h.disk_size)
        if h.kind == "full":
            self._vm = await self.target.begin_vm(RestoreRequest(vm_name=vm, dest=self.dest),
                                                  cluster=None)
            self._writer = await self._vm.open_disk(disk, size=h.disk_size)
            return
        parts = image_parts(vm, disk.label)
        self._chain = self._check_chain(h, self.dest.joinpath(*parts))
        self._image = await trio.to_thread.run_sync(RawImage, self.dest, parts, None)
        self._writer = RawDiskWriter(self._image)

    def _check_chain(self, h: StreamHeader, image: Path) -> list[str]:
        what = f"{h.kind} stream of {h.vm_name} {h.disk_label} (backup {h.backup_id})"
        side = chain_file(image)
        try:
            chain = json.loads(side.read_text())
        except FileNotFoundError:
            raise TargetError(
                f"{what}: {image} has no restored full to apply it to; restore the chain in "
                "order (the full first, then each incremental) into the same where") from None
        except (OSError, ValueError) as err:
            raise TargetError(f"{what}: {side} is unreadable ({err})") from err
        applied = list(chain.get("backup_ids", []))
        if chain.get("disk_uuid") != h.disk_uuid:
            raise TargetError(f"{what}: {image} holds another disk ({chain.get('disk_uuid')})")
        if chain.get("disk_size") != h.disk_size:
            raise TargetError(f"{what}: the disk was resized ({chain.get('disk_size')} -> "
                              f"{h.disk_size}); restore from a full taken after the resize")
        ref = h.reference_backup_id
        ok = (not ref or (applied and applied[-1] == ref)
              or (h.kind == "differential" and ref in applied))
        if not ok:
            raise TargetError(
                f"{what}: it applies on top of backup {ref}, but {image} holds "
                f"{' + '.join(applied) or 'nothing'}; restore the chain in order")
        return applied


async def apply_stream(applier: StreamApplier, read: Callable[[int], bytes], *,
                       block: int = 1 << 20) -> AppliedStream:
    """Apply everything `read` returns (blocking reads, in a worker thread) until it returns
    b'' (a pipe, a file)."""
    while True:
        data = await trio.to_thread.run_sync(read, block)
        if not data:
            return await applier.finish()
        await applier.feed(data)
