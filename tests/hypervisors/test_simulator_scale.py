"""Snapshot cost does not depend on disk size: a 100 GiB disk snapshotted 100 times via the API."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio
from tests.hypervisors.conftest import V3

from ahvbackup.hypervisors.ahv.simulator import Simulator

GiB, MiB = 1 << 30, 1 << 20


def _allocated(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


async def test_a_100_gib_sparse_disk_snapshotted_100_times_stays_small_and_exact(
    sim: Simulator, pc: httpx.AsyncClient, pe: httpx.AsyncClient
) -> None:
    r = await pc.post(f"{V3}/vms", json={"spec": {"name": "huge", "resources": {
        "disk_list": [{"disk_size_bytes": 100 * GiB}]}}})
    assert r.status_code == 202, r.text
    vm = r.json()["metadata"]["uuid"]
    before = _allocated(sim.state_dir / "disks")
    snaps: list[str] = []
    with trio.fail_after(120):
        for i in range(100):
            sim.write_disk(vm, 0, i * GiB, i.to_bytes(4, "big") * 16384)  # 64 KiB per GiB
            r = await pe.post(f"{V3}/vm_snapshots", json={
                "spec": {"name": f"n{i}", "resources": {"entity_uuid": vm}}})
            assert r.status_code == 202
            snaps.append(r.json()["metadata"]["uuid"])
    grown = _allocated(sim.state_dir / "disks") - before
    # 100 writes of 64 KiB plus metadata; a copy of the disk would be 100 GiB
    assert grown < 64 * MiB, f"100 snapshots of a 100 GiB disk allocated {grown} bytes"
    await trio.sleep(sim.task_seconds * 1.5)
    vmdisk = sim.vm(vm).data_disks[0].uuid
    # snapshot k sees the writes 0..k and nothing after
    for k in (0, 49, 99):
        got = sim.read_snapshot_disk(snaps[k], vmdisk, k * GiB, 8)
        assert got == k.to_bytes(4, "big") * 2
        if k < 99:
            assert sim.read_snapshot_disk(snaps[k], vmdisk, (k + 1) * GiB, 8) == bytes(8)
    first = (await pe.get(f"{V3}/vm_snapshots/{snaps[0]}")).json()
    last = (await pe.get(f"{V3}/vm_snapshots/{snaps[-1]}")).json()
    r = await pe.post(f"{V3}/data/changed_regions", json={
        "snapshot_file_path": last["status"]["snapshot_file_list"][0]["snapshot_file_path"],
        "reference_snapshot_file_path":
            first["status"]["snapshot_file_list"][0]["snapshot_file_path"]})
    regions = r.json()["region_list"]
    assert [x["offset"] for x in regions] == [i * GiB for i in range(1, 100)]
    assert all(x["length"] == 65536 and x["type"] == "REGULAR" for x in regions)
    assert r.json()["file_size"] == 100 * GiB
    assert sim.stats.peak_concurrent_snapshot_creations >= 2
    with trio.fail_after(120):
        for uuid in snaps:
            assert (await pe.delete(f"{V3}/vm_snapshots/{uuid}")).status_code == 202
    assert sim.store.snapshots(vmdisk) == []
    assert os.path.getsize(sim.state_dir / "inventory.json") < 256 * 1024
