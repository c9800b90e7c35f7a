"""Hook plugin of the AHV distribution: adds `ahvbackup simulator ...` and `ahvbackup demo`."""

from __future__ import annotations

from typing import Any

from ahvbackup.core import hookimpl


@hookimpl
def ahvbackup_cli_commands() -> list[Any]:
    from .demo import demo
    from .simulator.cli import simulator

    return [simulator, demo]
