"""A backed-up VM's recorded configuration read into what a restore recreates.

The manifest keeps the VM as the API of its backup gave it: a v3 intent entity
(`metadata`/`spec`/`status`) or a v4 `vmm.v4.ahv.config.Vm`. Which one it is shows in the
record itself, so a v3 backup restores through a v4 session and the other way round.
"""

from __future__ import annotations

__all__ = ["is_v4_vm", "vm_shape"]

from collections.abc import Mapping
from typing import Any

from ahvbackup.core.drivers import NicShape, VmShape

_MiB = 1 << 20


def is_v4_vm(config: Mapping[str, Any]) -> bool:
    return str(config.get("$objectType", "")).startswith("vmm.v4.") or "extId" in config


def vm_shape(config: Mapping[str, Any]) -> VmShape:
    return _v4_shape(config) if is_v4_vm(config) else _v3_shape(config)


def _v4_shape(config: Mapping[str, Any]) -> VmShape:
    """A v4 `Vm`: sockets, cores, `memorySizeBytes`, `bootConfig` by its `$objectType`."""
    boot = config.get("bootConfig") or {}
    kind = str(boot.get("$objectType", ""))
    boot_type = ("SECURE_BOOT" if boot.get("isSecureBootEnabled") else "UEFI") \
        if kind.endswith("UefiBoot") else ("LEGACY" if kind.endswith("LegacyBoot") else "")
    nics = tuple(
        NicShape(network_uuid=str(((n.get("networkInfo") or {}).get("subnet") or {}).get(
                     "extId") or ""),
                 mac=(n.get("backingInfo") or {}).get("macAddress") or None)
        for n in config.get("nics") or [] if isinstance(n, Mapping))
    return VmShape(
        cluster_uuid=str((config.get("cluster") or {}).get("extId") or ""),
        sockets=int(config.get("numSockets") or 1),
        cores_per_socket=int(config.get("numCoresPerSocket") or 1),
        memory_mib=int(config.get("memorySizeBytes") or 1 << 30) // _MiB,
        boot_type=boot_type, machine_type=str(config.get("machineType") or ""),
        nics=nics, description=str(config.get("description") or ""),
    )


def _v3_shape(config: Mapping[str, Any]) -> VmShape:
    """A v3 VM entity (`spec`, else `status`)."""
    spec = config.get("spec") or config.get("status") or {}
    res = spec.get("resources") or {}
    nics = tuple(
        NicShape(network_uuid=str((n.get("subnet_reference") or {}).get("uuid") or ""),
                 mac=n.get("mac_address") or None)
        for n in res.get("nic_list") or [] if isinstance(n, Mapping))
    cref = spec.get("cluster_reference") or (config.get("status") or {}).get(
        "cluster_reference") or {}
    return VmShape(
        cluster_uuid=str(cref.get("uuid") or ""),
        sockets=int(res.get("num_sockets") or 1),
        cores_per_socket=int(res.get("num_vcpus_per_socket") or 1),
        memory_mib=int(res.get("memory_size_mib") or 1024),
        boot_type=str((res.get("boot_config") or {}).get("boot_type") or ""),
        machine_type=str(res.get("machine_type") or ""),
        nics=nics, description=str(spec.get("description") or ""),
    )
