"""v3 clusters, subnets and the current user (Prism Central and Element)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .._http import guarded, json_body, listener
from ..errors import EntityNotFound
from ._common import _Attrs, _json, _list_response, _sim, _uuid_param
from .render import render_cluster, render_pc_cluster, render_subnet, render_user


@guarded("cluster", "read")
async def clusters_list(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    body = await json_body(request, kind="cluster", empty_ok=True)
    if lis.is_pc:
        items: list[Any] = [None, *sim.clusters.values()]
    else:
        items = [sim.cluster(lis.cluster_uuid or "")]

    def render(c: Any) -> dict[str, Any]:
        return render_pc_cluster(sim) if c is None else render_cluster(sim, c)

    names: _Attrs = {"name": lambda c: sim.pc_name if c is None else c.name}
    return _list_response(body, kind="cluster", items=items, attrs=names, render=render)


@guarded("cluster", "read")
async def clusters_get(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    uuid = _uuid_param(request, "cluster")
    if lis.is_pc and uuid == sim.pc_uuid:
        return _json(render_pc_cluster(sim))
    if not lis.is_pc and uuid != lis.cluster_uuid:
        raise EntityNotFound("cluster", uuid)
    return _json(render_cluster(sim, sim.cluster(uuid)))


def _subnets(request: Request) -> list[Any]:
    sim, lis = _sim(request), listener(request)
    subnets = list(sim.subnets.values())
    return [s for s in subnets if lis.is_pc or s.cluster_uuid == lis.cluster_uuid]


@guarded("subnet", "read")
async def subnets_list(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="subnet", empty_ok=True)
    attrs: _Attrs = {"name": lambda s: s.name, "subnet_name": lambda s: s.name,
                     "vlan_id": lambda s: s.vlan_id, "cluster_uuid": lambda s: s.cluster_uuid}
    return _list_response(body, kind="subnet", items=_subnets(request), attrs=attrs,
                          render=lambda s: render_subnet(sim, s))


@guarded("subnet", "read")
async def subnets_get(request: Request) -> Response:
    uuid = _uuid_param(request, "subnet")
    for s in _subnets(request):
        if s.uuid == uuid:
            return _json(render_subnet(_sim(request), s))
    raise EntityNotFound("subnet", uuid)


@guarded("user", "read")
async def users_me(request: Request) -> Response:
    return _json(render_user(_sim(request), request.scope["sim.user"]))
