"""The base of the qcow2, vmdk, vhdx and vhd targets: disk images written through `qemu-nbd`.

Per disk: ``qemu-img create`` makes the image at the disk's exact virtual size (rounded up
where the format demands it) under a hidden partial name; ``qemu-nbd`` serves it on a unix
socket next to it (no root, no kernel nbd device); only data ranges go over NBD (`nbd.py`),
regrouped into whole granules with zero granules left out (`granules.py`), several in flight
(one at a time for a format that must be written in order); then flush, disconnect, and
qemu-nbd exits. No staging copy of the disk is ever made, and memory stays flat.

`commit` runs ``qemu-img check`` (where the format has one) and ``qemu-img info`` on every
image: the format, the virtual size, the create type where it has one, and no backing file.
Only when every image passed are the artifacts written (an OVA, a command line) and the
partial files renamed into place. A failed check, a qemu-nbd that died, a full destination or
a missing qemu-img fail the restore in one line, and `abort` removes every partial file; a
later restore into the folder removes those a killed one left (`raw.sweep_partials`).
"""

from __future__ import annotations

__all__ = [
    "ImageFormat",
    "ImageInfo",
    "QemuDisk",
    "QemuTarget",
    "QemuTools",
    "QemuVmRestore",
    "image_info",
]

import abc
import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import trio

from ahvbackup.core.containment import folders_inside, open_inside, safe_name
from ahvbackup.core.drivers import (
    ClusterAccess,
    DiskWriter,
    RestoreRequest,
    RestoreTarget,
    VmRestore,
    VmShape,
)
from ahvbackup.core.errors import TargetError
from ahvbackup.core.fsutil import fsync_dir, io_failure
from ahvbackup.core.model import DiskInfo

from .granules import Granules
from .nbd import NbdError
from .nbd_server import NbdServer
from .raw import image_parts, partial_name, sweep_partials

log = logging.getLogger("ahvbackup.target.qemu")

@dataclass(frozen=True)
class ImageFormat:
    """How a target makes its images: qemu's format `name`, the file `suffix`, the
    ``qemu-img create -o`` `options`; `granule` is the unit each write covers whole (a grain
    or cluster of a compressed image), `in_order` one write in flight at a time (a stream
    format), `compress_filter` serves the image through qemu's compress filter; `align` is
    what the virtual size is rounded up to; `checkable` says ``qemu-img check`` knows the
    format; `create_type` and `compression_type` are what ``qemu-img info`` must report."""

    name: str
    suffix: str
    options: tuple[str, ...] = ()
    granule: int = 4096
    in_order: bool = False
    compress_filter: bool = False
    align: int = 512
    checkable: bool = True
    create_type: str = ""
    compression_type: str = ""

    @property
    def compressed(self) -> bool:
        return self.compress_filter or self.in_order

    def virtual_size(self, size: int) -> int:
        return -(-size // self.align) * self.align

    def served_size(self, size: int) -> int:
        """The size the image is served at: the compress filter takes whole clusters only,
        so it serves an image rounded up to one, shrunk back once written."""
        if self.compress_filter:
            return -(-size // self.granule) * self.granule
        return self.virtual_size(size)

    def nbd_source(self, image: Path) -> list[str]:
        """qemu-nbd's arguments for `image` (through the compress filter when it has one)."""
        if self.compress_filter:
            spec = ",".join([f"driver=compress,file.driver={self.name}",
                             "file.file.driver=file",
                             "file.file.filename=" + str(image).replace(",", ",,")])
            return ["--image-opts", spec]
        return ["--format", self.name, str(image)]


@dataclass(frozen=True)
class QemuTools:
    """The qemu programs a restore runs."""

    qemu_img: str
    qemu_nbd: str

    @classmethod
    def find(cls, target: str) -> QemuTools:
        found = {p: shutil.which(p) or shutil.which(p, path="/usr/sbin:/sbin")
                 for p in ("qemu-img", "qemu-nbd")}
        missing = [p for p, path in found.items() if not path]
        if missing:
            raise TargetError(f"target={target}: {' and '.join(missing)} not found on PATH "
                              "(install Debian's qemu-utils)")
        return cls(qemu_img=str(found["qemu-img"]), qemu_nbd=str(found["qemu-nbd"]))


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info --output=json`` says about an image."""

    format: str
    virtual_size: int
    actual_size: int
    backing: str | None
    create_type: str = ""
    compression_type: str = ""
    extents: int = 1

    @classmethod
    def of(cls, doc: dict[str, Any]) -> ImageInfo:
        specific = (doc.get("format-specific") or {}).get("data") or {}
        return cls(
            format=str(doc.get("format", "")), virtual_size=int(doc.get("virtual-size", -1)),
            actual_size=int(doc.get("actual-size", 0)),
            backing=doc.get("backing-filename") or doc.get("full-backing-filename"),
            create_type=str(specific.get("create-type", "")),
            compression_type=str(specific.get("compression-type", "")),
            extents=len(specific.get("extents") or [None]),
        )


def _last_line(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


async def _run(argv: list[str], *, what: str) -> str:
    """Run a qemu tool; its failure is one line with what it said."""
    try:
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False, stdin=subprocess.DEVNULL)
    except OSError as err:
        raise TargetError(f"{what}: cannot run {argv[0]} ({err.strerror or err})") from err
    if done.returncode != 0:
        said = _last_line(done.stderr) or _last_line(done.stdout) or f"exit {done.returncode}"
        raise TargetError(f"{what}: {Path(argv[0]).name} failed: {said}")
    return done.stdout.decode("utf-8", "replace")


async def image_info(tools: QemuTools, fmt: str, path: Path, *, what: str) -> ImageInfo:
    out = await _run([tools.qemu_img, "info", "--output=json", "-f", fmt, str(path)],
                     what=what)
    return ImageInfo.of(json.loads(out))


async def _check(tools: QemuTools, fmt: ImageFormat, path: Path, *, size: int,
                 what: str) -> None:
    """``qemu-img info`` as expected, then ``check`` clean (where the format has one)."""
    info = await image_info(tools, fmt.name, path, what=what)
    problems = []
    if info.format != fmt.name:
        problems.append(f"format {info.format}, not {fmt.name}")
    if info.virtual_size != fmt.virtual_size(size):
        problems.append(f"virtual size {info.virtual_size}, not {fmt.virtual_size(size)}")
    if info.backing:
        problems.append(f"a backing file ({info.backing})")
    if fmt.create_type and info.create_type != fmt.create_type:
        problems.append(f"create type {info.create_type or 'none'}, not {fmt.create_type}")
    if fmt.compression_type and info.compression_type != fmt.compression_type:
        problems.append(f"compression {info.compression_type or 'none'}, "
                        f"not {fmt.compression_type}")
    if info.extents != 1:
        problems.append(f"{info.extents} extents, not one")
    if problems:
        raise TargetError(f"{what}: qemu-img info shows {'; '.join(problems)}")
    if fmt.checkable:
        argv = [tools.qemu_img, "check", "--output=json", "-f", fmt.name, str(path)]
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False, stdin=subprocess.DEVNULL)
        report: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            report = json.loads(done.stdout or b"{}")
        bad = {k: report.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
        if done.returncode != 0 or any(bad.values()):
            said = _last_line(done.stderr) or ", ".join(f"{v} {k}" for k, v in bad.items() if v)
            raise TargetError(f"{what}: qemu-img check found the image damaged: "
                              f"{said or f'exit {done.returncode}'}")


@dataclass
class QemuDisk:
    """One image being written: its partial file, its final path, the disk's size."""

    info: DiskInfo
    size: int
    partial: Path
    final: Path
    socket: Path
    server: NbdServer | None = None
    finished: bool = False


class _Writer(DiskWriter):
    """Data ranges regrouped into granules and sent over NBD; zero ranges skipped (a new
    image reads as zeros); `finish` flushes, stops qemu-nbd and makes the image durable."""

    def __init__(self, vm: QemuVmRestore, disk: QemuDisk) -> None:
        self.vm = vm
        self.disk = disk
        self.what = f"{vm.target} target: disk {disk.info.label}"
        fmt = vm.format
        self.granules = Granules(size=disk.size, granule=fmt.granule)

    async def _failure(self, err: NbdError) -> TargetError:
        server = self.disk.server
        if server is None:
            return TargetError(f"{self.what}: {err}")
        return await server.failure(err, during="mid-restore", full=self.disk.partial)

    async def _send(self, writes: list[tuple[int, memoryview]]) -> None:
        server = self.disk.server
        assert server is not None and server.client is not None
        try:
            for offset, data in writes:
                await server.client.write(offset, data)
        except NbdError as err:
            raise await self._failure(err) from err

    async def write(self, offset: int, data: memoryview) -> None:
        await self._send(self.granules.add(offset, data))

    async def zero(self, offset: int, length: int) -> None:
        del offset, length  # a new image reads as zeros already

    async def finish(self) -> str:
        server = self.disk.server
        assert server is not None and server.client is not None
        await self._send(self.granules.end())
        try:
            await server.client.flush()
            await server.stop()
        except NbdError as err:
            raise await self._failure(err) from err
        fmt, disk = self.vm.format, self.disk
        if fmt.served_size(disk.size) != fmt.virtual_size(disk.size):
            await _run([self.vm.tools.qemu_img, "resize", "-q", "-f", fmt.name, "--shrink",
                        str(disk.partial), str(fmt.virtual_size(disk.size))], what=self.what)
        await trio.to_thread.run_sync(self._settle)
        self.disk.finished = True
        return str(self.disk.final)

    def _settle(self) -> None:
        """End a compressed image on a sector, as qemu-img convert does, and make it durable."""
        path = self.disk.partial
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                end = os.fstat(fd).st_size
                if self.vm.format.compressed and end % 512:
                    os.ftruncate(fd, end + 512 - end % 512)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise TargetError(f"{self.what}: {io_failure(path, err)}") from err


class QemuVmRestore(VmRestore):
    """One VM's images in ``<dest>/<vm>/`` (see the module docstring). A format's target
    adds its artifacts by overriding `artifacts`."""

    def __init__(self, target: QemuTarget, request: RestoreRequest, tools: QemuTools) -> None:
        self.target = target.name
        self.format = target.image_format()
        self.config = target.config
        self.request = request
        self.tools = tools
        self.folder = request.dest / safe_name(request.vm_name)
        self.disks: list[QemuDisk] = []
        self.made: list[Path] = []  # partial files of artifacts, and files put in place
        self.committed = False

    async def open_disk(self, disk: DiskInfo, *, size: int) -> DiskWriter:
        what = f"{self.target} target: disk {disk.label}"
        if size % 512:
            raise TargetError(f"{what}: its size {size} is not a whole number of 512-byte "
                              "sectors; disk image formats cannot hold it")
        folder, name = image_parts(self.request.vm_name, disk.label, self.format.suffix)
        fd, partial = await trio.to_thread.run_sync(functools.partial(
            open_inside, self.request.dest, (folder, partial_name(name)),
            flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, what=f"{self.target} target"))
        os.close(fd)
        entry = QemuDisk(info=disk, size=size, partial=partial, final=partial.with_name(name),
                         socket=partial.with_name(partial_name(f"{name}.nbd")))
        self.disks.append(entry)
        opts = ["-o", ",".join(self.format.options)] if self.format.options else []
        await _run([self.tools.qemu_img, "create", "-q", "-f", self.format.name, *opts,
                    str(partial), str(self.format.served_size(size))], what=what)
        entry.server = await NbdServer.start(
            self.tools.qemu_nbd, self.format.nbd_source(partial), socket=entry.socket,
            what=what, depth=1 if self.format.in_order else 8)
        return _Writer(self, entry)

    @property
    def shape(self) -> VmShape:
        """What the VM was, for the artifacts (the job's hypervisor driver read it); the
        defaults when it is not known."""
        return self.request.shape or VmShape(cluster_uuid="")

    def artifacts(self, disks: list[QemuDisk]) -> list[tuple[str, Path]]:
        """Files that go with the images (written as partial files in the VM's folder), as
        (final name, partial path). None by default."""
        del disks
        return []

    async def commit(self) -> str:
        for d in self.disks:
            if not d.finished:
                raise TargetError(f"{self.target} target: disk {d.info.label} was not finished")
            await _check(self.tools, self.format, d.partial, size=d.size,
                         what=f"{self.target} target: disk {d.info.label}")
        made = await trio.to_thread.run_sync(self._artifacts)

        def rename() -> None:
            for d in self.disks:
                os.rename(d.partial, d.final)  # over an older restore's image, atomically
                self.made.append(d.final)
            for final, partial in made:
                os.rename(partial, partial.with_name(final))
                self.made.append(partial.with_name(final))
            if self.disks:
                fsync_dir(self.disks[0].final.parent)

        await trio.to_thread.run_sync(rename)
        self.committed = True
        return str(self.folder)

    def _artifacts(self) -> list[tuple[str, Path]]:
        folders_inside(self.request.dest, (safe_name(self.request.vm_name),),
                       what=f"{self.target} target")
        try:
            out = self.artifacts(self.disks)
        except OSError as err:
            raise TargetError(f"{self.target} target: {io_failure(self.folder, err)}") from err
        self.made += [p for _, p in out]
        return out

    async def abort(self) -> None:
        with trio.CancelScope(shield=True):
            for d in self.disks:
                if d.server is not None:
                    await d.server.kill()
                    d.server = None
            if self.committed:
                return

            def remove() -> None:
                for d in self.disks:
                    d.partial.unlink(missing_ok=True)
                    d.socket.unlink(missing_ok=True)
                for p in self.made:
                    p.unlink(missing_ok=True)

            await trio.to_thread.run_sync(remove)


class QemuTarget(RestoreTarget):
    """Base of the image targets: a subclass names its `image_format` and, through
    `restore_class`, the artifacts that go with the images."""

    restore_class: ClassVar[type[QemuVmRestore]] = QemuVmRestore

    @abc.abstractmethod
    def image_format(self) -> ImageFormat:
        """How this target's images are made, from its configuration keys."""

    async def begin_vm(self, request: RestoreRequest, *,
                       cluster: ClusterAccess | None) -> QemuVmRestore:
        tools = QemuTools.find(self.name)
        restoring = self.restore_class(self, request, tools)
        await trio.to_thread.run_sync(sweep_partials, restoring.folder)
        return restoring
