"""The `vmdk` target: VMware disks with the LSI Logic adapter, and an OVA for vSphere.

Each disk becomes ``<dest>/<vm>/<label>.vmdk`` through `qemu.py`, with
``adapter_type=lsilogic`` (qemu's default, IDE, is not what a vSphere VM boots from).
`vmdk_subformat`:

- ``streamOptimized`` (default): compressed grains, the form vSphere imports; the grains
  are written whole and in disk order, one write in flight. Next to the disks goes
  ``<vm>.ova`` (`ova.py`): the OVF descriptor with the backed-up VM's CPU, memory,
  firmware, NICs and disk controller, its SHA-256 manifest, and a copy of the vmdks, ready
  for "Deploy OVF Template" or ``ovftool``.
- ``monolithicSparse``: one sparse extent per disk, for a datastore upload and
  ``vmkfstools -i``; no OVA (vSphere's OVF import takes streamOptimized disks only).

Uploading to vCenter is the operator's step: nothing is uploaded.
"""

from __future__ import annotations

__all__ = ["VmdkKeys", "VmdkTarget", "VmdkVmRestore"]

import logging
from dataclasses import dataclass
from pathlib import Path

from ahvbackup.core.config import PluginSettings, setting
from ahvbackup.core.config.fields import Choice
from ahvbackup.core.containment import safe_name

from .ova import OvaDisk, write_ova
from .qemu import ImageFormat, QemuDisk, QemuTarget, QemuVmRestore
from .raw import partial_name

log = logging.getLogger("ahvbackup.target.vmdk")

GRAIN = 64 << 10
_SUBFORMATS = ("streamOptimized", "monolithicSparse")


@dataclass(frozen=True)
class VmdkKeys(PluginSettings):
    """`vmdk_subformat`: streamOptimized (default, with an OVA) or monolithicSparse."""

    vmdk_subformat: str = setting(
        Choice(tuple(s.lower() for s in _SUBFORMATS),
               synonyms={"stream": "streamoptimized", "sparse": "monolithicsparse"}),
        "streamoptimized")


class VmdkVmRestore(QemuVmRestore):
    def artifacts(self, disks: list[QemuDisk]) -> list[tuple[str, Path]]:
        if self.format.create_type != "streamOptimized":
            return []
        manifest = self.request.manifest
        name = manifest.vm.name if manifest is not None else self.request.vm_name
        ordered = sorted(disks, key=lambda d: (d.info.bus.lower(), d.info.index))
        final = f"{safe_name(name)}.ova"
        partial = self.folder / partial_name(final)
        self.made.append(partial)  # removed by abort even if writing it fails midway
        write_ova(partial, name=name, shape=self.shape,
                  disks=[OvaDisk(d.final.name, d.partial, d.size) for d in ordered])
        log.info("vSphere: %s holds the VM and its disks", self.folder / final)
        return [(final, partial)]


class VmdkTarget(QemuTarget):
    name = "vmdk"
    summary = "VMware vmdk images (lsilogic) through qemu-nbd, and an OVA for vSphere"
    config_schema = VmdkKeys.schema()
    restore_class = VmdkVmRestore

    def image_format(self) -> ImageFormat:
        chosen = self.config.settings(VmdkKeys).vmdk_subformat
        sub = next(s for s in _SUBFORMATS if s.lower() == chosen)
        options = (f"subformat={sub}", "adapter_type=lsilogic")
        if sub == "streamOptimized":
            return ImageFormat("vmdk", ".vmdk", options, granule=GRAIN, in_order=True,
                               create_type=sub)
        return ImageFormat("vmdk", ".vmdk", options, create_type=sub)
