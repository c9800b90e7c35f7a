"""Prism Element v2.0 volume-group routes (`/api/nutanix/v2.0/volume_groups`).

Shapes follow the public v2.0 usage (docs/nutanix-api.md section 4.1). Cloning a disk from a
snapshot is not publicly documented; the simulator's choice (docs/volume-groups.md):

    "disk_list": [{"vmdisk_clone_spec": {"snapshot_file_path": "/ctr/.snapshot/..."}}]
    "disk_list": [{"vmdisk_clone_spec": {"vmdisk_uuid": "<live VM disk>"}}]
    "disk_list": [{"create_spec": {"container_uuid": "...", "size_mb": 1024}}]
    "disk_list": [{"create_spec": {"container_uuid": "...", "size": 1073742336}}]  (bytes)

A client may choose the VG's `uuid` in the create body, so it can record it before creating.
"""

from __future__ import annotations

__all__ = ["volume_group_routes"]

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._http import guarded, injected_failure, json_body, listener, run_blocking
from .errors import InvalidRequest
from .volume_groups import VolumeGroup

V2 = "/api/nutanix/v2.0/volume_groups"
_KIND = "volume_group"


def render(vg: VolumeGroup) -> dict[str, Any]:
    return {
        "uuid": vg.uuid,
        "name": vg.name,
        "description": vg.description,
        "iscsi_target": vg.iscsi_target,
        "is_shared": True,
        "flash_mode_enabled": False,
        "logical_timestamp": 1,
        "disk_list": [
            {"vmdisk_uuid": d.uuid, "index": d.index, "vmdisk_size_bytes": d.size,
             "storage_container_uuid": d.container_uuid, "is_cdrom": False,
             "flash_mode_enabled": False}
            for d in vg.disks
        ],
        "attachment_list": [
            {"iscsi_initiator_name": iqn, "client_address": iqn} for iqn in vg.attachments
        ],
    }


def _disk_spec(n: int, item: Any) -> dict[str, Any]:
    where = f"disk_list[{n}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: must be an object", kind=_KIND)
    clone = item.get("vmdisk_clone_spec")
    if isinstance(clone, dict):
        source = clone.get("snapshot_file_path") or clone.get("vmdisk_uuid")
        if not isinstance(source, str) or not source:
            raise InvalidRequest(f"{where}.vmdisk_clone_spec: needs snapshot_file_path or "
                                 "vmdisk_uuid", kind=_KIND)
        return {"clone_from": source}
    create = item.get("create_spec")
    if isinstance(create, dict):
        size = create.get("size")  # bytes (UNVERIFIED: public usage shows only size_mb)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 512 or size % 512:
                raise InvalidRequest(f"{where}.create_spec.size: a positive multiple of 512 "
                                     f"bytes is required (got {size!r})", kind=_KIND)
            return {"size": size, "container_uuid": create.get("container_uuid")}
        size_mb = create.get("size_mb")
        if not isinstance(size_mb, int) or size_mb < 1:
            raise InvalidRequest(f"{where}.create_spec.size_mb: a positive integer is required "
                                 f"(got {size_mb!r})", kind=_KIND)
        return {"size": size_mb << 20, "container_uuid": create.get("container_uuid")}
    raise InvalidRequest(f"{where}: needs vmdisk_clone_spec or create_spec", kind=_KIND)


def _client(body: dict[str, Any], operation: str) -> str:
    client = (body.get("iscsi_client") or {}).get("client_address")
    if not isinstance(client, str) or not client:
        raise InvalidRequest("iscsi_client.client_address: required (the initiator IQN)",
                             kind=_KIND)
    if body.get("operation", operation) != operation:
        raise InvalidRequest(f"operation: must be {operation} here (got "
                             f"{body.get('operation')!r})", kind=_KIND)
    return client


@guarded(_KIND, "read")
async def vg_list(request: Request) -> Response:
    lis = listener(request)
    groups = lis.sim.volume_groups.of_cluster(lis.cluster_uuid or "")
    n = len(groups)
    return JSONResponse({"metadata": {"grand_total_entities": n, "total_entities": n,
                                      "count": n},
                         "entities": [render(g) for g in groups]})


@guarded(_KIND, "read")
async def vg_get(request: Request) -> Response:
    lis = listener(request)
    vg = lis.sim.volume_groups.get(request.path_params["uuid"], cluster_uuid=lis.cluster_uuid)
    return JSONResponse(render(vg))


@guarded(_KIND, "create")
async def vg_create(request: Request) -> Response:
    lis = listener(request)
    body = await json_body(request, kind=_KIND)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("name: required", kind=_KIND)
    disks = body.get("disk_list") or []
    if not isinstance(disks, list):
        raise InvalidRequest("disk_list: must be a list", kind=_KIND)
    specs = [_disk_spec(n, item) for n, item in enumerate(disks)]
    uuid = body.get("uuid")
    vgs = lis.sim.volume_groups
    vg = await run_blocking(request, lambda: vgs.create(
        cluster_uuid=lis.cluster_uuid or "", name=name,
        description=str(body.get("description") or ""), disks=specs,
        uuid=uuid if isinstance(uuid, str) and uuid else None,
        fail=injected_failure(request)))
    return JSONResponse({"task_uuid": vg.task_uuid}, status_code=201)


@guarded(_KIND, "delete")
async def vg_delete(request: Request) -> Response:
    lis = listener(request)
    vgs = lis.sim.volume_groups
    task = await run_blocking(request, lambda: vgs.delete(
        request.path_params["uuid"], cluster_uuid=lis.cluster_uuid,
        fail=injected_failure(request)))
    return JSONResponse({"task_uuid": task.uuid}, status_code=201)


@guarded(_KIND, "update")
async def vg_open(request: Request) -> Response:
    lis = listener(request)
    client = _client(await json_body(request, kind=_KIND), "ATTACH")
    lis.sim.volume_groups.attach(request.path_params["uuid"], client,
                                  cluster_uuid=lis.cluster_uuid)
    return JSONResponse({"value": True})


@guarded(_KIND, "update")
async def vg_close(request: Request) -> Response:
    lis = listener(request)
    client = _client(await json_body(request, kind=_KIND), "DETACH")
    lis.sim.volume_groups.detach(request.path_params["uuid"], client,
                                  cluster_uuid=lis.cluster_uuid)
    return JSONResponse({"value": True})


def volume_group_routes() -> list[Route]:
    return [
        Route(V2, vg_list, methods=["GET"]),
        Route(V2, vg_create, methods=["POST"]),
        Route(f"{V2}/{{uuid}}", vg_get, methods=["GET"]),
        Route(f"{V2}/{{uuid}}", vg_delete, methods=["DELETE"]),
        Route(f"{V2}/{{uuid}}/open", vg_open, methods=["POST"]),
        Route(f"{V2}/{{uuid}}/close", vg_close, methods=["POST"]),
    ]
