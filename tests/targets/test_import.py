"""`ahvbackup import` against real qemu-img and qemu-nbd and the served simulator: foreign
images (our own qcow2, vmdk, vhdx and vhd outputs, an OVA of our vmdk target, and images made
independently with ``qemu-img convert``) become VMs whose disks read back byte-identical
through the simulator; refusals and a qemu-nbd that dies leave nothing on the cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from tests.conftest import require_peer
from tests.e2e import test_restore_ahv
from tests.e2e.e2e_world import MiB
from tests.e2e.test_restore_ahv import ADMIN, LAYOUT, SRC, Dr, restored

from ahvbackup.core.errors import AhvBackupError
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.hypervisors.ahv.simulator.model import Vm
from ahvbackup.targets.importer import ImportJob, ImportOutcome, ImportRequest

pytestmark = pytest.mark.peer
#: the served simulator with two clusters (tests/e2e/test_restore_ahv.py), as a fixture here
dr = test_restore_ahv.dr
KiB = 1 << 10
#: a raw disk with holes: data, a run of written zeros (allocated, all zero), data at the end
RAW_SIZE = 4 * MiB
RAW_DATA = [(0, 300 * KiB), (MiB + 4 * KiB, 100 * KiB), (4 * MiB - 64 * KiB, 64 * KiB)]
RAW_ZEROS = (2 * MiB, 512 * KiB)
#: qemu-img convert options of each independently made image
CONVERTED = {
    "qcow2": ("qcow2", ()),
    "vmdk-stream": ("vmdk", ("-o", "subformat=streamOptimized")),
    "vmdk-sparse": ("vmdk", ("-o", "subformat=monolithicSparse")),
    "vhdx": ("vhdx", ("-o", "subformat=dynamic")),
    "vhd": ("vpc", ("-o", "subformat=dynamic,force_size=on")),
}


def written_within(got: int, extents: list[tuple[int, int]]) -> bool:
    """An import wrote the data of these extents and at most every 64 KiB granule they touch
    (how finely a format maps its allocation varies); holes and zeros were left out."""
    data = sum(n for _, n in extents)
    return data <= got <= granular(extents)


def granular(extents: list[tuple[int, int]]) -> int:
    return len({g for off, n in extents for g in range(off >> 16, (off + n - 1 >> 16) + 1)}) << 16


def qemu_img(*args: str) -> None:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


async def run_import(d: Dr, request: ImportRequest, *, progress: Any = None,
                     **keys: Any) -> ImportOutcome:
    keys = {"target_cluster": "sim-cluster-1", **keys}
    cfg = d.config(target="ahv", **ADMIN, **keys)
    return await ImportJob(Runtime.from_config(cfg), request, progress=progress).run()


def disks_of(d: Dr, vm: Vm) -> list[bytes]:
    ordered = sorted(vm.data_disks, key=lambda x: x.device_index)
    return [d.sim.read_disk(vm.uuid, vm.data_disks.index(x), 0, x.size) for x in ordered]


def raw_image(path: Path) -> bytes:
    with path.open("wb") as f:
        f.truncate(RAW_SIZE)
        for off, length in RAW_DATA:
            f.seek(off)
            f.write(os.urandom(length))
        f.seek(RAW_ZEROS[0])
        f.write(bytes(RAW_ZEROS[1]))
    return path.read_bytes()


async def our_outputs(d: Dr, targets: tuple[str, ...] = ("qcow2", "vmdk", "vhdx", "vhd")) -> Path:
    """The source VM backed up, then restored through the image targets (qcow2, vmdk, vhdx,
    vhd) into <tmp>/out/<target>/src-01/."""
    await d.backup()
    for target in targets:
        rt = Runtime.from_config(d.config(target=target))
        backup = await pick_backup(rt, vm=SRC, backup_id=None)
        out = await RestoreJob(rt, backup, dest=d.world.tmp / "out" / target).run()
        assert out.ok, out.to_json()
    return d.world.tmp / "out"


async def test_our_outputs_and_converted_images_import_byte_identical(dr: Dr) -> None:
    """Every format in one VM each time (one disk per image, in --image order), to keep the
    time down: our targets' outputs over iSCSI, qemu-img convert's over REST."""
    require_peer("qemu-img", "qemu-nbd")
    expect = dr.disks_now()
    out = await our_outputs(dr)
    ours = {"qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vhd": "vpc"}
    images = tuple(out / target / SRC / f"scsi.{i}.{target}" for target in ours
                   for i in range(len(LAYOUT)))
    got = await run_import(dr, ImportRequest(images=images, vm_name="ours"), data_path="iscsi")
    vm = restored(dr, "ours")
    assert got.vm_id == vm.uuid
    assert disks_of(dr, vm) == expect * len(ours)
    assert [d.format for d in got.disks] == [f for f in ours.values() for _ in LAYOUT]
    assert (vm.num_sockets, vm.memory_mib, vm.nics) == (1, 1024, [])  # no OVF: the defaults
    for disk, (_, extents) in zip(got.disks, LAYOUT * len(ours), strict=True):
        assert written_within(disk.data_bytes, extents), disk

    raw = dr.world.tmp / "holes.raw"
    data = raw_image(raw)
    sources = [raw]
    for name, (fmt, opts) in CONVERTED.items():
        sources.append(dr.world.tmp / f"holes.{name}")
        qemu_img("convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(sources[-1]))
    got = await run_import(dr, ImportRequest(images=tuple(sources), vm_name="converted"),
                           data_path="rest")  # every format probed, none named
    assert disks_of(dr, restored(dr, "converted")) == [data] * len(sources)
    assert [d.format for d in got.disks] == ["raw", *(f for f, _ in CONVERTED.values())]
    for disk in got.disks:
        assert disk.virtual_size == RAW_SIZE
        # only the data: neither the holes nor the allocated run of zeros was written
        assert written_within(disk.data_bytes, RAW_DATA), disk
        assert disk.data_bytes < disk.virtual_size
    assert dr.ledger() == []
    assert dr.leftovers() == ["vm converted", "vm ours"]


async def test_an_ova_of_our_vmdk_target_imports_with_its_shape(dr: Dr) -> None:
    require_peer("qemu-img", "qemu-nbd")
    expect = dr.disks_now()
    out = await our_outputs(dr, ("vmdk",))
    ova = out / "vmdk" / SRC / f"{SRC}.ova"
    dr.sim.delete_vm(dr.src.uuid)  # the new VM takes the OVF's name, the source VM's
    moved: list[int] = []
    got = await run_import(dr, ImportRequest(ova=ova), network_map="VM Network=backup-net",
                           progress=moved.append, memory_mib=4096)
    vm = restored(dr, SRC)  # the OVF's name
    assert got.vm_id == vm.uuid and disks_of(dr, vm) == expect
    assert (vm.num_sockets, vm.num_vcpus_per_socket) == (2, 2)
    assert vm.memory_mib == 4096  # memory_mib wins over the OVF's 2048
    assert vm.boot_type == "UEFI"
    assert [dr.sim.subnets[n.subnet_uuid].name for n in vm.nics] == ["backup-net"]
    assert sum(moved) == sum(d.data_bytes for d in got.disks)
    # an OVF with its disks next to it (the same package, unpacked), as vSphere exports it
    unpacked = dr.world.tmp / "unpacked"
    with tarfile.open(ova) as tar:
        tar.extractall(unpacked, filter="data")
    got = await run_import(dr, ImportRequest(ovf=unpacked / "vm.ovf", vm_name="from-ovf"),
                           network_map="VM Network=vlan0")
    vm = restored(dr, "from-ovf")
    assert disks_of(dr, vm) == expect and vm.memory_mib == 2048
    assert dr.ledger() == []


async def test_a_refusal_is_one_line_and_creates_nothing(dr: Dr, tmp_path: Path) -> None:
    require_peer("qemu-img", "qemu-nbd")
    raw = tmp_path / "base.raw"
    raw_image(raw)
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(child))
    corrupt = tmp_path / "corrupt.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(corrupt))
    with corrupt.open("r+b") as f:  # its L1 table past the file: it would read as zeros
        f.seek(40)
        f.write((1 << 60).to_bytes(8, "big"))
    unknown = tmp_path / "unknown.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(unknown))
    with unknown.open("r+b") as f:  # a qcow2 version that does not exist
        f.write(b"QFI\xfb\x00\x00\x00\x09")
    ovf = tmp_path / "vm.ovf"
    out = await our_outputs(dr, ("vmdk",))
    ova = out / "vmdk" / SRC / f"{SRC}.ova"
    damaged = tmp_path / "damaged.ova"
    damaged.write_bytes(ova.read_bytes())
    with tarfile.open(ova) as tar:  # one byte of the first disk's data, changed
        member = next(m for m in tar.getmembers() if m.name.endswith(".vmdk"))
    with damaged.open("r+b") as f:
        f.seek(member.offset_data + member.size - 600)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = dr.leftovers()
    cases: list[tuple[ImportRequest, dict[str, str], str]] = [
        (ImportRequest(images=(tmp_path / "gone.qcow2",), vm_name="x"), {},
         f"image: {tmp_path / 'gone.qcow2'}: no such file"),
        (ImportRequest(images=(corrupt,), vm_name="x"), {},
         f"import: {corrupt}: qemu-img check found it damaged (1 corruptions)"),
        (ImportRequest(images=(unknown,), vm_name="x"), {},
         f"import: {unknown}: qemu-img cannot read it as a disk image (qemu-img: Could not "
         f"open "),
        (ImportRequest(images=(child,), vm_name="x"), {},
         f"import: {child}: has a backing file ({raw})"),
        (ImportRequest(ova=ova, vm_name="x"), {},
         "network_map: the OVF's NIC 0 is on network 'VM Network', which network_map does "
         "not map; add network_map=VM Network=<a subnet of the target cluster>"),
        (ImportRequest(ova=ova, vm_name="x"), {"network_map": "VM Network=nowhere"},
         "network_map: VM Network=nowhere: cluster sim-cluster-1 has no subnet 'nowhere'"),
        (ImportRequest(ova=damaged, vm_name="x"), {"network_map": "VM Network=vlan0"},
         f"import: {damaged}: {member.name} does not match its SHA256 digest in the manifest "
         "(.mf); the package is damaged"),
        (ImportRequest(ovf=ovf, images=(raw,)), {}, f"ovf: {ovf}: no such file"),
        (ImportRequest(images=(raw,), vm_name="x"), {"target_cluster": ""},
         "target_cluster: Prism manages 2 clusters (sim-cluster-1, sim-cluster-2); name the "
         "one to import into"),
        (ImportRequest(images=(raw,), vm_name="web-01"), {},
         "restore_vm_name: a VM named 'web-01' already exists on cluster sim-cluster-1"),
    ]
    for request, keys, said in cases:
        with pytest.raises(AhvBackupError) as err:
            await run_import(dr, request, **keys)
        text = str(err.value)
        assert text.startswith(said) and "\n" not in text, text
        assert dr.leftovers() == before, said
        assert dr.ledger() == []


async def test_a_qemu_nbd_that_dies_mid_import_leaves_nothing(
        dr: Dr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_peer("qemu-img", "qemu-nbd")
    # where qemu-nbd's private folder goes, to see it removed: short, as a socket path must be
    sockets = Path(tempfile.mkdtemp(prefix="nbd-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(sockets))
    image = tmp_path / "big.qcow2"
    raw = tmp_path / "big.raw"
    with raw.open("wb") as f:
        f.write(os.urandom(8 * MiB))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    before = dr.leftovers()

    def kill_qemu_nbd(n: int) -> None:
        del n
        assert [x.name[:14] for x in sockets.iterdir()] == ["ahvbackup-nbd-"]
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            comm, ppid = stat[stat.index("(") + 1 : stat.rindex(")")], stat.split()[3]
            if comm == "qemu-nbd" and int(ppid) == os.getpid():
                os.kill(int(pid), 9)

    with pytest.raises(AhvBackupError) as err:
        await run_import(dr, ImportRequest(images=(image,), vm_name="dies"),
                         progress=kill_qemu_nbd)
    assert str(err.value).startswith(f"import: {image}: qemu-nbd ended mid-import"), err.value
    assert "killed by signal 9" in str(err.value)
    assert dr.leftovers() == before
    assert dr.ledger() == []
    assert list(sockets.iterdir()) == []
    sockets.rmdir()


async def test_the_command_line_imports_and_refuses_in_one_line(dr: Dr, tmp_path: Path) -> None:
    require_peer("qemu-img", "qemu-nbd")
    raw = tmp_path / "disk.raw"
    data = raw_image(raw)
    image = tmp_path / "disk.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", str(raw), str(image))

    async def cli(*args: str, **keys: Any) -> subprocess.CompletedProcess[str]:
        sets = dr.world.cli_args(iscsi_port=dr.iscsi_port, verbose=0, **ADMIN, **keys)
        return await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "ahvbackup.core.cli", "import", *args, *sets],
            capture_output=True, text=True, timeout=120, check=False))

    done = await cli("--image", str(image), "--vm-name", "cli-import", power_on="yes",
                     target_cluster="sim-cluster-1",
                     network_map="nic=vlan0", vcpu=2)
    assert done.returncode == 0, done.stderr
    vm = restored(dr, "cli-import")
    assert vm.uuid in done.stdout and vm.power_state == "ON" and vm.num_sockets == 2
    assert [dr.sim.subnets[n.subnet_uuid].name for n in vm.nics] == ["vlan0"]
    assert disks_of(dr, vm) == [data]
    again = await cli("--image", str(image), "--format", "floppy", "--vm-name", "other",
                      target_cluster="sim-cluster-1")
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"ahvbackup: error: format: {image}: 'floppy' is not a format an import reads "
        "(qcow2, vmdk, vhdx, vhd, raw)"]
    assert dr.leftovers() == ["vm cli-import"]


VSPHERE_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:o="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:r="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:v="http://www.vmware.com/schema/ovf">
  <References><File o:href="boot.vmdk" o:id="f1"/><File o:href="data.vmdk" o:id="f2"/></References>
  <DiskSection>
    <Disk o:diskId="data" o:fileRef="f2" o:capacity="2" o:capacityAllocationUnits="byte * 2^30"/>
    <Disk o:diskId="boot" o:fileRef="f1" o:capacity="16777216"/>
    <Disk o:diskId="blank" o:capacity="1" o:capacityAllocationUnits="byte * 2^20"/>
  </DiskSection>
  <VirtualSystem o:id="legacy-app"><Name>legacy-app</Name><VirtualHardwareSection>
    <Item><r:InstanceID>1</r:InstanceID><r:ResourceType>3</r:ResourceType>
      <r:VirtualQuantity>6</r:VirtualQuantity><v:CoresPerSocket>3</v:CoresPerSocket></Item>
    <Item><r:AllocationUnits>GigaBytes</r:AllocationUnits><r:InstanceID>2</r:InstanceID>
      <r:ResourceType>4</r:ResourceType><r:VirtualQuantity>3</r:VirtualQuantity></Item>
    <Item><r:InstanceID>3</r:InstanceID><r:ResourceType>6</r:ResourceType></Item>
    <Item><r:InstanceID>4</r:InstanceID><r:ResourceType>5</r:ResourceType></Item>
    <Item><r:AddressOnParent>1</r:AddressOnParent><r:HostResource>ovf:/disk/blank</r:HostResource>
      <r:InstanceID>5</r:InstanceID><r:Parent>4</r:Parent><r:ResourceType>17</r:ResourceType></Item>
    <Item><r:AddressOnParent>1</r:AddressOnParent><r:HostResource>ovf:/disk/data</r:HostResource>
      <r:InstanceID>6</r:InstanceID><r:Parent>3</r:Parent><r:ResourceType>17</r:ResourceType></Item>
    <Item><r:AddressOnParent>0</r:AddressOnParent><r:HostResource>ovf:/disk/boot</r:HostResource>
      <r:InstanceID>7</r:InstanceID><r:Parent>3</r:Parent><r:ResourceType>17</r:ResourceType></Item>
    <Item><r:Connection>Prod LAN</r:Connection><r:InstanceID>8</r:InstanceID>
      <r:ResourceType>10</r:ResourceType></Item>
    <Item><r:Connection>Backup LAN</r:Connection><r:InstanceID>9</r:InstanceID>
      <r:ResourceType>10</r:ResourceType></Item>
  </VirtualHardwareSection></VirtualSystem>
</Envelope>"""


def test_an_ovf_of_another_exporter_reads_in_boot_order() -> None:
    """Other prefixes, units and controllers than our own OVA's: the SCSI disks by address
    first (the controller declared first), then the IDE one, which has no file."""
    from ahvbackup.targets.ovf_reader import OvfDisk, read_ovf

    vm = read_ovf(VSPHERE_OVF)
    assert (vm.name, vm.vcpus, vm.cores_per_socket, vm.memory_mib, vm.uefi) == (
        "legacy-app", 6, 3, 3072, False)
    assert vm.networks == ("Prod LAN", "Backup LAN")
    assert vm.disks == (OvfDisk("boot", 16 * MiB, "boot.vmdk"),
                        OvfDisk("data", 2 << 30, "data.vmdk"), OvfDisk("blank", MiB, None))
    with pytest.raises(AhvBackupError, match=r"^ovf: memory: unknown allocation units 'pages'$"):
        read_ovf(VSPHERE_OVF.replace("GigaBytes", "pages"))
