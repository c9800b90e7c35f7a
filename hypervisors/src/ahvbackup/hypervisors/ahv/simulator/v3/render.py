"""v3 JSON shapes of the simulator's entities, as the v3 Swagger and real Prism have them.

Field names and nesting follow the recorded real responses in ``shared/specs/recorded`` where
they exist; the conformance test validates every rendered body against the Swagger schema.
"""

from __future__ import annotations

__all__ = [
    "API_VERSION",
    "error_body",
    "render_cluster",
    "render_image",
    "render_pc_cluster",
    "render_snapshot",
    "render_subnet",
    "render_task",
    "render_user",
    "render_vm",
]

from typing import TYPE_CHECKING, Any

from ..model import Cluster, Image, Subnet, Task, Vm, VmSnapshot, rfc3339
from ..users import User

if TYPE_CHECKING:
    from ..simulator import Simulator

API_VERSION = "3.1"
_AOS_VERSION = "6.5.4.5"
_PC_VERSION = "pc.2024.3.0.1"
_COMMIT = "0" * 40
_MiB = 1 << 20


def error_body(
    *, status: int, reason: str, message: str, kind: str = "", details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The v3 error envelope (``<kind>_status``)."""
    item: dict[str, Any] = {"message": message, "reason": reason}
    if details:
        item["details"] = {k: str(v) for k, v in details.items()}
    body: dict[str, Any] = {
        "api_version": API_VERSION,
        "code": status,
        "state": "ERROR",
        "message_list": [item],
    }
    if kind:
        body["kind"] = kind
    return body


def _ref(kind: str, uuid: str, name: str | None = None) -> dict[str, Any]:
    ref = {"kind": kind, "uuid": uuid}
    if name is not None:
        ref["name"] = name
    return ref


def _metadata(kind: str, uuid: str, *, created: float, updated: float, spec_version: int = 0,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    md = {
        "kind": kind,
        "uuid": uuid,
        "spec_version": spec_version,
        "spec_hash": "0" * 50,
        "categories": {},
        "categories_mapping": {},
        "creation_time": rfc3339(created),
        "last_update_time": rfc3339(updated),
    }
    md.update(extra or {})
    return md


def _exec_ctx(task_uuid: str | None) -> dict[str, Any]:
    return {"task_uuid": [task_uuid] if task_uuid else []}


def _cluster_resources(sim: Simulator, c: Cluster) -> dict[str, Any]:
    return {
        "config": {
            "service_list": ["AOS"],
            "software_map": {
                "NOS": {"software_type": "NOS", "status": "INSTALLED", "version": _AOS_VERSION},
            },
            "build": {"build_type": "release", "version": _AOS_VERSION,
                      "full_version": f"el7.3-release-fraser-{_AOS_VERSION}-stable-sim",
                      "commit_id": _COMMIT, "short_commit_id": _COMMIT[:6]},
            "redundancy_factor": 2,
            "is_available": True,
            "timezone": "UTC",
            "cluster_arch": "X86_64",
            "operation_mode": "NORMAL",
            "encryption_status": "NOT_SUPPORTED",
        },
        "nodes": {"hypervisor_server_list": [
            {"ip": c.external_ip, "type": "AHV", "version": "el7.nutanix.20220304.462"},
        ]},
        "network": {
            "external_ip": c.external_ip,
            "external_data_services_ip": c.dsip,
            "external_subnet": "127.0.0.0/255.0.0.0",
            "internal_subnet": "192.168.5.0/255.255.255.128",
            "ntp_server_ip_list": [],
            "name_server_ip_list": [],
        },
        # not in the v3 schema (extra keys are allowed): the containers, for clients and demos
        "storage_container_list": [
            {"uuid": ct.uuid, "name": ct.name} for ct in c.containers
        ],
    }


def render_cluster(sim: Simulator, c: Cluster) -> dict[str, Any]:
    resources = _cluster_resources(sim, c)
    return {
        "api_version": API_VERSION,
        "metadata": _metadata("cluster", c.uuid, created=0, updated=0, spec_version=1),
        "spec": {"name": c.name, "resources": {k: v for k, v in resources.items()
                                               if k in ("config", "network")}},
        "status": {"name": c.name, "state": "COMPLETE", "resources": resources},
    }


def render_pc_cluster(sim: Simulator) -> dict[str, Any]:
    """Prism Central lists itself as a cluster entity with service_list PRISM_CENTRAL."""
    resources = {
        "config": {
            "service_list": ["PRISM_CENTRAL"],
            "build": {"build_type": "release", "version": _PC_VERSION,
                      "commit_id": _COMMIT, "short_commit_id": _COMMIT[:6]},
            "is_available": True,
            "timezone": "UTC",
        },
        "network": {"external_ip": "127.0.0.1", "ntp_server_ip_list": []},
    }
    return {
        "api_version": API_VERSION,
        "metadata": _metadata("cluster", sim.pc_uuid, created=0, updated=0, spec_version=1),
        "spec": {"name": sim.pc_name, "resources": resources},
        "status": {"name": sim.pc_name, "state": "COMPLETE", "resources": resources},
    }


def _disk(sim: Simulator, vm: Vm, d: Any) -> dict[str, Any]:
    cluster = sim.clusters[vm.cluster_uuid]
    ct = cluster.container(d.container_uuid)
    out: dict[str, Any] = {
        "uuid": d.uuid,
        "device_properties": {
            "device_type": d.device_type,
            "disk_address": {"adapter_type": d.adapter_type, "device_index": d.device_index},
        },
    }
    if d.device_type == "DISK":
        out["disk_size_bytes"] = d.size
        out["disk_size_mib"] = -(-d.size // _MiB)
        out["storage_config"] = {
            "storage_container_reference": _ref("storage_container", ct.uuid, ct.name),
        }
        if d.source_image:
            out["data_source_reference"] = _ref("image", d.source_image)
    return out


def _vm_resources(sim: Simulator, vm: Vm, *, status: bool) -> dict[str, Any]:
    subnets = sim.subnets
    nics = []
    for n in vm.nics:
        s = subnets.get(n.subnet_uuid)
        nic: dict[str, Any] = {
            "uuid": n.uuid,
            "nic_type": "NORMAL_NIC",
            "vlan_mode": "ACCESS",
            "mac_address": n.mac,
            "is_connected": n.connected,
            "num_queues": 1,
            "subnet_reference": _ref("subnet", n.subnet_uuid, s.name if s else None),
            "ip_endpoint_list": [{"type": "ASSIGNED", "ip": n.ip}] if n.ip else [],
        }
        nics.append(nic)
    ngt: dict[str, Any] = {
        "state": "ENABLED" if vm.ngt_enabled else "DISABLED",
        "enabled_capability_list": list(vm.ngt_capabilities),
        "iso_mount_state": "UNMOUNTED",
    }
    if status:
        ngt["ngt_state"] = "INSTALLED" if vm.ngt_installed else "UNINSTALLED"
        ngt["vss_snapshot_capable"] = vm.app_consistent_capable
        ngt["is_reachable"] = vm.ngt_installed and vm.power_state == "ON"
        if vm.ngt_installed:
            ngt["version"] = "4.1"
            ngt["available_version"] = "4.1"
    res: dict[str, Any] = {
        "num_sockets": vm.num_sockets,
        "num_vcpus_per_socket": vm.num_vcpus_per_socket,
        "num_threads_per_core": 1,
        "memory_size_mib": vm.memory_mib,
        "power_state": vm.power_state,
        "power_state_mechanism": {"mechanism": "HARD"},
        "machine_type": vm.machine_type,
        "hardware_clock_timezone": "UTC",
        "boot_config": {
            "boot_type": vm.boot_type,
            "boot_device_order_list": ["CDROM", "DISK", "NETWORK"],
        },
        "disk_list": [_disk(sim, vm, d) for d in vm.disks],
        "nic_list": nics,
        "gpu_list": [],
        "serial_port_list": [],
        "vga_console_enabled": True,
        "guest_tools": {"nutanix_guest_tools": ngt},
    }
    if vm.boot_type != "LEGACY":
        res["boot_config"].pop("boot_device_order_list")
    if status:
        res["hypervisor_type"] = "AHV"
        res["protection_type"] = "UNPROTECTED"
        res["host_reference"] = _ref("host", sim.clusters[vm.cluster_uuid].uuid)
        for d in res["disk_list"]:
            d["is_migration_in_progress"] = False
    return res


def render_vm(sim: Simulator, vm: Vm) -> dict[str, Any]:
    cluster = sim.clusters[vm.cluster_uuid]
    cref = _ref("cluster", cluster.uuid, cluster.name)
    status: dict[str, Any] = {
        "name": vm.name,
        "description": vm.description,
        "state": sim.entity_state(vm.task_uuid, vm.failed),
        "cluster_reference": cref,
        "resources": _vm_resources(sim, vm, status=True),
        "execution_context": _exec_ctx(vm.task_uuid),
    }
    if status["state"] == "ERROR":
        status["message_list"] = [{"message": vm.failed or "", "reason": "INTERNAL_ERROR"}]
    return {
        "api_version": API_VERSION,
        "metadata": _metadata("vm", vm.uuid, created=vm.created, updated=vm.updated,
                              spec_version=vm.spec_version, extra={"entity_version": "1"}),
        "spec": {
            "name": vm.name,
            "description": vm.description,
            "cluster_reference": cref,
            "resources": _vm_resources(sim, vm, status=False),
        },
        "status": status,
    }


def render_image(sim: Simulator, image: Image, *, base_url: str) -> dict[str, Any]:
    state = sim.entity_state(image.task_uuid, image.failed)
    resources: dict[str, Any] = {"image_type": image.image_type, "architecture": "X86_64"}
    if image.source_uri:
        resources["source_uri"] = image.source_uri
    spec_resources = dict(resources)
    status_res = dict(resources)
    if image.size is not None:
        status_res["size_bytes"] = image.size
        status_res["retrieval_uri_list"] = [f"{base_url}/api/nutanix/v3/images/{image.uuid}/file"]
    status_res["current_cluster_reference_list"] = [
        _ref("cluster", c.uuid) for c in sim.clusters.values()
    ] if image.size is not None else []
    status: dict[str, Any] = {
        "name": image.name,
        "description": image.description,
        "state": state,
        "resources": status_res,
        "execution_context": _exec_ctx(image.task_uuid),
    }
    if state == "ERROR":
        status["message_list"] = [{"message": image.failed or "", "reason": "INTERNAL_ERROR"}]
    return {
        "api_version": API_VERSION,
        "metadata": _metadata("image", image.uuid, created=image.created, updated=image.updated),
        "spec": {"name": image.name, "description": image.description,
                 "resources": spec_resources},
        "status": status,
    }


def render_task(sim: Simulator, task: Task) -> dict[str, Any]:
    state, pct = sim.task_progress(task)
    out: dict[str, Any] = {
        "api_version": API_VERSION,
        "uuid": task.uuid,
        "status": state,
        "operation_type": task.operation_type,
        "percentage_complete": pct,
        "progress_message": f"{task.operation_type} {state.lower()}",
        "entity_reference_list": [_ref(task.entity_kind, task.entity_uuid, task.entity_name)],
        "subtask_reference_list": [],
        "creation_time": rfc3339(task.created),
        "creation_time_usecs": int(task.created * 1e6),
        "last_update_time": rfc3339(task.created + (task.duration if state in
                                                    ("SUCCEEDED", "FAILED") else 0)),
        "logical_timestamp": {"QUEUED": 1, "RUNNING": 2}.get(state, 3),
    }
    if state != "QUEUED":
        out["start_time"] = rfc3339(task.created)
        out["start_time_usecs"] = int(task.created * 1e6)
    if state in ("SUCCEEDED", "FAILED"):
        done = task.created + task.duration
        out["completion_time"] = rfc3339(done)
        out["completion_time_usecs"] = int(done * 1e6)
    if state == "FAILED":
        out["error_code"] = task.error_code or "INTERNAL_ERROR"
        out["error_detail"] = task.error or ""
    if task.cluster_uuid:
        out["cluster_reference"] = _ref("cluster", task.cluster_uuid)
    return out


def render_snapshot(sim: Simulator, snap: VmSnapshot) -> dict[str, Any]:
    """A PE ``vm_snapshot`` (not in the PC Swagger; shape from third-party clients, doc 2.2)."""
    state = sim.entity_state(snap.task_uuid, snap.failed)
    spec: dict[str, Any] = {
        "name": snap.name,
        "snapshot_type": snap.snapshot_type,
        "resources": {"entity_uuid": snap.vm_uuid},
    }
    if snap.expiration_time_msecs is not None:
        spec["expiration_time_msecs"] = snap.expiration_time_msecs
    status: dict[str, Any] = {
        **spec,
        "state": state,
        "creation_time_usecs": int(snap.created * 1e6),
        "execution_context": _exec_ctx(snap.task_uuid),
        "snapshot_file_list": [
            {"file_path": f.file_path, "snapshot_file_path": f.snapshot_file_path}
            for f in snap.files
        ] if state == "COMPLETE" else [],
    }
    if state == "ERROR":
        status["message_list"] = [{"message": snap.failed or "", "reason": "INTERNAL_ERROR"}]
    return {
        "api_version": API_VERSION,
        "metadata": _metadata("vm_snapshot", snap.uuid, created=snap.created,
                              updated=snap.created),
        "spec": spec,
        "status": status,
    }


def render_subnet(sim: Simulator, s: Subnet) -> dict[str, Any]:
    cluster = sim.clusters[s.cluster_uuid]
    resources: dict[str, Any] = {"subnet_type": "VLAN", "vlan_id": s.vlan_id,
                                 "vswitch_name": "br0"}
    if s.cidr:
        net, _, prefix = s.cidr.partition("/")
        head = net.rsplit(".", 1)[0]
        resources["ip_config"] = {"subnet_ip": net, "prefix_length": int(prefix),
                                  "default_gateway_ip": f"{head}.1",
                                  "pool_list": [{"range": f"{head}.10 {head}.250"}]}
    cref = _ref("cluster", cluster.uuid, cluster.name)
    return {
        "api_version": API_VERSION,
        "metadata": _metadata("subnet", s.uuid, created=0, updated=0),
        "spec": {"name": s.name, "resources": resources, "cluster_reference": cref},
        "status": {"name": s.name, "state": "COMPLETE", "resources": resources,
                   "cluster_reference": cref},
    }


def render_user(sim: Simulator, user: User) -> dict[str, Any]:
    return {
        "api_version": API_VERSION,
        "metadata": _metadata("user", user.uuid, created=0, updated=0),
        "spec": {"resources": {}},
        "status": {
            "name": user.name,
            "state": "COMPLETE",
            "resources": {
                "display_name": user.name,
                "user_type": "LOCAL",
                "access_control_policy_reference_list": [],
                "projects_reference_list": [],
                "roles": [user.role],
            },
        },
    }
