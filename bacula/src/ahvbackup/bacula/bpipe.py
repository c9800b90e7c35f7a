"""``ahvbackup bpipe backup|restore``: the reader and writer of a stock Bacula ``bpipe`` line.

::

    Plugin = "bpipe:/@ahvbackup/<cluster>/<vm>/disks/<label>.ahvd:\
    ahvbackup bpipe backup -c /etc/ahvbackup.conf --vm <vm> --disk <label>:\
    ahvbackup bpipe restore -c /etc/ahvbackup.conf --where %w"      (on one line)

bpipe's only error channel is the reader's exit status (a reader that dies still leaves a
"successful" backup with a warning), so the reader exits non-zero with a message on stderr
(copied into the job log) on any error, and the stream it wrote is self-checking: a cut-short
stream has no trailer, and restore refuses it. Only the stream goes to stdout: descriptor 1 is
taken for it at start and pointed at stderr, so no stray output can ever land in a backup.
"""

from __future__ import annotations

__all__ = ["bpipe"]

import dataclasses
import os
import sys
from pathlib import Path

import click

from ahvbackup.core.cli import Context, pass_context
from ahvbackup.core.cli.options import config_options, load_job_config, run_trio
from ahvbackup.core.config import ModeView
from ahvbackup.core.drivers import RestoreTarget
from ahvbackup.core.errors import ConfigError, JobError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.cluster import cluster_for
from ahvbackup.core.jobs.codec import stream_keys
from ahvbackup.core.jobs.results import JobResult
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.plugins import load_driver

from .apply import AppliedStream, StreamApplier, apply_stream
from .job_handlers import backup_config
from .sink import BaculaSink

#: the mode registry's views: the reader backs up; the writer restores, and the -c files it
#: shares with the reader may say mode=backup
READER_VIEW = ModeView("ahvbackup bpipe backup", ("backup",))
WRITER_VIEW = ModeView("ahvbackup bpipe restore", ("restore",), replayed=("backup", "estimate"))


def _take_stdout() -> int:
    """A private descriptor for the stream; descriptor 1 then writes to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return fd


def _say(text: str) -> None:
    click.echo(f"ahvbackup: {text}", err=True)


@click.group()
def bpipe() -> None:
    """Reader and writer commands for Bacula's bpipe plugin (one disk per Plugin line)."""


@bpipe.command("backup")
@config_options
@click.option("--vm", "vm_name", required=True, help="The VM (its name or UUID).")
@click.option("--disk", "label", required=True, help="The disk label, e.g. scsi.0.")
@click.option("--level", type=click.Choice(["auto", "full", "incremental", "differential"]),
              default="auto", show_default=True,
              help="auto: incremental against the reference in state_dir, a full when there "
                   "is none (Bacula's job level does not reach a bpipe reader).")
@pass_context
def bpipe_backup(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
                 plugin_string: str | None, vm_name: str, label: str, level: str) -> None:
    """Write one disk's stream to stdout (the bpipe reader)."""
    out_fd = _take_stdout()
    if any(c in vm_name for c in "*?[,"):
        raise ConfigError(f"--vm: {vm_name!r}: name exactly one VM (no patterns or lists)")
    wanted = "incremental" if level == "auto" else level
    cfg = load_job_config(
        configs=configs, sets=sets, plugin_string=plugin_string, hooks=ctx.hooks,
        verbose=ctx.verbose, overrides={"vm": vm_name, "level": wanted},
        require=("prism_central", "user", "password"), view=READER_VIEW,
    )
    cfg, warnings = backup_config(cfg)
    for warning in warnings:
        _say(f"warning: {warning}")
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)
    sink = rt.sink
    assert isinstance(sink, BaculaSink)
    sink.attach_pipe(out_fd)

    async def main() -> JobResult:
        return await BackupJob(rt, disks=[label]).run()

    try:
        result = run_trio(main)
    finally:
        os.close(out_fd)
    if not result.vms:
        raise JobError(f"vm={vm_name}: no such VM (nothing was written; this backup is empty)")
    if not result.ok:
        raise JobError(f"backup of {vm_name} {label} failed: {'; '.join(result.failed)} "
                       "(the stream written is incomplete and will be refused at restore)")
    (vr,) = result.vms
    (dr,) = vr.disks
    _say(f"backed up {vr.vm_name} {label}: level={dr.kind} backup={vr.backup_id} "
         f"read={dr.bytes_read} stream={dr.bytes_stored} consistency={vr.consistency}")


@bpipe.command("restore")
@config_options
@click.option("--where", required=True,
              help="Restore folder (give %w: Bacula puts the restore job's where there).")
@pass_context
def bpipe_restore(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
                  plugin_string: str | None, where: str) -> None:
    """Apply the stream on stdin through the restore target (the bpipe writer).

    A full goes to any target (raw: <where>/<vm>/<label>.raw; ahv: a new VM, configured from
    the backup's manifest when this host sent it); an incremental is applied onto the raw
    image its chain's earlier restores left there (restore the jobs of a chain in order, into
    the same where).
    """
    if not where.strip() or where.strip() == "/":
        raise ConfigError("--where: empty or '/'; give the restore job a where= folder "
                          "(the writer is run with %w)")
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose, overrides={"where": where},
                          view=WRITER_VIEW)
    target = load_driver("target", cfg.target, base=RestoreTarget)(cfg)
    rt = Runtime.from_config(dataclasses.replace(cfg, sink="bacula"), hooks=ctx.hooks)
    sent = rt.sink
    assert isinstance(sent, BaculaSink)

    async def main() -> AppliedStream:
        async with cluster_for(rt, target) as cluster:
            applier = StreamApplier(target=target, dest=Path(where), name="stream on stdin",
                                    cluster=cluster, manifest_of=sent.recorded,
                                    keys=stream_keys(cfg), hypervisor=rt.hypervisor)
            return await apply_stream(applier, lambda n: os.read(0, n))

    out = run_trio(main)
    click.echo(f"ahvbackup: restored {out.vm_name} {out.label} ({out.kind}) to "
               f"{out.path or 'the cluster'}: {out.data_bytes} data bytes, "
               f"{out.zero_bytes} zero bytes, chain {'+'.join(out.backup_ids)}")
