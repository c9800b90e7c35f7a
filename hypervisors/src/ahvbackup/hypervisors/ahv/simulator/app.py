"""One ASGI app per listener: request counting, fault injection, authentication, then routing.

``pc_app(sim)`` and ``pe_app(sim, cluster_uuid)`` build them. Which routes each listener serves
is the table ``PC_ROUTES`` / ``PE_ROUTES``: one entry per route module, each a function that
returns that module's routes. The v4 namespaces (``/api/vmm``, ``/api/clustermgmt``,
``/api/dataprotection``, ``/api/volumes``, ``/api/prism``) go there as further modules beside
v3, over the same ``Simulator``.
"""

from __future__ import annotations

__all__ = ["PC_COOKIE", "PC_ROUTES", "PE_COOKIE", "PE_ROUTES", "ListenerApp", "pc_app", "pe_app"]

import base64
import binascii
from collections.abc import Callable, Sequence
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from ._http import Listener
from .control import PREFIX as CONTROL_PREFIX
from .control import control_routes
from .diskstore import UnknownDiskError, UnknownSnapshotError
from .errors import SimulatorError
from .users import User
from .v2_volume_groups import volume_group_routes
from .v3 import pc_routes, pe_routes
from .v3.render import error_body
from .v4 import error_body as v4_error_body
from .v4 import is_v4_path, v4_namespace
from .v4 import pc_routes as v4_pc_routes
from .v4 import pe_routes as v4_pe_routes

if TYPE_CHECKING:
    from .simulator import Simulator

PC_COOKIE = "NTNX_IAM_SESSION"
# UNVERIFIED: the name a real Prism Element gives its session cookie (doc 1.1 mentions it only
# for the v4 JWT); clients must treat the cookie as opaque.
PE_COOKIE = "NTNX_IGW_SESSION"

_REALM = 'Basic realm="Intent Gateway"'


RouteSet = Callable[[], list[Route]]

#: the route modules of each listener, matched in this order (v4 modules go beside v3)
PC_ROUTES: tuple[RouteSet, ...] = (pc_routes, v4_pc_routes, control_routes)
PE_ROUTES: tuple[RouteSet, ...] = (pe_routes, volume_group_routes, v4_pe_routes)


def pc_app(sim: Simulator) -> ListenerApp:
    """The Prism Central ASGI app (served, or in-process through ``httpx.ASGITransport``)."""
    return ListenerApp(sim, name="pc", cluster_uuid=None, routes=PC_ROUTES)


def pe_app(sim: Simulator, cluster_uuid: str | None = None) -> ListenerApp:
    """The ASGI app of one Prism Element (default: the first cluster)."""
    uuid = cluster_uuid or next(iter(sim.clusters))
    sim.cluster(uuid)  # an unknown cluster is refused here, not on the first request
    n = list(sim.clusters).index(uuid) + 1
    return ListenerApp(sim, name=f"pe{n}", cluster_uuid=uuid, routes=PE_ROUTES)


def _kind_of(path: str) -> str:
    parts = path.split("/")
    if len(parts) > 4 and parts[1:4] == ["api", "nutanix", "v3"]:
        return parts[4].rstrip("s") if parts[4] != "data" else "changed_regions"
    return ""


def _error(status: int, reason: str, message: str, *, kind: str = "",
           details: dict[str, Any] | None = None,
           headers: dict[str, str] | None = None, scope: Scope | None = None) -> JSONResponse:
    """The error answer: the v4 envelope of the namespace for a v4 path (``scope`` given), else
    the v3 one."""
    ns = v4_namespace(scope["path"]) if scope is not None else None
    if ns is not None:
        assert scope is not None
        body = v4_error_body(ns, scope.get("v4.response_type", ""), status=status, reason=reason,
                             message=message, details=details)
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(
        error_body(status=status, reason=reason, message=message, kind=kind, details=details),
        status_code=status, headers=headers,
    )


async def _on_sim_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SimulatorError)
    headers = {"WWW-Authenticate": _REALM} if exc.status == 401 else None
    return _error(exc.status, exc.reason, exc.message, kind=exc.kind or _kind_of(request.url.path),
                  details=exc.details, headers=headers, scope=request.scope)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = {404: "ENTITY_NOT_FOUND", 405: "ACTION_NOT_SUPPORTED"}.get(
        exc.status_code, "INVALID_REQUEST")
    message = (f"no such endpoint: {request.method} {request.url.path}"
               if exc.status_code in (404, 405) else str(exc.detail))
    return _error(exc.status_code, reason, message, kind=_kind_of(request.url.path),
                  headers=dict(exc.headers) if exc.headers else None, scope=request.scope)


async def _on_store_error(request: Request, exc: Exception) -> Response:
    return _error(404, "ENTITY_NOT_FOUND", str(exc), kind=_kind_of(request.url.path),
                  scope=request.scope)


async def _on_value_error(request: Request, exc: Exception) -> Response:
    return _error(422, "INVALID_REQUEST", str(exc), kind=_kind_of(request.url.path),
                  scope=request.scope)


class _Dropped(Exception):
    """Raised inside the app to make the server close the connection mid-response."""


class ListenerApp:
    """The ASGI app of one listener (Prism Central if ``cluster_uuid`` is None, else a PE)."""

    def __init__(self, sim: Simulator, *, name: str, cluster_uuid: str | None,
                 routes: Sequence[RouteSet]) -> None:
        self.sim = sim
        self.name = name
        self.is_pc = cluster_uuid is None
        self.cluster_uuid = cluster_uuid
        self.cookie_name = PC_COOKIE if self.is_pc else PE_COOKIE
        self.router = Starlette(
            routes=[route for route_set in routes for route in route_set()],
            exception_handlers={
                SimulatorError: _on_sim_error,
                HTTPException: _on_http_error,
                UnknownDiskError: _on_store_error,
                UnknownSnapshotError: _on_store_error,
                ValueError: _on_value_error,
            },
        )
        self.router.state.listener = Listener(
            sim=sim, name=name, cluster_uuid=cluster_uuid, limiter=anyio.CapacityLimiter(8)
        )

    def _template(self, scope: Scope) -> str:
        partial = None
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(route.path)  # type: ignore[attr-defined]
            if match == Match.PARTIAL and partial is None:
                partial = str(route.path)  # type: ignore[attr-defined]
        return partial or "<unrouted>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.router(scope, receive, send)
            return
        sim = self.sim
        method, path = scope["method"], scope["path"]
        env = "pc" if self.is_pc else "pe"
        base_headers = [(b"x-ntnx-env", env.encode())]
        control = path.startswith(CONTROL_PREFIX + "/")
        if not control:
            sim.stats.requests[f"{self.name} {method} {self._template(scope)}"] += 1
            rule = sim.faults.take(method, path)
            if rule is not None:
                if rule.latency:
                    await anyio.sleep(rule.latency)
                if rule.status is not None:
                    await self._fault_response(scope, receive, send, rule.status,
                                               rule.retry_after, rule.body)
                    return
                if rule.drop:
                    send = _dropping(send, rule.drop_after_bytes)
                if rule.task_fail:
                    scope["sim.task_fail"] = f"injected task failure (fault rule {rule.id})"
        if not sim.v4 and is_v4_path(path):  # a Prism that speaks only v3
            response = _error(404, "ENTITY_NOT_FOUND", f"no such endpoint: {method} {path}",
                              kind=_kind_of(path))
            await response(scope, receive, _with_headers(send, base_headers))
            return
        if path.startswith("/api/"):
            user, token = self._authenticate(scope)
            if user is None:
                response = _error(401, "AUTHENTICATION_REQUIRED",
                                  "authentication required: bad or missing credentials",
                                  kind=_kind_of(path), headers={"WWW-Authenticate": _REALM},
                                  scope=scope)
                await response(scope, receive, _with_headers(send, base_headers))
                return
            scope["sim.user"] = user
            secure = "; Secure" if scope.get("scheme") == "https" else ""
            cookie = (f"{self.cookie_name}={token}; Path=/; Max-Age="
                      f"{int(sim.sessions.lifetime)}; HttpOnly; SameSite=Lax{secure}")
            base_headers.append((b"set-cookie", cookie.encode()))
        await self.router(scope, receive, _with_headers(send, base_headers))

    async def _fault_response(self, scope: Scope, receive: Receive, send: Send, status: int,
                              retry_after: float | None, body: str | None) -> None:
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(int(retry_after) if float(retry_after).is_integer()
                                         else retry_after)
        response: Response
        if body is not None:
            response = Response(body, status_code=status, headers=headers,
                                media_type="text/plain")
        else:
            reason = {429: "RATE_LIMITED", 503: "SERVICE_UNAVAILABLE"}.get(status,
                                                                          "INTERNAL_ERROR")
            response = _error(status, reason, f"injected fault: HTTP {status}",
                              kind=_kind_of(scope["path"]), headers=headers, scope=scope)
        await response(scope, receive, send)

    def _authenticate(self, scope: Scope) -> tuple[User | None, str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        users, sessions = self.sim.users, self.sim.sessions
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "basic":
                return None, ""
            try:
                name, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, ""
            user = users.verify(name, password)
            if user is None:
                return None, ""
            return user, sessions.create(user.name, self.name)
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except CookieError:
            return None, ""
        morsel = cookies.get(self.cookie_name)
        if morsel is None:
            return None, ""
        owner = sessions.lookup(morsel.value, self.name)
        if owner is None and self.cluster_uuid is not None:
            # a PE also takes the JWT Prism Central's discover-cluster issued for its cluster
            claims = self.sim.tokens.verify(morsel.value, cluster_uuid=self.cluster_uuid)
            owner = str(claims["sub"]) if claims else None
        user = users.get(owner) if owner else None
        return user, (morsel.value if user else "")


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return wrapped


def _dropping(send: Send, after: int) -> Send:
    """Let the response start, pass at most ``after`` body bytes, then break the connection."""
    left = after

    async def wrapped(message: Message) -> None:
        nonlocal left
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            if len(body) < left or (left == 0 and not body and message.get("more_body")):
                left -= len(body)
                await send(message)
                return
            if left:
                await send({"type": "http.response.body", "body": body[:left], "more_body": True})
            raise _Dropped("injected connection drop")
        await send(message)

    return wrapped

