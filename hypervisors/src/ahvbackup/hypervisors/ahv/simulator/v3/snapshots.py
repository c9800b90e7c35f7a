"""v3 backup snapshots and changed regions (Prism Element only), and the PE v2.0
storage containers."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .._http import guarded, injected_failure, json_body, listener, run_blocking
from ..errors import EntityNotFound, InvalidRequest
from ._common import _Attrs, _json, _list_response, _metadata_uuid, _sim, _uuid_param
from .projects import check_scope
from .render import render_snapshot


@guarded("vm_snapshot", "create")
async def snapshots_create(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    body = await json_body(request, kind="vm_snapshot")
    spec = body.get("spec") or {}
    vm_uuid = (spec.get("resources") or {}).get("entity_uuid")
    if not isinstance(vm_uuid, str) or not vm_uuid:
        raise InvalidRequest("spec.resources.entity_uuid: required (the VM to snapshot)",
                             kind="vm_snapshot")
    if vm_uuid in sim.vms:  # a project-scoped user snapshots only its projects' VMs
        check_scope(request.scope["sim.user"], sim.vms[vm_uuid])
    uuid = _metadata_uuid(body, "vm_snapshot")
    expiration = spec.get("expiration_time_msecs")
    snap = await run_blocking(request, lambda: sim.create_vm_snapshot(
        vm_uuid=vm_uuid,
        name=str(spec.get("name") or f"snapshot-{int(time.time())}"),
        snapshot_type=spec.get("snapshot_type", "CRASH_CONSISTENT"),
        cluster_uuid=lis.cluster_uuid or "",
        uuid=uuid,
        expiration_time_msecs=expiration if isinstance(expiration, int) else None,
        fail=injected_failure(request),
    ))
    return _json(render_snapshot(sim, snap), 202)


def _snapshot(request: Request, uuid: str) -> Any:
    lis = listener(request)
    snap = lis.sim.snapshot(uuid)
    if snap.cluster_uuid != lis.cluster_uuid:
        raise EntityNotFound("vm_snapshot", uuid)
    return snap


@guarded("vm_snapshot", "read")
async def snapshots_get(request: Request) -> Response:
    return _json(render_snapshot(_sim(request),
                                 _snapshot(request, _uuid_param(request, "vm_snapshot"))))


@guarded("vm_snapshot", "read")
async def snapshots_list(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    body = await json_body(request, kind="vm_snapshot", empty_ok=True)
    owned = sim.recovery_points.owns_snapshot  # v4 recovery points' snapshots are their own
    items = [s for s in list(sim.snapshots.values())
             if s.cluster_uuid == lis.cluster_uuid and not owned(s.uuid)]
    attrs: _Attrs = {"entity_uuid": lambda s: s.vm_uuid, "name": lambda s: s.name,
                     "uuid": lambda s: s.uuid, "snapshot_type": lambda s: s.snapshot_type}
    return _list_response(body, kind="vm_snapshot", items=items, attrs=attrs,
                          render=lambda s: render_snapshot(sim, s))


@guarded("vm_snapshot", "delete")
async def snapshots_delete(request: Request) -> Response:
    sim = _sim(request)
    snap = _snapshot(request, _uuid_param(request, "vm_snapshot"))
    rendered = render_snapshot(sim, snap)
    task = await run_blocking(request, lambda: sim.delete_vm_snapshot(
        snap.uuid, fail=injected_failure(request)))
    rendered["status"]["state"] = "DELETE_PENDING"
    rendered["status"]["execution_context"] = {"task_uuid": [task.uuid]}
    return _json(rendered, 202)


@guarded("vm_snapshot", "read")
async def changed_regions(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="changed_regions")
    path = body.get("snapshot_file_path")
    if not isinstance(path, str) or not path:
        raise InvalidRequest("snapshot_file_path: required", kind="changed_regions")
    ref = body.get("reference_snapshot_file_path") or None
    start = body.get("start_offset", 0)
    end = body.get("end_offset")
    for key, value in (("start_offset", start), ("end_offset", end)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidRequest(f"{key}: must be a non-negative integer (got {value!r})",
                                 kind="changed_regions")
    result = await run_blocking(request, lambda: sim.changed_regions(
        path, reference_snapshot_file_path=ref, start_offset=start, end_offset=end))
    out: dict[str, Any] = {
        "region_list": [
            {"offset": r.offset, "length": r.length, "type": r.type} for r in result.regions
        ],
        "file_size": result.file_size,
    }
    if result.next_offset is not None:
        out["next_offset"] = result.next_offset
    return _json(out)


@guarded("storage_container", "read")
async def v2_storage_containers(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    cluster = sim.cluster(lis.cluster_uuid or "")
    entities = [
        {"id": f"{cluster.cluster_id}::{n + 1}", "storage_container_uuid": c.uuid,
         "name": c.name, "cluster_uuid": cluster.uuid}
        for n, c in enumerate(cluster.containers)
    ]
    n = len(entities)
    return _json({"metadata": {"grand_total_entities": n, "total_entities": n, "count": n},
                  "entities": entities})
