"""The Prism simulator: a Prism Central and Prism Element listeners over one simulated inventory.

Start one in tests with ``Simulator(tmp_path)`` and either talk to ``sim.pc_app()`` /
``sim.pe_app()`` in-process (``httpx.ASGITransport``) or ``async with serve_simulator(sim) as
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
    "seed_pattern",
    "serve_simulator",
]

from .app import PC_COOKIE, PE_COOKIE
from .faults import FaultRule, Faults, Stats
from .seed import seed_pattern
from .serve import Endpoints, serve_simulator
from .simulator import EntityConflict, EntityNotFound, InvalidRequest, Simulator, SimulatorError
from .users import ROLES, SEED_USERS
