"""What the engine knows about VMs, disks and snapshots, independent of any hypervisor's API.

The hypervisor driver translates its API's answers into these; the job pipeline, the sinks and
the restore targets only ever see these.
"""

from __future__ import annotations

__all__ = ["DiskInfo", "DiskSnapshot", "Region", "VmInfo", "VmSnapshot"]

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DiskInfo:
    """One VM disk. `label` (e.g. ``scsi.0``) is how operators name it; `uuid` how the API does."""

    uuid: str
    bus: str
    index: int
    size: int
    container: str = ""

    @property
    def label(self) -> str:
        return f"{self.bus.lower()}.{self.index}"


@dataclass(frozen=True)
class VmInfo:
    uuid: str
    name: str
    cluster_uuid: str
    cluster_name: str
    disks: tuple[DiskInfo, ...]
    #: application-consistent snapshots possible (guest tools with VSS enabled)
    app_consistent_capable: bool = False
    #: the VM's configuration as the hypervisor reported it; kept in the backup manifest
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: the Prism Central project the VM is in (UUID and name; empty: none or not reported)
    project_uuid: str = ""
    project_name: str = ""


@dataclass(frozen=True)
class DiskSnapshot:
    """One disk as captured by a VM snapshot. `handle` is the cluster's name for it (for AHV the
    snapshot file path), which changed-regions queries use as a reference later."""

    disk: DiskInfo
    snapshot_id: str
    handle: str
    size: int


@dataclass(frozen=True)
class VmSnapshot:
    id: str
    vm_uuid: str
    cluster_uuid: str
    consistency: str  # "crash" | "application"
    disks: tuple[DiskSnapshot, ...]


@dataclass(frozen=True)
class Region:
    """A byte range of a disk; `zero` means it reads as zeros and needs no data transfer."""

    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length
