"""An OVA for vSphere: the OVF descriptor, its SHA-256 manifest, then the streamOptimized vmdks.

The OVF (DMTF DSP0243 1.x, in the form vSphere's "Deploy OVF Template" and ``ovftool`` read)
describes the backed-up VM: CPU (sockets and cores per socket), memory, firmware (``efi`` for
a UEFI VM), one LSI Logic SCSI controller per 15 disks with every disk on it, and a VMXNET3
NIC per recorded NIC (its MAC kept) on the network "VM Network". The OVA is a ustar archive
in the order OVA requires: the descriptor first, the manifest (``SHA256(name)= hex`` per
file) second, then the disks in the order the descriptor's References list them. The disks
are copied into the archive inside the kernel (``copy_file_range``).
"""

from __future__ import annotations

__all__ = ["OvaDisk", "ovf_descriptor", "write_ova"]

import hashlib
import io
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ahvbackup.core.drivers import VmShape

OVF_NAME = "vm.ovf"
MF_NAME = "vm.mf"
STREAM_FORMAT = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
DISKS_PER_CONTROLLER = 15  # SCSI units 0-15 less 7, the controller's own


@dataclass(frozen=True)
class OvaDisk:
    """One disk of the OVA: its member `name`, the file that holds it now, its capacity."""

    name: str
    path: Path
    capacity: int


def _item(**fields: str) -> str:
    body = "".join(f"<rasd:{k}>{escape(v)}</rasd:{k}>" for k, v in sorted(fields.items()))
    return f"      <Item>{body}</Item>\n"


def ovf_descriptor(name: str, shape: VmShape, disks: list[OvaDisk],
                   file_sizes: list[int]) -> str:
    """The OVF envelope for VM `name` with `disks` (boot disk first) of `file_sizes` bytes."""
    refs = "".join(f'    <File ovf:href={quoteattr(d.name)} ovf:id="file{i}" '
                   f'ovf:size="{n}"/>\n' for i, (d, n) in enumerate(zip(disks, file_sizes,
                                                                          strict=True)))
    disk_section = "".join(
        f'    <Disk ovf:capacity="{d.capacity}" ovf:capacityAllocationUnits="byte" '
        f'ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:format="{STREAM_FORMAT}"/>\n'
        for i, d in enumerate(disks))
    vcpus = shape.sockets * shape.cores_per_socket
    items = [
        _item(AllocationUnits="hertz * 10^6", Description="Number of Virtual CPUs",
              ElementName=f"{vcpus} virtual CPU(s)", InstanceID="1", ResourceType="3",
              VirtualQuantity=str(vcpus)).replace(
            "</Item>", f'<vmw:CoresPerSocket ovf:required="false">{shape.cores_per_socket}'
                       "</vmw:CoresPerSocket></Item>"),
        _item(AllocationUnits="byte * 2^20", Description="Memory Size",
              ElementName=f"{shape.memory_mib}MB of memory", InstanceID="2", ResourceType="4",
              VirtualQuantity=str(shape.memory_mib)),
    ]
    instance = 3
    controllers = []
    for c in range(-(-len(disks) // DISKS_PER_CONTROLLER) or 1):
        controllers.append(instance)
        items.append(_item(Address=str(c), Description="SCSI Controller",
                           ElementName=f"SCSI controller {c}", InstanceID=str(instance),
                           ResourceSubType="lsilogic", ResourceType="6"))
        instance += 1
    for i, _d in enumerate(disks):
        unit = i % DISKS_PER_CONTROLLER
        items.append(_item(AddressOnParent=str(unit if unit < 7 else unit + 1),
                           ElementName=f"Hard disk {i + 1}", HostResource=f"ovf:/disk/vmdisk{i}",
                           InstanceID=str(instance),
                           Parent=str(controllers[i // DISKS_PER_CONTROLLER]),
                           ResourceType="17"))
        instance += 1
    for i, nic in enumerate(shape.nics):
        fields = {"AddressOnParent": str(7 + i), "AutomaticAllocation": "true",
                  "Connection": "VM Network", "ElementName": f"Network adapter {i + 1}",
                  "InstanceID": str(instance), "ResourceSubType": "VmxNet3",
                  "ResourceType": "10"}
        if nic.mac:
            fields["Address"] = nic.mac
        items.append(_item(**fields))
        instance += 1
    firmware = ('      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>\n'
                if shape.uefi else "")
    network = ('  <NetworkSection>\n    <Info>The logical networks</Info>\n'
               '    <Network ovf:name="VM Network"><Description>The network the VM\'s NICs '
               'join</Description></Network>\n  </NetworkSection>\n') if shape.nics else ""
    title = escape(name)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"'
        ' xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"'
        ' xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/'
        'CIM_ResourceAllocationSettingData"'
        ' xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/'
        'CIM_VirtualSystemSettingData"'
        ' xmlns:vmw="http://www.vmware.com/schema/ovf">\n'
        f"  <References>\n{refs}  </References>\n"
        f"  <DiskSection>\n    <Info>Virtual disks</Info>\n{disk_section}  </DiskSection>\n"
        f"{network}"
        f"  <VirtualSystem ovf:id={quoteattr(name)}>\n    <Info>A virtual machine</Info>\n"
        f"    <Name>{title}</Name>\n"
        '    <OperatingSystemSection ovf:id="1" vmw:osType="otherGuest64">\n'
        "      <Info>The guest operating system</Info>\n    </OperatingSystemSection>\n"
        "    <VirtualHardwareSection>\n      <Info>Virtual hardware requirements</Info>\n"
        "      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName>"
        "<vssd:InstanceID>0</vssd:InstanceID>"
        f"<vssd:VirtualSystemIdentifier>{title}</vssd:VirtualSystemIdentifier>"
        "<vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>\n"
        f"{''.join(items)}{firmware}"
        "    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _member(out: int, name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    os.write(out, info.tobuf(format=tarfile.USTAR_FORMAT))


def _pad(out: int, size: int) -> None:
    if size % tarfile.BLOCKSIZE:
        os.write(out, bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))


def write_ova(path: Path, *, name: str, shape: VmShape, disks: list[OvaDisk]) -> None:
    """Write the OVA at `path` (a new file; blocking I/O)."""
    sizes = [d.path.stat().st_size for d in disks]
    ovf = ovf_descriptor(name, shape, disks, sizes).encode()
    digests = [hashlib.sha256(ovf).hexdigest(), *(_sha256(d.path) for d in disks)]
    mf = "".join(f"SHA256({n})= {h}\n" for n, h in
                 zip([OVF_NAME, *(d.name for d in disks)], digests, strict=True)).encode()
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        for member, data in ((OVF_NAME, ovf), (MF_NAME, mf)):
            _member(out, member, len(data))
            os.write(out, data)
            _pad(out, len(data))
        for d, size in zip(disks, sizes, strict=True):
            _member(out, d.name, size)
            with d.path.open("rb", buffering=0) as src:
                _copy(src, out, size)
            _pad(out, size)
        os.write(out, bytes(2 * tarfile.BLOCKSIZE))
        os.fsync(out)
    finally:
        os.close(out)


def _copy(src: io.FileIO, out: int, size: int) -> None:
    left = size
    while left:
        try:
            n = os.copy_file_range(src.fileno(), out, min(left, 1 << 30))
        except OSError:  # a filesystem (or kernel) without it: through user space
            n = os.write(out, src.read(min(left, 1 << 20)))
        if n == 0:
            raise OSError(f"{src.name} ended {left} bytes early")
        left -= n
