"""The demo inventory a new simulator starts with.

Deterministic (the same names, UUIDs and bytes every time) so that docs, demos and restore checks
can name them; small (a few MiB written) so that the first start is fast; and varied: multi-disk
VMs, a large sparse disk, VMs with and without Nutanix Guest Tools.
"""

from __future__ import annotations

__all__ = ["seed_inventory", "seed_pattern"]

import random
import time
import uuid as uuidlib
from typing import TYPE_CHECKING

from .model import Cluster, Container, Disk, Nic, Subnet, Vm

if TYPE_CHECKING:
    from .simulator import Simulator

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# name, power, (ngt installed, enabled, capabilities), disks: (size, [(offset, length)] written)
_Extents = list[tuple[int, list[tuple[int, int]]]]
_VMS: list[tuple[str, str, tuple[bool, bool, list[str]], _Extents]] = [
    ("web-01", "ON", (True, True, ["VSS_SNAPSHOT"]), [
        (1 * GiB, [(0, 1 * MiB), (300 * MiB, 512 * KiB)]),
        (512 * MiB, [(4 * MiB, 256 * KiB), (511 * MiB, 1 * MiB)]),
    ]),
    ("db-01", "ON", (True, True, ["VSS_SNAPSHOT", "SELF_SERVICE_RESTORE"]), [
        (1 * GiB, [(0, 512 * KiB)]),
        (8 * GiB, [(0, 256 * KiB), (2 * GiB, 1 * MiB), (5 * GiB + 64 * KiB, 192 * KiB),
                   (8 * GiB - 512 * KiB, 512 * KiB)]),
        (256 * MiB, [(128 * MiB, 128 * KiB)]),
    ]),
    ("app-01", "ON", (False, False, []), [
        (2 * GiB, [(0, 768 * KiB), (1 * GiB, 256 * KiB)]),
    ]),
    ("tiny-01", "OFF", (True, True, []), [
        (16 * MiB, [(0, 1 * MiB), (8 * MiB + 4 * KiB, 100 * KiB)]),
    ]),
]


def seed_pattern(vm_name: str, disk_index: int, offset: int, length: int) -> bytes:
    """The bytes the seed wrote at ``offset`` (restore checks can recompute them)."""
    return random.Random(f"{vm_name}/{disk_index}/{offset}").randbytes(length)


class _Ids:
    def __init__(self, seed: str) -> None:
        self._rng = random.Random(seed)

    def uuid(self) -> str:
        return str(uuidlib.UUID(int=self._rng.getrandbits(128), version=4))

    def mac(self) -> str:
        return "50:6b:8d:" + ":".join(f"{self._rng.randrange(256):02x}" for _ in range(3))


def seed_inventory(sim: Simulator, *, pe_count: int, with_vms: bool) -> None:
    """Fill an empty simulator: PC, ``pe_count`` clusters with containers and subnets, users,
    and (``with_vms``) the demo VMs with their disk contents."""
    ids = _Ids("ahvbackup-simulator")
    sim.pc_uuid = ids.uuid()
    sim.seed_users()
    clusters: list[Cluster] = []
    for n in range(pe_count):
        c = Cluster(
            uuid=ids.uuid(),
            name=f"sim-cluster-{n + 1}",
            external_ip=f"127.0.0.{n + 2}",
            dsip=f"127.0.0.{n + 102}",
            cluster_id=5_000_000 + 1000 * n + 1,
            incarnation=1_700_000_000 + n,
            containers=[
                Container(ids.uuid(), "default-container"),
                Container(ids.uuid(), "SelfServiceContainer"),
            ],
        )
        sim.clusters[c.uuid] = c
        clusters.append(c)
        for name, vlan in (("vlan0", 0), ("backup-net", 100)):
            s = Subnet(ids.uuid(), name if n == 0 else f"{name}-{n + 1}", vlan, c.uuid,
                       cidr=f"10.{vlan + 10 + n}.0.0/24")
            sim.subnets[s.uuid] = s
    if not with_vms:
        return
    vms = list(_VMS)
    for n in range(1, pe_count):
        vms.append((f"edge-{n + 1:02d}", "ON", (False, False, []), [(64 * MiB, [(0, 256 * KiB)])]))
    for vm_no, (name, power, (installed, enabled, caps), disks) in enumerate(vms):
        cluster = clusters[0] if vm_no < len(_VMS) else clusters[vm_no - len(_VMS) + 1]
        subnets = [s for s in sim.subnets.values() if s.cluster_uuid == cluster.uuid]
        vm = Vm(
            uuid=ids.uuid(),
            name=name,
            cluster_uuid=cluster.uuid,
            description=f"seeded demo VM {name}",
            num_sockets=2 if name == "db-01" else 1,
            memory_mib=4096 if name == "db-01" else 1024,
            power_state=power,
            boot_type="UEFI" if name in ("web-01", "db-01") else "LEGACY",
            ngt_installed=installed,
            ngt_enabled=enabled,
            ngt_capabilities=list(caps),
            nics=[Nic(ids.uuid(), ids.mac(), subnets[0].uuid, f"10.10.0.{10 + vm_no}")],
            created=time.time(),
        )
        vm.updated = vm.created
        for i, (size, _) in enumerate(disks):
            vm.disks.append(Disk(
                uuid=ids.uuid(), device_type="DISK", adapter_type="SCSI", device_index=i,
                size=size, container_uuid=cluster.containers[0].uuid,
            ))
        if name == "web-01":
            vm.disks.append(Disk(
                uuid=ids.uuid(), device_type="CDROM", adapter_type="IDE", device_index=0,
                size=0, container_uuid=cluster.containers[0].uuid,
            ))
        for disk in vm.disks:
            if disk.device_type == "DISK":
                sim.store.create_disk(disk.uuid, disk.size)
        for i, (_, extents) in enumerate(disks):
            for offset, length in extents:
                sim.store.write(vm.disks[i].uuid, offset, seed_pattern(name, i, offset, length))
        sim.vms[vm.uuid] = vm
