"""End-to-end fixtures: a served simulator (HTTPS, its own CA) to run real jobs against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from e2e_world import World

from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    sim = Simulator(tmp_path / "sim", seed=True, task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True) as ep:
            assert ep.ca_path is not None
            yield World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path, tmp=tmp_path)
    finally:
        sim.close()
