"""dataprotection v4: recovery points (Prism Central) and changed regions (Prism Element).

PC: ``/config/recovery-points`` create/list/get/delete, ``/{extId}/vm-recovery-points/{id}``,
``$actions/restore``, ``$actions/set-expiration-time`` and ``$actions/discover-cluster`` (which
answers the PE address and a JWT). PE: ``/content/recovery-points/{rp}/vm-recovery-points/{vmrp}
/disk-recovery-points/{drp}/$actions/compute-changed-regions``, which needs that JWT as the
``NTNX_IGW_SESSION`` cookie. Changed regions continue, when a page is full, through
``metadata.extraInfo`` ``nextOffset`` (and ``fileSize``), as third-party clients read them
(UNVERIFIED).
"""

from __future__ import annotations

__all__ = ["pc_dataprotection_routes", "pe_dataprotection_routes"]

import contextlib
import time
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._http import guarded, injected_failure, json_body, listener, run_blocking
from ..errors import EntityNotFound, InvalidRequest
from ._common import (
    Unauthorized,
    answer,
    entity,
    ipv4,
    list_answer,
    metadata,
    parse_ts,
    prefix,
    served,
    sim_of,
    task_ref,
    ts,
)

if TYPE_CHECKING:
    from ..recovery_points import RecoveryPoint, VmRecoveryPoint
    from ..simulator import Simulator

NS = "dataprotection"
RP = "dataprotection.v4.config.RecoveryPoint"
VM_RP = "dataprotection.v4.config.VmRecoveryPoint"
TASK_REF = "prism.v4.config.TaskReference"
CLUSTER_INFO = "dataprotection.v4.common.ClusterInfo"
REGION = "dataprotection.v4.content.ChangedRegion"
_KIND = "recovery_point"
_BLOCK_SIZES = (32768, 65536, 131072, 262144)
JWT_COOKIE = "NTNX_IGW_SESSION"  # from third-party evidence only (docs/nutanix-api.md 1.1)


def _render_vm_rp(sim: Simulator, rp: RecoveryPoint, v: VmRecoveryPoint,
                  *, top: bool = False) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "extId": v.uuid,
        "vmExtId": v.vm_uuid,
        "name": rp.name,
        "creationTime": ts(rp.created),
        "status": "COMPLETE",
        "recoveryPointType": rp.recovery_point_type,
        "hypervisorType": "AHV",
        "consistencyGroupExtId": None,
        "diskRecoveryPoints": [
            {"diskRecoveryPointExtId": d.uuid, "diskExtId": d.vmdisk_uuid,
             "$objectType": "dataprotection.v4.common.DiskRecoveryPoint"}
            for d in v.disks
        ],
        "locationAgnosticId": v.uuid,
    }
    if rp.expiration is not None:
        fields["expirationTime"] = ts(rp.expiration)
    fields = {k: val for k, val in fields.items() if val is not None}
    if top:
        return entity(VM_RP, fields)
    return {**fields, "$objectType": VM_RP}


def render_rp(sim: Simulator, rp: RecoveryPoint) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "extId": rp.uuid,
        "name": rp.name,
        "creationTime": ts(rp.created),
        "recoveryPointType": rp.recovery_point_type,
        "locationAgnosticId": rp.uuid,
        "locationReferences": [{"locationExtId": sim.pc_uuid,
                                "$objectType": "dataprotection.v4.config.LocationReference"}],
        "vmRecoveryPoints": [_render_vm_rp(sim, rp, v) for v in rp.vms],
        "volumeGroupRecoveryPoints": [],
        "totalExclusiveUsageBytes": 0,
    }
    if sim.task_done(rp.task_uuid) and not rp.failed:
        fields["status"] = "COMPLETE"
    if rp.expiration is not None:
        fields["expirationTime"] = ts(rp.expiration)
    return entity(RP, fields)


def _rp(request: Request, key: str = "extId") -> RecoveryPoint:
    """A recovery point the caller may see (not one whose create failed)."""
    sim = sim_of(request)
    ext_id = str(request.path_params[key])
    rp = sim.recovery_points.get(ext_id)
    if rp.failed:
        raise EntityNotFound(_KIND, ext_id)
    return rp


@served(NS, "config.CreateRecoveryPointApiResponse", replay=True)
@guarded(_KIND, "create")
async def rp_create(request: Request) -> Response:
    sim = sim_of(request)
    body = await json_body(request, kind=_KIND)
    name = body.get("name") or f"recovery-point-{int(time.time())}"
    rp_type = body.get("recoveryPointType", "CRASH_CONSISTENT")
    if rp_type not in ("CRASH_CONSISTENT", "APPLICATION_CONSISTENT"):
        raise InvalidRequest(f"recoveryPointType: CRASH_CONSISTENT or APPLICATION_CONSISTENT "
                             f"(got {rp_type!r})", kind=_KIND)
    expiration = (parse_ts(body["expirationTime"], "expirationTime")
                  if body.get("expirationTime") else None)
    vms = body.get("vmRecoveryPoints") or []
    if not isinstance(vms, list) or not vms:
        raise InvalidRequest("vmRecoveryPoints: a list with at least one {vmExtId} is required "
                             "(the simulator does not snapshot volume groups)", kind=_KIND)
    vm_uuids = []
    for i, v in enumerate(vms):
        vm_uuid = v.get("vmExtId") if isinstance(v, dict) else None
        if not isinstance(vm_uuid, str) or not vm_uuid:
            raise InvalidRequest(f"vmRecoveryPoints[{i}].vmExtId: required", kind=_KIND)
        vm_uuids.append(vm_uuid)
    if body.get("volumeGroupRecoveryPoints"):
        raise InvalidRequest("volumeGroupRecoveryPoints: not supported by the simulator",
                             kind=_KIND)
    rp = await run_blocking(request, lambda: sim.recovery_points.create(
        name=str(name), recovery_point_type=rp_type, vm_uuids=vm_uuids, expiration=expiration,
        fail=injected_failure(request)))
    return answer(request, task_ref(rp.task_uuid or ""), item_type=TASK_REF, status=202)


@served(NS, "config.ListRecoveryPointsApiResponse")
@guarded(_KIND, "read")
async def rp_list(request: Request) -> Response:
    sim = sim_of(request)
    items = [p for p in list(sim.recovery_points.points.values()) if not p.failed]
    attrs = {"name": lambda p: p.name, "extId": lambda p: p.uuid,
             "recoveryPointType": lambda p: p.recovery_point_type,
             "creationTime": lambda p: ts(p.created)}
    return list_answer(request, items, lambda p: render_rp(sim, p), item_type=RP, attrs=attrs)


@served(NS, "config.GetRecoveryPointApiResponse")
@guarded(_KIND, "read")
async def rp_get(request: Request) -> Response:
    return answer(request, render_rp(sim_of(request), _rp(request)), item_type=RP)


@served(NS, "config.DeleteRecoveryPointApiResponse", replay=True)
@guarded(_KIND, "delete")
async def rp_delete(request: Request) -> Response:
    sim = sim_of(request)
    rp = _rp(request)
    task = await run_blocking(request, lambda: sim.recovery_points.delete(
        rp.uuid, fail=injected_failure(request)))
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


@served(NS, "config.GetVmRecoveryPointApiResponse")
@guarded(_KIND, "read")
async def vm_rp_get(request: Request) -> Response:
    rp = _rp(request, "recoveryPointExtId")
    v = rp.vm_rp(str(request.path_params["extId"]))
    return answer(request, _render_vm_rp(sim_of(request), rp, v, top=True), item_type=VM_RP)


@served(NS, "config.UpdateRecoveryPointExpirationTimeApiResponse", replay=True)
@guarded(_KIND, "update")
async def rp_set_expiration(request: Request) -> Response:
    sim = sim_of(request)
    rp = _rp(request)
    body = await json_body(request, kind=_KIND)
    expiration = parse_ts(body.get("expirationTime"), "expirationTime")
    task = sim.recovery_points.set_expiration(rp.uuid, expiration)
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


@served(NS, "config.RecoveryPointRestoreApiResponse", replay=True)
@guarded("vm", "create")
async def rp_restore(request: Request) -> Response:
    sim = sim_of(request)
    rp = _rp(request)
    body = await json_body(request, kind=_KIND, empty_ok=True)
    cluster = body.get("clusterExtId")
    if cluster is not None:
        sim.cluster(str(cluster))
    overrides: dict[str, dict[str, Any]] = {}
    for i, o in enumerate(body.get("vmRecoveryPointRestoreOverrides") or []):
        key = o.get("vmRecoveryPointExtId")
        if not isinstance(key, str):
            raise InvalidRequest(f"vmRecoveryPointRestoreOverrides[{i}].vmRecoveryPointExtId: "
                                 "required", kind=_KIND)
        spec = o.get("vmOverrideSpec") or {}
        overrides[key] = {"name": spec.get("name"), "description": spec.get("description")}
    task = await run_blocking(request, lambda: sim.recovery_points.restore(
        rp.uuid, cluster_uuid=str(cluster) if cluster else None, overrides=overrides,
        fail=injected_failure(request)))
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


def _drp_ref(value: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: a VmDiskRecoveryPointReference is required", kind=_KIND)
    ids = tuple(value.get(k) for k in
                ("recoveryPointExtId", "vmRecoveryPointExtId", "diskRecoveryPointExtId"))
    if not all(isinstance(x, str) and x for x in ids):
        raise InvalidRequest(f"{where}: recoveryPointExtId, vmRecoveryPointExtId and "
                             "diskRecoveryPointExtId are required", kind=_KIND)
    return ids  # type: ignore[return-value]


@served(NS, "config.ClusterInfoApiResponse")
@guarded(_KIND, "read")
async def rp_discover_cluster(request: Request) -> Response:
    sim = sim_of(request)
    rp = _rp(request)
    body = await json_body(request, kind=_KIND)
    operation = body.get("operation")
    if operation not in ("COMPUTE_CHANGED_REGIONS", "GET_VSS_METADATA"):
        raise InvalidRequest(f"operation: COMPUTE_CHANGED_REGIONS or GET_VSS_METADATA (got "
                             f"{operation!r})", kind=_KIND)
    spec = body.get("spec") or {}
    ref = spec.get("diskRecoveryPoint") if operation == "COMPUTE_CHANGED_REGIONS" else spec
    rp_id, vm_rp_id, drp_id = _drp_ref(ref, "spec.diskRecoveryPoint")
    if rp_id != rp.uuid:
        raise InvalidRequest(f"spec.diskRecoveryPoint.recoveryPointExtId: {rp_id!r} is not "
                             f"the recovery point of the path ({rp.uuid})", kind=_KIND)
    sim.recovery_points.disk_rp(rp_id, vm_rp_id, drp_id)
    if spec.get("referenceDiskRecoveryPoint"):
        sim.recovery_points.disk_rp(*_drp_ref(spec["referenceDiskRecoveryPoint"],
                                              "spec.referenceDiskRecoveryPoint"))
    cluster = sim.cluster(rp.vm_rp(vm_rp_id).cluster_uuid)
    token = sim.tokens.issue(user=request.scope["sim.user"].name, cluster_uuid=cluster.uuid,
                             recovery_point=rp.uuid)
    return answer(request, entity(CLUSTER_INFO, {"jwtToken": token,
                                                 "clusterIp": ipv4(cluster.external_ip)}),
                  item_type=CLUSTER_INFO)


def _jwt_claims(request: Request) -> dict[str, Any]:
    lis = listener(request)
    cookies = SimpleCookie()
    with contextlib.suppress(CookieError):
        cookies.load(request.headers.get("cookie", ""))
    morsel = cookies.get(JWT_COOKIE)
    claims = (lis.sim.tokens.verify(morsel.value, cluster_uuid=lis.cluster_uuid or "")
              if morsel is not None else None)
    if claims is None:
        raise Unauthorized(
            f"compute-changed-regions needs the jwtToken of $actions/discover-cluster (on Prism "
            f"Central) as cookie {JWT_COOKIE}; none valid for this cluster was sent",
            kind=_KIND)
    return claims


def _aligned(regions: list[Any], block: int) -> list[tuple[int, int, str]]:
    """Regions widened to ``block`` boundaries and merged; where a REGULAR and a ZEROED region
    share a block, the block is REGULAR."""
    out: list[list[Any]] = []
    for r in regions:
        start = r.offset // block * block
        end = -(-(r.offset + r.length) // block) * block
        if out and start < out[-1][1]:
            last = out[-1]
            if last[2] == r.type:
                last[1] = max(last[1], end)
                continue
            if r.type == "REGULAR":
                last[1] = start
                if last[1] <= last[0]:
                    out.pop()
            else:
                start = last[1]
                if start >= end:
                    continue
        if out and out[-1][1] == start and out[-1][2] == r.type:
            out[-1][1] = end
        else:
            out.append([start, end, r.type])
    return [(s_, e - s_, t) for s_, e, t in out]


@served(NS, "content.ChangedVmRegionsApiResponse")
@guarded(_KIND, "read")
async def compute_changed_regions(request: Request) -> Response:
    sim = sim_of(request)
    claims = _jwt_claims(request)
    p = request.path_params
    rp_id = str(p["recoveryPointExtId"])
    if claims.get("rp") != rp_id:
        raise Unauthorized(f"the {JWT_COOKIE} token was issued for recovery point "
                           f"{claims.get('rp')!r}, not {rp_id!r}", kind=_KIND)
    rps = sim.recovery_points
    disk = rps.disk_rp(rp_id, str(p["vmRecoveryPointExtId"]), str(p["extId"]))
    body = await json_body(request, kind=_KIND, empty_ok=True)
    refs = [body.get(k) for k in ("referenceRecoveryPointExtId", "referenceVmRecoveryPointExtId",
                                  "referenceDiskRecoveryPointExtId")]
    if any(refs) and not all(refs):
        raise InvalidRequest("referenceRecoveryPointExtId, referenceVmRecoveryPointExtId and "
                             "referenceDiskRecoveryPointExtId must be given together", kind=_KIND)
    reference = rps.disk_rp(*map(str, refs)) if all(refs) else None
    offset = body.get("offset", 0)
    length = body.get("length")
    block = body.get("blockSizeByte")
    for key, value in (("offset", offset), ("length", length)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidRequest(f"{key}: a non-negative integer is required (got {value!r})",
                                 kind=_KIND)
    if block is not None and block not in _BLOCK_SIZES:
        raise InvalidRequest(f"blockSizeByte: one of {', '.join(map(str, _BLOCK_SIZES))} (got "
                             f"{block!r})", kind=_KIND)
    if block:
        length = None if length is None else -(-(offset + length) // block) * block - (
            offset // block * block)
        offset = offset // block * block
    result = await run_blocking(request, lambda: rps.changed_regions(
        disk, reference, offset=offset, length=length))
    regions = ([(r.offset, r.length, r.type) for r in result.regions] if not block
               else _aligned(result.regions, block))
    extra: list[dict[str, Any]] = [{"name": "fileSize", "value": result.file_size}]
    if result.next_offset is not None:
        extra.append({"name": "nextOffset", "value": result.next_offset})
    data = [{"offset": o, "length": n, "regionType": t, "$objectType": REGION}
            for o, n, t in regions]
    meta = metadata(links=[{"href": str(request.url), "rel": "self"}], extra=extra)
    return answer(request, data, item_type=REGION, meta=meta, is_list=True)


def pc_dataprotection_routes() -> list[Route]:
    p = f"{prefix(NS)}/config/recovery-points"
    return [
        Route(p, rp_list, methods=["GET"]),
        Route(p, rp_create, methods=["POST"]),
        Route(f"{p}/{{extId}}", rp_get, methods=["GET"]),
        Route(f"{p}/{{extId}}", rp_delete, methods=["DELETE"]),
        Route(f"{p}/{{recoveryPointExtId}}/vm-recovery-points/{{extId}}", vm_rp_get,
              methods=["GET"]),
        Route(f"{p}/{{extId}}/$actions/restore", rp_restore, methods=["POST"]),
        Route(f"{p}/{{extId}}/$actions/set-expiration-time", rp_set_expiration,
              methods=["POST"]),
        Route(f"{p}/{{extId}}/$actions/discover-cluster", rp_discover_cluster, methods=["POST"]),
    ]


def pe_dataprotection_routes() -> list[Route]:
    p = f"{prefix(NS)}/content/recovery-points"
    return [
        Route(f"{p}/{{recoveryPointExtId}}/vm-recovery-points/{{vmRecoveryPointExtId}}"
              "/disk-recovery-points/{extId}/$actions/compute-changed-regions",
              compute_changed_regions, methods=["POST"]),
    ]
