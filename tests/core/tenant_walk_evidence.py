"""Evidence for the tenancy keys in the configuration walk (tests/core/test_config_walk.py):
`project=` selects only a project's VMs, `tenant=` moves the job's state and backups into the
tenant's own folders."""

from __future__ import annotations

from typing import Any

from ahvbackup.core.state import StateStore
from ahvbackup.hypervisors.ahv.simulator.v3.projects import move_vm


async def project(w: Any) -> None:
    sim = w.world.sim
    sim.users.add_project("walk-p")
    move_vm(sim, sim.find_vm("walk-a").uuid, "walk-p")
    result = await w.works(vm="walk-*", project="walk-p")
    assert sorted(v.vm_name for v in result.vms) == ["walk-a"]
    assert "no-such-project" in await w.fails(vm="walk-*", project="no-such-project")


async def tenant(w: Any) -> None:
    mine, plain = w.config(tenant="t1"), w.config()
    assert mine.state_dir == plain.state_dir / "tenants" / "t1"
    await w.works(vm="walk-b", tenant="t1")
    assert StateStore(mine.state_dir).exists(w.world.sim.find_vm("walk-b").uuid)
    assert not StateStore(plain.state_dir).exists(w.world.sim.find_vm("walk-b").uuid)
    assert (mine.repository / ".tenant").read_text().strip() == "t1"


TENANT_EVIDENCE = {"project": project, "tenant": tenant}
