"""volumes v4 (``/api/volumes/v4.x/config``): volume groups over the simulator's VG model.

The same volume groups as the PE v2.0 routes (``sim.volume_groups``) and the same iSCSI target on
the cluster's DSIP. A disk's ``diskDataSourceReference`` may name a ``DISK_RECOVERY_POINT`` (a
copy-on-write clone of that snapshot disk; whether a real Prism accepts this entity type here is
UNVERIFIED) or a ``VM_DISK`` (a clone of the live disk). iSCSI clients are known by IQN; their
``extId`` is derived from it, and ``GET /iscsi-clients/{extId}`` shows ``attachedTargets`` with
the full target IQN the client logs in to.
"""

from __future__ import annotations

__all__ = ["pc_volume_routes", "pe_volume_routes"]

import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._http import guarded, injected_failure, json_body, listener, run_blocking
from ..errors import EntityNotFound, InvalidRequest
from ._common import answer, entity, etag_of, list_answer, prefix, served, sim_of, task_ref

if TYPE_CHECKING:
    from ..simulator import Simulator
    from ..volume_groups import VgDisk, VolumeGroup

NS = "volumes"
VG = "volumes.v4.config.VolumeGroup"
DISK = "volumes.v4.config.VolumeDisk"
CLIENT = "volumes.v4.config.IscsiClient"
ATTACHMENT = "volumes.v4.config.IscsiClientAttachment"
TASK_REF = "prism.v4.config.TaskReference"
_KIND = "volume_group"
_CLIENT_NS = uuidlib.UUID("6b1f6c1e-6a3b-4c55-9d7e-8a1f0b2c3d4e")


def client_ext_id(iqn: str) -> str:
    return str(uuidlib.uuid5(_CLIENT_NS, iqn))


def _render_disk(sim: Simulator, vg: VolumeGroup, d: VgDisk, *, top: bool = False
                 ) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "extId": d.uuid, "index": d.index, "diskSizeBytes": d.size,
        "storageContainerId": d.container_uuid,
        "diskStorageFeatures": {"flashMode": {"isEnabled": False}},
    }
    if d.source:
        ref = _source_ref(sim, d.source)
        if ref:
            fields["diskDataSourceReference"] = ref
    return entity(DISK, fields) if top else {**fields, "$objectType": DISK}


def _source_ref(sim: Simulator, source: str) -> dict[str, Any] | None:
    for rp in list(sim.recovery_points.points.values()):
        for v in rp.vms:
            for d in v.disks:
                if d.snapshot_file_path == source:
                    return {"extId": d.uuid, "entityType": "DISK_RECOVERY_POINT"}
    if "/" not in source:
        return {"extId": source, "entityType": "VM_DISK"}
    return None


def render_vg(sim: Simulator, vg: VolumeGroup) -> dict[str, Any]:
    return entity(VG, {
        "extId": vg.uuid,
        "name": vg.name,
        "description": vg.description,
        "clusterReference": vg.cluster_uuid,
        "sharingStatus": "SHARED",
        "targetName": vg.iscsi_target.split(":", 1)[-1],
        "enabledAuthentications": "NONE",
        "usageType": vg.usage_type,
        "isHidden": vg.is_hidden,
        "attachmentType": "EXTERNAL" if vg.attachments else "NONE",
        "protocol": "ISCSI" if vg.attachments else "NOT_ASSIGNED",
        "shouldLoadBalanceVmAttachments": False,
        "storageFeatures": {"flashMode": {"isEnabled": False}},
    })


def _vg(request: Request, key: str = "extId") -> VolumeGroup:
    lis = listener(request)
    return lis.sim.volume_groups.get(str(request.path_params[key]), cluster_uuid=lis.cluster_uuid)


def _disk_spec(sim: Simulator, d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise InvalidRequest(f"{where}: a VolumeDisk object is required", kind=_KIND)
    spec: dict[str, Any] = {"container_uuid": d.get("storageContainerId")}
    if d.get("index") is not None:
        spec["index"] = d["index"]
    ref = d.get("diskDataSourceReference")
    if ref:
        kind, ext_id = ref.get("entityType"), ref.get("extId")
        if not isinstance(ext_id, str) or not ext_id:
            raise InvalidRequest(f"{where}.diskDataSourceReference.extId: required", kind=_KIND)
        if kind == "DISK_RECOVERY_POINT":
            _rp, _v, drp = sim.recovery_points.find_disk_rp(ext_id)
            spec["clone_from"] = drp.snapshot_file_path
        elif kind == "VM_DISK":
            spec["clone_from"] = ext_id
        else:
            raise InvalidRequest(f"{where}.diskDataSourceReference.entityType: the simulator "
                                 f"clones DISK_RECOVERY_POINT or VM_DISK (got {kind!r})",
                                 kind=_KIND)
        return spec
    size = d.get("diskSizeBytes")
    if not isinstance(size, int) or size < 1:
        raise InvalidRequest(f"{where}.diskSizeBytes: a positive integer is required for an "
                             "empty disk (or give diskDataSourceReference)", kind=_KIND)
    spec["size"] = size
    return spec


@served(NS, "config.ListVolumeGroupsApiResponse")
@guarded(_KIND, "read")
async def vg_list(request: Request) -> Response:
    sim, lis = sim_of(request), listener(request)
    groups = [g for g in list(sim.volume_groups.groups.values())
              if lis.is_pc or g.cluster_uuid == lis.cluster_uuid]
    attrs = {"name": lambda g: g.name, "extId": lambda g: g.uuid,
             "clusterReference": lambda g: g.cluster_uuid}
    return list_answer(request, groups, lambda g: render_vg(sim, g), item_type=VG, attrs=attrs)


@served(NS, "config.GetVolumeGroupApiResponse")
@guarded(_KIND, "read")
async def vg_get(request: Request) -> Response:
    vg = _vg(request)
    return answer(request, render_vg(sim_of(request), vg), item_type=VG,
                  headers={"ETag": etag_of("vg", vg.uuid, len(vg.disks), *vg.attachments)})


@served(NS, "config.CreateVolumeGroupApiResponse", replay=True)
@guarded(_KIND, "create")
async def vg_create(request: Request) -> Response:
    sim, lis = sim_of(request), listener(request)
    body = await json_body(request, kind=_KIND)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("name: required", kind=_KIND)
    cluster = body.get("clusterReference") or lis.cluster_uuid
    if not cluster:
        raise InvalidRequest("clusterReference: required on Prism Central (the cluster extId)",
                             kind=_KIND)
    sim.cluster(str(cluster))
    if lis.cluster_uuid not in (None, cluster):
        raise InvalidRequest(f"clusterReference: {cluster!r} is not this cluster", kind=_KIND)
    usage = body.get("usageType", "USER")
    if usage not in ("USER", "INTERNAL", "TEMPORARY", "BACKUP_TARGET"):
        raise InvalidRequest(f"usageType: unknown value {usage!r}", kind=_KIND)
    specs = [_disk_spec(sim, d, f"disks[{i}]") for i, d in enumerate(body.get("disks") or [])]
    vg = await run_blocking(request, lambda: sim.volume_groups.create(
        cluster_uuid=str(cluster), name=name, description=str(body.get("description") or ""),
        disks=specs, usage_type=usage, is_hidden=bool(body.get("isHidden", False)),
        fail=injected_failure(request)))
    return answer(request, task_ref(vg.task_uuid or ""), item_type=TASK_REF, status=202)


@served(NS, "config.DeleteVolumeGroupApiResponse", replay=True)
@guarded(_KIND, "delete")
async def vg_delete(request: Request) -> Response:
    sim = sim_of(request)
    vg = _vg(request)
    task = await run_blocking(request, lambda: sim.volume_groups.delete(
        vg.uuid, fail=injected_failure(request)))
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


@served(NS, "config.ListVolumeDisksApiResponse")
@guarded(_KIND, "read")
async def disks_list(request: Request) -> Response:
    sim = sim_of(request)
    vg = _vg(request, "volumeGroupExtId")
    return list_answer(request, list(vg.disks), lambda d: _render_disk(sim, vg, d),
                       item_type=DISK, attrs={"extId": lambda d: d.uuid})


@served(NS, "config.GetVolumeDiskApiResponse")
@guarded(_KIND, "read")
async def disks_get(request: Request) -> Response:
    sim = sim_of(request)
    vg = _vg(request, "volumeGroupExtId")
    ext_id = str(request.path_params["extId"])
    for d in vg.disks:
        if d.uuid == ext_id:
            return answer(request, _render_disk(sim, vg, d, top=True), item_type=DISK)
    raise EntityNotFound("volume_disk", ext_id)


@served(NS, "config.CreateVolumeDiskApiResponse", replay=True)
@guarded(_KIND, "update")
async def disks_create(request: Request) -> Response:
    sim, lis = sim_of(request), listener(request)
    vg = _vg(request, "volumeGroupExtId")
    spec = _disk_spec(sim, await json_body(request, kind=_KIND), "body")
    _disk, task = await run_blocking(request, lambda: sim.volume_groups.add_disk(
        vg.uuid, spec, cluster_uuid=lis.cluster_uuid, fail=injected_failure(request)))
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


def _initiator(body: dict[str, Any]) -> str:
    iqn = body.get("iscsiInitiatorName")
    if body.get("iscsiInitiatorNetworkId") and not iqn:
        raise InvalidRequest("iscsiInitiatorNetworkId: the simulator attaches iSCSI clients by "
                             "iscsiInitiatorName (IQN) only", kind=_KIND)
    if not isinstance(iqn, str) or not iqn:
        raise InvalidRequest("iscsiInitiatorName: required (the initiator IQN)", kind=_KIND)
    return iqn


@served(NS, "config.AttachIscsiClientApiResponse", replay=True)
@guarded(_KIND, "update")
async def vg_attach_client(request: Request) -> Response:
    sim, lis = sim_of(request), listener(request)
    vg = _vg(request)
    iqn = _initiator(await json_body(request, kind=_KIND))
    fail = injected_failure(request)
    if fail is None:
        await run_blocking(request, lambda: sim.volume_groups.attach(
            vg.uuid, iqn, cluster_uuid=lis.cluster_uuid))
    task = sim.new_task("kVolumeGroupAttachExternal", kind=_KIND, uuid=vg.uuid, name=vg.name,
                        cluster_uuid=vg.cluster_uuid, error=fail)
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


def _iqn_of(vg: VolumeGroup, ext_id: str) -> str:
    for iqn in vg.attachments:
        if client_ext_id(iqn) == ext_id or iqn == ext_id:
            return iqn
    raise EntityNotFound("iscsi_client", ext_id)


@served(NS, "config.DetachIscsiClientApiResponse", replay=True)
@guarded(_KIND, "update")
async def vg_detach_client(request: Request) -> Response:
    sim, lis = sim_of(request), listener(request)
    vg = _vg(request)
    body = await json_body(request, kind=_KIND)
    ext_id = body.get("extId")
    if not isinstance(ext_id, str) or not ext_id:
        raise InvalidRequest("extId: required (the iSCSI client's extId)", kind=_KIND)
    iqn = _iqn_of(vg, ext_id)
    fail = injected_failure(request)
    if fail is None:
        await run_blocking(request, lambda: sim.volume_groups.detach(
            vg.uuid, iqn, cluster_uuid=lis.cluster_uuid))
    task = sim.new_task("kVolumeGroupDetachExternal", kind=_KIND, uuid=vg.uuid, name=vg.name,
                        cluster_uuid=vg.cluster_uuid, error=fail)
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


@served(NS, "config.ListExternalIscsiAttachmentsApiResponse")
@guarded(_KIND, "read")
async def vg_attachments(request: Request) -> Response:
    vg = _vg(request, "volumeGroupExtId")
    def render(iqn: str) -> dict[str, Any]:
        return {"extId": client_ext_id(iqn), "clusterReference": vg.cluster_uuid,
                "$objectType": ATTACHMENT}

    return list_answer(request, list(vg.attachments), render, item_type=ATTACHMENT)


def _clients(request: Request) -> dict[str, tuple[str, list[VolumeGroup]]]:
    sim, lis = sim_of(request), listener(request)
    out: dict[str, tuple[str, list[VolumeGroup]]] = {}
    for vg in list(sim.volume_groups.groups.values()):
        if not lis.is_pc and vg.cluster_uuid != lis.cluster_uuid:
            continue
        for iqn in vg.attachments:
            out.setdefault(client_ext_id(iqn), (iqn, []))[1].append(vg)
    return out


def _render_client(ext_id: str, iqn: str, vgs: list[VolumeGroup]) -> dict[str, Any]:
    return entity(CLIENT, {
        "extId": ext_id,
        "iscsiInitiatorName": iqn,
        "enabledAuthentications": "NONE",
        "attachedTargets": [{"iscsiTargetName": vg.iscsi_target, "numVirtualTargets": 1,
                             "$objectType": "volumes.v4.config.TargetParam"} for vg in vgs],
        "clusterReference": vgs[0].cluster_uuid if vgs else None,
    })


@served(NS, "config.ListIscsiClientsApiResponse")
@guarded(_KIND, "read")
async def clients_list(request: Request) -> Response:
    clients = _clients(request)
    return list_answer(request, list(clients.items()),
                       lambda kv: _render_client(kv[0], kv[1][0], kv[1][1]), item_type=CLIENT,
                       attrs={"iscsiInitiatorName": lambda kv: kv[1][0],
                              "extId": lambda kv: kv[0]})


@served(NS, "config.GetIscsiClientApiResponse")
@guarded(_KIND, "read")
async def clients_get(request: Request) -> Response:
    ext_id = str(request.path_params["extId"])
    hit = _clients(request).get(ext_id)
    if hit is None:
        raise EntityNotFound("iscsi_client", ext_id)
    return answer(request, _render_client(ext_id, *hit), item_type=CLIENT)


def _routes() -> list[Route]:
    p = f"{prefix(NS)}/config"
    g = f"{p}/volume-groups"
    return [
        Route(g, vg_list, methods=["GET"]),
        Route(g, vg_create, methods=["POST"]),
        Route(f"{g}/{{extId}}", vg_get, methods=["GET"]),
        Route(f"{g}/{{extId}}", vg_delete, methods=["DELETE"]),
        Route(f"{g}/{{volumeGroupExtId}}/disks", disks_list, methods=["GET"]),
        Route(f"{g}/{{volumeGroupExtId}}/disks", disks_create, methods=["POST"]),
        Route(f"{g}/{{volumeGroupExtId}}/disks/{{extId}}", disks_get, methods=["GET"]),
        Route(f"{g}/{{extId}}/$actions/attach-iscsi-client", vg_attach_client, methods=["POST"]),
        Route(f"{g}/{{extId}}/$actions/detach-iscsi-client", vg_detach_client, methods=["POST"]),
        Route(f"{g}/{{volumeGroupExtId}}/external-iscsi-attachments", vg_attachments,
              methods=["GET"]),
        Route(f"{p}/iscsi-clients", clients_list, methods=["GET"]),
        Route(f"{p}/iscsi-clients/{{extId}}", clients_get, methods=["GET"]),
    ]


def pc_volume_routes() -> list[Route]:
    return _routes()


def pe_volume_routes() -> list[Route]:
    return _routes()
