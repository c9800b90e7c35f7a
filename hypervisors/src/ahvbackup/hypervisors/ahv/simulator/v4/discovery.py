"""Version discovery: ``GET /api/actuator/versionroutes``, ``OPTIONS /api/{ns}/unversioned/info``.

``versionroutes`` answers in the shape of the recorded pc.2024.3 answer
(shared/specs/recorded/pc2024.3_actuator_versionroutes.json): a JSON array of
``{"namespace", "versionRoutes": [{"version", "routes": ["/<ns>/<version>/<module>", ...]}]}``,
listing only what this simulator serves. ``unversioned/info`` answers ``{"data": "<highest>"}``,
which the SDKs use to negotiate the version in their paths.
"""

from __future__ import annotations

__all__ = ["pc_discovery_routes", "pe_discovery_routes"]

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._http import listener
from ..errors import EntityNotFound
from ._common import VERSIONS

#: the modules each namespace serves on each listener
PC_MODULES: dict[str, tuple[str, ...]] = {
    "vmm": ("ahv",),
    "clustermgmt": ("config",),
    "dataprotection": ("config",),
    "volumes": ("config",),
    "prism": ("config",),
}
PE_MODULES: dict[str, tuple[str, ...]] = {
    "clustermgmt": ("config",),
    "dataprotection": ("content",),
    "volumes": ("config",),
    "prism": ("config",),
}


def _modules(request: Request) -> dict[str, tuple[str, ...]]:
    return PC_MODULES if listener(request).is_pc else PE_MODULES


async def version_routes(request: Request) -> Response:
    out = []
    for ns, modules in _modules(request).items():
        out.append({
            "namespace": ns,
            "versionRoutes": [
                {"version": v, "routes": [f"/{ns}/{v}/{m}" for m in modules]}
                for v in VERSIONS[ns]
            ],
        })
    return JSONResponse(out)


async def unversioned_info(request: Request) -> Response:
    ns = str(request.path_params["ns"])
    if ns not in _modules(request):
        raise EntityNotFound("namespace", ns)
    return JSONResponse({"data": VERSIONS[ns][-1]})


def _routes() -> list[Route]:
    return [
        Route("/api/actuator/versionroutes", version_routes, methods=["GET"]),
        Route("/api/{ns}/unversioned/info", unversioned_info, methods=["OPTIONS", "GET"]),
    ]


def pc_discovery_routes() -> list[Route]:
    return _routes()


def pe_discovery_routes() -> list[Route]:
    return _routes()
