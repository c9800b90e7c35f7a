"""Consolidation: a chain becomes a synthetic full, without touching the cluster.

The chosen backup (by default a VM's newest) is rewritten in place as a full: same backup id,
same snapshot, and each disk stream keeps its `stream_id`, so deltas taken later still name a
stream that exists. The new streams are read back and compared with the chain, range by range,
before they replace the old backup; only then are the older links that nothing else (no kept
backup, no state reference) builds on removed.
"""

from __future__ import annotations

__all__ = ["ConsolidateJob", "ConsolidateOutcome"]

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from ..drivers import BackupWriter, StoredBackup
from ..errors import ConfigError, StreamFormatError
from ..manifest import DiskEntry
from ..model import VmInfo
from ..stream import Encoder, StreamHeader, StreamReader
from .chain import ChainImage, Link, resolve_chain
from .codec import stream_codec, stream_keys
from .retention import needed, state_roots
from .runtime import Runtime

log = logging.getLogger("ahvbackup.consolidate")

COPY_BLOCK = 4 << 20


@dataclass
class ConsolidateOutcome:
    backup_id: str
    vm_name: str
    ok: bool = False
    disks: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # older links dropped afterwards
    seconds: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ConsolidateJob:
    def __init__(self, rt: Runtime, backup: StoredBackup) -> None:
        if not rt.sink.manages_backups:
            raise ConfigError(
                f"sink: {rt.config.sink!r} cannot consolidate (only the directory repository can)"
            )
        self.rt = rt
        self.backup = backup

    async def run(self) -> ConsolidateOutcome:
        started = time.monotonic()
        rt, backup = self.rt, self.backup
        rt.sweep_repository()  # a consolidation killed between its renames is finished first
        out = ConsolidateOutcome(backup_id=backup.backup_id, vm_name=backup.vm_name)
        by_id = {b.backup_id: b for b in await rt.sink.backups(backup.vm_uuid)}
        entries = backup.manifest.streams
        chains = {d.label: resolve_chain(by_id, backup, d) for d in entries}
        if all(len(c) == 1 for c in chains.values()):
            out.ok = True
            out.note = "already a full: nothing to consolidate"
            return out
        vm = VmInfo(uuid=backup.vm_uuid, name=backup.vm_name, cluster_uuid="",
                    cluster_name="", disks=())
        writer = await rt.sink.begin_replace(vm, backup_id=backup.backup_id, level="full")
        rewritten: dict[str, DiskEntry] = {}
        try:
            for entry in entries:
                links = chains[entry.label]
                stored, digest = await self._write_synthetic(writer, links)
                await trio.to_thread.run_sync(self._compare, writer, links)
                rewritten[entry.uuid] = replace(
                    entry, kind="full", reference_backup="", reference_snapshot="",
                    bytes_stored=stored, digest=digest,
                    warnings=(*entry.warnings, "consolidated from "
                              + " + ".join(link.backup.backup_id for link in links)))
                out.disks.append({"label": entry.label, "links": len(links),
                                  "bytes_stored": stored})
            manifest = backup.manifest.with_disks(
                tuple(rewritten.get(d.uuid, d) if d.stream else d
                      for d in backup.manifest.disks),
                level="full")
            await writer.commit(manifest)
        except BaseException:
            with trio.CancelScope(shield=True):
                await writer.abort()
            raise
        log.info("consolidated backup %s of %s (%d disk(s)) into a synthetic full",
                 backup.backup_id, backup.vm_name, len(entries))
        out.removed = await self._drop_links(chains)
        out.ok = True
        out.seconds = time.monotonic() - started
        return out

    async def _write_synthetic(self, writer: BackupWriter, links: list[Link]) -> tuple[int, str]:
        """Write the chain's image as one full stream, produced in a worker thread; returns
        the bytes stored and the stream's digest."""
        send, recv = trio.open_memory_channel[bytes](4)
        digest = [""]
        token = trio.lowlevel.current_trio_token()
        tip = links[-1]

        codec, keys = stream_codec(self.rt.config), stream_keys(self.rt.config)

        def produce() -> None:
            with ChainImage(self.rt.sink, links, keys=keys) as image:
                h = image.tip.header
                header = StreamHeader(
                    kind="full", vm_uuid=h.vm_uuid, vm_name=h.vm_name, disk_uuid=h.disk_uuid,
                    disk_label=h.disk_label, disk_bus=h.disk_bus, disk_index=h.disk_index,
                    disk_size=h.disk_size, block_size=h.block_size, snapshot_id=h.snapshot_id,
                    backup_id=tip.backup.backup_id, stream_id=h.stream_id,
                    extra={"synthetic": True,
                           "consolidated_from": [link.backup.backup_id for link in links]},
                )
                enc = Encoder(header, codec)  # a synthetic full is stored like a new one

                def put(b: bytes) -> None:
                    trio.from_thread.run(send.send, b, trio_token=token)

                put(enc.header())
                for off, length, view in image.ranges():
                    if view is None:
                        put(enc.zero(off, length))
                    else:
                        rec, payload = enc.data(off, view)
                        put(bytes(rec) + bytes(payload))
                put(enc.trailer())
                digest[0] = enc.summary().digest_hex

        async def run() -> None:
            # BrokenResourceError: the writer stopped taking data; its own error is what matters
            async with send:
                with contextlib.suppress(trio.BrokenResourceError):
                    await trio.to_thread.run_sync(produce)

        async def items() -> AsyncIterator[bytes]:
            async for item in recv:
                yield item

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with recv:
                stored: int = await writer.write_disk(tip.label, items())
        return stored, digest[0]

    def _compare(self, writer: BackupWriter, links: list[Link]) -> None:
        """Read the new stream back in full (digest included) and compare it, range by range,
        with the chain it replaces."""
        label = links[-1].label
        keys = stream_keys(self.rt.config)
        with writer.open_written(label) as f, ChainImage(self.rt.sink, links, keys=keys) as old:
            reader = StreamReader(f, name=f"{self.backup.vm_name}/{label} (consolidated)",
                                  keys=keys)
            expected = old.ranges()
            for rec in reader:
                want = next(expected, None)
                got_data = None if rec.data is None else bytes(rec.data)
                if want is None or (want[0], want[1]) != (rec.offset, rec.length) or (
                    (want[2] is None) != (got_data is None)
                    or (want[2] is not None and bytes(want[2]) != got_data)
                ):
                    raise StreamFormatError(
                        f"consolidation of backup {self.backup.backup_id} disk {label}: the "
                        f"synthetic full differs from the chain at disk offset {rec.offset}; "
                        "nothing was replaced"
                    )
            if next(expected, None) is not None:
                raise StreamFormatError(
                    f"consolidation of backup {self.backup.backup_id} disk {label}: the "
                    "synthetic full is shorter than the chain; nothing was replaced"
                )

    async def _drop_links(self, chains: dict[str, list[Link]]) -> list[str]:
        """Remove older links nothing kept builds on any more."""
        rt = self.rt
        backups = await rt.sink.backups(self.backup.vm_uuid)
        by_id = {b.backup_id: b for b in backups}
        candidates = {
            link.backup.backup_id for links in chains.values() for link in links[:-1]
        }
        kept = [b for b in by_id if b not in candidates]
        protected = needed(by_id, [*kept, *state_roots(rt, self.backup.vm_uuid)])
        removed = []
        for b in reversed(backups):
            if b.backup_id in candidates and b.backup_id not in protected:
                await rt.sink.remove(b)
                removed.append(b.backup_id)
                log.info("consolidation: removed backup %s (now part of %s)", b.backup_id,
                         self.backup.backup_id)
        return removed
