"""Demonstration handlers for the backend's conformance tests (no Prism, no job pipeline).

The backend loads them through ``AHVBACKUP_BACULA_HANDLERS=demo_handlers:DemoHandlers``. They
are driven by ordinary configuration keys, so the parameters go through the real schema:

- ``vm=`` names demo VMs; each backs up ``vm.json`` and two disks of known content;
- a VM named ``fail-*`` fails the job (an `AhvBackupError`); ``bug-*`` raises a plain bug;
- ``bad-disk-*`` fails its disk-0 stream half way (that file alone fails, the job goes on);
- ``hang-*`` records a resource in the cleanup ledger (``state_dir``) and waits forever;
  a cancel must release it (the releaser writes ``<state_dir>/released-<vm>``);
- ``complain-*`` reports job errors between files and from inside a disk stream;
- ``noisy-*`` prints to stdout and stderr and raises a Python warning;
- restore writes each file where the plugin says (``where`` applied); ``restore_disks_only``
  skips the other disks.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import trio

from ahvbackup.bacula.handlers import BackendContext, BackendHandlers, FileEmitter, RestoreFile
from ahvbackup.core.errors import DataPathError, HypervisorError
from ahvbackup.core.ledger import Ledger, Record, ReleaseStack

CLUSTER = "demo-cluster"
DISK_SIZES = (2_500_000, 1_000)  # disk-0 needs three D packets (limit 999999)
MTIME = 1_700_000_000


def disk_content(vm: str, disk: int) -> bytes:
    """The known bytes of a demo disk."""
    return hashlib.shake_256(f"{vm}/disk-{disk}".encode()).digest(DISK_SIZES[disk])


def vm_json(vm: str) -> bytes:
    return json.dumps({"name": vm, "cluster": CLUSTER,
                       "disks": [{"index": i, "size": s} for i, s in enumerate(DISK_SIZES)]},
                      sort_keys=True).encode()


def vm_names(ctx: BackendContext) -> list[str]:
    return [v for v in ctx.config.vm if v != "*"] or ["alpha"]


async def _chunks(data: bytes, *, fail_at: int | None = None, step: int = 300_000
                  ) -> AsyncIterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), step):
        if fail_at is not None and start >= fail_at:
            raise DataPathError(f"demo: read of disk failed at offset {start}")
        yield view[start : start + step]
        await trio.lowlevel.checkpoint()


async def _complaining(ctx: BackendContext, vm: str, chunks: AsyncIterator[memoryview]
                      ) -> AsyncIterator[memoryview]:
    """Reports a job error from inside a file's data stream (same task as the emitter)."""
    async for n, chunk in _enumerate(chunks):
        if n == 1:
            await ctx.messages.error(f"VM {vm}: complaint inside a disk stream (demo)")
        yield chunk


async def _enumerate(it: AsyncIterator[memoryview]) -> AsyncIterator[tuple[int, memoryview]]:
    n = 0
    async for item in it:
        yield n, item
        n += 1


class DemoHandlers(BackendHandlers):
    async def backup(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        for vm in vm_names(ctx):
            if vm.startswith("fail"):
                raise HypervisorError(f"VM {vm}: snapshot failed (demo)")
            if vm.startswith("bug"):
                raise RuntimeError(f"demo bug in {vm}")
            if vm.startswith("hang"):
                await self._hang(ctx, vm)
            if vm.startswith("noisy"):
                print(f"stray stdout line from {vm}")
                print(f"stray stderr line from {vm}", file=sys.stderr)
                warnings.warn(f"demo warning from {vm}", UserWarning, stacklevel=1)
            if vm.startswith("complain"):
                await ctx.messages.error(f"VM {vm}: complaint between files (demo)")
            meta = vm_json(vm)
            await emitter.file(ctx.path(CLUSTER, vm, "vm.json"), size=len(meta), mtime=MTIME,
                               chunks=_chunks(meta))
            try:
                for i, size in enumerate(DISK_SIZES):
                    fail_at = 1_000_000 if vm.startswith("bad-disk") and i == 0 else None
                    chunks = _chunks(disk_content(vm, i), fail_at=fail_at)
                    if vm.startswith("complain"):
                        chunks = _complaining(ctx, vm, chunks)
                    await emitter.file(ctx.path(CLUSTER, vm, "disks", f"disk-{i}.ahvd"),
                                       size=size, mtime=MTIME, chunks=chunks)
            except DataPathError:
                await ctx.messages.warning(f"VM {vm}: backup incomplete, continuing")
                continue
            await ctx.messages.info(f"VM backed up: vm={vm} disks={len(DISK_SIZES)}")

    async def _hang(self, ctx: BackendContext, vm: str) -> None:
        state = ctx.config.state_dir

        async def release(rec: Record) -> None:
            await trio.sleep(0.2)  # a remote call takes a while
            (state / f"released-{vm}").write_text(rec.resource_id)

        async with ReleaseStack(Ledger(state), owner="demo-job", releaser=release) as stack:
            stack.record("snapshot", f"snap-{vm}", vm=vm)
            await ctx.messages.info(f"VM {vm}: snapshot taken, waiting")
            await trio.sleep_forever()

    async def listing(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        top = (ctx.listing or "/").strip("/")
        if not top:
            await emitter.directory(ctx.path(CLUSTER), mtime=MTIME)
            return
        for vm in vm_names(ctx):
            await emitter.directory(ctx.path(CLUSTER, vm), mtime=MTIME)

    async def query(self, ctx: BackendContext) -> Iterable[tuple[str, str]]:
        if ctx.query == "vms":
            return [("vm", vm) for vm in vm_names(ctx)]
        raise HypervisorError(f"query {ctx.query!r}: unknown (demo knows 'vms')")

    async def restore_wanted(self, ctx: BackendContext, file: RestoreFile) -> bool:
        only = ctx.config.restore_disks_only
        name = Path(file.fname).name
        return not (only and name.endswith(".ahvd") and name.removesuffix(".ahvd") not in only)

    async def restore_file(self, ctx: BackendContext, file: RestoreFile,
                           data: AsyncIterator[memoryview]) -> None:
        if "reject" in file.fname:
            raise DataPathError(f"{file.fname}: demo refuses this file")
        target = Path(file.fname)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            async for block in data:
                out.write(block)
