"""v3 VMs: list, get, create, update, delete (Prism Central and Element).

A user scoped to projects lists only their VMs and gets 403 on any other (`projects`)."""

from __future__ import annotations

import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from .._http import guarded, injected_failure, json_body, listener, run_blocking
from ..errors import EntityNotFound, InvalidRequest
from ..model import Disk, Nic, Vm
from ..users import UnknownProject, User
from ._common import _Attrs, _json, _list_response, _metadata_uuid, _MiB, _sim, _uuid_param
from .projects import check_scope, project_reference
from .render import render_vm as _render_vm

if TYPE_CHECKING:
    from ..simulator import Simulator


def render_vm(sim: Simulator, vm: Vm) -> dict[str, Any]:
    out = _render_vm(sim, vm)
    ref = project_reference(sim, vm.project_uuid)
    if ref is not None:
        out["metadata"]["project_reference"] = ref
    return out


def _vms(request: Request) -> list[Vm]:
    sim, lis = _sim(request), listener(request)
    user: User = request.scope["sim.user"]
    vms = list(sim.vms.values())  # a snapshot: worker threads may add VMs meanwhile
    return [v for v in vms if (lis.is_pc or v.cluster_uuid == lis.cluster_uuid)
            and user.sees(v.project_uuid)]


def _vm(request: Request, uuid: str) -> Vm:
    lis = listener(request)
    vm = lis.sim.vm(uuid)
    if not lis.is_pc and vm.cluster_uuid != lis.cluster_uuid:
        raise EntityNotFound("vm", uuid)
    check_scope(request.scope["sim.user"], vm)
    return vm


def _project_of(request: Request, body: dict[str, Any], old: Vm | None) -> str | None:
    """The project a created or updated VM is in: ``metadata.project_reference``, else the
    old one, else (a scoped user) the user's first project."""
    user: User = request.scope["sim.user"]
    ref = (body.get("metadata") or {}).get("project_reference") or {}
    if not ref:
        return old.project_uuid if old else (user.projects[0] if user.projects else None)
    try:
        project = _sim(request).users.project(str(ref.get("uuid") or ref.get("name") or ""))
    except UnknownProject as err:
        raise InvalidRequest(f"metadata.project_reference: {err}", kind="vm") from err
    if not user.sees(project.uuid):
        raise InvalidRequest(f"metadata.project_reference: user {user.name!r} may not use "
                             f"project {project.name!r}", kind="vm")
    return project.uuid


_VM_ATTRS: _Attrs = {
    "vm_name": lambda v: v.name,
    "name": lambda v: v.name,
    "uuid": lambda v: v.uuid,
    "power_state": lambda v: v.power_state,
    "cluster_uuid": lambda v: v.cluster_uuid,
    "cluster": lambda v: v.cluster_uuid,
}


@guarded("vm", "read")
async def vms_list(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="vm", empty_ok=True)
    return _list_response(body, kind="vm", items=_vms(request), attrs=_VM_ATTRS,
                          render=lambda v: render_vm(sim, v))


@guarded("vm", "read")
async def vms_get(request: Request) -> Response:
    return _json(render_vm(_sim(request), _vm(request, _uuid_param(request, "vm"))))


def _int(value: Any, where: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{where}: must be an integer >= {minimum} (got {value!r})", kind="vm")
    return value


def _parse_vm(
    request: Request, body: dict[str, Any], *, uuid: str, old: Vm | None
) -> Vm:
    """A ``Vm`` record from a v3 VM intent (create: ``old`` None; update: the full new spec)."""
    sim, lis = _sim(request), listener(request)
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise InvalidRequest("spec: required object is missing", kind="vm")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("spec.name: required (got nothing)", kind="vm")
    res = spec.get("resources") or {}
    if old is not None:
        cluster_uuid = old.cluster_uuid
    else:
        cluster_uuid = ((spec.get("cluster_reference") or {}).get("uuid")
                        or lis.cluster_uuid or "")
        if not cluster_uuid and len(sim.clusters) == 1:
            cluster_uuid = next(iter(sim.clusters))
        if cluster_uuid not in sim.clusters or (lis.cluster_uuid not in (None, cluster_uuid)):
            raise InvalidRequest(
                f"spec.cluster_reference.uuid: unknown cluster {cluster_uuid!r}", kind="vm"
            )
    cluster = sim.clusters[cluster_uuid]
    old_disks = {d.uuid: d for d in old.disks} if old else {}
    disks: list[Disk] = []
    used: dict[str, set[int]] = {}
    for i, d in enumerate(res.get("disk_list") or []):
        where = f"spec.resources.disk_list[{i}]"
        props = d.get("device_properties") or {}
        addr = props.get("disk_address") or {}
        device_type = props.get("device_type", "DISK")
        if device_type not in ("DISK", "CDROM"):
            raise InvalidRequest(f"{where}.device_properties.device_type: DISK or CDROM "
                                 f"(got {device_type!r})", kind="vm")
        adapter = addr.get("adapter_type", "SCSI" if device_type == "DISK" else "IDE")
        prev = old_disks.get(d.get("uuid", ""))
        size = d.get("disk_size_bytes")
        if size is None and d.get("disk_size_mib") is not None:
            size = _int(d["disk_size_mib"], f"{where}.disk_size_mib") * _MiB
        source = d.get("data_source_reference") or {}
        image_uuid = None
        source_path = None
        if source and source.get("kind") == "vm_disk":
            # a clone of a vmdisk: another VM's disk or a volume group's (a restore's staging)
            if prev is None:
                vmdisk = str(source.get("uuid"))
                size = max(size or 0, sim.vmdisk_size(vmdisk, cluster_uuid=cluster_uuid,
                                                      where=f"{where}.data_source_reference"))
                source_path = f"/x/.acropolis/vmdisk/{vmdisk}"
        elif source:
            if source.get("kind") != "image":
                raise InvalidRequest(f"{where}.data_source_reference.kind: 'image' or 'vm_disk' "
                                     f"(got {source.get('kind')!r})", kind="vm")
            image_uuid = source.get("uuid")
            if prev is None:
                image = sim.image(str(image_uuid))
                if image.size is None:
                    raise InvalidRequest(f"{where}: image {image_uuid!r} has no data", kind="vm")
                size = max(size or 0, image.size)
        if device_type == "DISK":
            if prev is None and size is None:
                raise InvalidRequest(
                    f"{where}: disk_size_bytes (or disk_size_mib, or an image "
                    "data_source_reference) is required for a new disk", kind="vm",
                )
            if size is None and prev is not None:
                size = prev.size
            size = _int(size, f"{where}.disk_size_bytes", minimum=1)
        ctr = ((d.get("storage_config") or {}).get("storage_container_reference") or {})
        if prev is None and ctr.get("uuid") and all(c.uuid != ctr["uuid"]
                                                    for c in cluster.containers):
            raise InvalidRequest(f"{where}.storage_config.storage_container_reference.uuid: "
                                 f"cluster {cluster.name} has no container {ctr['uuid']!r}",
                                 kind="vm")
        container_uuid = prev.container_uuid if prev else cluster.container(ctr.get("uuid")).uuid
        taken = used.setdefault(adapter, set())
        index = addr.get("device_index")
        if index is None:
            index = prev.device_index if prev else next(n for n in range(1024) if n not in taken)
        index = _int(index, f"{where}.device_properties.disk_address.device_index")
        if index in taken:
            raise InvalidRequest(f"{where}: {adapter}.{index} is used by another disk", kind="vm")
        taken.add(index)
        disks.append(Disk(
            uuid=prev.uuid if prev else str(uuidlib.uuid4()),
            device_type=device_type,
            adapter_type=adapter,
            device_index=index,
            size=size or 0,
            container_uuid=container_uuid,
            source_image=prev.source_image if prev else image_uuid,
            source_path=prev.source_path if prev else source_path,
        ))
    old_nics = {n.uuid: n for n in old.nics} if old else {}
    nics: list[Nic] = []
    for i, n in enumerate(res.get("nic_list") or []):
        subnet_uuid = (n.get("subnet_reference") or {}).get("uuid")
        if subnet_uuid not in sim.subnets:
            raise InvalidRequest(f"spec.resources.nic_list[{i}].subnet_reference.uuid: unknown "
                                 f"subnet {subnet_uuid!r}", kind="vm")
        prev_nic = old_nics.get(n.get("uuid", ""))
        if prev_nic is None and sim.subnets[subnet_uuid].cluster_uuid != cluster_uuid:
            raise InvalidRequest(f"spec.resources.nic_list[{i}].subnet_reference.uuid: subnet "
                                 f"{sim.subnets[subnet_uuid].name!r} is not on cluster "
                                 f"{cluster.name}", kind="vm")
        ips = n.get("ip_endpoint_list") or []
        nics.append(Nic(
            uuid=prev_nic.uuid if prev_nic else str(uuidlib.uuid4()),
            mac=n.get("mac_address") or (prev_nic.mac if prev_nic else _mac()),
            subnet_uuid=subnet_uuid,
            ip=ips[0].get("ip") if ips else None,
            connected=n.get("is_connected", True),
        ))
    power = res.get("power_state", old.power_state if old else "OFF")
    if power not in ("ON", "OFF"):
        raise InvalidRequest(f"spec.resources.power_state: ON or OFF (got {power!r})", kind="vm")
    ngt = ((res.get("guest_tools") or {}).get("nutanix_guest_tools")) or {}
    enabled = ngt.get("state", "ENABLED" if old and old.ngt_enabled else "DISABLED") == "ENABLED"
    if "ngt_state" in ngt:
        installed = ngt["ngt_state"] == "INSTALLED"
    else:
        installed = old.ngt_installed if old else enabled
    boot = (res.get("boot_config") or {}).get("boot_type", old.boot_type if old else "LEGACY")
    machine = res.get("machine_type", old.machine_type if old else "PC")
    if machine not in ("PC", "PSERIES", "Q35"):
        raise InvalidRequest(f"spec.resources.machine_type: PC, PSERIES or Q35 (got "
                             f"{machine!r})", kind="vm")
    return Vm(
        uuid=uuid,
        name=name,
        cluster_uuid=cluster_uuid,
        description=spec.get("description", ""),
        num_sockets=_int(res.get("num_sockets", 1), "spec.resources.num_sockets", minimum=1),
        num_vcpus_per_socket=_int(res.get("num_vcpus_per_socket", 1),
                                  "spec.resources.num_vcpus_per_socket", minimum=1),
        memory_mib=_int(res.get("memory_size_mib", 1024), "spec.resources.memory_size_mib",
                        minimum=1),
        power_state=power,
        boot_type=boot,
        machine_type=machine,
        disks=disks,
        nics=nics,
        ngt_installed=installed,
        ngt_enabled=enabled,
        ngt_capabilities=list(ngt.get("enabled_capability_list",
                                      old.ngt_capabilities if old else [])),
        spec_version=old.spec_version if old else 0,
        project_uuid=_project_of(request, body, old),
    )


def _mac() -> str:
    b = uuidlib.uuid4().bytes
    return "50:6b:8d:" + ":".join(f"{x:02x}" for x in b[:3])


@guarded("vm", "create")
async def vms_create(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="vm")
    uuid = _metadata_uuid(body, "vm") or str(uuidlib.uuid4())
    if uuid in sim.vms:
        return _json(render_vm(sim, sim.vms[uuid]), 202)
    vm = _parse_vm(request, body, uuid=uuid, old=None)
    vm = await run_blocking(request, lambda: sim.create_vm(vm, fail=injected_failure(request)))
    return _json(render_vm(sim, vm), 202)


@guarded("vm", "update")
async def vms_update(request: Request) -> Response:
    sim = _sim(request)
    uuid = _uuid_param(request, "vm")
    old = _vm(request, uuid)
    body = await json_body(request, kind="vm")
    spec_version = (body.get("metadata") or {}).get("spec_version")
    new = _parse_vm(request, body, uuid=uuid, old=old)
    vm = await run_blocking(request, lambda: sim.update_vm(
        new, spec_version=spec_version, fail=injected_failure(request)))
    return _json(render_vm(sim, vm), 202)


@guarded("vm", "delete")
async def vms_delete(request: Request) -> Response:
    sim = _sim(request)
    vm = _vm(request, _uuid_param(request, "vm"))
    rendered = render_vm(sim, vm)
    task = await run_blocking(request, lambda: sim.delete_vm(vm.uuid,
                                                             fail=injected_failure(request)))
    rendered["status"]["state"] = "DELETE_PENDING"
    rendered["status"]["execution_context"] = {"task_uuid": [task.uuid]}
    rendered.pop("spec", None)
    return _json(rendered, 202)
