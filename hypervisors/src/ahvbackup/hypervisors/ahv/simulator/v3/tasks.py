"""v3 tasks and idempotence identifiers."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from .._http import guarded, json_body
from ..errors import InvalidRequest
from ..model import rfc3339
from ._common import _Attrs, _json, _list_response, _sim, _uuid_param
from .render import render_task


@guarded("task", "read")
async def tasks_get(request: Request) -> Response:
    sim = _sim(request)
    return _json(render_task(sim, sim.task(_uuid_param(request, "task"))))


@guarded("task", "read")
async def tasks_list(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="task", empty_ok=True)
    attrs: _Attrs = {
        "status": lambda t: sim.task_progress(t)[0],
        "operation_type": lambda t: t.operation_type,
        "entity_uuid": lambda t: t.entity_uuid,
        "uuid": lambda t: t.uuid,
    }
    return _list_response(body, kind="task", items=list(sim.tasks.values())[::-1],
                          attrs=attrs, render=lambda t: render_task(sim, t))


@guarded("idempotence_identifier", "create")
async def idempotence_create(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="idempotence_identifiers")
    client = body.get("client_identifier", "")
    count = body.get("count", 1)
    minutes = body.get("valid_duration_in_minutes", 527040)
    if not isinstance(count, int) or not 1 <= count <= 4096:
        raise InvalidRequest(f"count: must be 1..4096 (got {count!r})",
                             kind="idempotence_identifiers")
    if not isinstance(minutes, int) or minutes < 1:
        raise InvalidRequest(f"valid_duration_in_minutes: must be a positive integer "
                             f"(got {minutes!r})", kind="idempotence_identifiers")
    uuids = sim.reserve_uuids(str(client), count)
    return _json({
        "client_identifier": client,
        "count": count,
        "expiration_time": rfc3339(time.time() + 60 * minutes),
        "uuid_list": uuids,
    })
