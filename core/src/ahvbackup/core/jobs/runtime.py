"""Everything a job needs, assembled once from the configuration: drivers, ledger, state."""

from __future__ import annotations

__all__ = ["Runtime", "resolve_data_path"]

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..drivers import DataPath, Hypervisor, HypervisorSession, RestoreTarget, Sink
from ..ledger import Ledger, Record, sweep_orphans
from ..plugins import Hooks, load_driver
from ..state import StateStore

log = logging.getLogger("ahvbackup.job")


@dataclass
class Runtime:
    config: Config
    hooks: Hooks
    job_id: str
    hypervisor: Hypervisor
    sink: Sink
    ledger: Ledger
    states: StateStore

    @classmethod
    def from_config(cls, config: Config, *, hooks: Hooks | None = None) -> Runtime:
        state_dir = Path(config.state_dir)
        hooks = hooks or Hooks()
        return cls(
            config=config,
            hooks=hooks,
            job_id=uuid.uuid4().hex[:12],
            hypervisor=load_driver("hypervisor", config.hypervisor, base=Hypervisor)(config),
            sink=load_driver("sink", config.sink, base=Sink)(config),
            ledger=Ledger(state_dir, hooks=hooks),
            states=StateStore(state_dir),
        )

    def target(self, name: str | None = None) -> RestoreTarget:
        return load_driver("target", name or self.config.target, base=RestoreTarget)(self.config)

    async def sweep(self, session: HypervisorSession) -> list[Record]:
        """Release what killed jobs left behind; returns what could not be released."""
        left = await sweep_orphans(self.ledger, session.release)
        self.sweep_repository()
        return left

    def sweep_repository(self) -> None:
        """Finish or remove what killed jobs left half-done in the sink (a half-written
        backup, a consolidation killed between its renames). Every job that writes to the
        sink starts with it, cluster or not."""
        for path in self.sink.sweep_partials():
            log.info("removed an interrupted job's partial data: %s", path)


async def resolve_data_path(config: Config, session: HypervisorSession) -> DataPath:
    """The configured data path. `auto` is a driver of its own (ahvbackup-transports): it
    decides per disk, iSCSI where the cluster offers the disk's target, else REST."""
    del session  # the choice is the driver's, made when it opens each disk
    return load_driver("datapath", config.data_path, base=DataPath)(config)
