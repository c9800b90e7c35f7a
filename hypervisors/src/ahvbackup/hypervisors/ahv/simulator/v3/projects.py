"""v3 projects (Prism Central): list and get, in the shapes of the official v3 Swagger
(`project_list_intent_response`, `project_intent_response`), and the project scope of a
user's role assignment.

A user whose assignment is scoped to projects (`users.User.projects`) sees only those
projects and their VMs; acting on a VM of another project answers 403 naming the project
scope, as PC answers a project member (the message text is UNVERIFIED against a real PC).
`move_vm` is the Python API that puts a VM into a project (the control API calls it too).
"""

from __future__ import annotations

__all__ = ["check_scope", "move_vm", "project_reference", "projects_get", "projects_list"]

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from .._http import guarded, json_body
from ..errors import EntityNotFound, Forbidden
from ..model import Project, Vm, rfc3339
from ..users import User
from ._common import _json, _list_response, _sim, _uuid_param
from .render import API_VERSION

if TYPE_CHECKING:
    from ..simulator import Simulator


def project_reference(sim: Simulator, project_uuid: str | None) -> dict[str, Any] | None:
    """``metadata.project_reference`` of an entity in that project."""
    project = sim.users.projects.get(project_uuid or "")
    if project is None:
        return None
    return {"kind": "project", "uuid": project.uuid, "name": project.name}


def check_scope(user: User, vm: Vm) -> None:
    """403 unless the user's role assignment covers the VM's project."""
    if not user.sees(vm.project_uuid):
        raise Forbidden(
            f"user {user.name!r} (role {user.role!r}) may not access VM {vm.uuid}: its "
            "role assignment is scoped to other projects",
            kind="vm", details={"permission": "project_scope"},
        )


def move_vm(sim: Simulator, vm_uuid: str, project: str | None) -> Vm:
    """Put the VM into `project` (a name or UUID; None: into no project) and persist it."""
    vm = sim.vm(vm_uuid)
    vm.project_uuid = sim.users.project(project).uuid if project else None
    sim.save()
    return vm


def render_project(sim: Simulator, project: Project) -> dict[str, Any]:
    users = [{"kind": "user", "uuid": u.uuid, "name": u.name}
             for u in sim.users if project.uuid in u.projects]
    resources = {"user_reference_list": users}
    return {
        "api_version": API_VERSION,
        "metadata": {"kind": "project", "uuid": project.uuid, "name": project.name,
                     "spec_version": 0, "categories": {},
                     "creation_time": rfc3339(project.created),
                     "last_update_time": rfc3339(project.created)},
        "spec": {"name": project.name, "description": project.description,
                 "resources": resources},
        "status": {"name": project.name, "description": project.description,
                   "state": "COMPLETE", "resources": resources},
    }


def _visible(request: Request) -> list[Project]:
    user: User = request.scope["sim.user"]
    return [p for p in list(_sim(request).users.projects.values()) if user.sees(p.uuid)]


@guarded("project", "read")
async def projects_list(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="project", empty_ok=True)
    return _list_response(body, kind="project", items=_visible(request),
                          attrs={"name": lambda p: p.name, "uuid": lambda p: p.uuid},
                          render=lambda p: render_project(sim, p))


@guarded("project", "read")
async def projects_get(request: Request) -> Response:
    uuid = _uuid_param(request, "project")
    for project in _visible(request):
        if project.uuid == uuid:
            return _json(render_project(_sim(request), project))
    raise EntityNotFound("project", uuid)
