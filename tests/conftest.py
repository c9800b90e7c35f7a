"""Shared test fixtures.

Real peers (tgtd, libiscsi tools, qemu-img, Bacula daemons) are used for real. On a developer
machine without one, its tests skip with the reason; under CI (`AHVBACKUP_REQUIRE_PEERS=1`, set by
.ci/run) a missing peer fails the test instead, so a green CI always means the peer really ran.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.e2e.e2e_world import World

from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

REPO = Path(__file__).resolve().parents[1]


def peers_required() -> bool:
    return os.environ.get("AHVBACKUP_REQUIRE_PEERS", "") == "1"


def require_peer(*programs: str) -> dict[str, str]:
    """Return {program: path} for each program, or skip (fail under CI) naming the missing ones."""
    found = {p: shutil.which(p) or shutil.which(p, path="/usr/sbin:/sbin") for p in programs}
    missing = sorted(p for p, path in found.items() if not path)
    if missing:
        msg = f"real peer missing: {', '.join(missing)} (CI installs it; see .ci/run)"
        if peers_required():
            pytest.fail(msg)
        pytest.skip(msg)
    return {p: str(path) for p, path in found.items()}


def specs_dir() -> Path:
    """The read-only reference specs (../shared/specs); a missing spec fails, never skips."""
    d = Path(os.environ.get("AHVBACKUP_SPECS", REPO.parent / "shared" / "specs"))
    if not d.is_dir():
        pytest.fail(f"reference specs not found at {d} (set AHVBACKUP_SPECS)")
    return d


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """A seeded simulator served over HTTPS with its own CA, for jobs run like an operator's."""
    sim = Simulator(tmp_path / "sim", seed=True, task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True) as ep:
            assert ep.ca_path is not None
            yield World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path, tmp=tmp_path)
    finally:
        sim.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The kill matrices list every step they killed (their `killed` property), so a CI log
    shows what was covered, not just that it passed."""
    lines = [f"{r.nodeid}: {value}" for r in terminalreporter.stats.get("passed", [])
             for key, value in getattr(r, "user_properties", ()) if key == "killed"]
    if lines:
        terminalreporter.section("kill matrix: the steps killed")
        for line in lines:
            terminalreporter.write_line(line)
