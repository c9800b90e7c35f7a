"""The `vhd` target: fixed VHD images, the form Azure takes.

Each disk becomes ``<dest>/<vm>/<label>.vhd`` through `qemu.py`: qemu's `vpc` format,
``subformat=fixed`` with ``force_size`` (so the virtual size is the size asked for, not a
CHS-rounded one), and that size rounded up to a whole MiB, as Azure requires of an uploaded
disk. A fixed VHD is the raw disk plus a 512-byte footer; only data ranges are written, so on
a filesystem with holes it takes no more space than the data. ``qemu-img check`` does not
know vpc: `commit` checks it with ``qemu-img info`` alone. Uploading to Azure is the
operator's step.
"""

from __future__ import annotations

__all__ = ["VhdTarget"]

from .qemu import ImageFormat, QemuTarget

MiB = 1 << 20


class VhdTarget(QemuTarget):
    name = "vhd"
    summary = "fixed VHD images (vpc, force_size, 1 MiB-aligned) through qemu-nbd (Azure)"

    def image_format(self) -> ImageFormat:
        return ImageFormat("vpc", ".vhd", ("subformat=fixed", "force_size=on"), align=MiB,
                           checkable=False)
