"""vmm v4 (``/api/vmm/v4.x/ahv/config/vms``): list, get, create, delete, add a disk, power
actions (Prism Central).

A VM is rendered from the same model record as v3. ``disks[].extId`` and
``disks[].backingInfo.diskExtId`` are both the simulator's vmdisk uuid (the v3
``disk_list[].uuid``); whether a real AHV keeps them equal is UNVERIFIED. GET answers carry an
``ETag`` (it changes with every change of the VM); power actions need it in ``If-Match``.
"""

from __future__ import annotations

__all__ = ["render_vm", "vm_etag", "vm_routes"]

import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._http import guarded, injected_failure, json_body, listener, run_blocking
from ..errors import EntityNotFound, InvalidRequest
from ..model import Disk, Nic, Vm
from ..v3.projects import check_scope
from ._common import (
    answer,
    check_if_match,
    entity,
    etag_of,
    list_answer,
    prefix,
    served,
    sim_of,
    task_ref,
    ts,
)

if TYPE_CHECKING:
    from ..simulator import Simulator

NS = "vmm"
VM = "vmm.v4.ahv.config.Vm"
TASK_REF = "prism.v4.config.TaskReference"
_MiB = 1 << 20


def vm_etag(vm: Vm) -> str:
    return etag_of("vm", vm.uuid, vm.spec_version, vm.power_state)


def _disk(d: Disk) -> dict[str, Any]:
    backing: dict[str, Any] = {
        "diskExtId": d.uuid,
        "diskSizeBytes": d.size,
        "storageContainer": {"extId": d.container_uuid},
        "storageConfig": {"isFlashModeEnabled": False},
        "isMigrationInProgress": False,
        "$objectType": "vmm.v4.ahv.config.VmDisk",
    }
    if d.source_image:
        backing["dataSource"] = {"reference": {"imageExtId": d.source_image,
                                               "$objectType": "vmm.v4.ahv.config.ImageReference"}}
    return {"extId": d.uuid, "diskAddress": {"busType": d.adapter_type, "index": d.device_index},
            "backingInfo": backing}


def _nic(n: Nic) -> dict[str, Any]:
    info: dict[str, Any] = {"nicType": "NORMAL_NIC", "subnet": {"extId": n.subnet_uuid},
                            "vlanMode": "ACCESS"}
    if n.ip:
        info["ipv4Config"] = {"shouldAssignIp": False,
                              "ipAddress": {"value": n.ip, "prefixLength": 32}}
    return {"extId": n.uuid,
            "backingInfo": {"model": "VIRTIO", "macAddress": n.mac, "isConnected": n.connected,
                            "numQueues": 1},
            "networkInfo": info}


def render_vm(sim: Simulator, vm: Vm) -> dict[str, Any]:
    boot: dict[str, Any]
    if vm.boot_type == "LEGACY":
        boot = {"$objectType": "vmm.v4.ahv.config.LegacyBoot"}
    else:
        boot = {"isSecureBootEnabled": vm.boot_type == "SECURE_BOOT",
                "$objectType": "vmm.v4.ahv.config.UefiBoot"}
    tools: dict[str, Any] = {"isInstalled": vm.ngt_installed, "isEnabled": vm.ngt_enabled,
                             "isVssSnapshotCapable": vm.app_consistent_capable}
    if vm.ngt_installed:
        tools["capabilities"] = [c for c in vm.ngt_capabilities
                                 if c in ("SELF_SERVICE_RESTORE", "VSS_SNAPSHOT")]
        tools["isReachable"] = vm.power_state == "ON"
    return entity(VM, {
        "extId": vm.uuid,
        "name": vm.name,
        "description": vm.description,
        "createTime": ts(vm.created),
        "updateTime": ts(vm.updated or vm.created),
        "numSockets": vm.num_sockets,
        "numCoresPerSocket": vm.num_vcpus_per_socket,
        "numThreadsPerCore": 1,
        "memorySizeBytes": vm.memory_mib * _MiB,
        "machineType": "PC",
        "powerState": vm.power_state,
        "bootConfig": boot,
        "cluster": {"extId": vm.cluster_uuid},
        "guestTools": tools,
        "biosUuid": vm.uuid,
        "generationUuid": str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"{vm.uuid}:{vm.spec_version}")),
        "disks": [_disk(d) for d in vm.disks if d.device_type == "DISK"],
        "cdRoms": [{"extId": d.uuid, "diskAddress": {"busType": d.adapter_type,
                                                      "index": d.device_index}}
                   for d in vm.disks if d.device_type == "CDROM"],
        "nics": [_nic(n) for n in vm.nics],
    })


def _vm(request: Request) -> Vm:
    lis = listener(request)
    ext_id = str(request.path_params["extId"])
    vm = lis.sim.vm(ext_id)
    if not lis.is_pc and vm.cluster_uuid != lis.cluster_uuid:
        raise EntityNotFound("vm", ext_id)
    check_scope(request.scope["sim.user"], vm)  # a project-scoped user: its projects' VMs only
    return vm


_ATTRS = {"name": lambda v: v.name, "extId": lambda v: v.uuid,
          "powerState": lambda v: v.power_state, "cluster/extId": lambda v: v.cluster_uuid}


@served(NS, "ahv.config.ListVmsApiResponse")
@guarded("vm", "read")
async def vms_list(request: Request) -> Response:
    sim, lis = sim_of(request), listener(request)
    sees = request.scope["sim.user"].sees
    vms = [v for v in list(sim.vms.values())
           if (lis.is_pc or v.cluster_uuid == lis.cluster_uuid) and sees(v.project_uuid)]
    return list_answer(request, vms, lambda v: render_vm(sim, v), item_type=VM, attrs=_ATTRS)


@served(NS, "ahv.config.GetVmApiResponse")
@guarded("vm", "read")
async def vms_get(request: Request) -> Response:
    vm = _vm(request)
    return answer(request, render_vm(sim_of(request), vm), item_type=VM,
                  headers={"ETag": vm_etag(vm)})


def _int(value: Any, where: str, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{where}: an integer >= {minimum} is required (got {value!r})",
                             kind="vm")
    return value


def _parse_vm(request: Request, body: dict[str, Any]) -> Vm:
    """A model ``Vm`` from a v4 ``Vm`` create body."""
    sim, lis = sim_of(request), listener(request)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("name: required", kind="vm")
    cluster_uuid = (body.get("cluster") or {}).get("extId") or lis.cluster_uuid or ""
    if not cluster_uuid and len(sim.clusters) == 1:
        cluster_uuid = next(iter(sim.clusters))
    if cluster_uuid not in sim.clusters:
        raise InvalidRequest(f"cluster.extId: unknown cluster {cluster_uuid!r} (required on "
                             "Prism Central)", kind="vm")
    cluster = sim.clusters[cluster_uuid]
    memory = _int(body.get("memorySizeBytes"), "memorySizeBytes", 1 << 30, _MiB)
    disks: list[Disk] = []
    used: dict[str, set[int]] = {}

    def index_for(bus: str, wanted: Any) -> int:
        taken = used.setdefault(bus, set())
        index = wanted if isinstance(wanted, int) else next(
            i for i in range(64) if i not in taken)
        if index in taken:
            raise InvalidRequest(f"disks: two devices at {bus}.{index}", kind="vm")
        taken.add(index)
        return index

    for i, d in enumerate(body.get("disks") or []):
        where = f"disks[{i}]"
        addr = d.get("diskAddress") or {}
        backing = d.get("backingInfo") or {}
        bus = addr.get("busType", "SCSI")
        if bus not in ("SCSI", "IDE", "PCI", "SATA", "SPAPR"):
            raise InvalidRequest(f"{where}.diskAddress.busType: unknown bus {bus!r}", kind="vm")
        size = backing.get("diskSizeBytes")
        ref = (backing.get("dataSource") or {}).get("reference") or {}
        image_uuid = ref.get("imageExtId")
        source_path = None
        if ref.get("diskRecoveryPointExtId"):
            _rp, _vrp, drp = sim.recovery_points.find_disk_rp(str(ref["diskRecoveryPointExtId"]))
            source_path = drp.snapshot_file_path
        elif ref and not image_uuid:
            raise InvalidRequest(f"{where}.backingInfo.dataSource.reference: the simulator "
                                 "clones images (ImageReference) and disk recovery points "
                                 "(VmDiskRecoveryPointReference)", kind="vm")
        if image_uuid:
            image = sim.image(str(image_uuid))
            if image.size is None:
                raise InvalidRequest(f"{where}: image {image_uuid!r} has no data", kind="vm")
            size = max(size or 0, image.size)
        if size is None and source_path is None:
            raise InvalidRequest(f"{where}.backingInfo.diskSizeBytes: required for a new empty "
                                 "disk", kind="vm")
        container = cluster.container((backing.get("storageContainer") or {}).get("extId")).uuid
        disks.append(Disk(uuid=str(uuidlib.uuid4()), device_type="DISK", adapter_type=bus,
                          device_index=index_for(bus, addr.get("index")),
                          size=_int(size, f"{where}.backingInfo.diskSizeBytes", 1) if size else 1,
                          container_uuid=container,
                          source_image=str(image_uuid) if image_uuid else None,
                          source_path=source_path))
    for d in body.get("cdRoms") or []:
        bus = (d.get("diskAddress") or {}).get("busType", "IDE")
        disks.append(Disk(uuid=str(uuidlib.uuid4()), device_type="CDROM", adapter_type=bus,
                          device_index=index_for(bus, (d.get("diskAddress") or {}).get("index")),
                          size=0, container_uuid=cluster.containers[0].uuid))
    nics: list[Nic] = []
    for i, n in enumerate(body.get("nics") or []):
        subnet = ((n.get("networkInfo") or {}).get("subnet") or {}).get("extId")
        if not subnet:
            raise InvalidRequest(f"nics[{i}].networkInfo.subnet.extId: required", kind="vm")
        sim.subnet(str(subnet))
        mac = (n.get("backingInfo") or {}).get("macAddress") or "50:6b:8d:" + ":".join(
            f"{b:02x}" for b in uuidlib.uuid4().bytes[:3])
        nics.append(Nic(uuid=str(uuidlib.uuid4()), mac=mac, subnet_uuid=str(subnet)))
    boot = body.get("bootConfig") or {}
    boot_type = "LEGACY"
    if str(boot.get("$objectType", "")).endswith("UefiBoot"):
        boot_type = "SECURE_BOOT" if boot.get("isSecureBootEnabled") else "UEFI"
    power = body.get("powerState", "OFF")
    if power not in ("ON", "OFF"):
        raise InvalidRequest(f"powerState: ON or OFF (got {power!r})", kind="vm")
    return Vm(uuid=str(uuidlib.uuid4()), name=name, cluster_uuid=cluster_uuid,
              description=str(body.get("description") or ""),
              num_sockets=_int(body.get("numSockets"), "numSockets", 1),
              num_vcpus_per_socket=_int(body.get("numCoresPerSocket"), "numCoresPerSocket", 1),
              memory_mib=memory // _MiB, power_state=power, boot_type=boot_type,
              disks=disks, nics=nics)


@served(NS, "ahv.config.CreateVmApiResponse", replay=True)
@guarded("vm", "create")
async def vms_create(request: Request) -> Response:
    sim = sim_of(request)
    vm = _parse_vm(request, await json_body(request, kind="vm"))
    made = await run_blocking(request, lambda: sim.create_vm(vm, fail=injected_failure(request)))
    return answer(request, task_ref(made.task_uuid or ""), item_type=TASK_REF, status=202)


_POWER = {
    "power-on": "ON", "power-off": "OFF", "shutdown": "OFF", "guest-shutdown": "OFF",
    "reboot": None, "guest-reboot": None, "reset": None, "power-cycle": None,
}
_RESPONSE = {
    "power-on": "PowerOnVmApiResponse", "power-off": "PowerOffVmApiResponse",
    "shutdown": "ShutdownVmApiResponse", "guest-shutdown": "ShutdownVmApiResponse",
    "reboot": "RebootVmApiResponse", "guest-reboot": "RebootVmApiResponse",
    "reset": "ResetVmApiResponse", "power-cycle": "PowerCycleVmApiResponse",
}


def _power_handler(action: str) -> Any:
    @served(NS, f"ahv.config.{_RESPONSE[action]}", replay=True)
    @guarded("vm", "update")
    async def handler(request: Request) -> Response:
        sim = sim_of(request)
        vm = _vm(request)
        check_if_match(request, vm_etag(vm), "vm")
        target = _POWER[action]
        if target is None and vm.power_state != "ON":
            raise InvalidRequest(f"vm {vm.name!r} is powered off; {action} needs it on",
                                 kind="vm", details={"powerState": vm.power_state})
        new = Vm.from_json(vm.to_json())
        if target is not None:
            new.power_state = target
        done = await run_blocking(request, lambda: sim.update_vm(
            new, spec_version=None, fail=injected_failure(request)))
        return answer(request, task_ref(done.task_uuid or ""), item_type=TASK_REF, status=202)

    handler.__name__ = f"vm_{action.replace('-', '_')}"
    return handler


@served(NS, "ahv.config.DeleteVmApiResponse", replay=True)
@guarded("vm", "delete")
async def vms_delete(request: Request) -> Response:
    sim = sim_of(request)
    vm = _vm(request)
    task = await run_blocking(request, lambda: sim.delete_vm(
        vm.uuid, fail=injected_failure(request)))
    return answer(request, task_ref(task), item_type=TASK_REF, status=202)


def _new_disk(sim: Simulator, vm: Vm, body: dict[str, Any]) -> Disk:
    """A model ``Disk`` from a v4 ``Disk`` body: empty (``diskSizeBytes``), or a clone of an
    image (``ImageReference``), a VG disk (``VolumeDiskReference``), a VM disk
    (``VmDiskReference``) or a disk recovery point (``VmDiskRecoveryPointReference``)."""
    addr = body.get("diskAddress") or {}
    backing = body.get("backingInfo") or {}
    bus = addr.get("busType", "SCSI")
    if bus not in ("SCSI", "IDE", "PCI", "SATA", "SPAPR"):
        raise InvalidRequest(f"diskAddress.busType: unknown bus {bus!r}", kind="vm")
    taken = {d.device_index for d in vm.disks if d.adapter_type == bus}
    index = addr.get("index")
    if index is None:
        index = next(i for i in range(1024) if i not in taken)
    index = _int(index, "diskAddress.index", 0, minimum=0)
    if index in taken:
        raise InvalidRequest(f"diskAddress: {bus}.{index} is used by another disk", kind="vm")
    ref = (backing.get("dataSource") or {}).get("reference") or {}
    size = backing.get("diskSizeBytes")
    image_uuid = ref.get("imageExtId")
    source_path = None
    vmdisk = ref.get("diskExtId")
    if ref.get("diskRecoveryPointExtId"):
        _rp, _vrp, drp = sim.recovery_points.find_disk_rp(str(ref["diskRecoveryPointExtId"]))
        source_path = drp.snapshot_file_path
    elif vmdisk:
        size = max(size or 0, sim.vmdisk_size(str(vmdisk), cluster_uuid=vm.cluster_uuid,
                                              where="backingInfo.dataSource.reference"))
        source_path = f"/x/.acropolis/vmdisk/{vmdisk}"
    elif image_uuid:
        image = sim.image(str(image_uuid))
        if image.size is None:
            raise InvalidRequest(f"image {image_uuid!r} has no data", kind="vm")
        size = max(size or 0, image.size)
    elif ref:
        raise InvalidRequest("backingInfo.dataSource.reference: the simulator clones images, "
                             "VG disks, VM disks and disk recovery points", kind="vm")
    if size is None and source_path is None:
        raise InvalidRequest("backingInfo.diskSizeBytes: required for a new empty disk",
                             kind="vm")
    cluster = sim.clusters[vm.cluster_uuid]
    container = cluster.container((backing.get("storageContainer") or {}).get("extId")).uuid
    return Disk(uuid=str(uuidlib.uuid4()), device_type="DISK", adapter_type=bus,
                device_index=index, size=_int(size, "backingInfo.diskSizeBytes", 1) if size
                else 1, container_uuid=container,
                source_image=str(image_uuid) if image_uuid else None, source_path=source_path)


@served(NS, "ahv.config.CreateDiskApiResponse", replay=True)
@guarded("vm", "update")
async def vm_disks_create(request: Request) -> Response:
    sim, lis = sim_of(request), listener(request)
    ext_id = str(request.path_params["vmExtId"])
    vm = lis.sim.vm(ext_id)
    body = await json_body(request, kind="vm")
    new = Vm.from_json(vm.to_json())
    new.disks.append(_new_disk(sim, vm, body))
    done = await run_blocking(request, lambda: sim.update_vm(
        new, spec_version=None, fail=injected_failure(request)))
    return answer(request, task_ref(done.task_uuid or ""), item_type=TASK_REF, status=202)


def vm_routes() -> list[Route]:
    p = f"{prefix(NS)}/ahv/config/vms"
    return [
        Route(p, vms_list, methods=["GET"]),
        Route(p, vms_create, methods=["POST"]),
        Route(f"{p}/{{extId}}", vms_get, methods=["GET"]),
        Route(f"{p}/{{extId}}", vms_delete, methods=["DELETE"]),
        Route(f"{p}/{{vmExtId}}/disks", vm_disks_create, methods=["POST"]),
        *(Route(f"{p}/{{extId}}/$actions/{a}", _power_handler(a), methods=["POST"])
          for a in _POWER),
    ]
