"""The `qcow2` target: qcow2 images for Proxmox VE, plus the ``qm create`` that imports them.

Each disk becomes ``<dest>/<vm>/<label>.qcow2`` through `qemu.py` (qemu-nbd, data ranges
only). `qcow2_compression=zstd` compresses every cluster (qemu's compress filter, so each
cluster is written once, whole) and marks the image zstd; `none`, the default, leaves the
clusters plain.

Next to the disks goes ``proxmox-import.sh``: the ``qm create`` command line that makes the
VM from them on a Proxmox VE node (``--scsi0 STORAGE:0,import-from=...``, PVE 7.2 or later),
with the backed-up VM's CPU, memory, firmware and NICs. It is printed in the log too. Copying
the folder to the node and running it there is the operator's step: nothing is uploaded.
"""

from __future__ import annotations

__all__ = ["Qcow2Keys", "Qcow2Target", "Qcow2VmRestore", "proxmox_command"]

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ahvbackup.core.config import PluginSettings, setting
from ahvbackup.core.config.fields import Choice
from ahvbackup.core.drivers import VmShape

from .qemu import ImageFormat, QemuDisk, QemuTarget, QemuVmRestore
from .raw import partial_name

log = logging.getLogger("ahvbackup.target.qcow2")

SCRIPT = "proxmox-import.sh"
#: qemu's default cluster: compressed, each is written once and whole
CLUSTER = 64 << 10
#: AHV disk buses as Proxmox names them
_PVE_BUS = {"scsi": "scsi", "sata": "sata", "ide": "ide", "pci": "virtio", "virtio": "virtio"}


@dataclass(frozen=True)
class Qcow2Keys(PluginSettings):
    """`qcow2_compression`: none (default) or zstd (every cluster compressed)."""

    qcow2_compression: str = setting(Choice(("none", "zstd")), "none")


def proxmox_command(name: str, shape: VmShape, disks: list[tuple[str, int, str]]) -> str:
    """The ``qm create`` line for a VM called `name`, its disks given as (bus, index, file
    name in the script's folder). `$VMID`, `$STORAGE` and `$BRIDGE` are the script's."""
    args = ["qm", "create", "$VMID", "--name", shlex.quote(name),
            "--sockets", str(shape.sockets), "--cores", str(shape.cores_per_socket),
            "--memory", str(shape.memory_mib), "--scsihw", "virtio-scsi-pci"]
    if shape.uefi:
        args += ["--bios", "ovmf", "--efidisk0", '"$STORAGE:1,efitype=4m"']
    if shape.machine_type.upper() == "Q35" or shape.uefi:
        args += ["--machine", "q35"]
    for i, nic in enumerate(shape.nics):
        mac = f",macaddr={nic.mac}" if nic.mac else ""
        args += [f"--net{i}", f'"virtio,bridge=$BRIDGE{mac}"']
    first = ""
    for bus, index, file in disks:
        slot = f"{_PVE_BUS.get(bus.lower(), 'scsi')}{index}"
        first = first or slot
        args += [f"--{slot}", f'"$STORAGE:0,import-from=$HERE/"{shlex.quote(file)}']
    if first:
        args += ["--boot", f"order={first}"]
    return " ".join(args)


def _script(name: str, command: str) -> str:
    return f"""#!/bin/sh
# Proxmox VE: create the VM {shlex.quote(name)} from the qcow2 disks in this folder.
# Run it as root on the node, in (or naming) the folder the disks are in; PVE 7.2 or later.
# VMID, STORAGE (where the disks go) and BRIDGE may be set in the environment.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
VMID=${{VMID:-$(pvesh get /cluster/nextid)}}
STORAGE=${{STORAGE:-local-lvm}}
BRIDGE=${{BRIDGE:-vmbr0}}
{command}
"""


class Qcow2VmRestore(QemuVmRestore):
    def artifacts(self, disks: list[QemuDisk]) -> list[tuple[str, Path]]:
        manifest = self.request.manifest
        name = manifest.vm.name if manifest is not None else self.request.vm_name
        ordered = sorted(disks, key=lambda d: (d.info.bus.lower(), d.info.index))
        command = proxmox_command(name, self.shape,
                                  [(d.info.bus, d.info.index, d.final.name) for d in ordered])
        partial = self.folder / partial_name(SCRIPT)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(_script(name, command))
        log.info("Proxmox VE: %s creates the VM (%s)", self.folder / SCRIPT, command)
        return [(SCRIPT, partial)]


class Qcow2Target(QemuTarget):
    name = "qcow2"
    summary = "qcow2 images through qemu-nbd, and the qm create that imports them (Proxmox VE)"
    config_schema = Qcow2Keys.schema()
    restore_class = Qcow2VmRestore

    def image_format(self) -> ImageFormat:
        if self.config.settings(Qcow2Keys).qcow2_compression == "zstd":
            return ImageFormat("qcow2", ".qcow2", ("compression_type=zstd",), granule=CLUSTER,
                               compress_filter=True, compression_type="zstd")
        return ImageFormat("qcow2", ".qcow2")
