"""Everything a job needs, assembled once from the configuration: drivers, ledger, state."""

from __future__ import annotations

__all__ = ["Runtime", "resolve_data_path"]

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..drivers import DataPath, Hypervisor, HypervisorSession, RestoreTarget, Sink
from ..errors import AhvBackupError
from ..ledger import Ledger, Record, release_record
from ..plugins import Hooks, load_driver
from ..state import StateStore

log = logging.getLogger("ahvbackup.job")


@dataclass
class Runtime:
    config: Any
    hooks: Hooks
    job_id: str
    hypervisor: Hypervisor
    sink: Sink
    ledger: Ledger
    states: StateStore

    @classmethod
    def from_config(cls, config: Any, *, hooks: Hooks | None = None) -> Runtime:
        state_dir = Path(config.state_dir)
        return cls(
            config=config,
            hooks=hooks or Hooks(),
            job_id=uuid.uuid4().hex[:12],
            hypervisor=load_driver("hypervisor", config.hypervisor)(config),
            sink=load_driver("sink", config.sink)(config),
            ledger=Ledger(state_dir),
            states=StateStore(state_dir),
        )

    def target(self, name: str | None = None) -> RestoreTarget:
        return load_driver("target", name or self.config.target)(self.config)

    async def sweep(self, session: HypervisorSession) -> list[Record]:
        """Release what killed jobs left behind; returns what could not be released."""
        left = []
        orphans = self.ledger.orphans()
        if orphans:
            log.warning("cleaning up %d resource(s) left by an interrupted job", len(orphans))
        for rec in reversed(orphans):
            log.info("releasing leftover %s", rec.describe())
            if not await release_record(self.ledger, rec, session.release):
                left.append(rec)
            else:
                self.hooks.resource_released(
                    kind=rec.kind, resource_id=rec.resource_id, owner=rec.owner, ok=True
                )
        sweep = getattr(self.sink, "sweep_partials", None)
        if sweep is not None:
            for path in sweep():
                log.info("removed an interrupted backup's partial data: %s", path)
        return left


async def resolve_data_path(config: Any, session: HypervisorSession) -> DataPath:
    """`data_path=auto`: iscsi when the cluster's data services address answers on its iSCSI
    port and the iscsi driver is installed, else rest. The choice is logged."""
    name = config.data_path
    if name == "auto":
        name = "rest"
        portal = await session.iscsi_portal()
        if portal is not None:
            try:
                load_driver("datapath", "iscsi")
                with trio.move_on_after(3):
                    stream = await trio.open_tcp_stream(*portal)
                    await stream.aclose()
                    name = "iscsi"
            except (OSError, AhvBackupError) as err:  # not installed or not answering
                log.debug("iscsi not usable: %s", err)
        log.info("data_path=auto: using %s", name)
    return load_driver("datapath", name)(config)
