"""The simulator-only control API on the Prism Central listener: ``/api/simulator/v1``.

It is the HTTP face of the Python workload, fault and stats calls, for demos and for tests that
drive a simulator in another process. Administrators only (role Prism Admin). Not part of any
Nutanix API, and never subject to fault injection itself.

| Method + path | Body / query | Answer |
|---|---|---|
| GET  /api/simulator/v1/vms/{vm}/disks/{i}/data | ?offset=&length= | the live bytes |
| PUT  /api/simulator/v1/vms/{vm}/disks/{i}/data | ?offset=, raw bytes | {"bytes_written": n} |
| POST /api/simulator/v1/vms/{vm}/disks/{i}/zero | {"offset", "length"} | {} |
| POST /api/simulator/v1/vms/{vm}/disks/{i}/trim | {"offset", "length"} | {} |
| GET / POST / DELETE /api/simulator/v1/faults | POST: the keywords of ``Faults.add`` | rules |
| DELETE /api/simulator/v1/faults/{id} | | {} |
| GET / DELETE /api/simulator/v1/stats | | ``Stats.as_dict()`` / reset |
| GET / POST /api/simulator/v1/projects | POST: {"name", "description"} | projects |
| GET / POST /api/simulator/v1/users | POST: {"name", "password", "role", "projects"} | users |
| PUT / DELETE /api/simulator/v1/users/{name} | PUT: {"role", "projects"} | the user / {} |
| PUT  /api/simulator/v1/vms/{vm}/project | {"project": name, UUID or null} | {"project_uuid"} |

Users are answered without their password hashes; ``projects`` (names or UUIDs) scopes a
user's role assignment to those projects (none: everything).
"""

from __future__ import annotations

__all__ = ["PREFIX", "control_routes"]

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._http import guarded, json_body, listener, run_blocking
from .errors import BadRequest, EntityNotFound
from .users import UnknownProject, User
from .v3.projects import move_vm

PREFIX = "/api/simulator/v1"
_MAX_READ = 64 << 20


def _int_arg(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}: must be an integer (got {value!r})", kind="simulator") from None
    if n < 0:
        raise BadRequest(f"{name}: must not be negative (got {n})", kind="simulator")
    return n


def _target(request: Request) -> tuple[str, int]:
    return str(request.path_params["vm"]), _int_arg(request.path_params["index"], "disk index")


@guarded("simulator", "read")
async def disk_read(request: Request) -> Response:
    vm, index = _target(request)
    offset = _int_arg(request.query_params.get("offset", 0), "offset")
    length = _int_arg(request.query_params.get("length"), "length")
    if length > _MAX_READ:
        raise BadRequest(f"length: at most {_MAX_READ} per request (got {length})",
                         kind="simulator")
    data = await run_blocking(request, listener(request).sim.read_disk, vm, index, offset, length)
    return Response(data, media_type="application/octet-stream")


@guarded("simulator", "update")
async def disk_write(request: Request) -> Response:
    vm, index = _target(request)
    offset = _int_arg(request.query_params.get("offset"), "offset")
    data = await request.body()
    await run_blocking(request, listener(request).sim.write_disk, vm, index, offset, data)
    return JSONResponse({"bytes_written": len(data)})


def _discard(op: str):  # type: ignore[no-untyped-def]
    @guarded("simulator", "update")
    async def handler(request: Request) -> Response:
        vm, index = _target(request)
        body = await json_body(request, kind="simulator")
        offset = _int_arg(body.get("offset"), "offset")
        length = _int_arg(body.get("length"), "length")
        sim = listener(request).sim
        fn = sim.zero_disk if op == "zero" else sim.trim_disk
        await run_blocking(request, fn, vm, index, offset, length)
        return JSONResponse({})

    return handler


@guarded("simulator", "read")
async def faults_list(request: Request) -> Response:
    return JSONResponse([r.as_dict() for r in listener(request).sim.faults.rules])


_FAULT_KEYS = {"method", "path", "status", "retry_after", "latency", "drop", "drop_after_bytes",
               "count", "task_fail", "body"}


@guarded("simulator", "create")
async def faults_add(request: Request) -> Response:
    body = await json_body(request, kind="simulator")
    unknown = sorted(set(body) - _FAULT_KEYS)
    if unknown:
        raise BadRequest(f"fault rule: unknown keys {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_FAULT_KEYS))})", kind="simulator")
    try:
        rule = listener(request).sim.faults.add(**body)
    except (TypeError, ValueError) as err:
        raise BadRequest(f"fault rule: {err}", kind="simulator") from err
    return JSONResponse(rule.as_dict(), status_code=201)


@guarded("simulator", "delete")
async def faults_clear(request: Request) -> Response:
    listener(request).sim.faults.clear()
    return JSONResponse({})


@guarded("simulator", "delete")
async def fault_remove(request: Request) -> Response:
    rule_id = _int_arg(request.path_params["id"], "id")
    if not listener(request).sim.faults.remove(rule_id):
        raise EntityNotFound("fault rule", str(rule_id))
    return JSONResponse({})


@guarded("simulator", "read")
async def stats_get(request: Request) -> Response:
    return JSONResponse(listener(request).sim.stats.as_dict())


@guarded("simulator", "delete")
async def stats_reset(request: Request) -> Response:
    listener(request).sim.stats.reset()
    return JSONResponse({})


def _user_json(user: User) -> dict[str, Any]:
    return {"name": user.name, "uuid": user.uuid, "role": user.role,
            "projects": list(user.projects)}


def _projects_arg(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("projects", [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest(f"projects: a list of project names or UUIDs (got {value!r})",
                         kind="simulator")
    return tuple(value)


def _text_arg(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name}: required text (got {value!r})", kind="simulator")
    return value


@guarded("simulator", "read")
async def projects_list(request: Request) -> Response:
    return JSONResponse([p.to_json() for p in listener(request).sim.users.projects.values()])


@guarded("simulator", "create")
async def projects_add(request: Request) -> Response:
    body = await json_body(request, kind="simulator")
    sim = listener(request).sim
    project = sim.users.add_project(_text_arg(body, "name"),
                                    description=str(body.get("description", "")))
    await run_blocking(request, sim.save)
    return JSONResponse(project.to_json(), status_code=201)


@guarded("simulator", "read")
async def users_list(request: Request) -> Response:
    return JSONResponse([_user_json(u) for u in listener(request).sim.users])


@guarded("simulator", "create")
async def users_add(request: Request) -> Response:
    body = await json_body(request, kind="simulator")
    sim = listener(request).sim
    try:  # PBKDF2 takes a while: off the event loop
        user = await run_blocking(request, lambda: sim.users.add(
            _text_arg(body, "name"), _text_arg(body, "password"), _text_arg(body, "role"),
            projects=_projects_arg(body)))
    except ValueError as err:  # an unknown role or project
        raise BadRequest(str(err), kind="simulator") from err
    await run_blocking(request, sim.save)
    return JSONResponse(_user_json(user), status_code=201)


@guarded("simulator", "update")
async def user_assign(request: Request) -> Response:
    body = await json_body(request, kind="simulator")
    sim = listener(request).sim
    name = str(request.path_params["name"])
    if sim.users.get(name) is None:
        raise EntityNotFound("user", name)
    try:
        user = sim.users.assign(name, role=_text_arg(body, "role"),
                                projects=_projects_arg(body))
    except ValueError as err:
        raise BadRequest(str(err), kind="simulator") from err
    await run_blocking(request, sim.save)
    return JSONResponse(_user_json(user))


@guarded("simulator", "delete")
async def user_remove(request: Request) -> Response:
    sim = listener(request).sim
    sim.users.remove(str(request.path_params["name"]))
    await run_blocking(request, sim.save)
    return JSONResponse({})


@guarded("simulator", "update")
async def vm_project(request: Request) -> Response:
    body = await json_body(request, kind="simulator")
    project = body.get("project")
    if project is not None and not isinstance(project, str):
        raise BadRequest(f"project: a name, a UUID or null (got {project!r})", kind="simulator")
    sim = listener(request).sim
    try:
        vm = await run_blocking(request, move_vm, sim, str(request.path_params["vm"]), project)
    except UnknownProject as err:
        raise BadRequest(str(err), kind="simulator") from err
    return JSONResponse({"project_uuid": vm.project_uuid})


def control_routes() -> list[Route]:
    disk = f"{PREFIX}/vms/{{vm}}/disks/{{index}}"
    return [
        Route(f"{disk}/data", disk_read, methods=["GET"]),
        Route(f"{disk}/data", disk_write, methods=["PUT"]),
        Route(f"{disk}/zero", _discard("zero"), methods=["POST"]),
        Route(f"{disk}/trim", _discard("trim"), methods=["POST"]),
        Route(f"{PREFIX}/faults", faults_list, methods=["GET"]),
        Route(f"{PREFIX}/faults", faults_add, methods=["POST"]),
        Route(f"{PREFIX}/faults", faults_clear, methods=["DELETE"]),
        Route(f"{PREFIX}/faults/{{id}}", fault_remove, methods=["DELETE"]),
        Route(f"{PREFIX}/stats", stats_get, methods=["GET"]),
        Route(f"{PREFIX}/stats", stats_reset, methods=["DELETE"]),
        Route(f"{PREFIX}/projects", projects_list, methods=["GET"]),
        Route(f"{PREFIX}/projects", projects_add, methods=["POST"]),
        Route(f"{PREFIX}/users", users_list, methods=["GET"]),
        Route(f"{PREFIX}/users", users_add, methods=["POST"]),
        Route(f"{PREFIX}/users/{{name}}", user_assign, methods=["PUT"]),
        Route(f"{PREFIX}/users/{{name}}", user_remove, methods=["DELETE"]),
        Route(f"{PREFIX}/vms/{{vm}}/project", vm_project, methods=["PUT"]),
    ]
