"""What Prism v3 answers, as frozen dataclasses.

Each model has a pure `from_api(data, *, endpoint=...)` that ignores fields it does not know
(Prism adds some with every release) and refuses an answer missing a field we rely on, with an
`ApiServerError` that names the field and the endpoint, so a Prism change shows up as one clear
line instead of a KeyError deep in a job.
"""

from __future__ import annotations

__all__ = [
    "ChangedRegions",
    "Cluster",
    "CreateResult",
    "IdempotenceIds",
    "Image",
    "NgtInfo",
    "Region",
    "SnapshotFile",
    "Task",
    "User",
    "Vm",
    "VmDisk",
    "VmNic",
    "VmSnapshot",
    "task_uuids",
]

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ahvbackup.core.errors import ApiServerError

_MISSING = object()


class _Fields:
    """Reads dotted paths out of one answer, naming the endpoint and path when one is wrong."""

    def __init__(self, data: object, *, endpoint: str, prefix: str = "") -> None:
        self.endpoint = endpoint
        self.prefix = prefix
        if not isinstance(data, Mapping):
            raise self._error(prefix or "the answer", f"is not an object (got {_kind(data)})")
        self.data = data

    def _error(self, where: str, problem: str) -> ApiServerError:
        at = f" to {self.endpoint}" if self.endpoint else ""
        return ApiServerError(
            f"Prism answer{at} does not parse: {where} {problem}", endpoint=self.endpoint
        )

    def _name(self, path: str) -> str:
        return f"{self.prefix}.{path}" if self.prefix else path

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, Mapping) or node.get(part) is None:
                return default
            node = node[part]
        return node

    def req(self, path: str, kind: type | tuple[type, ...] = object) -> Any:
        value = self.get(path, _MISSING)
        if value is _MISSING:
            raise self._error(f"required field {self._name(path)}", "is missing")
        return self._check(path, value, kind)

    def opt(self, path: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.get(path, _MISSING)
        if value is _MISSING:
            return default
        return self._check(path, value, kind)

    def _check(self, path: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        bad_bool = isinstance(value, bool) and bool not in kinds and int in kinds
        if not isinstance(value, kinds) or bad_bool:
            raise self._error(
                f"field {self._name(path)}", f"has the wrong type (got {_kind(value)})"
            )
        return value

    def sub(self, path: str, data: object) -> _Fields:
        return _Fields(data, endpoint=self.endpoint, prefix=self._name(path))

    def items(self, path: str) -> list[_Fields]:
        seq = self.opt(path, list, [])
        return [self.sub(f"{path}[{i}]", item) for i, item in enumerate(seq)]


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _strs(values: object) -> tuple[str, ...]:
    if not isinstance(values, list):
        return ()
    return tuple(v for v in values if isinstance(v, str))


@dataclass(frozen=True)
class CreateResult:
    """The uuid Prism gave (or kept) for a created entity and the task doing the work."""

    uuid: str
    task_uuid: str | None

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> CreateResult:
        f = _Fields(data, endpoint=endpoint)
        uuid = f.req("metadata.uuid", str)
        tasks = task_uuids(f.data)
        return cls(uuid=uuid, task_uuid=tasks[0] if tasks else None)


def task_uuids(data: object) -> tuple[str, ...]:
    """Task uuids of an intent response (`status.execution_context.task_uuid`, one or a
    list) or a procedural response (`task_uuid`)."""
    if not isinstance(data, Mapping):
        return ()
    found = data.get("task_uuid")
    if found is None:
        status = data.get("status")
        ctx = status.get("execution_context") if isinstance(status, Mapping) else None
        found = ctx.get("task_uuid") if isinstance(ctx, Mapping) else None
    if isinstance(found, str):
        return (found,)
    return _strs(found)


@dataclass(frozen=True)
class Cluster:
    """A cluster as Prism Central lists it; PC lists itself too (`is_prism_central`)."""

    uuid: str
    name: str
    external_ip: str | None
    dsip: str | None
    is_prism_central: bool
    services: tuple[str, ...]
    software_version: str | None = None

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> Cluster:
        f = _Fields(data, endpoint=endpoint)
        services = _strs(f.get("status.resources.config.service_list"))
        net = "status.resources.network"
        return cls(
            uuid=f.req("metadata.uuid", str),
            name=f.opt("status.name", str) or f.req("spec.name", str),
            external_ip=f.opt(f"{net}.external_ip", str)
            or f.opt("spec.resources.network.external_ip", str),
            dsip=f.opt(f"{net}.external_data_services_ip", str)
            or f.opt("spec.resources.network.external_data_services_ip", str),
            is_prism_central="PRISM_CENTRAL" in services,
            services=services,
            software_version=f.opt("status.resources.config.software_map.NOS.version", str),
        )


@dataclass(frozen=True)
class VmDisk:
    """One entry of a VM's disk list. `uuid` is the vmdisk uuid snapshots name their files by."""

    uuid: str
    device_type: str
    adapter_type: str
    device_index: int
    size_bytes: int
    container_uuid: str | None
    container_name: str | None
    volume_group_uuid: str | None = None

    @property
    def address(self) -> str:
        """`scsi.0` style, as Prism shows it."""
        return f"{self.adapter_type.lower()}.{self.device_index}"

    @classmethod
    def from_fields(cls, f: _Fields) -> VmDisk:
        device_type = f.req("device_properties.device_type", str)
        container = "storage_config.storage_container_reference"
        return cls(
            uuid=f.req("uuid", str) if device_type == "DISK" else f.opt("uuid", str, ""),
            device_type=device_type,
            adapter_type=f.req("device_properties.disk_address.adapter_type", str),
            device_index=f.req("device_properties.disk_address.device_index", int),
            size_bytes=f.opt("disk_size_bytes", int)
            or f.opt("disk_size_mib", int, 0) * 1024 * 1024,
            container_uuid=f.opt(f"{container}.uuid", str),
            container_name=f.opt(f"{container}.name", str),
            volume_group_uuid=f.opt("volume_group_reference.uuid", str),
        )


@dataclass(frozen=True)
class VmNic:
    uuid: str | None
    mac_address: str | None
    subnet_uuid: str | None
    subnet_name: str | None
    ip_addresses: tuple[str, ...]
    is_connected: bool
    nic_type: str | None = None

    @classmethod
    def from_fields(cls, f: _Fields) -> VmNic:
        ips = tuple(
            ip.opt("ip", str) for ip in f.items("ip_endpoint_list") if ip.opt("ip", str)
        )
        return cls(
            uuid=f.opt("uuid", str),
            mac_address=f.opt("mac_address", str),
            subnet_uuid=f.opt("subnet_reference.uuid", str),
            subnet_name=f.opt("subnet_reference.name", str),
            ip_addresses=ips,
            is_connected=f.opt("is_connected", bool, True),
            nic_type=f.opt("nic_type", str),
        )


@dataclass(frozen=True)
class NgtInfo:
    """Nutanix Guest Tools as Prism reports them; VSS_SNAPSHOT in `capabilities` is what an
    application-consistent snapshot needs."""

    state: str | None
    capabilities: tuple[str, ...]
    is_reachable: bool | None = None
    version: str | None = None

    @property
    def can_quiesce(self) -> bool:
        return self.state == "ENABLED" and "VSS_SNAPSHOT" in self.capabilities

    @classmethod
    def from_fields(cls, f: _Fields) -> NgtInfo:
        return cls(
            state=f.opt("state", str),
            capabilities=_strs(f.get("enabled_capability_list")),
            is_reachable=f.opt("is_reachable", bool),
            version=f.opt("version", str),
        )


@dataclass(frozen=True)
class Vm:
    """A VM; values come from `status` (what is), falling back to `spec` (what was asked).

    `raw` is the whole answer, kept for the backup manifest so a restore can rebuild the VM
    from fields this model does not name.
    """

    uuid: str
    name: str
    cluster_uuid: str
    power_state: str
    num_sockets: int
    num_vcpus_per_socket: int
    memory_size_mib: int
    disks: tuple[VmDisk, ...]
    nics: tuple[VmNic, ...]
    ngt: NgtInfo | None
    spec_version: int | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def data_disks(self) -> tuple[VmDisk, ...]:
        """The disks a backup reads (no CD-ROMs, no volume groups)."""
        return tuple(d for d in self.disks if d.device_type == "DISK" and not d.volume_group_uuid)

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> Vm:
        f = _Fields(data, endpoint=endpoint)
        side = "status" if isinstance(f.get("status.resources"), Mapping) else "spec"
        res = f"{side}.resources"
        ngt = f.get(f"{res}.guest_tools.nutanix_guest_tools")
        return cls(
            uuid=f.req("metadata.uuid", str),
            name=f.opt("status.name", str) or f.req("spec.name", str),
            cluster_uuid=f.opt("status.cluster_reference.uuid", str)
            or f.req("spec.cluster_reference.uuid", str),
            power_state=f.req(f"{res}.power_state", str),
            num_sockets=f.req(f"{res}.num_sockets", int),
            num_vcpus_per_socket=f.opt(f"{res}.num_vcpus_per_socket", int, 1),
            memory_size_mib=f.req(f"{res}.memory_size_mib", int),
            disks=tuple(VmDisk.from_fields(d) for d in f.items(f"{res}.disk_list")),
            nics=tuple(VmNic.from_fields(n) for n in f.items(f"{res}.nic_list")),
            ngt=NgtInfo.from_fields(f.sub("nutanix_guest_tools", ngt)) if ngt else None,
            spec_version=f.opt("metadata.spec_version", int),
            raw=f.data,
        )


@dataclass(frozen=True)
class Image:
    uuid: str
    name: str
    state: str | None
    image_type: str | None
    size_bytes: int | None
    source_uri: str | None = None

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> Image:
        f = _Fields(data, endpoint=endpoint)
        return cls(
            uuid=f.req("metadata.uuid", str),
            name=f.opt("status.name", str) or f.req("spec.name", str),
            state=f.opt("status.state", str),
            image_type=f.opt("status.resources.image_type", str)
            or f.opt("spec.resources.image_type", str),
            size_bytes=f.opt("status.resources.size_bytes", int),
            source_uri=f.opt("status.resources.source_uri", str),
        )


@dataclass(frozen=True)
class Task:
    """A Prism task. `status` is QUEUED, RUNNING, SUCCEEDED, FAILED, ABORTED or SUSPENDED."""

    uuid: str
    status: str
    operation_type: str | None
    percentage_complete: int | None
    progress_message: str | None
    entity_uuids: tuple[str, ...]
    error_code: str | None
    error_detail: str | None

    FINISHED = frozenset({"SUCCEEDED", "FAILED", "ABORTED"})

    @property
    def done(self) -> bool:
        return self.status in self.FINISHED

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> Task:
        f = _Fields(data, endpoint=endpoint)
        refs = tuple(r.opt("uuid", str) for r in f.items("entity_reference_list"))
        code = f.get("error_code")
        return cls(
            uuid=f.req("uuid", str),
            status=f.req("status", str),
            operation_type=f.opt("operation_type", str),
            percentage_complete=f.opt("percentage_complete", int),
            progress_message=f.opt("progress_message", str),
            entity_uuids=tuple(r for r in refs if r),
            error_code=None if code is None else str(code),
            error_detail=f.opt("error_detail", str),
        )


@dataclass(frozen=True)
class SnapshotFile:
    """One file of a PE vm_snapshot: the live vmdisk path and its frozen `.snapshot/` path."""

    file_path: str
    snapshot_file_path: str

    @property
    def vmdisk_uuid(self) -> str:
        """The last component of `file_path`, which is the VM disk's uuid."""
        return self.file_path.rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def from_fields(cls, f: _Fields) -> SnapshotFile:
        return cls(
            file_path=f.req("file_path", str), snapshot_file_path=f.req("snapshot_file_path", str)
        )


@dataclass(frozen=True)
class VmSnapshot:
    """A Prism Element backup snapshot (`/vm_snapshots`). `state` is COMPLETE when usable."""

    uuid: str
    name: str | None
    state: str
    snapshot_type: str | None
    vm_uuid: str | None
    files: tuple[SnapshotFile, ...]
    expiration_time_msecs: int | None = None
    messages: tuple[str, ...] = ()

    def file_for_disk(self, vmdisk_uuid: str) -> SnapshotFile | None:
        return next((x for x in self.files if x.vmdisk_uuid == vmdisk_uuid), None)

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> VmSnapshot:
        f = _Fields(data, endpoint=endpoint)
        messages = tuple(
            m.opt("message", str) or m.opt("reason", str, "")
            for m in f.items("status.message_list")
        )
        return cls(
            uuid=f.req("metadata.uuid", str),
            name=f.opt("status.name", str) or f.opt("spec.name", str),
            state=f.opt("status.state", str, "PENDING"),
            snapshot_type=f.opt("status.snapshot_type", str) or f.opt("spec.snapshot_type", str),
            vm_uuid=f.opt("status.resources.entity_uuid", str)
            or f.opt("spec.resources.entity_uuid", str),
            files=tuple(SnapshotFile.from_fields(x) for x in f.items("status.snapshot_file_list")),
            expiration_time_msecs=f.opt("status.expiration_time_msecs", int),
            messages=tuple(m for m in messages if m),
        )


@dataclass(frozen=True)
class Region:
    """A byte range of a snapshot file: `REGULAR` holds data, `ZEROED` reads as zeros."""

    offset: int
    length: int
    type: str

    @property
    def zeroed(self) -> bool:
        return self.type.upper().lstrip("K") == "ZEROED"

    @property
    def end(self) -> int:
        return self.offset + self.length

    @classmethod
    def from_fields(cls, f: _Fields) -> Region:
        kind = f.opt("type", str) or f.opt("region_type", str, "REGULAR")
        return cls(offset=f.req("offset", int), length=f.req("length", int), type=kind)


@dataclass(frozen=True)
class ChangedRegions:
    """One page of `data/changed_regions`; `next_offset` is where the next page starts, or
    None when this page is the last."""

    regions: tuple[Region, ...]
    file_size: int | None
    next_offset: int | None

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> ChangedRegions:
        f = _Fields(data, endpoint=endpoint)
        f.req("region_list", list)
        nxt = f.opt("next_offset", int)
        return cls(
            regions=tuple(Region.from_fields(r) for r in f.items("region_list")),
            file_size=f.opt("file_size", int),
            next_offset=nxt or None,
        )


@dataclass(frozen=True)
class IdempotenceIds:
    """Uuids reserved by Prism so a retried create makes one entity, not two."""

    client_identifier: str
    uuids: tuple[str, ...]
    expiration_time: str | None

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> IdempotenceIds:
        f = _Fields(data, endpoint=endpoint)
        uuids = f.req("uuid_list", list)
        return cls(
            client_identifier=f.opt("client_identifier", str, ""),
            uuids=tuple(str(u) for u in uuids),
            expiration_time=f.opt("expiration_time", str),
        )


@dataclass(frozen=True)
class User:
    """Who we are logged in as (`users/me`): the connectivity and credentials check."""

    uuid: str | None
    name: str
    display_name: str | None = None

    @classmethod
    def from_api(cls, data: object, *, endpoint: str = "") -> User:
        f = _Fields(data, endpoint=endpoint)
        return cls(
            uuid=f.opt("metadata.uuid", str),
            name=f.opt("status.name", str)
            or f.opt("spec.name", str)
            or f.opt("status.resources.username", str)
            or f.req("metadata.name", str),
            display_name=f.opt("status.resources.display_name", str),
        )
