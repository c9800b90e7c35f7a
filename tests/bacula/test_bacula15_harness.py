"""The backend under the harness, playing what Bacula 15.0.3's metaplugin sends (seen with the
real daemons, test_bacula15_metaplugin.py): its Job block ends with the file daemon's
WorkingDir, SysconfigPath and ExePath, which are Bacula's, not configuration keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from demo_handlers import CLUSTER
from harness import Backend, job_fields

Spawn = Callable[..., Backend]


def test_the_15_job_block_is_acknowledged_and_its_fd_paths_are_not_configuration(
        spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    b = spawn()
    b.hello("ahvbackup")
    b.job(**job_fields("B", bacula="15"))
    assert b.params([*base_params, "vm=alpha"]).kind == "F"
    b.start("BackupStart")
    files = b.files(data=True)
    assert f"/@ahvbackup/{CLUSTER}/alpha/vm.json" in [f.fname for f in files]
    assert not [m for m in b.messages if m.kind in "EA"], b.messages
    assert b.end() == 0
    log = (tmp_path / "backend.log").read_text()
    assert "unknown key" not in log, log
