"""Hook plugin of the targets distribution: adds `ahvbackup import`."""

from __future__ import annotations

from typing import Any

from ahvbackup.core import hookimpl


@hookimpl
def ahvbackup_cli_commands() -> list[Any]:
    from .import_cli import import_vm

    return [import_vm]
