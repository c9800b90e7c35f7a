"""`make demo` must stay true: the demo runs the main job end to end over iSCSI and proves it,
whatever else listens on the machine (here: another simulator on the default ports)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
DEFAULT_ISCSI = ("127.0.0.102", 3260)


def _answers(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def another_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`ahvbackup simulator serve` on the default ports (Prism 9440, iSCSI 3260), as a user
    may have running beside the demo. If they are taken already, something else answers
    there, which is the same test."""
    state = tmp_path_factory.mktemp("other-simulator")
    proc = subprocess.Popen([*CLI, "simulator", "serve", "--state", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Press Ctrl-C"):
                break
        else:  # it could not listen: fine if something else holds the iSCSI port
            assert _answers(DEFAULT_ISCSI), proc.stderr.read() if proc.stderr else ""
        assert _answers(DEFAULT_ISCSI)
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _demo(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = [sys.executable, "-c", code] if code else CLI
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=300)


def test_demo_backs_up_over_its_own_iscsi_portal_and_proves_it(another_simulator: None) -> None:
    done = _demo("--json", "demo")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["vms"] == len(result["inventory"]) >= 4
    assert result["data_path"] == "iscsi"
    assert result["iscsi_portal"] != "{}:{}".format(*DEFAULT_ISCSI)  # its own, not the other
    assert result["bytes_read_over_iscsi"] == result["bytes_read"] > 0
    assert result["restore_check"] and all(c["identical"] for c in result["restore_check"])
    assert result["verified_backups"] == result["vms"] and not result["verify_failures"]
    assert result["left_on_cluster"] == {
        "reference_snapshots": result["vms"], "other_snapshots": 0, "images": 0,
        "volume_groups": 0,
    }
    assert result["work_dir"] is None  # removed, as it said


def test_demo_output_shows_the_iscsi_path_and_warns_about_nothing(
        another_simulator: None) -> None:
    done = _demo("demo")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower()
    assert re.search(r"over iSCSI from the cluster's iSCSI portal 127\.0\.0\.102:\d+ ",
                     done.stdout), done.stdout
    assert "byte-identical to the simulator" in done.stdout
    assert "DIFFERENT" not in done.stdout


# The failure the newcomer saw: the demo's disks read from another simulator's iSCSI target.
_FOOLED = """
import dataclasses, sys
from ahvbackup.core.cli import main
from ahvbackup.hypervisors.ahv import demo
own = demo._config
def fooled(*args, **kwargs):
    cfg = own(*args, **kwargs)
    return dataclasses.replace(cfg, extra={**cfg.extra, "iscsi_port": 3260})
demo._config = fooled
main(sys.argv[1:])
"""


def test_a_failed_demo_is_one_error_line_and_keeps_its_files(another_simulator: None) -> None:
    done = _demo("demo", code=_FOOLED)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    *_, last = done.stderr.strip().splitlines()
    assert last.startswith("ahvbackup: error: demo failed: the backup failed for "), last
    assert done.stderr.count("demo failed") == 1
    kept = Path(re.search(r"work files kept in (\S+)", last)[1])  # type: ignore[index]
    try:
        assert (kept / "ahvbackup.log").exists()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
