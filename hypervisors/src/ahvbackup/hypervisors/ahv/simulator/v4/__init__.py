"""The v4 API namespaces, over the same ``Simulator`` model as v3 (docs/simulator.md, "v4").

``pc_routes()`` / ``pe_routes()`` are the route sets ``app.PC_ROUTES`` / ``app.PE_ROUTES`` list.
Prism Central serves vmm, clustermgmt, dataprotection (config), volumes and prism; each Prism
Element serves the PE-only ``compute-changed-regions``, plus volumes, clustermgmt and prism
tasks. ``Simulator(v4=False)`` (or ``sim.v4 = False``) makes every v4 path answer 404, like a
Prism that speaks only v3.
"""

from __future__ import annotations

__all__ = ["VERSIONS", "error_body", "is_v4_path", "pc_routes", "pe_routes", "v4_namespace"]

from starlette.routing import Route

from ._common import VERSIONS, error_body, is_v4_path, v4_namespace
from .clustermgmt import cluster_routes
from .dataprotection import pc_dataprotection_routes, pe_dataprotection_routes
from .discovery import pc_discovery_routes, pe_discovery_routes
from .prism import task_routes
from .vmm import vm_routes
from .volumes import pc_volume_routes, pe_volume_routes


def pc_routes() -> list[Route]:
    return [*pc_discovery_routes(), *vm_routes(), *cluster_routes(),
            *pc_dataprotection_routes(), *pc_volume_routes(), *task_routes()]


def pe_routes() -> list[Route]:
    return [*pe_discovery_routes(), *pe_dataprotection_routes(), *cluster_routes(),
            *pe_volume_routes(), *task_routes()]
