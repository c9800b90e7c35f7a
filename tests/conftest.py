"""Shared test fixtures.

Real peers (tgtd, libiscsi tools, qemu-img, Bacula daemons) are used for real. On a developer
machine without one, its tests skip with the reason; under CI (`AHVBACKUP_REQUIRE_PEERS=1`, set by
.ci/run) a missing peer fails the test instead, so a green CI always means the peer really ran.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
