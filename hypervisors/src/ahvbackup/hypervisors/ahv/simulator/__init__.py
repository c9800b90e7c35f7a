"""The Prism simulator: a Prism Central and Prism Element listeners over one simulated inventory.

They speak v3 (``v3/``) and, unless ``Simulator(v4=False)``, v4 (``v4/``) over the same model.

Start one in tests with ``Simulator(tmp_path)`` and either talk to ``pc_app(sim)`` /
``pe_app(sim)`` in-process (``httpx.ASGITransport``) or ``async with serve_simulator(sim) as
endpoints:`` over real sockets. See docs/simulator.md.
"""

from __future__ import annotations

__all__ = [
    "PC_COOKIE",
    "PE_COOKIE",
    "ROLES",
    "SEED_USERS",
    "Endpoints",
    "EntityConflict",
    "EntityNotFound",
    "FaultRule",
    "Faults",
    "InvalidRequest",
    "Simulator",
    "SimulatorError",
    "Stats",
    "VolumeGroups",
    "pc_app",
    "pe_app",
    "seed_pattern",
    "serve_simulator",
]

from .app import PC_COOKIE, PE_COOKIE, pc_app, pe_app
from .errors import EntityConflict, EntityNotFound, InvalidRequest, SimulatorError
from .faults import FaultRule, Faults, Stats
from .seed import seed_pattern
from .serve import Endpoints, serve_simulator
from .simulator import Simulator
from .users import ROLES, SEED_USERS
from .volume_groups import VolumeGroups
