"""`ahvbackup import`: foreign disk images (qcow2, vmdk, vhdx, vhd, raw, an OVF or OVA) into a
new AHV VM.

Everything that can be checked is checked before the cluster is contacted: the files exist
and are images qemu reads (`image_reader.probe`; a backing file is refused by name), an OVA's
or OVF's SHA manifest matches, every OVF network is mapped (`network_map`) and every image
fits its OVF capacity. Then the ``ahv`` target makes the VM as it does for a restore
(`RestoreTarget.begin_vm` with the cluster from `cluster_for`, which sweeps what a killed run
left): each image is served read-only by ``qemu-nbd``, its allocation map read over NBD
(block status), and only its data, less all-zero 64 KiB pieces, written into the target's
`DiskWriter` (a new AHV disk reads as zeros). Any failure aborts the VM's restore: nothing is
left on the cluster, and the ledger is clean. Disks are imported `concurrent_disks` at a time.

The VM's shape comes from the OVF when there is one (CPU, memory, firmware, NICs, disk order
and capacities), else from the defaults: 1 vCPU, 1024 MiB, BIOS, and one NIC only when
`network_map` names its subnet. It reaches the ``ahv`` target the one way that target takes
a shape: as the recorded VM configuration a backup manifest carries (a Prism v3 VM entity).
An OVA's disks are read inside the tar where they lie (`ImageSource.offset`): no copy.
"""

from __future__ import annotations

__all__ = ["DiskImported", "ImportJob", "ImportOutcome", "ImportRequest"]

import dataclasses
import hashlib
import logging
import posixpath
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ahvbackup.core.drivers import (
    DiskWriter,
    HypervisorSession,
    NicShape,
    RestoreRequest,
    RestoreTarget,
    VmRestore,
    VmShape,
)
from ahvbackup.core.errors import ConfigError, TargetError, our_errors
from ahvbackup.core.jobs.cluster import cluster_for
from ahvbackup.core.jobs.concurrency import each_limited
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.manifest import DiskEntry, Manifest, VmIdentity
from ahvbackup.core.model import DiskInfo
from ahvbackup.core.plugins import load_driver
from ahvbackup.core.stream.encoder import is_zero

from .image_reader import ImageSource, Probed, data_extents, find_tools, open_image, probe
from .nbd import NbdClient
from .ovf_reader import OvfDisk, OvfVm, read_ovf
from .qemu import QemuTools

log = logging.getLogger("ahvbackup.import")

#: bytes read from an image at a time
CHUNK = 1 << 20
#: the unit all-zero data is left out in (a qcow2 cluster, a vmdk grain)
GRANULE = 64 << 10
_MF_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ImportRequest:
    """What to import: `images` (in disk order; with `ovf`, in the OVF's disk order), or
    the disks an `ovf` names next to it, or an `ova`'s; `image_format` for every image
    (None: probed); `vm_name` (None: restore_vm_name, else the OVF's name)."""

    images: tuple[Path, ...] = ()
    ovf: Path | None = None
    ova: Path | None = None
    image_format: str | None = None
    vm_name: str | None = None


@dataclass
class DiskImported:
    label: str
    image: str  # the image's name (a path, or ``x.ova:member``), "" for a blank disk
    format: str = ""
    virtual_size: int = 0
    size: int = 0  # the AHV disk's size
    data_bytes: int = 0  # bytes written into the disk (everything else is zeros)
    ok: bool = False


@dataclass
class ImportOutcome:
    vm_name: str
    vm_id: str = ""
    seconds: float = 0.0
    disks: list[DiskImported] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm_name, "vm_id": self.vm_id, "seconds": self.seconds,
                "disks": [d.__dict__ for d in self.disks]}


@dataclass(frozen=True)
class _Planned:
    info: DiskInfo
    image: Probed | None  # None: a blank disk of the OVF


# the plan: files, OVF, digests and images, all checked before the cluster is contacted ---------


@dataclass(frozen=True)
class _Package:
    """Where the disks come from: the OVF (if any), and each OVF disk's image source."""

    ovf: OvfVm | None
    sources: tuple[ImageSource | None, ...]
    digests: tuple[tuple[str, str, str], ...] = ()  # (file, algorithm, hex) from a manifest
    files: dict[str, ImageSource] = field(default_factory=dict)  # name -> bytes to check


def _member_name(name: str) -> str:
    return posixpath.normpath(name).lstrip("/")


def _read_ova(ova: Path, fmt: str | None) -> _Package:
    try:
        with tarfile.open(ova, mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.isreg()]
            ovfs = [m for m in members if m.name.lower().endswith(".ovf")]
            if not ovfs:
                raise ConfigError(f"ova: {ova}: holds no .ovf descriptor")
            with tar.extractfile(ovfs[0]) as f:  # type: ignore[union-attr]
                text = f.read()
            mfs = [m for m in members if m.name.lower().endswith(".mf")]
            mf = b""
            if mfs:
                with tar.extractfile(mfs[0]) as f:  # type: ignore[union-attr]
                    mf = f.read()
    except FileNotFoundError:
        raise ConfigError(f"ova: {ova}: no such file") from None
    except (tarfile.TarError, OSError) as err:
        raise ConfigError(f"ova: {ova}: not an OVA (an uncompressed tar): {err}") from None
    by_name = {_member_name(m.name): m for m in members}
    vm = read_ovf(text)

    def source(name: str) -> ImageSource:
        m = by_name.get(_member_name(name))
        if m is None:
            raise ConfigError(f"ova: {ova}: the OVF names disk file {name!r}, which the OVA "
                              "does not hold")
        if m.issparse():
            raise ConfigError(f"ova: {ova}: {name} is a sparse tar member; qemu cannot read "
                              "it in place")
        return ImageSource(path=ova, name=f"{ova.name}:{name}", format=fmt,
                           offset=m.offset_data, length=m.size)

    sources = tuple(source(d.href) if d.href else None for d in vm.disks)
    files = {_member_name(m.name): ImageSource(ova, f"{ova.name}:{m.name}",
                                               offset=m.offset_data, length=m.size)
             for m in members}
    return _Package(vm, sources, _digests(mf), files)


def _read_ovf(ovf: Path, images: tuple[Path, ...], fmt: str | None) -> _Package:
    try:
        text = ovf.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"ovf: {ovf}: no such file") from None
    except OSError as err:
        raise ConfigError(f"ovf: {ovf}: {err.strerror or err}") from None
    vm = read_ovf(text)
    with_files = [d for d in vm.disks if d.href]
    if images and len(images) != len(with_files):
        raise ConfigError(f"image: the OVF has {len(with_files)} disk file(s), "
                          f"{len(images)} --image given (give one per disk, in its order, or "
                          "none to take the files next to the OVF)")
    given = iter(images)
    sources: list[ImageSource | None] = []
    for d in vm.disks:
        if not d.href:
            sources.append(None)
        elif images:
            path = next(given)
            sources.append(ImageSource(path, str(path), fmt))
        elif Path(d.href).name != d.href:
            raise ConfigError(f"ovf: disk file {d.href!r} is not a plain file name; give the "
                              "images with --image")
        else:
            sources.append(ImageSource(ovf.parent / d.href, str(ovf.parent / d.href), fmt))
    mf = ovf.with_suffix(".mf")
    digests = _digests(mf.read_bytes()) if mf.is_file() and not images else ()
    files = {ovf.name: ImageSource(ovf, str(ovf))}
    files.update({Path(d.href).name: s for d, s in zip(vm.disks, sources, strict=True)
                  if d.href and s is not None})
    return _Package(vm, tuple(sources), digests, files)


def _digests(mf: bytes) -> tuple[tuple[str, str, str], ...]:
    out = []
    for line in mf.decode("utf-8", "replace").splitlines():
        m = _MF_LINE.match(line.strip())
        if m:
            out.append((_member_name(m.group(2)), m.group(1).lower(), m.group(3).lower()))
    return tuple(out)


def _check_digests(package: _Package, where: str) -> None:
    """Blocking: every file the manifest lists and the import reads matches its digest."""
    for name, algorithm, want in package.digests:
        src = package.files.get(name)
        if src is None:
            continue
        h = hashlib.new(algorithm)
        with src.path.open("rb") as f:
            f.seek(src.offset)
            left = src.length if src.length is not None else -1
            while left:
                chunk = f.read(CHUNK if left < 0 else min(CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk) if left > 0 else 0
        if h.hexdigest() != want:
            raise TargetError(f"import: {where}: {name} does not match its {algorithm.upper()} "
                              "digest in the manifest (.mf); the package is damaged")


def _package(request: ImportRequest) -> _Package:
    fmt = request.image_format
    if request.ova is not None:
        if request.ovf is not None or request.images:
            raise ConfigError("ova: an OVA holds its descriptor and disks; give --ova alone "
                              "(no --ovf or --image)")
        return _read_ova(request.ova, fmt)
    if request.ovf is not None:
        return _read_ovf(request.ovf, request.images, fmt)
    if not request.images:
        raise ConfigError("image: nothing to import: give --image FILE (repeatable), --ovf or "
                          "--ova")
    return _Package(None, tuple(ImageSource(p, str(p), fmt) for p in request.images))


def _nics(config: Any, ovf: OvfVm | None) -> tuple[str, ...]:
    """The source network of each NIC (a network_map key): the OVF's, all mapped; without
    an OVF, one NIC when network_map names its subnet."""
    mapping = config.network_map_dict
    if ovf is None:
        if len(mapping) > 1:
            raise ConfigError("network_map: without an OVF the imported VM has one NIC, on "
                              f"the subnet network_map names; give one pair (got {len(mapping)})")
        return tuple(mapping)
    for i, net in enumerate(ovf.networks):
        if net not in mapping:
            raise ConfigError(f"network_map: the OVF's NIC {i} is on network {net!r}, which "
                              f"network_map does not map; add network_map={net}=<a subnet of "
                              "the target cluster>")
    unused = [k for k in mapping if k not in ovf.networks]
    if unused:
        raise ConfigError(f"network_map: {', '.join(unused)}: not a network of the OVF (it has "
                          f"{', '.join(ovf.networks) or 'no NIC'})")
    return ovf.networks


def _shape(ovf: OvfVm | None, nics: tuple[str, ...], described: str) -> VmShape:
    """The VM to create: from the OVF, else one vCPU, 1024 MiB, BIOS; NICs on `nics`."""
    cores = ovf.cores_per_socket if ovf else 1
    return VmShape(cluster_uuid="", sockets=(ovf.vcpus // cores) if ovf else 1,
                   cores_per_socket=cores, memory_mib=ovf.memory_mib if ovf else 1024,
                   boot_type="UEFI" if ovf is not None and ovf.uefi else "",
                   nics=tuple(NicShape(network_uuid=n) for n in nics),
                   description=f"imported by ahvbackup from {described}")


def _size(disk: OvfDisk | None, image: Probed | None) -> int:
    capacity = disk.capacity if disk is not None else 0
    if image is None:
        return -(-capacity // 512) * 512
    if capacity and image.virtual_size > capacity:
        raise ConfigError(f"ovf: disk {disk.disk_id if disk else ''}: capacity {capacity} but "
                          f"{image.source.name} holds {image.virtual_size} bytes")
    return max(capacity, image.virtual_size)


async def _one_cluster(session: HypervisorSession) -> None:
    """An imported VM has no cluster of its own: with several, target_cluster names one."""
    places = await session.restore_places()
    if len(places) > 1:
        raise ConfigError(f"target_cluster: Prism manages {len(places)} clusters "
                          f"({', '.join(sorted(p.name for p in places))}); name the one to "
                          "import into")


# the job ----------------------------------------------------------------------------------------


class ImportJob:
    """Import one VM (see the module docstring)."""

    def __init__(self, rt: Runtime, request: ImportRequest, *,
                 progress: Progress | None = None) -> None:
        if rt.config.target != "ahv":
            raise ConfigError(f"target: ahvbackup import writes into AHV (target=ahv), not "
                              f"target={rt.config.target}")
        self.rt = rt
        self.request = request
        self.progress = progress or (lambda n: None)

    async def _plan(self, tools: QemuTools) -> tuple[str, list[_Planned], Manifest, VmShape]:
        request = self.request
        package = await trio.to_thread.run_sync(_package, request)
        ovf = package.ovf
        name = request.vm_name or self.rt.config.restore_vm_name or (ovf.name if ovf else "")
        if not name:
            raise ConfigError("vm-name: name the imported VM (--vm-name NAME or "
                              "restore_vm_name=)")
        nics = _nics(self.rt.config, ovf)
        where = str(request.ova or request.ovf or "")
        await trio.to_thread.run_sync(_check_digests, package, where)
        planned = []
        for i, src in enumerate(package.sources):
            image = await probe(tools, src) if src is not None else None
            size = _size(ovf.disks[i] if ovf else None, image)
            info = DiskInfo(uuid=f"import-{i}", bus="scsi", index=i, size=size)
            planned.append(_Planned(info, image))
        described = where or ", ".join(s.name for s in package.sources if s is not None)
        manifest = Manifest(
            backup_id="import", level="full", created=time.time(),
            vm=VmIdentity(uuid="", name=name), producer="ahvbackup import",
            disks=tuple(DiskEntry(label=p.info.label, uuid=p.info.uuid, bus="scsi",
                                  index=p.info.index, size=p.info.size) for p in planned))
        return name, planned, manifest, _shape(ovf, nics, described)

    async def run(self) -> ImportOutcome:
        started = time.monotonic()
        tools = find_tools()
        name, planned, manifest, shape = await self._plan(tools)
        out = ImportOutcome(vm_name=name, disks=[
            DiskImported(label=p.info.label, image=p.image.source.name if p.image else "",
                         format=p.image.format if p.image else "",
                         virtual_size=p.image.virtual_size if p.image else 0, size=p.info.size)
            for p in planned])
        config = dataclasses.replace(self.rt.config, restore_vm_name=name)
        target = load_driver("target", "ahv", base=RestoreTarget)(config)
        hooks, job_id = self.rt.hooks, self.rt.job_id
        hooks.job_started(job_id=job_id, mode="restore", level="full", config=config)
        ok = False
        try:
            async with cluster_for(self.rt, target) as cluster:
                if cluster is not None and not config.target_cluster:
                    await _one_cluster(cluster.session)
                request = RestoreRequest(vm_name=name, dest=Path("."), manifest=manifest,
                                         shape=shape)
                restoring = await target.begin_vm(request, cluster=cluster)
                try:
                    await each_limited(
                        zip(planned, out.disks, strict=True), config.concurrent_disks,
                        lambda pair: self._disk(restoring, *pair, vm_name=name, tools=tools))
                    out.vm_id = await restoring.commit()
                except BaseException as err:
                    with trio.CancelScope(shield=True):
                        await restoring.abort()
                    errors = our_errors(err) if isinstance(err, BaseExceptionGroup) else None
                    if errors:  # one disk's failure (the others were cancelled): its line
                        raise errors[0] from err
                    raise
            ok = True
        finally:
            out.seconds = time.monotonic() - started
            failed = [] if ok else [f"{name}/{d.label}" for d in out.disks if not d.ok] or [name]
            hooks.job_finished(job_id=job_id, ok=ok, failed=failed, seconds=out.seconds)
        log.info("imported VM %s (%s)", name, out.vm_id)
        return out

    async def _disk(self, vm: VmRestore, p: _Planned, done: DiskImported, *, vm_name: str,
                    tools: QemuTools) -> None:
        hooks = self.rt.hooks
        hooks.disk_started(job_id=self.rt.job_id, vm_name=vm_name, disk=done.label,
                           size=p.info.size)
        try:
            writer = await vm.open_disk(p.info, size=p.info.size)
            if p.image is not None:
                async with open_image(tools, p.image) as nbd:
                    done.data_bytes = await self._copy(nbd, writer)
            await writer.finish()
            done.ok = True
        finally:
            hooks.disk_finished(job_id=self.rt.job_id, vm_name=vm_name, disk=done.label,
                                ok=done.ok, bytes_read=done.data_bytes, bytes_stored=0)

    async def _copy(self, nbd: NbdClient, writer: DiskWriter) -> int:
        """The image's data into `writer`, chunk by chunk in disk order; returns the bytes
        written. What reads as zeros is never written (the new disk reads as zeros): the
        extents the allocation map calls zero are not even read, and all-zero granules of
        what is read are left out."""
        buf = memoryview(bytearray(CHUNK))
        written = 0
        async for offset, length in data_extents(nbd):
            for pos in range(offset, offset + length, CHUNK):
                view = buf[: min(CHUNK, offset + length - pos)]
                await nbd.read_into(pos, view)
                for start, end in _nonzero_runs(view):
                    await writer.write(pos + start, view[start:end])
                    written += end - start
                self.progress(len(view))
        return written


def _nonzero_runs(view: memoryview) -> list[tuple[int, int]]:
    """[start, end) of the runs of `view` that are not all-zero granules (`GRANULE`)."""
    out: list[tuple[int, int]] = []
    for at in range(0, len(view), GRANULE):
        end = min(at + GRANULE, len(view))
        if is_zero(view[at:end]):
            continue
        if out and out[-1][1] == at:
            out[-1] = (out[-1][0], end)
        else:
            out.append((at, end))
    return out
