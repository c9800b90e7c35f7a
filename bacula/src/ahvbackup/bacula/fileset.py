"""``ahvbackup bacula fileset``: ready-to-use FileSet and Job resources for the selected VMs.

One FileSet and one Job per VM, so the Director can run (and distribute over file daemons)
each VM's backup on its own. ``--path bpipe`` writes one ``Plugin`` line per disk for stock
Bacula's bpipe; ``--path metaplugin`` one ``ahvbackup:`` line per VM for the metaplugin backend.
"""

from __future__ import annotations

__all__ = ["bacula", "render_filesets"]

import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

import click

from ahvbackup.core.cli import Context, pass_context
from ahvbackup.core.cli.options import config_options, load_job_config, run_trio
from ahvbackup.core.errors import ConfigError
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.jobs.selection import select_vms
from ahvbackup.core.model import VmInfo

from .sink import virtual_part

_RESOURCE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def _resource(prefix: str, vm: VmInfo) -> str:
    return f"{prefix}{_RESOURCE_NAME.sub('_', vm.name)}"


def render_filesets(vms: Sequence[VmInfo], *, path: str, command: str,
                    configs: Sequence[Path], jobdefs: str, prefix: str = "ahv-") -> str:
    """The Bacula resources (text) for `vms`; refuses names bpipe or the parser cannot carry."""
    conf = " ".join(f"-c {shlex.quote(str(c))}" for c in configs)
    out = []
    for vm in vms:
        if '"' in vm.name or "\n" in vm.name:
            raise ConfigError(f"VM {vm.name!r}: a name with a double quote or a newline cannot "
                              "go in a Bacula resource; exclude it (exclude=) and back it up "
                              "with a hand-written FileSet")
        name = _resource(prefix, vm)
        cluster = virtual_part(vm.cluster_name or vm.cluster_uuid)
        lines = [f"# VM {vm.name} ({vm.uuid}), cluster {vm.cluster_name or vm.cluster_uuid}",
                 "FileSet {", f'  Name = "{name}"', "  Include {",
                 "    Options { signature = MD5 }"]
        if path == "metaplugin":
            lines.append(f'    Plugin = "ahvbackup: vm={shlex.quote(vm.name)}"')
        else:
            for disk in vm.disks:
                vpath = f"/@ahvbackup/{cluster}/{virtual_part(vm.name)}/disks/{disk.label}.ahvd"
                reader = (f"{command} bpipe backup {conf} --vm {shlex.quote(vm.uuid)} "
                          f"--disk {disk.label}")
                writer = f"{command} bpipe restore {conf} --where %w"
                for what, text in (("virtual path", vpath), ("reader", reader)):
                    if ":" in text:
                        raise ConfigError(
                            f"VM {vm.name}: the bpipe {what} {text!r} contains ':', which bpipe "
                            "takes as a separator; rename the VM or cluster, or use paths "
                            "without ':' for -c and the ahvbackup command")
                lines.append(f'    Plugin = "bpipe:{vpath}:{reader}:{writer}"')
        lines += ["  }", "}",
                  f'Job {{\n  Name = "{name}"\n  JobDefs = "{jobdefs}"\n  FileSet = "{name}"\n}}',
                  ""]
        out.append("\n".join(lines))
    return "\n".join(out)


@click.group()
def bacula() -> None:
    """Bacula helpers (resources for bconsole/bacula-dir.conf)."""


@bacula.command("fileset")
@config_options
@click.option("--path", "bacula_path", type=click.Choice(["bpipe", "metaplugin"]),
              default="bpipe", show_default=True,
              help="bpipe (any Bacula since 5.x) or metaplugin (Bacula 13.0+).")
@click.option("--jobdefs", default="DefaultJob", show_default=True,
              help="JobDefs each Job uses (client, storage, pool, schedule, messages).")
@click.option("--command", "command",
              help="The ahvbackup program as the file daemon runs it (default: this one).")
@click.option("--prefix", default="ahv-", show_default=True, help="Resource name prefix.")
@pass_context
def fileset(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
            plugin_string: str | None, bacula_path: str, jobdefs: str, command: str | None,
            prefix: str) -> None:
    """Print FileSet and Job resources for the VMs the selection (vm=, exclude=, cluster=)
    matches. The readers and writers get the same -c files, so give absolute paths."""
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose,
                          require=("prism_central", "user", "password"))
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)

    async def listed() -> list[VmInfo]:
        async with rt.hypervisor.connect() as session:
            vms, warnings = select_vms(await session.list_vms(), include=cfg.vm,
                                       exclude=cfg.exclude, cluster=cfg.cluster)
        for w in warnings:
            click.echo(f"ahvbackup: warning: {w}", err=True)
        return vms

    vms = run_trio(listed)
    if not vms:
        raise ConfigError("vm: no VM matches the selection; nothing to print")
    program = command or shutil.which("ahvbackup") or "ahvbackup"
    click.echo(render_filesets(vms, path=bacula_path, command=program,
                               configs=[c.resolve() for c in configs], jobdefs=jobdefs,
                               prefix=prefix), nl=False)
