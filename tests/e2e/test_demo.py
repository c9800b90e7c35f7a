"""`make demo` must stay true: the demo runs the main job end to end and proves it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_backs_up_restores_and_leaves_only_references() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ahvbackup.core.cli", "--json", "demo"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["vms"] == len(result["inventory"]) >= 4
    assert result["restore_check"] and all(c["identical"] for c in result["restore_check"])
    assert result["verified_backups"] == result["vms"] and not result["verify_failures"]
    assert result["left_on_cluster"] == {
        "reference_snapshots": result["vms"], "other_snapshots": 0, "images": 0,
    }
