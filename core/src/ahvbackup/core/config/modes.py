"""The mode registry: what `mode=` makes a job do, and which callers run which modes.

`mode=` is read from files, plugin strings and the command line like any key; the caller
(a CLI subcommand, a Bacula job, a bpipe command) is a `ModeView` over this one table. A
mode the caller does not run is an error naming both, and a mode this version does not do
yet is refused by name, whoever asks for it.
"""

from __future__ import annotations

__all__ = ["MODE_TABLE", "Mode", "ModeView", "pick_mode", "view_of_job"]

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .model import Config


@dataclass(frozen=True)
class Mode:
    """One value of `mode=`. `job` names the job that runs it; `issue` is set while a mode is
    not done yet (it names the issue that will make it work)."""

    name: str
    job: str
    summary: str
    issue: int | None = None

    @property
    def works(self) -> bool:
        return self.issue is None


_DR = 12  # the DR replication issue

MODE_TABLE: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("backup", "backup", "back up the selected VMs"),
        Mode("restore", "restore", "rebuild a backup's disks through the restore target"),
        Mode("estimate", "backup", "report what a backup would read, without reading data"),
        Mode("receiver", "dr", "run the DR receiver that takes pushed deltas"),
        Mode("seed", "dr", "send the first full image to a DR receiver"),
        Mode("bitmap-push", "dr", "push changed regions to a DR receiver"),
        Mode("failover-test", "dr", "start a DR copy for a test, leaving the source up", _DR),
        Mode("failover-planned", "dr", "move a VM to its DR copy after a last sync", _DR),
        Mode("failover-unplanned", "dr", "start the DR copy when the source is lost", _DR),
        Mode("failover-undo", "dr", "undo a failover and return to the source", _DR),
        Mode("failover-perm", "dr", "make a failover permanent", _DR),
    )
}


@dataclass(frozen=True)
class ModeView:
    """What one caller runs. `modes` are the modes it runs (the first is the one it runs
    when `mode=` is not set); `replayed` are modes it accepts from a source it does not own
    and runs as its first mode instead (a Bacula restore job replays the FileSet of the
    backup, whose plugin string may say mode=backup). An empty `modes` runs no mode (list,
    verify): any working mode is accepted and left as it is."""

    name: str
    modes: tuple[str, ...] = ()
    replayed: tuple[str, ...] = ()


def view_of_job(name: str, job: str, *, replayed: tuple[str, ...] = ()) -> ModeView:
    """The view of a caller that runs every working mode of `job` (``backup``: backup and
    estimate), in the table's order."""
    modes = tuple(m.name for m in MODE_TABLE.values() if m.job == job and m.works)
    return ModeView(name, modes, replayed)


def pick_mode(config: Config, view: ModeView) -> Config:
    """`config` with the mode `view` runs; a `ConfigError` when `mode=` asks for another job
    or for a mode that does not work yet."""
    mode = MODE_TABLE[config.mode]
    origin = config.sources.get("mode", "default")
    if not mode.works:
        raise ConfigError(f"{origin}: mode: {mode.name} ({mode.summary}): this version does not "
                          "do that yet")
    if not view.modes:
        return config
    if origin == "default" or mode.name in view.replayed:
        return dataclasses.replace(config, mode=view.modes[0])
    if mode.name in view.modes:
        return config
    runs = " or ".join(view.modes)
    raise ConfigError(f"{origin}: mode: {mode.name!r} disagrees with {view.name}, which runs "
                      f"{runs}")
