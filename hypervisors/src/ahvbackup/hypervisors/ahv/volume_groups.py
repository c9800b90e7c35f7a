"""Prism Element v2.0 volume groups: the calls the iSCSI data path makes.

A VG is created under a uuid we choose (so it can go on the cleanup ledger first), with a
disk cloned from each snapshot file of a VM's snapshot (`vmdisk_clone_spec.snapshot_file_path`,
the simulator's documented choice: Nutanix does not publish the clone field names, see
docs/volume-groups.md).
The iSCSI target name is read from the API (`iscsi_target`), never computed.
"""

from __future__ import annotations

__all__ = [
    "VolumeGroupInfo",
    "attach_initiator",
    "create_empty_volume_group",
    "create_volume_group",
    "delete_volume_group",
    "detach_initiator",
    "get_volume_group",
]

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ahvbackup.core.errors import ApiServerError

from .client.v3 import PrismClient

V2 = "/api/nutanix/v2.0/volume_groups"


@dataclass(frozen=True)
class VolumeGroupInfo:
    uuid: str
    name: str
    iscsi_target: str
    disk_sizes: tuple[int, ...]  # by disk index
    attached: tuple[str, ...]  # initiator IQNs
    disk_uuids: tuple[str, ...] = ()  # vmdisk uuids, by disk index


def _parse(data: Any, endpoint: str) -> VolumeGroupInfo:
    if not isinstance(data, Mapping):
        raise ApiServerError(f"{endpoint}: answer is not a JSON object", endpoint=endpoint)
    target = data.get("iscsi_target")
    if not isinstance(target, str) or not target:
        raise ApiServerError(f"{endpoint}: volume group has no iscsi_target", endpoint=endpoint)
    disks = sorted(data.get("disk_list") or [], key=lambda d: d.get("index", 0))
    return VolumeGroupInfo(
        uuid=str(data.get("uuid")), name=str(data.get("name")), iscsi_target=target,
        disk_sizes=tuple(int(d.get("vmdisk_size_bytes") or 0) for d in disks),
        attached=tuple(str(a.get("iscsi_initiator_name") or a.get("client_address"))
                       for a in data.get("attachment_list") or []),
        disk_uuids=tuple(str(d.get("vmdisk_uuid") or "") for d in disks),
    )


async def create_volume_group(
    pe: PrismClient, *, uuid: str, name: str, snapshot_file_paths: Sequence[str],
    description: str = "",
) -> str | None:
    """Create the VG, one disk cloned from each snapshot file (disk index i from
    `snapshot_file_paths[i]`); returns its task uuid."""
    body = {
        "uuid": uuid, "name": name, "description": description,
        "disk_list": [{"vmdisk_clone_spec": {"snapshot_file_path": path}}
                      for path in snapshot_file_paths],
    }
    data = await pe.request_json("POST", V2, json=body, idempotent=True)
    task = data.get("task_uuid") if isinstance(data, Mapping) else None
    return str(task) if task else None


async def create_empty_volume_group(
    pe: PrismClient, *, uuid: str, name: str, container_uuid: str, size: int,
    description: str = "",
) -> str | None:
    """Create the VG with one new, all-zero disk of `size` bytes in the container; returns
    its task uuid. `size` in bytes beside `size_mb` is the simulator's choice (UNVERIFIED:
    public usage shows only `size_mb`, which rounds up to whole MiB)."""
    spec: dict[str, Any] = {"container_uuid": container_uuid, "size_mb": -(-size // (1 << 20))}
    if size % (1 << 20):
        spec["size"] = size
    body = {"uuid": uuid, "name": name, "description": description,
            "disk_list": [{"create_spec": spec}]}
    data = await pe.request_json("POST", V2, json=body, idempotent=True)
    task = data.get("task_uuid") if isinstance(data, Mapping) else None
    return str(task) if task else None


async def get_volume_group(pe: PrismClient, uuid: str) -> VolumeGroupInfo:
    return _parse(await pe.request_json("GET", f"{V2}/{uuid}"), f"GET {V2}/{uuid}")


async def attach_initiator(pe: PrismClient, uuid: str, initiator_iqn: str) -> None:
    body = {"iscsi_client": {"client_address": initiator_iqn}, "operation": "ATTACH"}
    await pe.request_json("POST", f"{V2}/{uuid}/open", json=body, idempotent=True)


async def detach_initiator(pe: PrismClient, uuid: str, initiator_iqn: str) -> None:
    body = {"iscsi_client": {"client_address": initiator_iqn}, "operation": "DETACH"}
    await pe.request_json("POST", f"{V2}/{uuid}/close", json=body, idempotent=True)


async def delete_volume_group(pe: PrismClient, uuid: str) -> str | None:
    data = await pe.request_json("DELETE", f"{V2}/{uuid}", idempotent=True)
    task = data.get("task_uuid") if isinstance(data, Mapping) else None
    return str(task) if task else None
