"""Foreign disk images read in place: qcow2, vmdk, vhdx, vhd and raw through `qemu-nbd --read-only`.

`probe` asks ``qemu-img info`` what an image is (the format given, else probed; a raw file
that ends in a VHD footer is a fixed VHD, which qemu probes as raw) and refuses, naming it,
an image with a backing file or a vmdk whose extents lie outside the image's folder (an
import copies one self-contained disk), and one ``qemu-img check`` finds damaged (metadata
that points nowhere would import as zeros). `open_image` serves it read-only with
``qemu-nbd`` on a unix socket in a private folder (no root, no kernel nbd device, nothing
written next to the image) and `data_extents` walks its allocation map (NBD block status,
``base:allocation``): what reads as zeros is never read.

An image inside an OVA (an uncompressed tar) is read where it lies: qemu's ``raw`` driver
with ``offset`` and ``size`` shows the member as a file of its own, and the image format
sits on top (`ImageSource.offset`). Nothing is extracted.
"""

from __future__ import annotations

__all__ = ["FORMATS", "ImageSource", "Probed", "data_extents", "find_tools", "open_image",
           "probe"]

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ahvbackup.core.errors import ConfigError, TargetError

from .nbd import NbdClient, NbdError
from .nbd_server import NbdServer
from .qemu import QemuTools

#: the formats an import reads, as qemu names them; the names an operator may use for them
FORMATS = ("qcow2", "vmdk", "vhdx", "vpc", "raw")
SPELLINGS = {"vhd": "vpc", "img": "raw"}
#: the formats ``qemu-img check`` knows
CHECKABLE = ("qcow2", "vmdk", "vhdx")
_VHD_COOKIE = b"conectix"


@dataclass(frozen=True)
class ImageSource:
    """Where an image's bytes are: `path`, or `length` bytes of it from `offset` (a member
    of an OVA); `name` is how messages call it; `format` the one given (None: probe)."""

    path: Path
    name: str
    format: str | None = None
    offset: int = 0
    length: int | None = None

    def file_opts(self, prefix: str) -> list[str]:
        """qemu ``--image-opts`` for the file node (at `prefix`), commas escaped."""
        filename = str(self.path.resolve()).replace(",", ",,")
        if self.length is None:
            return [f"{prefix}driver=file", f"{prefix}filename={filename}"]
        return [f"{prefix}driver=raw", f"{prefix}offset={self.offset}",
                f"{prefix}size={self.length}", f"{prefix}file.driver=file",
                f"{prefix}file.filename={filename}"]


@dataclass(frozen=True)
class Probed:
    """An image an import can read: its qemu `format` and `virtual_size`."""

    source: ImageSource
    format: str
    virtual_size: int


def find_tools() -> QemuTools:
    """qemu-img and qemu-nbd, or one line naming what is missing."""
    try:
        return QemuTools.find("import")
    except TargetError:
        raise TargetError("import: qemu-img and qemu-nbd are needed (install Debian's "
                          "qemu-utils)") from None


def _format_name(wanted: str, name: str) -> str:
    fmt = SPELLINGS.get(wanted.lower(), wanted.lower())
    if fmt not in FORMATS:
        raise ConfigError(f"format: {name}: {wanted!r} is not a format an import reads "
                          "(qcow2, vmdk, vhdx, vhd, raw)")
    return fmt


def _last_line(text: bytes) -> str:
    lines = [x.strip() for x in text.decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1] if lines else ""


async def _info(tools: QemuTools, source: ImageSource, fmt: str | None) -> dict[str, Any]:
    opts = ([f"driver={fmt}"] if fmt else []) + source.file_opts("file.")
    argv = [tools.qemu_img, "info", "--output=json", "--image-opts", ",".join(opts)]
    try:
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False, stdin=subprocess.DEVNULL)
    except OSError as err:
        raise TargetError(f"import: cannot run qemu-img ({err.strerror or err})") from err
    if done.returncode != 0:
        said = _last_line(done.stderr) or f"exit {done.returncode}"
        raise TargetError(f"import: {source.name}: qemu-img cannot read it as a disk image "
                          f"({said})")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


async def _check(tools: QemuTools, source: ImageSource, fmt: str) -> None:
    """``qemu-img check``: metadata that points nowhere would import as zeros, silently.
    Leaked clusters (exit 3) harm no data and pass."""
    spec = ",".join([f"driver={fmt}", *source.file_opts("file.")])
    argv = [tools.qemu_img, "check", "--output=json", "--image-opts", spec]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                  check=False, stdin=subprocess.DEVNULL)
    report: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        report = json.loads(done.stdout or b"{}")
    bad = {k: report.get(k, 0) for k in ("corruptions", "check-errors")}
    if done.returncode not in (0, 3) or any(bad.values()):
        said = ", ".join(f"{v} {k}" for k, v in bad.items() if v) or _last_line(done.stderr)
        raise TargetError(f"import: {source.name}: qemu-img check found it damaged "
                          f"({said or f'exit {done.returncode}'})")


def _ends_in_vhd_footer(source: ImageSource) -> bool:
    size = source.length if source.length is not None else source.path.stat().st_size
    if size < 512:
        return False
    with source.path.open("rb") as f:
        f.seek(source.offset + size - 512)
        return f.read(len(_VHD_COOKIE)) == _VHD_COOKIE


def _outside_extents(doc: dict[str, Any], source: ImageSource) -> list[str]:
    """A vmdk descriptor may name extent files anywhere: only its own folder's are read."""
    if source.length is not None:  # inside an OVA: qemu names the tar member itself
        return []
    extents = ((doc.get("format-specific") or {}).get("data") or {}).get("extents") or []
    home = source.path.resolve().parent
    out = []
    for e in extents:
        name = str(e.get("filename") or "")
        if name and Path(name).resolve().parent != home:
            out.append(name)
    return out


async def probe(tools: QemuTools, source: ImageSource) -> Probed:
    """What `source` is, or one line saying why it cannot be imported."""
    try:
        is_file = source.path.is_file()
    except OSError as err:
        raise ConfigError(f"image: {source.name}: {err.strerror or err}") from err
    if not is_file:
        raise ConfigError(f"image: {source.name}: no such file")
    fmt = _format_name(source.format, source.name) if source.format else None
    doc = await _info(tools, source, fmt)
    found = str(doc.get("format", ""))
    if fmt is None and found == "raw" and await trio.to_thread.run_sync(
            _ends_in_vhd_footer, source):
        found = "vpc"  # a fixed VHD: raw data then a footer qemu probes as part of the disk
        doc = await _info(tools, source, found)
    if found not in FORMATS:
        raise TargetError(f"import: {source.name}: a {found or 'unknown'} image; an import "
                          "reads qcow2, vmdk, vhdx, vhd and raw")
    backing = doc.get("backing-filename") or doc.get("full-backing-filename")
    if backing:
        raise TargetError(f"import: {source.name}: has a backing file ({backing}); import a "
                          "self-contained image (qemu-img convert it without -B first)")
    outside = _outside_extents(doc, source)
    if outside:
        raise TargetError(f"import: {source.name}: its extents lie outside its folder "
                          f"({', '.join(outside)}); import a self-contained image")
    if found in CHECKABLE:
        await _check(tools, source, found)
    size = int(doc.get("virtual-size", -1))
    if size <= 0 or size % 512:
        raise TargetError(f"import: {source.name}: virtual size {size} is not a whole number "
                          "of 512-byte sectors")
    return Probed(source=source, format=found, virtual_size=size)


@contextlib.asynccontextmanager
async def open_image(tools: QemuTools, image: Probed) -> AsyncIterator[NbdClient]:
    """``async with open_image(tools, image) as nbd``: the image served read-only, with its
    allocation map (`NbdClient.block_status`). A qemu-nbd that ends early makes the next
    request an `NbdError`, told as one line; leaving the block stops it and removes its
    socket."""
    spec = ",".join([f"driver={image.format}", *image.source.file_opts("file.")])
    server = await NbdServer.start(tools.qemu_nbd, ["--image-opts", spec], socket=None,
                                   what=f"import: {image.source.name}", read_only=True,
                                   allocation=True)
    try:
        assert server.client is not None
        try:
            yield server.client
        except NbdError as err:
            raise await server.failure(err, during="mid-import") from err
    finally:
        with trio.CancelScope(shield=True):
            await server.kill()


async def data_extents(nbd: NbdClient) -> AsyncIterator[tuple[int, int]]:
    """(offset, length) of every run that does not read as zeros, in order."""
    pos, size = 0, nbd.export.size
    run_start, run_end = 0, 0
    while pos < size:
        for e in await nbd.block_status(pos, size - pos):
            if not e.zero:
                if e.offset != run_end:
                    if run_end > run_start:
                        yield run_start, run_end - run_start
                    run_start = e.offset
                run_end = e.offset + e.length
            pos = e.offset + e.length
    if run_end > run_start:
        yield run_start, run_end - run_start
