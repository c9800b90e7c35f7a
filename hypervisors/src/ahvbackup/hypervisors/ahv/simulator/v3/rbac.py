"""v3 RBAC reads: ``GET /users/info`` (the caller's access control policies, each with its role
and that role's permission uuids) and ``POST /permissions/list`` (what each permission allows,
as ``resources.operation`` on ``resources.kind``), the shapes of the official v3 Swagger
(`user_info`, `access_control_policy_detail`, `role_acp`, `permission_list_intent_response`).

The simulator's roles (`users.ROLES`) say which entity kinds they may change; reads are always
allowed. Here each role becomes one access control policy over everything, holding a
``view`` permission for every kind and ``create``/``update``/``delete`` for the kinds it may
change. Permission *names* (``Create_Virtual_Machine``, as a 403 names them) follow PC's role
editor but are UNVERIFIED against a real PC; clients should match on (operation, kind), as
ahvbackup's health-check does. A user scoped to projects gets a policy whose context is
``PROJECT IN [uuids]`` (the Swagger's `scope_filter_expression`) instead of everything.
"""

from __future__ import annotations

__all__ = ["KINDS", "OPERATIONS", "permission_uuid", "permissions_list", "users_info"]

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .._http import guarded, json_body, permission_name
from ..users import ROLES, Role, User
from ._common import _json, _list_response
from .render import API_VERSION

#: every entity kind a simulator route guards
KINDS = ("cluster", "vm", "vm_snapshot", "image", "volume_group", "task", "subnet",
         "storage_container", "idempotence_identifier", "recovery_point", "user", "permission",
         "project")
#: v3 permission operations (the Swagger's x-ntnx-operations); "view" is a route's "read"
OPERATIONS = ("view", "create", "update", "delete")
_NS = uuid.UUID("6f9c1a52-3d0e-4b7a-9a51-7f2c0de1b0a1")


def permission_uuid(operation: str, kind: str) -> str:
    return str(uuid.uuid5(_NS, f"{operation}:{kind}"))


def _name(operation: str, kind: str) -> str:
    return permission_name(kind, operation)  # the name a 403 of a guarded route gives


def _granted(role: Role) -> list[tuple[str, str]]:
    return [(op, kind) for kind in KINDS for op in OPERATIONS
            if role.allows(kind, "read" if op == "view" else op)]


def _scope(user: User) -> list[dict[str, Any]]:
    if not user.scoped:
        return []
    return [{"operator": "IN", "left_hand_side": "PROJECT",
             "right_hand_side": {"uuid_list": list(user.projects)}}]


def render_user_info(user: User) -> dict[str, Any]:
    role = ROLES[user.role]
    return {
        "access_control_policy_list": [{
            "role": {"name": role.name,
                     "permission_uuid_list": [permission_uuid(op, k) for op, k in _granted(role)]},
            "filter_list": {"context_list": [{
                "scope_filter_expression_list": _scope(user),
                "entity_filter_expression_list": [{
                    "operator": "IN",
                    "left_hand_side": {"entity_type": "ALL"},
                    "right_hand_side": {"collection": "ALL"},
                }],
            }]},
        }],
        "user_details": {"username": user.name, "user_uuid": user.uuid,
                         "display_name": user.name, "user_type": "LOCAL"},
        "user_legacy_name": user.name,
    }


def _render_permission(item: tuple[str, str]) -> dict[str, Any]:
    op, kind = item
    resources = {"operation": op, "kind": kind}
    meta = {"kind": "permission", "uuid": permission_uuid(op, kind),
            "spec_version": 0, "categories": {}}
    return {
        "api_version": API_VERSION,
        "metadata": meta,
        "spec": {"name": _name(op, kind), "resources": resources},
        "status": {"name": _name(op, kind), "state": "COMPLETE", "resources": resources},
    }


@guarded("user", "read")
async def users_info(request: Request) -> Response:
    return _json(render_user_info(request.scope["sim.user"]))


@guarded("permission", "read")
async def permissions_list(request: Request) -> Response:
    body = await json_body(request, kind="permission", empty_ok=True)
    items = [(op, kind) for kind in KINDS for op in OPERATIONS]
    return _list_response(body, kind="permission", items=items,
                          attrs={"name": lambda p: _name(*p)}, render=_render_permission)
