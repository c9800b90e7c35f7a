"""The `vhdx` target: dynamic VHDX images for Hyper-V, plus the ``New-VM`` that attaches them.

Each disk becomes ``<dest>/<vm>/<label>.vhdx`` (dynamic: only written blocks take space)
through `qemu.py`. Next to the disks goes ``hyperv-import.ps1``: a PowerShell snippet that
creates the VM from them with the backed-up VM's CPU, memory and NICs, generation 2 for a
UEFI VM and 1 otherwise. Copying the folder to the Hyper-V host and running it there is the
operator's step: nothing is uploaded.
"""

from __future__ import annotations

__all__ = ["VhdxTarget", "VhdxVmRestore", "hyperv_script"]

import os
from pathlib import Path

from ahvbackup.core.drivers import VmShape

from .qemu import ImageFormat, QemuDisk, QemuTarget, QemuVmRestore
from .raw import partial_name

SCRIPT = "hyperv-import.ps1"


def _ps(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def hyperv_script(name: str, shape: VmShape, files: list[str]) -> str:
    """PowerShell that creates VM `name` from the disk `files` (boot disk first) in the
    script's folder."""
    gen = 2 if shape.uefi else 1
    lines = [
        f"# Hyper-V: create the VM {name} from the vhdx disks in this folder.",
        "# Run it on the Hyper-V host, with the folder on a path the host can reach.",
        "param([string]$SwitchName = 'Default Switch', [string]$Folder = $PSScriptRoot)",
        "$ErrorActionPreference = 'Stop'",
        f"$vm = New-VM -Name {_ps(name)} -Generation {gen} "
        f"-MemoryStartupBytes {shape.memory_mib}MB"
        + (f" -VHDPath (Join-Path $Folder {_ps(files[0])})" if files else " -NoVHD")
        + (" -SwitchName $SwitchName" if shape.nics else ""),
        f"Set-VMProcessor -VM $vm -Count {shape.sockets * shape.cores_per_socket}",
    ]
    if gen == 2 and shape.boot_type.upper() != "SECURE_BOOT":
        lines.append("Set-VMFirmware -VM $vm -EnableSecureBoot Off")
    for f in files[1:]:
        lines.append(f"Add-VMHardDiskDrive -VM $vm -ControllerType SCSI "
                     f"-Path (Join-Path $Folder {_ps(f)})")
    for i, nic in enumerate(shape.nics):
        if i:
            lines.append("Add-VMNetworkAdapter -VM $vm -SwitchName $SwitchName")
        if nic.mac:
            lines.append(f"(Get-VMNetworkAdapter -VM $vm)[{i}] | Set-VMNetworkAdapter "
                         f"-StaticMacAddress {_ps(nic.mac.replace(':', '').upper())}")
    return "\r\n".join(lines) + "\r\n"


class VhdxVmRestore(QemuVmRestore):
    def artifacts(self, disks: list[QemuDisk]) -> list[tuple[str, Path]]:
        manifest = self.request.manifest
        name = manifest.vm.name if manifest is not None else self.request.vm_name
        ordered = sorted(disks, key=lambda d: (d.info.bus.lower(), d.info.index))
        partial = self.folder / partial_name(SCRIPT)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", newline="") as f:
            f.write(hyperv_script(name, self.shape, [d.final.name for d in ordered]))
        return [(SCRIPT, partial)]


class VhdxTarget(QemuTarget):
    name = "vhdx"
    summary = "dynamic VHDX images through qemu-nbd, and the New-VM that attaches them (Hyper-V)"
    restore_class = VhdxVmRestore

    def image_format(self) -> ImageFormat:
        return ImageFormat("vhdx", ".vhdx", ("subformat=dynamic",))
