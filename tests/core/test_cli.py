"""The command itself: --help everywhere, --version, and errors as one line with an exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from ahvbackup.core import __version__
from ahvbackup.core.cli import cli

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]


def all_commands() -> list[list[str]]:
    found: list[list[str]] = []

    def walk(group: click.Group, path: list[str]) -> None:
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            assert cmd is not None
            found.append([*path, name])
            if isinstance(cmd, click.Group):
                walk(cmd, [*path, name])

    walk(cli, [])
    return found


def test_every_command_has_help() -> None:
    commands = all_commands()
    assert ["backup"] in commands and ["simulator", "serve"] in commands and ["demo"] in commands
    for path in commands:
        done = subprocess.run([*CLI, *path, "--help"], capture_output=True, text=True)
        assert done.returncode == 0, (path, done.stderr)
        assert "Usage:" in done.stdout and done.stderr == ""


def test_version() -> None:
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, check=True)
    assert __version__ in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["backup", "-o", "vm"], 2, "-o expects KEY=VALUE"),
        (["list", "-o", "sink=tape"], 2, "sink: no sink driver named 'tape' (installed: "),
        (["restore"], 2, "name a backup (--backup ID) or a VM"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(
    args: list[str], code: int, message: str, tmp_path: Path
) -> None:
    where = ["-o", f"repository={tmp_path}/repo", "-o", f"state_dir={tmp_path}/state"]
    done = subprocess.run([*CLI, *args, *where], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
