"""Disk streams that arrive in pieces (D packets, a pipe): checked as they pass, then applied.

- `StreamFeed` decodes a stream given in any pieces and hands each item on: every check of the
  format (checksums, trailer, digest) runs as the bytes pass, with memory bounded by one record.
- `StreamApplier` applies one stream through a restore target as it arrives: the bpipe writer
  (one stream per job), and a metaplugin restore whose chain is not all in the job (backups
  taken before one-job chain restores, restored job by job). A full goes through any installed
  target (a cluster target gets the `ClusterAccess` the caller opened); an incremental or
  differential alone can only be written into the raw image the earlier links of its chain
  left (``target=raw``), and only when that image is the one it was taken against. A sidecar
  ``<image>.chain.json`` records what was applied, so a chain restored out of order, or an
  incremental onto nothing, fails with a message instead of producing a wrong disk.

A stream is only good once its trailer checked out; if it does not (damaged, truncated), what
it was writing is removed, so nothing partial is passed off as restored. A metaplugin restore
that holds a whole chain applies it in one pass instead (`restore_collect`).
"""

from __future__ import annotations

__all__ = ["AppliedStream", "StreamApplier", "StreamFeed", "apply_stream", "chain_file",
           "write_chain_file"]

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ahvbackup.core.drivers import (
    ClusterAccess,
    DiskWriter,
    Hypervisor,
    RestoreRequest,
    RestoreTarget,
    VmRestore,
)
from ahvbackup.core.errors import StreamFormatError, TargetError
from ahvbackup.core.fsutil import atomic_write_json
from ahvbackup.core.jobs.restore import refuse_vm_keys, restore_request
from ahvbackup.core.manifest import Manifest
from ahvbackup.core.model import DiskInfo
from ahvbackup.core.stream import Decoder, Keyring, Record, StreamHeader, Trailer
from ahvbackup.targets.raw import RawDiskWriter, RawImage, RawTarget, image_parts

log = logging.getLogger("ahvbackup.bacula.restore")

Item = StreamHeader | Record | Trailer | None
#: the backed-up VM's manifest for a stream, when this host knows it (bpipe: the record of
#: sent backups), so a cluster target can rebuild the VM's configuration
ManifestOf = Callable[[StreamHeader], Manifest | None]


def chain_file(image: Path) -> Path:
    return image.with_name(image.name + ".chain.json")


def write_chain_file(image: Path, *, vm_uuid: str, disk_uuid: str, disk_size: int,
                     backup_ids: Sequence[str], snapshot_id: str, stream_id: str) -> None:
    """Record which backups a raw image holds (the next link restored alone checks it)."""
    atomic_write_json(chain_file(image), {
        "vm_uuid": vm_uuid, "disk_uuid": disk_uuid, "disk_size": disk_size,
        "backup_ids": list(backup_ids), "snapshot_id": snapshot_id, "stream_id": stream_id,
    })


class StreamFeed:
    """A stream's bytes in any pieces (`feed`), then `end`: each decoded item (header, records,
    trailer) goes to `on_item` as soon as it is complete."""

    def __init__(self, on_item: Callable[[Item], Awaitable[None]], *, name: str,
                 keys: Keyring | None = None, keyless: bool = False) -> None:
        """`keys` open an encrypted stream's payloads; `keyless`: check its framing,
        checksums and digest without them (payloads are then not opened)."""
        self.decoder = Decoder(name=name, keys=keys, keyless=keyless)
        self._on_item = on_item
        self._pending = bytearray()

    @property
    def name(self) -> str:
        return self.decoder.name

    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            want = self.decoder.want
            if want == 0:
                self.decoder.at_eof(extra=True)
            if self._pending or len(view) < want:
                take = min(want - len(self._pending), len(view))
                self._pending += view[:take]
                view = view[take:]
                if len(self._pending) == want:
                    await self._on_item(self.decoder.take(self._pending))
                    self._pending = bytearray()
            else:
                await self._on_item(self.decoder.take(view[:want]))
                view = view[want:]

    def end(self) -> StreamHeader:
        """End of input: the stream must be complete; returns its header."""
        if self.decoder.want:
            self.decoder.truncated_in(len(self._pending))
        if self.decoder.header is None:
            raise StreamFormatError(f"{self.name}: the stream is empty")
        return self.decoder.header


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
                 name: str = "", cluster: ClusterAccess | None = None,
                 manifest_of: ManifestOf | None = None, keys: Keyring | None = None,
                 hypervisor: Hypervisor | None = None) -> None:
        """Images go where `target` puts them under `dest` (raw: ``<dest>/<vm>/<label>.raw``);
        `vm_name` overrides the VM folder name (default: the name in the stream); `cluster`
        is what the caller opened for a target that `needs_cluster` (`cluster_for`); `keys`
        open an encrypted stream (`stream_keys`); `hypervisor` reads the VM's shape from
        the manifest `manifest_of` finds."""
        refuse_vm_keys(target)
        self.target = target
        self.dest = dest
        self.vm_name = vm_name
        self.cluster = cluster
        self.manifest_of = manifest_of
        self.hypervisor = hypervisor
        self.stream = StreamFeed(self._handle, name=name, keys=keys)
        self.out = AppliedStream()
        self._vm: VmRestore | None = None  # a full's own restore (an incremental has none)
        self._writer: DiskWriter | None = None
        self._image: RawImage | None = None  # an incremental's image, which its chain left
        self._chain: list[str] = []
        self._failed = False

    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.feed(data)
        except BaseException:
            await self.abort()
            raise

    async def finish(self) -> AppliedStream:
        """End of input: the stream must be complete; the disk is closed and recorded
        (`AppliedStream.path`: the disk's file; None for a VM made on a cluster, whose id is
        then in `AppliedStream.vm_name`)."""
        try:
            h = self.stream.end()
            assert self._writer is not None
            disk = await self._writer.finish()
            made = await self._vm.commit() if self._vm is not None else ""
            self._writer = self._vm = self._image = None
        except BaseException:
            await self.abort()
            raise
        self._chain.append(h.backup_id)
        self.out.backup_ids = list(self._chain)
        if self.target.needs_cluster:
            self.out.vm_name = f"{self.out.vm_name} (VM {made})"
            return self.out
        self.out.path = Path(disk)
        if isinstance(self.target, RawTarget):
            write_chain_file(self.out.path, vm_uuid=h.vm_uuid, disk_uuid=h.disk_uuid,
                             disk_size=h.disk_size, backup_ids=self._chain,
                             snapshot_id=h.snapshot_id, stream_id=h.stream_id)
        return self.out

    async def abort(self) -> None:
        """Remove what this stream was writing (a full's new disk; an incremental's image,
        which is no longer the earlier point and not yet the new one)."""
        if self._failed:
            return
        self._failed = True
        with trio.CancelScope(shield=True):
            if self._vm is not None:
                await self._vm.abort()
                # debug: the error that follows is the one line the job log gets
                log.debug("%s: restore failed; what it wrote was removed", self.stream.name)
            elif self._image is not None:
                path = await trio.to_thread.run_sync(self._image.close)
                path.unlink(missing_ok=True)
                chain_file(path).unlink(missing_ok=True)
                log.debug("%s: restore failed; removed %s", self.stream.name, path)
        self._writer = self._vm = self._image = None

    # decoded items ------------------------------------------------------------------------
    async def _handle(self, item: Item) -> None:
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
            manifest = self.manifest_of(h) if self.manifest_of is not None else None
            request = (restore_request(self.hypervisor, vm_name=vm, dest=self.dest,
                                       manifest=manifest) if self.hypervisor is not None
                       else RestoreRequest(vm_name=vm, dest=self.dest, manifest=manifest))
            self._vm = await self.target.begin_vm(request, cluster=self.cluster)
            self._writer = await self._vm.open_disk(disk, size=h.disk_size)
            return
        what = f"{h.kind} stream of {h.vm_name} {h.disk_label} (backup {h.backup_id})"
        if not isinstance(self.target, RawTarget):
            raise TargetError(
                f"{what}: a delta alone can only be applied onto the raw image its chain's "
                f"earlier restores left (target=raw), not to target={self.target.name}; "
                "restore the whole chain in one job (metaplugin), or the chain to raw "
                "images first")
        parts = image_parts(vm, disk.label)
        self._chain = self._check_chain(what, h, self.dest.joinpath(*parts))
        self._image = await trio.to_thread.run_sync(RawImage, self.dest, parts, None)
        self._writer = RawDiskWriter(self._image)

    def _check_chain(self, what: str, h: StreamHeader, image: Path) -> list[str]:
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
