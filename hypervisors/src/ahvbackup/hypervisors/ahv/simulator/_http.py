"""Helpers shared by the simulator's route modules: the listener context, guards, bodies."""

from __future__ import annotations

__all__ = [
    "Listener",
    "guarded",
    "injected_failure",
    "json_body",
    "listener",
    "run_blocking",
]

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response

from .errors import BadRequest, Forbidden, InvalidRequest

if TYPE_CHECKING:
    from .simulator import Simulator

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Listener:
    """One listener's identity: Prism Central (``cluster_uuid`` None) or one Prism Element."""

    sim: Simulator
    name: str
    cluster_uuid: str | None
    limiter: anyio.CapacityLimiter

    @property
    def is_pc(self) -> bool:
        return self.cluster_uuid is None


def listener(request: Request) -> Listener:
    return request.app.state.listener  # type: ignore[no-any-return]


async def run_blocking(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking model or store call in a worker thread (bounded per listener)."""
    return await anyio.to_thread.run_sync(
        functools.partial(fn, *args), limiter=listener(request).limiter
    )


#: the Prism Central RBAC permission each change needs, as the 403 names it (the names follow
#: PC's role editor; UNVERIFIED against a real PC's error text)
_ENTITY_NAMES = {"vm": "Virtual_Machine", "image": "Image", "volume_group": "Volume_Group",
                 "vm_snapshot": "Vm_Snapshot", "recovery_point": "Recovery_Point",
                 "subnet": "Subnet", "cluster": "Cluster"}


def permission_name(kind: str, verb: str) -> str:
    """``Create_Virtual_Machine`` for (vm, create)."""
    what = _ENTITY_NAMES.get(kind, kind.title().replace(" ", "_"))
    return f"{verb.title()}_{what}"


def guarded(kind: str, verb: str) -> Callable[[Handler], Handler]:
    """Refuse the request with 403 unless the user's role may ``verb`` entities of ``kind``;
    the answer names the permission the role lacks."""

    def deco(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def wrapper(request: Request) -> Response:
            user = request.scope["sim.user"]
            if not user.role_def.allows(kind, verb):
                permission = permission_name(kind, verb)
                raise Forbidden(
                    f"user {user.name!r} (role {user.role!r}) may not {verb} {kind} entities: "
                    f"the role lacks the permission {permission}",
                    kind=kind, details={"permission": permission},
                )
            return await fn(request)

        return wrapper

    return deco


async def json_body(request: Request, *, kind: str, empty_ok: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if empty_ok:
            return {}
        raise InvalidRequest("request body: a JSON object is required (got an empty body)",
                             kind=kind)
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise BadRequest(f"request body: not valid JSON ({err})", kind=kind) from err
    if not isinstance(body, dict):
        raise BadRequest(
            f"request body: must be a JSON object (got {type(body).__name__})", kind=kind
        )
    return body


def injected_failure(request: Request) -> str | None:
    """The error a fault rule (``task_fail``) wants this request's task to end with."""
    return request.scope.get("sim.task_fail")
