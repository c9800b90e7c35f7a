"""clustermgmt v4: ``GET /api/clustermgmt/v4.x/config/clusters``, ``/clusters/{extId}`` and
``/config/storage-containers``.

Prism Central lists itself (``clusterFunction: [PRISM_CENTRAL]``) and every cluster
(``[AOS]``), like v3. The DSIP is ``network.externalDataServiceIp.ipv4.value`` (singular
"Service", docs/nutanix-api.md 3.4); the PE address ``network.externalAddress``.
"""

from __future__ import annotations

__all__ = ["cluster_routes", "render_cluster"]

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._http import guarded, listener
from ..errors import EntityNotFound
from ._common import answer, entity, ipv4, list_answer, prefix, served, sim_of

if TYPE_CHECKING:
    from ..model import Cluster
    from ..simulator import Simulator

NS = "clustermgmt"
CLUSTER = "clustermgmt.v4.config.Cluster"
_AOS_VERSION = "7.0"


def render_cluster(sim: Simulator, c: Cluster | None) -> dict[str, Any]:
    """One cluster (None: Prism Central itself)."""
    if c is None:
        return entity(CLUSTER, {
            "extId": sim.pc_uuid,
            "name": sim.pc_name,
            "config": {
                "clusterFunction": ["PRISM_CENTRAL"],
                "buildInfo": {"version": "pc.2024.3", "fullVersion": "pc.2024.3.0.1"},
                "hypervisorTypes": ["NATIVEHOST"],
            },
            "network": {"externalAddress": ipv4("127.0.0.1")},
        })
    vms = sum(1 for v in list(sim.vms.values()) if v.cluster_uuid == c.uuid)
    return entity(CLUSTER, {
        "extId": c.uuid,
        "name": c.name,
        "config": {
            "incarnationId": c.incarnation,
            "clusterFunction": ["AOS"],
            "buildInfo": {"version": _AOS_VERSION, "fullVersion": f"el8.5-release-{_AOS_VERSION}"},
            "hypervisorTypes": ["AHV"],
            "redundancyFactor": 2,
            "isAvailable": True,
        },
        "network": {
            "externalAddress": ipv4(c.external_ip),
            "externalDataServiceIp": ipv4(c.dsip),
        },
        "vmCount": vms,
        "containerName": c.containers[0].name if c.containers else None,
    })


def _items(request: Request) -> list[Cluster | None]:
    sim, lis = sim_of(request), listener(request)
    if lis.is_pc:
        return [None, *list(sim.clusters.values())]
    return [sim.cluster(lis.cluster_uuid or "")]


@served(NS, "config.ListClustersApiResponse")
@guarded("cluster", "read")
async def clusters_list(request: Request) -> Response:
    sim = sim_of(request)
    attrs = {"name": lambda c: sim.pc_name if c is None else c.name,
             "extId": lambda c: sim.pc_uuid if c is None else c.uuid}
    return list_answer(request, _items(request), lambda c: render_cluster(sim, c),
                       item_type=CLUSTER, attrs=attrs)


@served(NS, "config.GetClusterApiResponse")
@guarded("cluster", "read")
async def clusters_get(request: Request) -> Response:
    sim = sim_of(request)
    ext_id = str(request.path_params["extId"])
    for c in _items(request):
        if (sim.pc_uuid if c is None else c.uuid) == ext_id:
            return answer(request, render_cluster(sim, c), item_type=CLUSTER)
    raise EntityNotFound("cluster", ext_id)


CONTAINER = "clustermgmt.v4.config.StorageContainer"


@served(NS, "config.ListStorageContainersApiResponse")
@guarded("storage_container", "read")
async def containers_list(request: Request) -> Response:
    """Every storage container of the clusters the listener serves (PC: all of them)."""
    items = [(c, k) for c in _items(request) if c is not None for k in c.containers]

    def render(item: Any) -> dict[str, Any]:
        cluster, container = item
        return {"extId": container.uuid, "containerExtId": container.uuid,
                "name": container.name, "clusterExtId": cluster.uuid,
                "clusterName": cluster.name, "replicationFactor": 2, "isInternal": False,
                "isMarkedForRemoval": False, "$objectType": CONTAINER}

    attrs = {"name": lambda i: i[1].name, "clusterExtId": lambda i: i[0].uuid,
             "containerExtId": lambda i: i[1].uuid}
    return list_answer(request, items, render, item_type=CONTAINER, attrs=attrs)


def cluster_routes() -> list[Route]:
    p = prefix(NS)
    return [
        Route(f"{p}/config/storage-containers", containers_list, methods=["GET"]),
        Route(f"{p}/config/clusters", clusters_list, methods=["GET"]),
        Route(f"{p}/config/clusters/{{extId}}", clusters_get, methods=["GET"]),
    ]
