"""Configuration from a hostile or careless operator's hands: files that are not files, a BOM,
huge values, and command-line slips, each refused at once with one line naming what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ahvbackup.core.config import MAX_FILE_BYTES, load_config
from ahvbackup.core.errors import ConfigError

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
#: far below what reading /dev/zero or waiting on a FIFO would take
FAST = 20


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    where = ["-o", f"repository={tmp_path}/repo", "-o", f"state_dir={tmp_path}/state",
             "-o", "debug_log="]
    return subprocess.run([*CLI, *args, *where], capture_output=True, text=True, timeout=FAST,
                          check=False)


def refused(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a command that exited 2."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.conf"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(("make", "kind"), [
    (lambda tmp: Path("/dev/zero"), "a device"),
    (fifo, "a FIFO"),
    (lambda tmp: tmp, "a directory"),
], ids=["dev-zero", "fifo", "directory"])
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, make,
                                                                kind: str) -> None:
    path = make(tmp_path)
    line = refused(cli("list", "-c", str(path), tmp_path=tmp_path))  # timeout: never hangs
    assert line == f"ahvbackup: error: config file {path}: is {kind}, not a regular file"


def test_a_passfile_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = fifo(tmp_path)
    path.chmod(0o600)
    done = cli("list", "-o", f"passfile={path}", tmp_path=tmp_path)
    assert f"passfile {path}: " in refused(done)
    assert "not a regular file" in done.stderr


def test_a_config_larger_than_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.conf"
    with big.open("w") as f:
        f.write("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"big\.conf: \d+ bytes; the limit is 1048576"):
        load_config(files=[big])


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    conf = tmp_path / "bom.conf"
    conf.write_bytes(b"\xef\xbb\xbfconcurrent_vms = 5\nvm = db-*\n")
    cfg = load_config(files=[conf])
    assert cfg.concurrent_vms == 5
    assert cfg.sources["concurrent_vms"] == f"{conf}:1"


def test_a_10_mb_value_or_key_is_never_echoed_whole(tmp_path: Path) -> None:
    huge = "9" * 10_000_000
    with pytest.raises(ConfigError) as bad_value:
        load_config(overrides={"chunk_size_mib": huge + "x"})
    with pytest.raises(ConfigError) as bad_key:
        load_config(plugin_string=f"ahvbackup: {'k' * 10_000_000}=1")
    for err in (bad_value, bad_key):
        text = str(err.value)
        assert len(text) < 300, text[:300]
    assert str(bad_value.value).startswith("command line: chunk_size_mib: ")
    assert str(bad_key.value).startswith("plugin string: kkkk")


def test_o_without_equals_names_the_key(tmp_path: Path) -> None:
    line = refused(cli("backup", "-o", "concurrent_vms", tmp_path=tmp_path))
    assert line.startswith("ahvbackup: error: command line: concurrent_vms: ")
    assert "KEY=VALUE" in line


def test_an_unknown_data_path_is_refused_also_for_an_estimate(tmp_path: Path) -> None:
    line = refused(cli("backup", "--estimate", "-o", "data_path=nfs", "-o",
                       "prism_central=127.0.0.1:1", "-o", "user=u", "-o", "password=p",
                       tmp_path=tmp_path))
    assert "command line: data_path: no datapath driver named 'nfs' (installed: " in line


def test_sink_bacula_on_the_command_line_exits_2_before_contacting_prism(
        tmp_path: Path) -> None:
    # nothing listens on port 1: contacting Prism would end with exit 3, not 2
    line = refused(cli("backup", "-o", "sink=bacula", "-o", "prism_central=127.0.0.1:1",
                       "-o", "user=u", "-o", "password=p", tmp_path=tmp_path))
    assert "command line: sink=bacula works only inside a Bacula job" in line


def test_verify_without_a_selector_mentions_all(tmp_path: Path) -> None:
    line = refused(cli("verify", tmp_path=tmp_path))
    assert "--all" in line and "--vm" in line and "--backup" in line


def test_backup_with_mode_restore_names_both(tmp_path: Path) -> None:
    line = refused(cli("backup", "-o", "mode=restore", "-o", "prism_central=127.0.0.1:1",
                       "-o", "user=u", "-o", "password=p", tmp_path=tmp_path))
    assert line == ("ahvbackup: error: command line: mode: 'restore' disagrees with ahvbackup "
                    "backup, which runs backup or estimate")


def test_restore_with_mode_backup_names_both(tmp_path: Path) -> None:
    line = refused(cli("restore", "--vm", "x", "--plugin-string", "ahvbackup: mode=backup",
                       tmp_path=tmp_path))
    assert line == ("ahvbackup: error: plugin string: mode: 'backup' disagrees with ahvbackup "
                    "restore, which runs restore")


@pytest.mark.parametrize("mode", ["failover-test", "failover-planned", "failover-unplanned",
                                  "failover-undo", "failover-perm"])
def test_dr_modes_are_refused_by_name(mode: str, tmp_path: Path) -> None:
    line = refused(cli("backup", "-o", f"mode={mode}", "-o", "prism_central=127.0.0.1:1",
                       "-o", "user=u", "-o", "password=p", tmp_path=tmp_path))
    assert f"command line: mode: {mode} (" in line
    assert line.endswith("this version does not do that yet")
