"""``ahvbackup bacula fileset``: ready-to-use FileSet and Job resources for the selected VMs.

One FileSet and one Job per VM, so the Director can run (and distribute over file daemons)
each VM's backup on its own. ``--path bpipe`` writes one ``Plugin`` line per disk for stock
Bacula's bpipe; ``--path metaplugin`` one ``ahvbackup:`` line per VM for the metaplugin backend.
``--project P`` (repeatable) writes one set of resources per tenant: each project's VMs, with
``project=P`` in their plugin strings (so the job runs as tenant P, docs/tenants.md) and the
tenant in the resource names; ``--out DIR`` writes them to ``DIR/ahvbackup-<tenant>.conf``.
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
                    configs: Sequence[Path], jobdefs: str, prefix: str = "ahv-",
                    project: str | None = None) -> str:
    """The Bacula resources (text) for `vms`; refuses names bpipe or the parser cannot carry.
    `project`: the resources of that project's tenant (`project=` in every plugin string)."""
    conf = " ".join(f"-c {shlex.quote(str(c))}" for c in configs)
    if project is not None:
        conf += f" -o project={shlex.quote(project)}"
        prefix = f"{prefix}{_RESOURCE_NAME.sub('_', project)}-"
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
            scope = f" project={shlex.quote(project)}" if project is not None else ""
            lines.append(f'    Plugin = "ahvbackup: vm={shlex.quote(vm.name)}{scope}"')
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
@click.option("--project", "projects", multiple=True, metavar="NAME",
              help="One tenant's resources per project (name or UUID; repeatable): its VMs, "
                   "run with project=NAME.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="With --project: write DIR/ahvbackup-<tenant>.conf per tenant.")
@pass_context
def fileset(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
            plugin_string: str | None, bacula_path: str, jobdefs: str, command: str | None,
            prefix: str, projects: tuple[str, ...], out_dir: Path | None) -> None:
    """Print FileSet and Job resources for the VMs the selection (vm=, exclude=, cluster=,
    project=) matches. The readers and writers get the same -c files, so give absolute
    paths."""
    if out_dir is not None and not projects:
        raise ConfigError("--out: writes one file per tenant; name the tenants with --project")
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose,
                          require=("prism_central", "user", "password"))
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)

    async def listed(project: tuple[str, ...]) -> list[VmInfo]:
        async with rt.hypervisor.connect() as session:
            vms, warnings = select_vms(await session.list_vms(), include=cfg.vm,
                                       exclude=cfg.exclude, cluster=cfg.cluster,
                                       project=project)
        for w in warnings:
            click.echo(f"ahvbackup: warning: {w}", err=True)
        return vms

    program = command or shutil.which("ahvbackup") or "ahvbackup"
    for project in projects or (None,):
        vms = run_trio(listed, (project,) if project is not None else cfg.project)
        if not vms:
            raise ConfigError("vm: no VM matches the selection; nothing to print")
        text = render_filesets(vms, path=bacula_path, command=program,
                               configs=[c.resolve() for c in configs], jobdefs=jobdefs,
                               prefix=prefix, project=project)
        if out_dir is not None and project is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            target = out_dir / f"ahvbackup-{_RESOURCE_NAME.sub('_', project)}.conf"
            target.write_text(text)
            click.echo(f"{target}: {len(vms)} VM(s) of project {project}")
        else:
            click.echo((f"# tenant {project}\n" if project is not None else "") + text, nl=False)
