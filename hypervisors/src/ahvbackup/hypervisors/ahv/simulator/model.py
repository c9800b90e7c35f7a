"""The simulator's inventory: plain records, persisted as JSON (``inventory.json``).

These are the simulator's own facts (sizes, references, states); the v3 JSON shapes are made from
them by ``v3.render`` so that later API versions (v4) can render the same facts their own way.
"""

from __future__ import annotations

__all__ = [
    "Cluster",
    "Container",
    "Disk",
    "Image",
    "Nic",
    "Project",
    "SnapshotFile",
    "Subnet",
    "Task",
    "Vm",
    "VmSnapshot",
    "rfc3339",
]

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any


def rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Record:
    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass
class Container(_Record):
    uuid: str
    name: str


@dataclass
class Cluster(_Record):
    """A Prism Element cluster; its listener answers on ``external_ip``."""

    uuid: str
    name: str
    external_ip: str
    dsip: str
    cluster_id: int
    incarnation: int
    containers: list[Container]
    next_entity_id: int = 1000

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Cluster:
        d = dict(d)
        d["containers"] = [Container(**c) for c in d["containers"]]
        return cls(**d)

    def container(self, uuid: str | None) -> Container:
        for c in self.containers:
            if c.uuid == uuid:
                return c
        return self.containers[0]


@dataclass
class Subnet(_Record):
    uuid: str
    name: str
    vlan_id: int
    cluster_uuid: str
    #: the subnet's IPv4 network, ``10.10.0.0/24`` ("" when it has no IP management)
    cidr: str = ""


@dataclass
class Project(_Record):
    """A Prism Central project: VMs belong to one, and a role assignment can be scoped to it."""

    uuid: str
    name: str
    description: str = ""
    created: float = 0.0


@dataclass
class Disk(_Record):
    """A VM disk; ``uuid`` is the vmdisk UUID and also the disk's id in the disk store."""

    uuid: str
    device_type: str
    adapter_type: str
    device_index: int
    size: int
    container_uuid: str
    source_image: str | None = None
    #: a snapshot file path (or vmdisk path) the disk is cloned from (restores, v4 data sources)
    source_path: str | None = None


@dataclass
class Nic(_Record):
    uuid: str
    mac: str
    subnet_uuid: str
    ip: str | None = None
    connected: bool = True


@dataclass
class Vm(_Record):
    uuid: str
    name: str
    cluster_uuid: str
    description: str = ""
    num_sockets: int = 1
    num_vcpus_per_socket: int = 1
    memory_mib: int = 1024
    power_state: str = "OFF"
    boot_type: str = "LEGACY"
    machine_type: str = "PC"
    disks: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    ngt_installed: bool = False
    ngt_enabled: bool = False
    ngt_capabilities: list[str] = field(default_factory=list)
    spec_version: int = 0
    created: float = 0.0
    updated: float = 0.0
    task_uuid: str | None = None
    failed: str | None = None
    #: the project the VM is in (``metadata.project_reference``); None: no project
    project_uuid: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vm:
        d = dict(d)
        d["disks"] = [Disk(**x) for x in d["disks"]]
        d["nics"] = [Nic(**x) for x in d["nics"]]
        return cls(**d)

    @property
    def data_disks(self) -> list[Disk]:
        """The disks that hold data (not CD-ROMs), in the order the workload API indexes them."""
        return [d for d in self.disks if d.device_type == "DISK"]

    @property
    def app_consistent_capable(self) -> bool:
        return self.ngt_installed and self.ngt_enabled and "VSS_SNAPSHOT" in self.ngt_capabilities


@dataclass
class Image(_Record):
    uuid: str
    name: str
    description: str = ""
    image_type: str = "DISK_IMAGE"
    size: int | None = None
    source_uri: str | None = None
    disk_id: str | None = None
    created: float = 0.0
    updated: float = 0.0
    task_uuid: str | None = None
    failed: str | None = None


@dataclass
class SnapshotFile(_Record):
    vmdisk_uuid: str
    file_path: str
    snapshot_file_path: str
    store_snapshot: str


@dataclass
class VmSnapshot(_Record):
    uuid: str
    name: str
    vm_uuid: str
    cluster_uuid: str
    snapshot_type: str
    entity_id: int
    files: list[SnapshotFile] = field(default_factory=list)
    expiration_time_msecs: int | None = None
    created: float = 0.0
    task_uuid: str | None = None
    failed: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VmSnapshot:
        d = dict(d)
        d["files"] = [SnapshotFile(**x) for x in d["files"]]
        return cls(**d)


@dataclass
class Task(_Record):
    """A task; its state follows the clock: QUEUED, RUNNING, then SUCCEEDED or FAILED.

    ``started`` is on the simulator's clock (not persisted meaningfully across restarts: a loaded
    task is final); ``created`` is wall-clock time for display.
    """

    uuid: str
    operation_type: str
    cluster_uuid: str | None
    entity_kind: str
    entity_uuid: str
    entity_name: str
    created: float
    started: float
    duration: float
    error: str | None = None
    error_code: str | None = None
    final: bool = False
