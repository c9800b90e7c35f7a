"""The qcow2, vmdk, vhdx and vhd targets against real qemu-img and qemu-nbd.

Each format and option restores a multi-disk VM with holes at a chain point (a full and an
incremental) and is judged by qemu itself: ``qemu-img compare`` against the raw restore of
the same point, ``info`` (format, virtual size, create type, no backing file), ``check``, and
the allocated size against ``qemu-img convert`` of the raw image.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from tests.conftest import require_peer
from tests.e2e.e2e_world import MiB, World
from tests.e2e.test_full_disk import small_fs

from ahvbackup.core.drivers import RestoreRequest, StoredBackup
from ahvbackup.core.errors import TargetError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, RestoreOutcome, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.model import DiskInfo
from ahvbackup.core.testing import check_restore_target
from ahvbackup.hypervisors.ahv.simulator.model import Nic
from ahvbackup.targets.qemu import ImageInfo

pytestmark = pytest.mark.peer
CLI = [sys.executable, "-m", "ahvbackup.core.cli"]


@dataclass(frozen=True)
class Case:
    """One format and option: the keys that select it, and what qemu must then report."""

    keys: dict[str, str]
    fmt: str
    suffix: str
    convert: tuple[str, ...]  # qemu-img convert options that make the same kind of image
    create_type: str = ""
    compression: str = ""


CASES = {
    "qcow2": Case({"target": "qcow2"}, "qcow2", ".qcow2", ()),
    "qcow2-zstd": Case({"target": "qcow2", "qcow2_compression": "zstd"}, "qcow2", ".qcow2",
                       ("-c", "-o", "compression_type=zstd"), compression="zstd"),
    "vmdk-stream": Case({"target": "vmdk"}, "vmdk", ".vmdk",
                        ("-o", "subformat=streamOptimized,adapter_type=lsilogic"),
                        create_type="streamOptimized"),
    "vmdk-sparse": Case({"target": "vmdk", "vmdk_subformat": "monolithicSparse"}, "vmdk",
                        ".vmdk", ("-o", "subformat=monolithicSparse,adapter_type=lsilogic"),
                        create_type="monolithicSparse"),
    "vhdx": Case({"target": "vhdx"}, "vhdx", ".vhdx", ("-o", "subformat=dynamic")),
    "vhd": Case({"target": "vhd"}, "vpc", ".vhd", ("-o", "subformat=fixed,force_size=on")),
}


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def info(path: Path, fmt: str) -> ImageInfo:
    done = qemu("info", "--output=json", "-f", fmt, str(path))
    assert done.returncode == 0, done.stderr
    return ImageInfo.of(json.loads(done.stdout))


def allocated(path: Path) -> int:
    """Bytes the filesystem allocated to the file's contents: the lengths of its extents
    (FIEMAP), written or not. Neither st_blocks (it adds the extent tree's own blocks) nor
    SEEK_DATA (an unwritten extent counts once its pages are cached) says it exactly."""
    head = struct.Struct("=QQIIII")
    extent = struct.Struct("=QQQQQI12x")
    total, start, count = 0, 0, 256
    with path.open("rb") as f:
        os.fsync(f.fileno())
        while True:
            buf = bytearray(head.pack(start, (1 << 64) - 1 - start, 1, 0, count, 0)
                            + bytes(extent.size * count))
            fcntl.ioctl(f.fileno(), 0xC020660B, buf)  # FS_IOC_FIEMAP, FIEMAP_FLAG_SYNC
            mapped = head.unpack_from(buf)[3]
            last = False
            for i in range(mapped):
                logical, _phys, length, _r1, _r2, flags = extent.unpack_from(
                    buf, head.size + i * extent.size)
                total += length
                start = logical + length
                last = last or bool(flags & 1)  # FIEMAP_EXTENT_LAST
            if last or mapped == 0:
                return total


def grain_sectors(path: Path) -> list[int]:
    """Where each allocated grain of a sparse vmdk is in the file, in disk (LBA) order: from
    the grain directory and tables the header points at (VMware's sparse extent layout)."""
    data = path.read_bytes()
    (magic, _v, _f, capacity, grain, _do, _ds, per_gt, _rgd, gd, _over) = struct.unpack_from(
        "<4sIIQQQQIQQQ", data, 0)
    assert magic == b"KDMV"
    tables = struct.unpack_from(f"<{-(-capacity // grain // per_gt)}I", data, gd * 512)
    out: list[int] = []
    for table in tables:
        if table:
            out += [e for e in struct.unpack_from(f"<{per_gt}I", data, table * 512) if e]
    return out


async def chain_point(world: World) -> tuple[Runtime, StoredBackup]:
    """A three-disk VM with holes, odd sizes, two NICs and UEFI firmware, backed up full and
    then incremental; returns the incremental (a chain point)."""
    vm = world.add_vm("multi", [
        (8 * MiB, [(0, MiB + 3), (5 * MiB + 4096, MiB)]),    # data, hole, data
        (4 * MiB, []),                                       # entirely sparse
        (4 * MiB + 512, [(4 * MiB - 1000, 1000)]),           # odd size, data at the end
    ])
    subnet = next(iter(world.sim.subnets.values()))
    vm.nics = [Nic("nic-0", "50:6b:8d:00:00:01", subnet.uuid),
               Nic("nic-1", "50:6b:8d:00:00:02", subnet.uuid)]
    vm.boot_type, vm.num_sockets, vm.num_vcpus_per_socket, vm.memory_mib = "UEFI", 2, 2, 3072
    rt = Runtime.from_config(world.config(vm="multi", chunk_size_mib=1))
    assert (await BackupJob(rt).run()).ok
    world.sim.write_disk(vm.uuid, 0, 2 * MiB + 77, os.urandom(300_000))  # into the hole
    world.sim.zero_disk(vm.uuid, 0, 0, 64 << 10)
    world.sim.write_disk(vm.uuid, 2, 0, os.urandom(4096))
    assert (await BackupJob(Runtime.from_config(
        world.config(vm="multi", chunk_size_mib=1, level="incremental"))).run()).ok
    backup = await pick_backup(rt, vm="multi", backup_id=None)
    assert backup.level == "incremental"
    return rt, backup


async def restore(world: World, backup: StoredBackup, dest: Path,
                  **keys: str) -> RestoreOutcome:
    rt = Runtime.from_config(world.config(**keys))
    out = await RestoreJob(rt, backup, dest=dest).run()
    return out


@pytest.mark.parametrize("target", ["qcow2", "vmdk", "vhdx", "vhd"])
async def test_each_format_restores_a_chain_point_as_qemu_sees_it(world: World,
                                                                  target: str) -> None:
    """Every option of the target (one backup for them all, to keep the time down)."""
    require_peer("qemu-img", "qemu-nbd")
    _rt, backup = await chain_point(world)
    raw = await restore(world, backup, world.tmp / "raw")
    assert raw.ok
    for name, case in CASES.items():
        if case.keys["target"] == target:
            await check_case(world, backup, raw, name, case)


async def check_case(world: World, backup: StoredBackup, raw: RestoreOutcome, name: str,
                     case: Case) -> None:
    out = await restore(world, backup, world.tmp / name, **case.keys)
    assert out.ok, [d.error for d in out.disks]
    folder = world.tmp / name / "multi"
    for disk, raw_disk in zip(out.disks, raw.disks, strict=True):
        path, raw_path = Path(disk.path), Path(raw_disk.path)
        assert path == folder / f"{disk.label}{case.suffix}" and path.is_file()
        same = qemu("compare", "-f", "raw", "-F", case.fmt, str(raw_path), str(path))
        assert same.returncode == 0, (disk.label, same.stdout, same.stderr)
        got = info(path, case.fmt)
        size = raw_path.stat().st_size
        assert got.format == case.fmt and got.backing is None and got.extents == 1
        assert got.virtual_size == (-(-size // MiB) * MiB if name == "vhd" else size)
        assert got.create_type == case.create_type
        assert got.compression_type == (case.compression or ("zlib" if case.fmt == "qcow2"
                                                             else ""))
        if case.fmt != "vpc":  # qemu-img check knows every format here but vpc
            checked = qemu("check", "-f", case.fmt, str(path))
            assert checked.returncode == 0, checked.stdout + checked.stderr
        if case.fmt == "vmdk":  # the adapter is in the embedded descriptor
            assert b'ddb.adapterType = "lsilogic"' in path.read_bytes()[:65536]
        if case.create_type == "streamOptimized":  # the grains lie in the file in disk order
            sectors = grain_sectors(path)
            assert sectors == sorted(set(sectors)), sectors
            assert bool(sectors) == (disk.label != "scsi.1")  # the empty disk has none
        if name == "vhd":  # fixed: the whole virtual size plus the footer, data sparse
            assert path.stat().st_size == got.virtual_size + 512
        if name == "vhdx" and disk.label == "scsi.1":  # dynamic: empty, smaller than fixed
            fixed = world.tmp / "fixed.vhdx"
            qemu("create", "-q", "-f", "vhdx", "-o", "subformat=fixed", str(fixed), str(size))
            assert path.stat().st_size < fixed.stat().st_size
        converted = world.tmp / f"{name}-{disk.label}.converted"
        made = qemu("convert", "-f", "raw", "-O", case.fmt, *case.convert, str(raw_path),
                    str(converted))
        assert made.returncode == 0, made.stderr
        ours, theirs = allocated(path), allocated(converted)
        assert abs(ours - theirs) <= theirs / 100, (disk.label, ours, theirs)
    left = sorted(p.name for p in folder.iterdir())
    assert not [n for n in left if n.startswith(".")], left  # no partial file, no socket
    artifacts = {"vmdk-stream": ["multi.ova"], "qcow2": ["proxmox-import.sh"],
                 "qcow2-zstd": ["proxmox-import.sh"], "vhdx": ["hyperv-import.ps1"]}
    assert left == sorted([*artifacts.get(name, []), *(f"scsi.{i}{case.suffix}"
                                                       for i in range(3))])
    if name == "vmdk-stream":
        check_ova(out, folder / "multi.ova")
    elif name == "qcow2":
        check_proxmox(folder / "proxmox-import.sh")
    elif name == "vhdx":
        check_hyperv(folder / "hyperv-import.ps1")


def check_ova(out: RestoreOutcome, ova: Path) -> None:
    """The OVA's structure: a tar with the descriptor first, then the manifest whose digests
    match, then the disks; the descriptor has the VM's shape and every disk's capacity."""
    with tarfile.open(ova) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == ["vm.ovf", "vm.mf", "scsi.0.vmdk", "scsi.1.vmdk", "scsi.2.vmdk"]
        assert all(m.isfile() and m.type == tarfile.REGTYPE for m in members)
        files = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    for disk in out.disks:  # the OVA's disks are the restored vmdks
        assert files[f"{disk.label}.vmdk"] == Path(disk.path).read_bytes()
    digests = dict(line.split("= ") for line in files["vm.mf"].decode().splitlines())
    assert digests == {f"SHA256({n})": hashlib.sha256(files[n]).hexdigest()
                       for n in names if n != "vm.mf"}
    ns = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1",
          "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"
                  "CIM_ResourceAllocationSettingData",
          "vmw": "http://www.vmware.com/schema/ovf"}
    root = ET.fromstring(files["vm.ovf"])
    o = "{http://schemas.dmtf.org/ovf/envelope/1}"
    refs = {f.get(f"{o}id", ""): f for f in root.iterfind("ovf:References/ovf:File", ns)}
    assert sorted(f.get(f"{o}href", "") for f in refs.values()) == names[2:]
    for d in root.iterfind("ovf:DiskSection/ovf:Disk", ns):
        ref = refs[d.get(f"{o}fileRef", "")]
        name = ref.get(f"{o}href", "")
        assert int(ref.get(f"{o}size") or -1) == len(files[name])
        raw_size = next(x.size for x in out.disks if f"{x.label}.vmdk" == name)
        assert int(d.get(f"{o}capacity") or -1) == raw_size
        assert d.get(f"{o}capacityAllocationUnits") == "byte"
        assert d.get(f"{o}format", "").endswith("#streamOptimized")
    items: dict[str | None, list[ET.Element]] = {}
    for item in root.iterfind(".//ovf:VirtualHardwareSection/ovf:Item", ns):
        kind = item.findtext("rasd:ResourceType", namespaces=ns)
        items.setdefault(kind, []).append(item)
    (cpu,), (mem,), (ctl,) = items["3"], items["4"], items["6"]
    assert cpu.findtext("rasd:VirtualQuantity", namespaces=ns) == "4"
    assert cpu.findtext("vmw:CoresPerSocket", namespaces=ns) == "2"
    assert mem.findtext("rasd:VirtualQuantity", namespaces=ns) == "3072"
    assert ctl.findtext("rasd:ResourceSubType", namespaces=ns) == "lsilogic"
    assert len(items["17"]) == 3 and len(items["10"]) == 2
    assert [n.findtext("rasd:Address", namespaces=ns) for n in items["10"]] == \
        ["50:6b:8d:00:00:01", "50:6b:8d:00:00:02"]
    firmware = root.find(".//vmw:Config[@{http://www.vmware.com/schema/ovf}key='firmware']", ns)
    assert firmware is not None and firmware.get("{http://www.vmware.com/schema/ovf}value") == "efi"


def check_proxmox(path: Path) -> None:
    """The qm create line makes the VM from the disks next to it, with the VM's shape."""
    script = path.read_text()
    (line,) = [x for x in script.splitlines() if x.startswith("qm create")]
    for part in ("--name multi", "--sockets 2", "--cores 2", "--memory 3072", "--bios ovmf",
                 '--scsi0 "$STORAGE:0,import-from=$HERE/"scsi.0.qcow2',
                 '--scsi2 "$STORAGE:0,import-from=$HERE/"scsi.2.qcow2',
                 '--net1 "virtio,bridge=$BRIDGE,macaddr=50:6b:8d:00:00:02"', "--boot order=scsi0"):
        assert part in line, part
    assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0  # valid sh
    assert os.access(path, os.X_OK)


def check_hyperv(path: Path) -> None:
    """New-VM: generation 2 for the UEFI VM, its memory, vCPUs, disks and MACs."""
    ps = path.read_text()
    assert "New-VM -Name 'multi' -Generation 2 -MemoryStartupBytes 3072MB" in ps
    assert "-VHDPath (Join-Path $Folder 'scsi.0.vhdx')" in ps
    assert "Set-VMProcessor -VM $vm -Count 4" in ps
    assert ps.count("Add-VMHardDiskDrive") == 2 and "-StaticMacAddress '506B8D000002'" in ps


@pytest.mark.parametrize("name", ["qcow2", "vmdk", "vhdx", "vhd"])
async def test_each_target_honours_the_restore_target_contract(world: World, tmp_path: Path,
                                                               name: str) -> None:
    require_peer("qemu-img", "qemu-nbd")
    fmt = {"vhd": "vpc"}.get(name, name)

    def matches(location: str, image: bytes) -> bool:
        out = tmp_path / "read.raw"
        done = qemu("convert", "-f", fmt, "-O", "raw", location, str(out))
        got = out.read_bytes() if done.returncode == 0 else b""
        return got[: len(image)] == image and not got[len(image):].strip(b"\0")

    target = Runtime.from_config(world.config(target=name)).target()
    await check_restore_target(target, dest=tmp_path / "dest", matches=matches)


def _qemu_nbd_serving(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"qemu-nbd") and any(str(folder).encode() in a
                                                             for a in cmd):
                pids.append(int(proc.name))
    return pids


async def test_a_qemu_nbd_that_dies_mid_restore_fails_it_and_leaves_nothing(
        world: World) -> None:
    require_peer("qemu-img", "qemu-nbd")
    world.add_vm("dies", [(8 * MiB, [(0, 6 * MiB)])])
    assert (await BackupJob(Runtime.from_config(world.config(vm="dies"))).run()).ok
    rt = Runtime.from_config(world.config(target="qcow2", chunk_size_mib=1))
    backup = await pick_backup(rt, vm="dies", backup_id=None)
    dest = world.tmp / "dest"
    dead = subprocess.Popen(["true"])  # a process id nobody has any more
    dead.wait()
    (dest / "dies").mkdir(parents=True)
    stale = dest / "dies" / f".scsi.0.qcow2.partial-{dead.pid}"  # what a killed restore left
    stale.write_bytes(b"half an image")
    killed: list[int] = []

    def progress(n: int) -> None:
        if not killed:
            for pid in _qemu_nbd_serving(dest):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    out = await RestoreJob(rt, backup, dest=dest, progress=progress).run()
    assert killed and not out.ok
    (error,) = [d.error for d in out.disks]
    assert error and "\n" not in error
    assert error == "qcow2 target: disk scsi.0: qemu-nbd ended mid-restore (killed by signal 9)"
    assert [p for p in dest.rglob("*") if not p.is_dir()] == []  # the stale partial too
    assert _qemu_nbd_serving(dest) == []


async def test_a_full_destination_fails_the_restore_and_leaves_nothing(world: World) -> None:
    require_peer("qemu-img", "qemu-nbd")
    world.add_vm("wide", [(16 * MiB, [(0, 6 * MiB)]), (16 * MiB, [(0, 6 * MiB)])])
    assert (await BackupJob(Runtime.from_config(world.config(vm="wide"))).run()).ok
    rt = Runtime.from_config(world.config(target="qcow2"))
    with small_fs(world.tmp / "dest", 8) as dest:
        out = await RestoreJob(rt, await pick_backup(rt, vm="wide", backup_id=None),
                               dest=dest).run()
        assert not out.ok
        errors = [d.error for d in out.disks if d.error]
        assert any("No space left on device" in e and str(dest) in e and "free" in e
                   for e in errors), errors
        assert [p for p in dest.rglob("*") if not p.is_dir()] == []


async def test_the_command_line_restores_to_qcow2(world: World) -> None:
    require_peer("qemu-img", "qemu-nbd")
    vm = world.add_vm("cli", [(4 * MiB, [(MiB, MiB)])])
    assert (await BackupJob(Runtime.from_config(world.config(vm="cli"))).run()).ok
    dest = world.tmp / "out"
    args = ["restore", "--vm", "cli", "--target", "qcow2", "--dest", str(dest),
            *world.cli_args()]
    done = await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True,
                                  check=False)
    assert done.returncode == 0, done.stderr.decode()
    image = dest / "cli" / "scsi.0.qcow2"
    assert info(image, "qcow2").virtual_size == 4 * MiB
    raw = world.tmp / "check.raw"
    assert qemu("convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)).returncode == 0
    assert raw.read_bytes() == world.sim.read_disk(vm.uuid, 0, 0, 4 * MiB)



async def test_a_missing_qemu_img_is_one_line_and_nothing_is_made(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.add_vm("bare", [(4 * MiB, [(0, MiB)])])
    rt = Runtime.from_config(world.config(vm="bare", target="vhd"))
    assert (await BackupJob(rt).run()).ok
    backup = await pick_backup(rt, vm="bare", backup_id=None)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no qemu on it
    with pytest.raises(TargetError) as err:
        await RestoreJob(rt, backup, dest=world.tmp / "none").run()
    assert str(err.value) == ("target=vhd: qemu-img and qemu-nbd not found on PATH (install "
                              "Debian's qemu-utils)")
    assert not (world.tmp / "none").exists()


async def test_an_image_that_fails_its_check_fails_the_commit_and_leaves_nothing(
        world: World) -> None:
    require_peer("qemu-img", "qemu-nbd")
    dest = world.tmp / "dest"
    target = Runtime.from_config(world.config(target="qcow2")).target()
    vm = await target.begin_vm(RestoreRequest(vm_name="bad", dest=dest), cluster=None)
    writer = await vm.open_disk(DiskInfo(uuid="d", bus="scsi", index=0, size=4 * MiB),
                                size=4 * MiB)
    await writer.write(0, memoryview(os.urandom(MiB)))
    await writer.finish()
    (partial,) = (dest / "bad").glob(".scsi.0.qcow2.partial-*")
    # something changed the image behind the restore's back: it now has a backing file
    assert qemu("rebase", "-u", "-b", "/elsewhere.raw", "-F", "raw", "-f", "qcow2",
                str(partial)).returncode == 0
    with pytest.raises(TargetError, match=r"^qcow2 target: disk scsi\.0: qemu-img info shows "
                                          r"a backing file \(/elsewhere\.raw\)$"):
        await vm.commit()
    await vm.abort()
    assert [p for p in dest.rglob("*") if not p.is_dir()] == []


async def test_memory_stays_flat_as_the_disk_grows(world: World) -> None:
    """Eight times the data through the writer needs no more memory: one regrouping buffer,
    and what is in flight is in the socket, not in Python."""
    require_peer("qemu-img", "qemu-nbd")
    target = Runtime.from_config(world.config(target="qcow2")).target()
    chunk = memoryview(os.urandom(MiB))
    peaks = []
    for mib in (4, 32):
        vm = await target.begin_vm(RestoreRequest(vm_name=f"m{mib}", dest=world.tmp / "mem"),
                                   cluster=None)
        writer = await vm.open_disk(DiskInfo(uuid="d", bus="scsi", index=0, size=mib * MiB),
                                    size=mib * MiB)
        tracemalloc.start()
        try:
            for off in range(0, mib * MiB, MiB):
                await writer.write(off, chunk)
            await writer.finish()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        await vm.commit()
    assert peaks[1] < peaks[0] + MiB and peaks[1] < 16 * MiB, peaks
