"""Restores to AHV (`target=ahv`) against the served simulator with two clusters: VMs made
from a backup over iSCSI and over REST, on the same cluster and on the other one, read back
through the simulator; refusals that create nothing; failures and cancellations that leave
nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.drivers import ClusterAccess
from ahvbackup.core.errors import AhvBackupError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, RestoreOutcome, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.ledger import ReleaseStack
from ahvbackup.core.testing import check_restore_target
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator
from ahvbackup.hypervisors.ahv.simulator.model import Disk, Nic, Vm

KiB = 1 << 10
SRC = "src-01"
MAC = "50:6b:8d:aa:bb:cc"
ADMIN = {"user": "admin", "password": "nutanix/4u"}
# disk sizes and (offset, length) extents of data
LAYOUT = [(2 * MiB, [(0, 300 * KiB), (MiB + 4 * KiB, 100 * KiB)]), (MiB, [(512 * KiB, 256 * KiB)])]


@dataclass
class Dr:
    world: World
    iscsi_port: int
    src: Vm

    @property
    def sim(self) -> Simulator:
        return self.world.sim

    def cluster(self, n: int) -> Any:
        return list(self.sim.clusters.values())[n]

    def subnet(self, name: str) -> Any:
        return next(s for s in self.sim.subnets.values() if s.name == name)

    def config(self, **extra: Any) -> Any:
        return self.world.config(iscsi_port=self.iscsi_port, **extra)

    async def backup(self, level: str = "full") -> None:
        cfg = self.config(vm=SRC, level=level)
        result = await BackupJob(Runtime.from_config(cfg)).run()
        assert result.ok, result.to_json()

    def disks_now(self) -> list[bytes]:
        return [self.sim.read_disk(self.src.uuid, i, 0, size)
                for i, (size, _) in enumerate(LAYOUT)]

    async def restore(self, *, backup_id: str | None = None, progress: Any = None,
                      **extra: Any) -> RestoreOutcome:
        keys = {"target": "ahv", **ADMIN, **extra}
        rt = Runtime.from_config(self.config(**keys))
        backup = await pick_backup(rt, vm=SRC, backup_id=backup_id)
        job = RestoreJob(rt, backup, dest=self.world.tmp / "unused", progress=progress,
                         disks=rt.config.restore_disks_only)
        return await job.run()

    def leftovers(self) -> list[str]:
        """What a restore may have made: volume groups, images, VMs other than the seed's."""
        sim = self.sim
        return sorted([f"volume group {g.name}" for g in sim.volume_groups.groups.values()]
                      + [f"image {i.name}" for i in sim.images.values()]
                      + [f"vm {v.name}" for v in sim.vms.values() if v.uuid not in self.seeded])

    seeded: frozenset[str] = frozenset()

    def ledger(self) -> list[Path]:
        return sorted((self.world.tmp / "state" / "ledger").glob("*.json"))


@pytest.fixture
async def dr(tmp_path: Path) -> AsyncIterator[Dr]:
    sim = Simulator(tmp_path / "sim", seed=True, pe_count=2, task_seconds=0.02, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0) as ep:
            assert ep.ca_path is not None
            (port,) = {p for _, p in ep.iscsi_portals.values()}  # one port, on each DSIP
            world = World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path, tmp=tmp_path)
            c1 = next(iter(sim.clusters.values()))
            vlan0 = next(s for s in sim.subnets.values() if s.name == "vlan0")
            src = Vm(uuid=str(uuid.uuid4()), name=SRC, cluster_uuid=c1.uuid, num_sockets=2,
                     num_vcpus_per_socket=2, memory_mib=2048, boot_type="UEFI",
                     machine_type="Q35", power_state="ON",
                     nics=[Nic(uuid=str(uuid.uuid4()), mac=MAC, subnet_uuid=vlan0.uuid)],
                     disks=[Disk(uuid=str(uuid.uuid4()), device_type="DISK",
                                 adapter_type="SCSI", device_index=i, size=size,
                                 container_uuid=c1.containers[0].uuid)
                            for i, (size, _) in enumerate(LAYOUT)])
            sim.create_vm(src)
            for i, (_, extents) in enumerate(LAYOUT):
                for off, length in extents:
                    sim.write_disk(src.uuid, i, off, os.urandom(length))
            d = Dr(world, port, src)
            d.seeded = frozenset(sim.vms)
            yield d
    finally:
        sim.close()


def restored(d: Dr, name: str) -> Vm:
    (vm,) = [v for v in d.sim.vms.values() if v.name == name]
    return vm


def assert_disks(d: Dr, vm: Vm, expect: list[bytes], *, container: str,
                 labels: tuple[int, ...] = (0, 1)) -> None:
    disks = sorted(vm.data_disks, key=lambda x: x.device_index)
    assert [x.device_index for x in disks] == list(labels)
    for disk in disks:
        want = expect[disk.device_index]
        assert disk.size == len(want)
        assert disk.container_uuid == container
        got = d.sim.read_disk(vm.uuid, vm.data_disks.index(disk), 0, disk.size)
        assert got == want, f"disk {disk.device_index} differs"


async def test_a_vm_restores_to_both_clusters_over_iscsi_and_rest(dr: Dr) -> None:
    await dr.backup()
    expect = dr.disks_now()
    c1, c2 = dr.cluster(0), dr.cluster(1)
    cases = [
        # same cluster, iSCSI, defaults: "<name>-restored", the source's shape, new MACs
        ({"data_path": "iscsi"}, f"{SRC}-restored", c1, "vlan0", c1.containers[0], False),
        # same cluster, REST, every knob
        ({"data_path": "rest", "restore_vm_name": "same-rest", "vcpu": 3, "memory_mib": 512,
          "target_container": "SelfServiceContainer", "network_map": "vlan0=backup-net",
          "power_on": "yes"}, "same-rest", c1, "backup-net", c1.containers[1], True),
        # the other cluster by name, iSCSI, subnet mapped by CIDR
        ({"data_path": "iscsi", "restore_vm_name": "dr-iscsi", "target_cluster": c2.name,
          "network_map": "10.10.0.0/24=vlan0-2", "power_on": "yes"},
         "dr-iscsi", c2, "vlan0-2", c2.containers[0], True),
        # the other cluster by UUID, REST (auto would pick iSCSI), subnet mapped by UUID
        ({"data_path": "rest", "restore_vm_name": "dr-rest", "target_cluster": c2.uuid,
          "target_container": c2.containers[1].uuid,
          "network_map": f"{dr.subnet('vlan0').uuid}={dr.subnet('backup-net-2').uuid}"},
         "dr-rest", c2, "backup-net-2", c2.containers[1], False),
    ]
    for keys, name, cluster, subnet, container, power in cases:
        out = await dr.restore(**keys)
        assert out.ok, out.to_json()
        vm = restored(dr, name)
        assert out.path == vm.uuid
        assert vm.cluster_uuid == cluster.uuid, name
        assert_disks(dr, vm, expect, container=container.uuid)
        cpu = (keys["vcpu"], 1) if "vcpu" in keys else (2, 2)
        assert (vm.num_sockets, vm.num_vcpus_per_socket) == cpu, name
        assert vm.memory_mib == int(keys.get("memory_mib", 2048))
        assert (vm.boot_type, vm.machine_type) == ("UEFI", "Q35")
        assert [dr.sim.subnets[n.subnet_uuid].name for n in vm.nics] == [subnet]
        assert vm.nics[0].mac != MAC  # the original VM still exists (or another cluster)
        assert vm.power_state == ("ON" if power else "OFF"), name
        # the staging is gone, the VM stays, the ledger is clean
        assert dr.leftovers() == sorted(f"vm {n}" for n in _names_so_far(cases, name))
        assert dr.ledger() == []


def _names_so_far(cases: list[Any], upto: str) -> list[str]:
    names = [c[1] for c in cases]
    return names[: names.index(upto) + 1]


async def test_the_original_macs_are_kept_on_the_same_cluster_when_the_vm_is_gone(
        dr: Dr) -> None:
    await dr.backup()
    dr.sim.delete_vm(dr.src.uuid)
    out = await dr.restore(restore_vm_name="back")
    assert out.ok, out.to_json()
    assert [n.mac for n in restored(dr, "back").nics] == [MAC]


async def test_a_point_in_the_middle_of_a_chain_restores_as_that_point(dr: Dr) -> None:
    await dr.backup()
    dr.sim.write_disk(dr.src.uuid, 0, 64 * KiB, os.urandom(128 * KiB))
    await dr.backup("incremental")
    middle_id = (await Runtime.from_config(dr.config()).sink.backups(SRC))[-1].backup_id
    middle = dr.disks_now()
    dr.sim.write_disk(dr.src.uuid, 0, 0, os.urandom(64 * KiB))
    dr.sim.write_disk(dr.src.uuid, 1, 0, os.urandom(64 * KiB))
    await dr.backup("incremental")
    assert dr.disks_now() != middle
    out = await dr.restore(backup_id=middle_id, restore_vm_name="mid")  # data_path=auto
    assert out.ok, out.to_json()
    assert [d.chain[-1] for d in out.disks] == [middle_id, middle_id]
    assert len(out.disks[0].chain) == 2
    assert_disks(dr, restored(dr, "mid"), middle, container=dr.cluster(0).containers[0].uuid)


async def test_restore_disks_only_makes_a_vm_with_those_disks(dr: Dr) -> None:
    await dr.backup()
    expect = dr.disks_now()
    out = await dr.restore(restore_vm_name="only-1", restore_disks_only="disk-1")
    assert out.ok, out.to_json()
    assert [d.label for d in out.disks] == ["scsi.1"]
    assert_disks(dr, restored(dr, "only-1"), expect,
                 container=dr.cluster(0).containers[0].uuid, labels=(1,))


@pytest.mark.parametrize(("keys", "said"), [
    ({"target_cluster": "sim-cluster-2"},
     "network_map: NIC 0 is on subnet 'vlan0'"),
    ({"restore_vm_name": "web-01"},
     "restore_vm_name: a VM named 'web-01' already exists on cluster sim-cluster-1"),
    ({"user": "backup", "password": "backup/4u"},
     "lacks permission for POST /vms (403)"),
    ({"target_cluster": "nowhere"}, "target_cluster: no cluster 'nowhere'"),
    ({"network_map": "vlan0=vlan0-2"}, "network_map: vlan0=vlan0-2: cluster sim-cluster-1 "
                                       "has no subnet 'vlan0-2'"),
])
async def test_a_refusal_is_one_line_and_creates_nothing(dr: Dr, keys: dict[str, str],
                                                          said: str) -> None:
    await dr.backup()
    before = dr.leftovers()
    with pytest.raises(AhvBackupError) as err:
        await dr.restore(**keys)
    text = str(err.value)
    assert said in text and "\n" not in text, text
    if "403" in said:
        assert "Create_Virtual_Machine" in text
    assert dr.leftovers() == before
    assert dr.ledger() == []


@pytest.mark.parametrize(("fault", "path"), [
    ({"method": "POST", "path": r"/api/nutanix/v3/vms$", "task_fail": True}, "iscsi"),
    ({"method": "PUT", "path": r"/api/nutanix/v3/vms/", "status": 500, "count": None}, "iscsi"),
    ({"method": "PUT", "path": r"/api/nutanix/v3/vms/", "status": 500, "count": None}, "rest"),
])
async def test_a_failure_at_vm_create_or_commit_leaves_nothing(dr: Dr, fault: dict[str, Any],
                                                               path: str) -> None:
    await dr.backup()
    before = dr.leftovers()
    dr.sim.faults.add(**fault)
    try:
        out = await dr.restore(data_path=path)
    except AhvBackupError:
        pass
    else:
        assert not out.ok
    dr.sim.faults.clear()
    assert dr.leftovers() == before
    assert dr.ledger() == []


@pytest.mark.parametrize("path", ["iscsi", "rest"])
async def test_a_cancel_mid_write_leaves_nothing(dr: Dr, path: str) -> None:
    await dr.backup()
    before = dr.leftovers()
    with trio.CancelScope() as scope:
        def cancel_at_first_bytes(n: int) -> None:
            assert dr.leftovers() != before  # the staging exists: the restore is writing
            scope.cancel()

        await dr.restore(data_path=path, progress=cancel_at_first_bytes)
    assert scope.cancelled_caught
    assert dr.leftovers() == before
    assert dr.ledger() == []


@pytest.mark.parametrize("path", ["iscsi", "rest"])
async def test_the_ahv_target_passes_the_restore_target_check(dr: Dr, path: str,
                                                              tmp_path: Path) -> None:
    cfg = dr.config(target="ahv", data_path=path, target_cluster="sim-cluster-1", **ADMIN)
    rt = Runtime.from_config(cfg)
    sim = dr.sim

    def matches(location: str, data: bytes) -> bool:
        vm_uuid, label = location.split("/")
        vm = sim.vms[vm_uuid]
        (i,) = [n for n, d in enumerate(vm.data_disks)
                if f"{d.adapter_type.lower()}.{d.device_index}" == label]
        return vm.data_disks[i].size == len(data) and \
            sim.read_disk(vm_uuid, i, 0, len(data)) == data

    async with rt.hypervisor.connect() as session, \
            ReleaseStack(rt.ledger, owner="check", releaser=session.release) as stack:
        await check_restore_target(rt.target(), dest=tmp_path / "unused", matches=matches,
                                   leftovers=dr.leftovers,
                                   cluster=ClusterAccess(session=session, stack=stack))
    assert [n for n in dr.leftovers() if n.startswith(("volume group", "image"))] == []


async def test_the_command_line_restores_to_ahv(dr: Dr) -> None:
    await dr.backup()

    async def cli(*args: str, **keys: Any) -> subprocess.CompletedProcess[str]:
        sets = dr.world.cli_args(iscsi_port=dr.iscsi_port, verbose=0, **ADMIN, **keys)
        return await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "ahvbackup.core.cli", "restore", "--vm", SRC, *args, *sets],
            capture_output=True, text=True, timeout=120, check=False))

    done = await cli("--target", "ahv", restore_vm_name="cli-copy", power_on="yes")
    assert done.returncode == 0, done.stderr
    vm = restored(dr, "cli-copy")
    assert vm.power_state == "ON" and vm.uuid in done.stdout
    again = await cli(restore_vm_name="cli-copy", target="ahv")
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        "ahvbackup: error: restore_vm_name: a VM named 'cli-copy' already exists on cluster "
        "sim-cluster-1; choose another restore_vm_name"]
    assert dr.leftovers() == ["vm cli-copy"]


async def test_a_killed_restore_is_swept_by_the_next_run(dr: Dr) -> None:
    await dr.backup()
    before = dr.leftovers()
    dr.sim.faults.add(method="PUT", path=r"/images/.*/file", latency=1.5, count=1)
    sets = dr.world.cli_args(iscsi_port=dr.iscsi_port, verbose=0, data_path="rest",
                             restore_vm_name="killed", **ADMIN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ahvbackup.core.cli", "restore", "--target", "ahv", "--vm", SRC,
         *sets], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(30):
            while not any(n.startswith("image") for n in dr.leftovers()):
                await trio.sleep(0.05)
        await trio.sleep(0.3)  # the upload is under way (held by the fault's latency)
    finally:
        proc.kill()
        await trio.to_thread.run_sync(proc.wait)
    left = dr.leftovers()
    assert "vm killed" in left and any(n.startswith("image") for n in left), left
    assert dr.ledger()
    await trio.sleep(1.5)  # the server side of the killed upload ends
    out = await dr.restore(restore_vm_name="next")  # sweeps what the killed run left
    assert out.ok, out.to_json()
    assert dr.leftovers() == [*before, "vm next"]
    assert dr.ledger() == []


@pytest.mark.parametrize("path", ["iscsi", "rest"])
async def test_unaligned_ranges_and_coalesced_writes_land_exactly(dr: Dr, path: str) -> None:
    """Ranges that start or end inside a 512-byte block (read-modify-write over iSCSI), runs
    that coalesce past the 4 MiB write size, gaps and zero ranges."""
    from ahvbackup.core.drivers import RestoreRequest
    from ahvbackup.core.model import DiskInfo

    cfg = dr.config(target="ahv", data_path=path, target_cluster="sim-cluster-1", **ADMIN)
    rt = Runtime.from_config(cfg)
    size = 6 * MiB
    image = bytearray(size)
    ranges = [(100, 1000), (1500, 10), (1510, 600), (5000, 3), (8192, 5 * MiB), (6 * MiB - 7, 7)]
    async with rt.hypervisor.connect() as session, \
            ReleaseStack(rt.ledger, owner="t", releaser=session.release) as stack:
        vm = await rt.target().begin_vm(RestoreRequest(vm_name="odd", dest=dr.world.tmp),
                                        cluster=ClusterAccess(session=session, stack=stack))
        writer = await vm.open_disk(DiskInfo(uuid="d0", bus="scsi", index=0, size=size),
                                    size=size)
        for off, length in ranges:
            chunk = os.urandom(length)
            image[off:off + length] = chunk
            for pos in range(0, length, MiB):  # the job hands a run over in pieces
                await writer.write(off + pos, memoryview(chunk)[pos:pos + MiB])
            if off == 5000:
                await writer.zero(5003, 8192 - 5003)
        location = await writer.finish()
        vm_uuid = await vm.commit()
    assert location == f"{vm_uuid}/scsi.0"
    assert dr.sim.read_disk(vm_uuid, 0, 0, size) == bytes(image)


async def test_vm_keys_for_a_file_target_are_refused_not_ignored(dr: Dr) -> None:
    await dr.backup()
    with pytest.raises(AhvBackupError) as err:
        await dr.restore(target="raw", power_on="yes", target_cluster="sim-cluster-2")
    assert str(err.value).splitlines() == [
        "command line: target_cluster: shapes the VM a restore creates on a cluster "
        "(target=ahv), but target=raw writes disk images",
        "command line: power_on: shapes the VM a restore creates on a cluster (target=ahv), "
        "but target=raw writes disk images"]
    assert dr.leftovers() == []
