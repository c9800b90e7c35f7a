"""Our own Prism client against the served simulator over TLS: the backup path end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from ahvbackup.core.errors import ApiAuthError
from ahvbackup.core.secret import Secret
from ahvbackup.hypervisors.ahv.client import connect_prism
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

MiB = 1 << 20


async def test_client_snapshot_changed_regions_image_range_and_cleanup(tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "s", task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim) as ep, connect_prism(
            ep.pc_url, user="backup", password=Secret("backup/4u"), verify=str(ep.ca_path),
            rate_rpm=0,
        ) as prism:
            vms = await prism.pc.list_vms(filter="vm_name==db-01")
            assert [v.name for v in vms] == ["db-01"]
            pe = await prism.pe(vms[0].cluster_uuid)
            made = await pe.create_vm_snapshot(vms[0].uuid, name="nightly",
                                               snapshot_type="APPLICATION_CONSISTENT")
            snap = await pe.wait_vm_snapshot(made.uuid, timeout=10, poll=0.02)
            assert len(snap.files) == 3
            big = snap.files[1]
            regions = [r async for r in pe.changed_regions(big.snapshot_file_path)]
            assert sum(r.length for r in regions) == 8 << 30
            image = await prism.pc.create_image(
                "stage", source_uri=f"nfs://127.0.0.2{big.snapshot_file_path}")
            if image.task_uuid:
                await prism.pc.wait_task(image.task_uuid, timeout=10, poll=0.02)
            buf = bytearray(MiB)
            n = await prism.pc.read_image_range(image.uuid, 2 << 30, memoryview(buf))
            assert n == MiB
            disk = sim.find_vm("db-01").data_disks[1].uuid
            assert bytes(buf) == sim.read_snapshot_disk(made.uuid, disk, 2 << 30, MiB)
            await prism.pc.delete_image(image.uuid)
            await pe.delete_vm_snapshot(made.uuid)
            with pytest.raises(ApiAuthError):  # the backup role may not delete VMs
                await prism.pc.delete_vm(vms[0].uuid)
        await trio.sleep(0)
        assert sim.snapshots == {}
        assert sim.images == {}
    finally:
        sim.close()
