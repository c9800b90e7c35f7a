"""What every subcommand shares: its context object, and printing JSON or text."""

from __future__ import annotations

__all__ = ["Context", "emit", "pass_context"]

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from ..plugins import Hooks


@dataclass
class Context:
    """What every subcommand gets: output mode, verbosity and the hook facade."""

    json: bool = False
    verbose: int | None = None
    hooks: Hooks = field(default_factory=Hooks)


pass_context = click.make_pass_decorator(Context)


def emit(ctx: Context, data: Any, human: Callable[[Any], str] | None = None) -> None:
    """Print `data` as JSON under --json, else as the human rendering."""
    if ctx.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(human(data) if human else str(data))


