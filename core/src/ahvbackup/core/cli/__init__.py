"""The `ahvbackup` command.

Every subcommand takes `--json` (through the group) for machine use. Errors are turned into
one line on stderr and an exit code here, at the boundary, and nowhere deeper.
Exit codes: see `ahvbackup.core.errors.ExitCode` and docs/cli.md.
"""

from __future__ import annotations

__all__ = ["Context", "cli", "emit", "main", "pass_context"]

import sys
from typing import Any

import click

from .. import __version__
from ..errors import AhvBackupError, ExitCode
from ..log import log_context
from ..plugins import Hooks, installed_plugins
from .context import Context, emit, pass_context


class _Group(click.Group):
    """Adds commands contributed by hook plugins, and turns our errors into exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugins_added = False

    def _add_plugin_commands(self) -> None:
        if self._plugins_added:
            return
        self._plugins_added = True
        try:
            commands = Hooks().cli_commands()
        except (AhvBackupError, ImportError) as err:
            # a broken plugin must not take the whole command down with it
            click.echo(f"ahvbackup: warning: a plugin's commands are unavailable: {err}", err=True)
            return
        for cmd in commands:
            if cmd.name not in self.commands:
                self.add_command(cmd)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AhvBackupError as err:
            tenant = log_context().tenant  # a tenant's operator sees which tenant failed
            click.echo(f"ahvbackup: error: {f'tenant {tenant}: ' if tenant else ''}{err}",
                       err=True)
            ctx.exit(int(err.exit_code))
        except KeyboardInterrupt:
            click.echo("ahvbackup: interrupted", err=True)
            ctx.exit(int(ExitCode.INTERRUPTED))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option(
    "-v", "--verbose", count=True,
    help="More detail on stderr (repeat up to 3 times); overrides the verbose= key.",
)
@click.version_option(__version__, prog_name="ahvbackup")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, verbose: int) -> None:
    """Agentless backup and disaster recovery for Nutanix AHV virtual machines."""
    ctx.obj = Context(json=as_json, verbose=verbose or None)


@cli.command()
@pass_context
def plugins(ctx: Context) -> None:
    """List every installed driver and hook plugin with its distribution and version."""
    rows = [p.__dict__ for p in installed_plugins()]

    def human(rows: list[dict[str, str]]) -> str:
        if not rows:
            return "no plugins installed"
        cols = ("group", "name", "distribution", "version", "target")
        width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
        lines = ["  ".join(c.upper().ljust(width[c]) for c in cols).rstrip()]
        lines += ["  ".join(r[c].ljust(width[c]) for c in cols).rstrip() for r in rows]
        return "\n".join(lines)

    emit(ctx, rows, human)


from .consolidate import consolidate  # noqa: E402 - they need the group defined above
from .dr import dr, receiver  # noqa: E402
from .health import health_check  # noqa: E402
from .jobs import backup, list_backups  # noqa: E402
from .report import report  # noqa: E402
from .restore import restore, verify  # noqa: E402

for _command in (backup, list_backups, restore, verify, consolidate, health_check, report,
                 receiver, dr):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="ahvbackup", standalone_mode=True)
    sys.exit(0)
