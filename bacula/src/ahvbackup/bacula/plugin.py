"""Hook plugin of the Bacula distribution: ``ahvbackup bpipe ...``, ``ahvbackup bacula ...``."""

from __future__ import annotations

from typing import Any

from ahvbackup.core import hookimpl


@hookimpl
def ahvbackup_cli_commands() -> list[Any]:
    from .bpipe import bpipe
    from .fileset import bacula

    return [bpipe, bacula]
