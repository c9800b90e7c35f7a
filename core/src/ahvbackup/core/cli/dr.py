"""DR commands: `receiver` (the daemon, mode=receiver) and `dr seed` / `dr push [--loop]`
(the source, mode=seed and mode=bitmap-push), and `dr status` (the source's DR state)."""

from __future__ import annotations

__all__ = ["dr", "receiver"]

import signal
from pathlib import Path
from typing import Any

import click
import trio

from ..config import Config, ModeView
from ..dr.daemon import ReceiverDaemon
from ..dr.source_state import DrStateStore
from ..drivers import DrTransport, dr_transport_name
from ..errors import ConfigError, Interrupted, JobError
from ..jobs.dr_push import DrCycleResult, DrPushJob
from ..plugins import load_driver
from .context import Context, emit, pass_context
from .options import config_options, load_job_config, run_trio

RECEIVER_VIEW = ModeView("ahvbackup receiver", ("receiver",))
#: `dr push` runs bitmap-push, or seed when the configuration says mode=seed
PUSH_VIEW = ModeView("ahvbackup dr push", ("bitmap-push", "seed"))
#: `dr seed` seeds, also with a configuration file shared with `dr push` (mode=bitmap-push)
SEED_VIEW = ModeView("ahvbackup dr seed", ("seed",), replayed=("bitmap-push",))
_SOURCE_KEYS = ("prism_central", "user", "password", "dr_host")


def _transport(cfg: Config) -> DrTransport:
    return load_driver("transport", dr_transport_name(cfg), base=DrTransport)(cfg)


@click.command()
@config_options
@pass_context
def receiver(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
             plugin_string: str | None) -> None:
    """Run the DR receiver (mode=receiver): take the pushes of DR sources on dr_port into
    state_dir, until SIGTERM or SIGINT (then exit 0)."""
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose, view=RECEIVER_VIEW)
    daemon = ReceiverDaemon(cfg, transport=_transport(cfg))
    trio.run(daemon.run)


@click.group()
def dr() -> None:
    """The DR source: seed a receiver, push deltas to it, show what it acknowledged."""


def _human(res: dict[str, Any]) -> str:
    lines = []
    for vm in res["vms"]:
        state = "ok" if vm["ok"] else "FAILED"
        kind = "seed" if vm["base"] == 0 else f"delta on {vm['base']}"
        full = f" full={','.join(vm['full_disks'])}" if vm["full_disks"] and vm["base"] else ""
        lines.append(f"{vm['vm_name']:<24} {state:<7} point={vm['point']} ({kind}){full} "
                     f"pushed={vm['bytes_pushed']:,} reconnects={vm['reconnects']} "
                     f"lag={vm['lag']:.1f}s")
        if vm["error"]:
            lines.append(f"    error: {vm['error']}")
        lines += [f"    warning: {w}" for w in vm["warnings"]]
    lines.append(f"{len(res['vms'])} VM(s) to {res['receiver']}, {len(res['failed'])} failed, "
                 f"{res['seconds']:.1f}s")
    return "\n".join(lines)


def _finish(ctx: Context, result: DrCycleResult) -> None:
    emit(ctx, result.to_json(), _human)
    if not result.ok:
        raise JobError(f"{len(result.failed)} failed: {', '.join(result.failed)}")


def _source_config(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
                   plugin_string: str | None, view: ModeView) -> Config:
    return load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                           hooks=ctx.hooks, verbose=ctx.verbose, require=_SOURCE_KEYS,
                           view=view)


@dr.command()
@config_options
@pass_context
def seed(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
         plugin_string: str | None) -> None:
    """Push the full disks of the selected VMs to the receiver (mode=seed), once."""
    cfg = _source_config(ctx, configs, sets, plugin_string, SEED_VIEW)
    job = DrPushJob(cfg, hooks=ctx.hooks)
    _finish(ctx, run_trio(job.run))


@dr.command()
@config_options
@click.option("--loop", is_flag=True,
              help="Push every push_interval seconds until SIGTERM or SIGINT (exit 0 between "
                   "cycles; a cycle cut short exits 143 or 130, as a backup does).")
@pass_context
def push(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
         plugin_string: str | None, loop: bool) -> None:
    """Push the changes since the last acknowledged point (mode=bitmap-push), once or with
    --loop; a VM without one is seeded."""
    cfg = _source_config(ctx, configs, sets, plugin_string, PUSH_VIEW)
    if loop and cfg.mode != "bitmap-push":
        raise ConfigError(f"{cfg.sources.get('mode', 'default')}: mode: {cfg.mode}: --loop "
                          "repeats bitmap-push; a seed runs once (ahvbackup dr seed)")
    job = DrPushJob(cfg, hooks=ctx.hooks)
    if not loop:
        _finish(ctx, run_trio(job.run))
        return
    signum = trio.run(_until_signal, job, ctx)
    if signum is not None:
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} during a DR "
                                  "cycle; what it had created on the cluster was released")


async def _until_signal(job: DrPushJob, ctx: Context) -> int | None:
    """`job.loop` until SIGTERM or SIGINT: None when it came between cycles, else the
    signal (the cycle was cancelled; its releases ran shielded)."""

    def on_cycle(result: DrCycleResult) -> None:
        emit(ctx, result.to_json(), _human)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.loop, on_cycle)
            async for signum in signals:
                busy = job.busy
                nursery.cancel_scope.cancel()
                return int(signum) if busy else None
    return None  # pragma: no cover


@dr.command()
@config_options
@pass_context
def status(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
           plugin_string: str | None) -> None:
    """The last point each VM's receiver acknowledged, and the snapshot kept for it."""
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose)
    rows = [{"vm": s.vm_name, "vm_uuid": s.vm_uuid, "receiver": s.receiver, "point": s.point,
             "snapshot_id": s.snapshot_id, "disks": sorted(d.label for d in s.disks.values())}
            for s in DrStateStore(Path(cfg.state_dir)).all()]

    def human(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "no DR state"
        out = [f"{'VM':<24} {'RECEIVER':<28} {'POINT':>6} SNAPSHOT"]
        out += [f"{r['vm']:<24} {r['receiver']:<28} {r['point']:>6} {r['snapshot_id']}"
                for r in rows]
        return "\n".join(out)

    emit(ctx, rows, human)
