"""prism v4 tasks: ``GET /api/prism/v4.x/config/tasks`` and ``/tasks/{extId}``.

Every simulator operation's task (v3 or v4) is visible here, with ``extId``
``ZXJnb24=:<uuid>`` (base64 "ergon", as real ones; a bare uuid is accepted too) and the status
the simulator's clock gives it: QUEUED, RUNNING with rising ``progressPercentage``, then
SUCCEEDED or FAILED (``errorMessages``). ``entitiesAffected[].rel`` names the entity's kind the
v4 way (``vmm:ahv:config:vm``, ``dataprotection:config:recovery-point``, ...).
"""

from __future__ import annotations

__all__ = ["REL", "render_task", "task_routes"]

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._http import guarded
from ._common import (
    TASK_PREFIX,
    answer,
    entity,
    list_answer,
    prefix,
    served,
    sim_of,
    task_ext_id,
    ts,
)

if TYPE_CHECKING:
    from ..model import Task
    from ..simulator import Simulator

NS = "prism"
TASK = "prism.v4.config.Task"

#: the v4 ``rel`` of each entity kind of the model (UNVERIFIED beyond ``vmm:ahv:config:vm``)
REL = {
    "vm": "vmm:ahv:config:vm",
    "recovery_point": "dataprotection:config:recovery-point",
    "volume_group": "volumes:config:volume-group",
    "vm_snapshot": "dataprotection:config:vm-recovery-point",
    "image": "vmm:content:image",
}


def render_task(sim: Simulator, task: Task) -> dict[str, Any]:
    state, pct = sim.task_progress(task)
    done = task.created + task.duration
    out: dict[str, Any] = {
        "extId": task_ext_id(task.uuid),
        "operation": task.operation_type,
        "operationDescription": f"{task.operation_type} {task.entity_name}".strip(),
        "createdTime": ts(task.created),
        "lastUpdatedTime": ts(done if state in ("SUCCEEDED", "FAILED") else task.created),
        "status": state,
        "progressPercentage": pct,
        "entitiesAffected": [{
            "extId": task.entity_uuid, "rel": REL.get(task.entity_kind, task.entity_kind),
            "name": task.entity_name, "$objectType": "prism.v4.config.EntityReference",
        }],
        "isCancelable": False,
        "isBackgroundTask": False,
        "numberOfSubtasks": 0,
        "numberOfEntitiesAffected": 1,
        "clusterExtIds": [task.cluster_uuid] if task.cluster_uuid else [],
        "subTasks": [],
    }
    if state != "QUEUED":
        out["startedTime"] = ts(task.created)
    if state in ("SUCCEEDED", "FAILED"):
        out["completedTime"] = ts(done)
    if state == "FAILED":
        out["errorMessages"] = [{
            "message": task.error or "task failed", "severity": "ERROR",
            "code": task.error_code or "INTERNAL_ERROR", "locale": "en_US",
            "$objectType": "prism.v4.error.AppMessage",
        }]
        out["legacyErrorMessage"] = task.error or ""
    return entity(TASK, out)


@served(NS, "config.GetTaskApiResponse")
@guarded("task", "read")
async def tasks_get(request: Request) -> Response:
    sim = sim_of(request)
    ext_id = str(request.path_params["extId"])
    return answer(request, render_task(sim, sim.task(ext_id.removeprefix(TASK_PREFIX))),
                  item_type=TASK)


@served(NS, "config.ListTasksApiResponse")
@guarded("task", "read")
async def tasks_list(request: Request) -> Response:
    sim = sim_of(request)
    attrs = {"status": lambda t: sim.task_progress(t)[0], "operation": lambda t: t.operation_type,
             "extId": lambda t: task_ext_id(t.uuid)}
    return list_answer(request, list(sim.tasks.values())[::-1], lambda t: render_task(sim, t),
                       item_type=TASK, attrs=attrs)


def task_routes() -> list[Route]:
    p = prefix(NS)
    return [
        Route(f"{p}/config/tasks", tasks_list, methods=["GET"]),
        Route(f"{p}/config/tasks/{{extId}}", tasks_get, methods=["GET"]),
    ]
