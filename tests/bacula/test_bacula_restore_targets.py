"""Restores through Bacula into any installed restore target, against the served simulator with
two clusters: the whitepaper's alternate-cluster FileSet (8.3) as written, through the
metaplugin backend, makes a VM from a chain on the other cluster over iSCSI; the example
third-party target works through Bacula with no Bacula code of its own; the bpipe writer
makes a VM over REST from one disk stream."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from harness import Backend
from test_bacula_chain_restore import backup, restore_session
from test_bacula_jobs import opened, prism_params
from test_bpipe_commands import write_config
from tests.conftest import require_peer
from tests.e2e.test_restore_ahv import ADMIN, SRC, Dr, restored
from tests.e2e.test_restore_ahv import dr as two_clusters  # noqa: F401 - a fixture

from ahvbackup.core.containment import safe_name

Spawn = Callable[..., Backend]
AHVBACKUP = Path(sys.executable).with_name("ahvbackup")


async def test_the_whitepapers_fileset_8_3_restores_a_chain_to_the_other_cluster(
        two_clusters: Dr, spawn: Spawn, base_params: list[str],  # noqa: F811 - the fixture
        tmp_path: Path) -> None:
    dr = two_clusters
    full, _ = await backup(dr.world, vm=SRC, iscsi_port=str(dr.iscsi_port))
    dr.sim.write_disk(dr.src.uuid, 1, 0, b"\x77" * 65536)
    inc, inc_id = await backup(dr.world, vm=SRC, iscsi_port=str(dr.iscsi_port),
                               level="incremental")
    expect = dr.disks_now()
    c2 = dr.cluster(1)
    # FileSet 8.3 of the whitepaper, with our plugin name (and no target= in it)
    fileset_8_3 = ["mode=restore", "target_cluster=sim-cluster-2",
                   f"target_container={c2.containers[0].name}",
                   "network_map=10.10.0.0/24=10.11.0.0/24", "power_on=yes",
                   "restore_vm_name=prod-vm-dr-copy"]
    params = [*prism_params(dr.world, base_params, **ADMIN), f"iscsi_port={dr.iscsi_port}",
              *fileset_8_3]
    answers, said = await trio.to_thread.run_sync(restore_session, spawn, params,
                                                  tmp_path / "where", [*inc, *full])
    assert answers == ["OK"] * 6
    assert not any(m.startswith(("E ", "Q ")) for m in said), said
    vm = restored(dr, "prod-vm-dr-copy")
    assert any(f"VM restored: {SRC} backup {inc_id} (2 disk(s)) to {vm.uuid}" in m
               for m in said), said
    assert vm.cluster_uuid == c2.uuid
    assert vm.power_state == "ON"
    assert [dr.sim.subnets[n.subnet_uuid].cidr for n in vm.nics] == ["10.11.0.0/24"]
    disks = sorted(vm.data_disks, key=lambda x: x.device_index)
    for disk in disks:
        assert disk.container_uuid == c2.containers[0].uuid
        got = dr.sim.read_disk(vm.uuid, vm.data_disks.index(disk), 0, disk.size)
        assert got == expect[disk.device_index], disk.device_index
    assert dr.leftovers() == ["vm prod-vm-dr-copy"]  # no volume group, no image
    assert dr.ledger() == []
    assert not list((dr.world.tmp / "where").rglob("*.raw"))


async def test_a_third_party_target_works_through_bacula(
        two_clusters: Dr, spawn: Spawn, base_params: list[str],  # noqa: F811 - the fixture
        tmp_path: Path) -> None:
    dr = two_clusters
    files, _ = await backup(dr.world, vm=SRC)
    where = tmp_path / "where"
    params = [*prism_params(dr.world, base_params), "target=sha256"]
    answers, said = await trio.to_thread.run_sync(restore_session, spawn, params, where, files)
    assert answers == ["OK"] * 3, said
    cluster = safe_name(dr.cluster(0).name)
    for i, data in enumerate(dr.disks_now()):
        out = where / "@ahvbackup" / cluster / SRC / f"scsi.{i}.sha256"
        assert out.read_text().split()[0] == hashlib.sha256(data).hexdigest()


async def test_a_cancelled_restore_to_ahv_leaves_nothing(
        two_clusters: Dr, spawn: Spawn, base_params: list[str],  # noqa: F811 - the fixture
        tmp_path: Path) -> None:
    dr = two_clusters
    files, _ = await backup(dr.world, vm=SRC)
    before = dr.leftovers()
    dr.sim.faults.add(method="PUT", path=r"/images/.*/file", latency=1.5, count=None)
    params = [*prism_params(dr.world, base_params, **ADMIN), "data_path=rest",
              "restore_vm_name=cancelled"]

    def scenario() -> int:
        r = opened(spawn, params, kind="R", where=str(tmp_path / "where"))
        r.start("RestoreStart")
        for f in files:
            assert r.restore(f"{tmp_path / 'where'}{f.fname}", f.data).text == "OK"
        r.command("FINISH")
        deadline = time.monotonic() + 30
        while not dr.sim.images:  # the VM exists and its disks are being uploaded
            assert time.monotonic() < deadline, "the restore never staged a disk"
            time.sleep(0.05)
        r.signal(signal.SIGUSR1)  # bconsole: cancel jobid=N
        code = r.wait(30)
        r.check_stderr()
        return code

    assert await trio.to_thread.run_sync(scenario) == 0
    assert dr.leftovers() == before  # no VM, no image
    assert dr.ledger() == []
    assert not list((dr.world.tmp / "work").glob("ahvbackup-restore-*")), "spool left"


@pytest.mark.peer
async def test_a_chain_restores_to_qcow2_through_bacula(
        two_clusters: Dr, spawn: Spawn, base_params: list[str],  # noqa: F811 - the fixture
        tmp_path: Path) -> None:
    qemu_img = require_peer("qemu-img", "qemu-nbd")["qemu-img"]
    dr = two_clusters
    full, _ = await backup(dr.world, vm=SRC)
    dr.sim.write_disk(dr.src.uuid, 0, 4096, b"\x42" * 8192)
    inc, _ = await backup(dr.world, vm=SRC, level="incremental")
    where = tmp_path / "where"
    params = [*prism_params(dr.world, base_params), "target=qcow2"]
    answers, said = await trio.to_thread.run_sync(restore_session, spawn, params, where,
                                                  [*full, *inc])
    assert answers == ["OK"] * 6, said
    folder = where / "@ahvbackup" / safe_name(dr.cluster(0).name) / SRC
    for i, data in enumerate(dr.disks_now()):
        raw = tmp_path / f"disk{i}.raw"
        raw.write_bytes(data)
        same = subprocess.run([qemu_img, "compare", "-f", "qcow2", "-F", "raw",
                               str(folder / f"scsi.{i}.qcow2"), str(raw)],
                              capture_output=True, text=True, check=False)
        assert same.returncode == 0, same.stdout + same.stderr


async def test_the_bpipe_writer_makes_a_vm_over_rest(
        two_clusters: Dr, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    dr = two_clusters
    files, _ = await backup(dr.world, vm=SRC)
    stream = next(f.data for f in files if f.fname.endswith("/scsi.0.ahvd"))
    conf = write_config(dr.world, tmp_path / "ahvbackup.conf", **ADMIN)
    args = [str(AHVBACKUP), "bpipe", "restore", "-c", str(conf), "--where", str(tmp_path / "w"),
            "-o", "target=ahv", "-o", "data_path=rest", "-o", "restore_vm_name=from-bpipe"]
    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        args, input=stream, capture_output=True, timeout=120, check=False))
    assert done.returncode == 0, done.stderr.decode()
    vm = restored(dr, "from-bpipe")
    assert f"(VM {vm.uuid})" in done.stdout.decode()
    # the VM's shape from the backup's manifest, which this host recorded when it sent it
    assert (vm.num_sockets, vm.num_vcpus_per_socket, vm.memory_mib) == (2, 2, 2048)
    (disk,) = vm.data_disks
    assert dr.sim.read_disk(vm.uuid, 0, 0, disk.size) == dr.disks_now()[0]
    assert dr.leftovers() == ["vm from-bpipe"]
