"""The v3 API (``/api/nutanix/v3``) and a PE v2.0 call, as Prism Central and Element serve them.

One module per resource (clusters, vms, images, tasks, snapshots), the shapes in ``render``.
``pc_routes()`` and ``pe_routes()`` list what each listener answers; a route missing from a
listener answers 404 there, as the PE-only ``vm_snapshots`` and ``data/changed_regions`` do on a
real Prism Central.
"""

from __future__ import annotations

__all__ = ["V3", "pc_routes", "pe_routes"]

from starlette.routing import Route

from ._common import V3
from .clusters import clusters_get, clusters_list, subnets_get, subnets_list, users_me
from .images import (
    image_file_get,
    image_file_put,
    images_create,
    images_delete,
    images_get,
    images_list,
)
from .projects import projects_get, projects_list
from .rbac import permissions_list, users_info
from .snapshots import (
    changed_regions,
    snapshots_create,
    snapshots_delete,
    snapshots_get,
    snapshots_list,
    v2_storage_containers,
)
from .tasks import idempotence_create, tasks_get, tasks_list
from .vms import vms_create, vms_delete, vms_get, vms_list, vms_update

# ---- route tables ---------------------------------------------------------------------------

def _common() -> list[Route]:
    return [
        Route(f"{V3}/clusters/list", clusters_list, methods=["POST"]),
        Route(f"{V3}/clusters/{{uuid}}", clusters_get, methods=["GET"]),
        Route(f"{V3}/subnets/list", subnets_list, methods=["POST"]),
        Route(f"{V3}/subnets/{{uuid}}", subnets_get, methods=["GET"]),
        Route(f"{V3}/users/me", users_me, methods=["GET"]),
        Route(f"{V3}/vms/list", vms_list, methods=["POST"]),
        Route(f"{V3}/vms", vms_create, methods=["POST"]),
        Route(f"{V3}/vms/{{uuid}}", vms_get, methods=["GET"]),
        Route(f"{V3}/vms/{{uuid}}", vms_update, methods=["PUT"]),
        Route(f"{V3}/vms/{{uuid}}", vms_delete, methods=["DELETE"]),
        Route(f"{V3}/tasks/list", tasks_list, methods=["POST"]),
        Route(f"{V3}/tasks/{{uuid}}", tasks_get, methods=["GET"]),
    ]


def pc_routes() -> list[Route]:
    return [
        *_common(),
        Route(f"{V3}/idempotence_identifiers", idempotence_create, methods=["POST"]),
        Route(f"{V3}/users/info", users_info, methods=["GET"]),
        Route(f"{V3}/permissions/list", permissions_list, methods=["POST"]),
        Route(f"{V3}/projects/list", projects_list, methods=["POST"]),
        Route(f"{V3}/projects/{{uuid}}", projects_get, methods=["GET"]),
        Route(f"{V3}/images/list", images_list, methods=["POST"]),
        Route(f"{V3}/images", images_create, methods=["POST"]),
        Route(f"{V3}/images/{{uuid}}", images_get, methods=["GET"]),
        Route(f"{V3}/images/{{uuid}}", images_delete, methods=["DELETE"]),
        Route(f"{V3}/images/{{uuid}}/file", image_file_get, methods=["GET"]),
        Route(f"{V3}/images/{{uuid}}/file", image_file_put, methods=["PUT"]),
    ]


def pe_routes() -> list[Route]:
    return [
        *_common(),
        Route(f"{V3}/vm_snapshots/list", snapshots_list, methods=["POST"]),
        Route(f"{V3}/vm_snapshots", snapshots_create, methods=["POST"]),
        Route(f"{V3}/vm_snapshots/{{uuid}}", snapshots_get, methods=["GET"]),
        Route(f"{V3}/vm_snapshots/{{uuid}}", snapshots_delete, methods=["DELETE"]),
        Route(f"{V3}/data/changed_regions", changed_regions, methods=["POST"]),
        Route("/api/nutanix/v2.0/storage_containers", v2_storage_containers, methods=["GET"]),
        Route("/PrismGateway/services/rest/v2.0/storage_containers", v2_storage_containers,
              methods=["GET"]),
    ]
