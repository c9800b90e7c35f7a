"""The Prism v4 client behind the API seam, against the served simulator: version discovery
(and a recorded real answer), compute-changed-regions page by page, releases through the API
that made a resource, the v4 refusals."""

from __future__ import annotations

import json
import logging
import os

import pytest
from tests.conftest import specs_dir
from tests.e2e.e2e_world import MiB, World, _unused_port

from ahvbackup.core.errors import ConfigError
from ahvbackup.core.ledger import Ledger, ReleaseStack
from ahvbackup.hypervisors.ahv.client.detect import versions_from_routes
from ahvbackup.hypervisors.ahv.driver import AhvHypervisor, AhvSession

KiB = 1 << 10


def test_a_recorded_versionroutes_answer_gives_the_released_versions() -> None:
    recorded = json.loads((specs_dir() / "recorded" /
                           "pc2024.3_actuator_versionroutes.json").read_text())
    versions = versions_from_routes(recorded[0]["response_body"])
    # pc.2024.3.0.1 lists v4.0 beside pre-releases (v4.0.a1, v4.0.b1): only v4.0 is used
    for ns in ("vmm", "clustermgmt", "dataprotection", "volumes", "prism"):
        assert versions[ns] == "v4.0", ns
    assert "objects" not in versions  # only a pre-release (v4.0.b1) there


async def _regions(session: AhvSession, disk: object, ref: str | None = None
                   ) -> list[tuple[int, int, bool]]:
    return [(r.offset, r.length, r.zero)
            async for r in session.regions(disk, reference=ref)]  # type: ignore[arg-type]


async def test_changed_regions_through_v4_page_by_page(world: World) -> None:
    vm = world.add_vm("crt", [(4 * MiB, [(0, 64 * KiB), (MiB, 128 * KiB), (3 * MiB, 64 * KiB)])])
    world.sim.changed_regions_page_size = 1  # one region per compute-changed-regions answer
    cfg = world.config(prism_api_version="v4")
    ledger = Ledger(world.tmp / "state")
    async with AhvHypervisor(cfg).connect() as session, ReleaseStack(
            ledger, owner="t", releaser=session.release) as stack:
        assert session.api.version == "v4"
        (info,) = [v for v in await session.list_vms() if v.uuid == vm.uuid]
        full = await session.snapshot_vm(info, application_consistent=False, name="a",
                                         stack=stack)
        (d0,) = full.disks
        assert full.id.startswith("v4:") and d0.handle.startswith(f"{full.id}/")
        data = [(o, n) for o, n, zero in await _regions(session, d0) if not zero]
        assert data == [(0, 64 * KiB), (MiB, 128 * KiB), (3 * MiB, 64 * KiB)]
        world.sim.write_disk(vm.uuid, 0, 2 * MiB, os.urandom(4 * KiB))
        world.sim.write_disk(vm.uuid, 0, 3 * MiB + 64 * KiB, os.urandom(64 * KiB))
        incr = await session.snapshot_vm(info, application_consistent=False, name="b",
                                         stack=stack)
        changed = await _regions(session, incr.disks[0], d0.handle)
        assert [(o, n) for o, n, zero in changed if not zero] == [
            (2 * MiB, 64 * KiB), (3 * MiB + 64 * KiB, 64 * KiB)]
    # both recovery points and the name records were released through v4
    assert world.sim.recovery_points.points == {}
    assert ledger.records() == []


async def test_a_v4_record_left_behind_is_released_by_a_later_v3_run(world: World) -> None:
    world.add_vm("left", [(MiB, [(0, 64 * KiB)])])
    ledger = Ledger(world.tmp / "state")
    async with AhvHypervisor(world.config(prism_api_version="v4")).connect() as v4:
        (info,) = [v for v in await v4.list_vms() if v.name == "left"]
        stack = ReleaseStack(ledger, owner="killed", releaser=v4.release)
        await v4.snapshot_vm(info, application_consistent=False, name="x", stack=stack)
    # the job "died" here: its records stay on the ledger
    assert {r.kind for r in ledger.records()} == {"snapshot"}
    assert len(world.sim.recovery_points.points) == 1
    async with AhvHypervisor(world.config(prism_api_version="v3")).connect() as v3:
        assert v3.api.version == "v3"
        for rec in ledger.records():
            await v3.release(rec)
            ledger.forget(rec)
    assert world.sim.recovery_points.points == {}


async def test_auto_with_rest_speaks_v3(world: World,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ahvbackup")
    async with AhvHypervisor(world.config(prism_api_version="auto",
                                          data_path="rest")).connect() as session:
        assert "api=v3" in await session.discover()
    assert "data_path=rest, which v3 reads through one image per disk" in caplog.text


async def test_auto_with_data_path_auto_keeps_v3(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """data_path=auto reads over REST any disk the portal does not offer: v4 would read those
    through a VM clone (a permission a backup user lacks), so auto stays on v3 and says why.
    (A portal that answers is not enough: it found another test's target once, and the
    backup then failed with a 403 on the v4 clone.)"""
    caplog.set_level(logging.INFO, logger="ahvbackup")
    cfg = world.config(prism_api_version="auto", data_path="auto", iscsi_port=_unused_port())
    async with AhvHypervisor(cfg).connect() as session:
        assert "api=v3" in await session.discover()
    assert "data_path=auto may read disks over REST" in caplog.text and "using v3" in caplog.text


async def test_health_check_lists_clusters_through_v4(world: World) -> None:
    cfg = world.config(prism_api_version="v4", user="admin", password="nutanix/4u")
    checks = {c.step: c for c in await AhvHypervisor(cfg).health_checks(timeout=5)}
    assert checks["clusters"].status == "ok", checks["clusters"].detail
    assert checks["clusters"].data["selected"] == [c.name for c in world.sim.clusters.values()]
    assert checks["rbac"].data["api"] == "v4"
    world.sim.v4 = False
    with pytest.raises(ConfigError, match=r"^prism_api_version=v4: .*serves no v4 API"):
        await AhvHypervisor(cfg).health_checks(timeout=5)
