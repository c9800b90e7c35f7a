"""Prism v4 calls on one endpoint, by composition over a `PrismHttp` transport.

`PrismV4` builds `/api/<ns>/<version>/...` paths from the versions discovery found, pages
lists with `$page`/`$limit`, sends every change with a fresh `NTNX-Request-Id` (so a retried
POST is answered with the original task instead of doing it twice) and polls prism tasks. It
never subclasses the v3 client: both only share the transport (TLS, auth, retries, rate limit).
"""

from __future__ import annotations

__all__ = ["LIST_LIMIT", "PrismV4"]

import re
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
import trio

from ahvbackup.core.errors import ApiServerError
from ahvbackup.core.secret import Secret

from .errors import PrismTaskError, PrismTimeoutError
from .http import PrismHttp
from .v4_models import V4Task

LIST_LIMIT = 100


def _data(body: Any, endpoint: str) -> Any:
    if not isinstance(body, Mapping) or "data" not in body:
        raise ApiServerError(f"Prism v4 answer to {endpoint} has no data", endpoint=endpoint)
    return body["data"]


#: a path segment that is an entity's extId (not part of the kind of task it starts)
_ID = re.compile(r"[0-9A-Fa-f-]{16,}")


class PrismV4:
    """v4 on `http` (Prism Central or a Prism Element), at `versions[namespace]`."""

    def __init__(self, http: PrismHttp, versions: Mapping[str, str]) -> None:
        self.http = http
        self.versions = dict(versions)

    @property
    def host(self) -> str:
        return self.http.host

    def path(self, ns: str, rest: str) -> str:
        return f"/api/{ns}/{self.versions[ns]}/{rest.lstrip('/')}"

    async def get(self, ns: str, rest: str) -> Any:
        path = self.path(ns, rest)
        return _data(await self.http.request_json("GET", path), f"GET {path}")

    async def get_with_etag(self, ns: str, rest: str) -> tuple[Any, str]:
        """The entity and its `ETag` (sent back as `If-Match` on a change of it)."""
        path = self.path(ns, rest)
        resp = await self.http.request("GET", path)
        etag = resp.headers.get("etag") or resp.headers.get("x-ntnx-etag") or ""
        return _data(resp.json(), f"GET {path}"), etag

    async def list_all(self, ns: str, rest: str, *, filter: str | None = None) -> list[Any]:
        """Every item of a list, page by page."""
        path = self.path(ns, rest)
        out: list[Any] = []
        page = 0
        while True:
            params = {"$page": str(page), "$limit": str(LIST_LIMIT)}
            if filter:
                params["$filter"] = filter
            body = await self.http.request_json("GET", path, params=params)
            items = _data(body, f"GET {path}") or []
            if not isinstance(items, list):
                raise ApiServerError(f"Prism v4 answer to GET {path}: data is not a list",
                                     endpoint=f"GET {path}")
            out += items
            total = ((body.get("metadata") or {}).get("totalAvailableResults")
                     if isinstance(body, Mapping) else None)
            page += 1
            if len(items) < LIST_LIMIT or (isinstance(total, int) and len(out) >= total):
                return out

    async def change(self, method: str, ns: str, rest: str, *, json: Any = None,
                     headers: Mapping[str, str] | None = None,
                     request_id: str | None = None) -> Any:
        """A create, update, delete or action: the answer's data (mostly a TaskReference).
        Retried safely: Prism answers a repeated NTNX-Request-Id with the original answer."""
        path = self.path(ns, rest)
        sent = {"NTNX-Request-Id": request_id or str(uuid.uuid4()), **(headers or {})}
        body = await self.http.request_json(method, path, json=json, headers=sent,
                                            idempotent=True)
        return _data(body, f"{method} {path}")

    async def task_of(self, method: str, ns: str, rest: str, **kw: Any) -> str:
        data = await self.change(method, ns, rest, **kw)
        ext_id = data.get("extId") if isinstance(data, Mapping) else None
        if not isinstance(ext_id, str) or not ext_id:
            raise ApiServerError(f"Prism v4 answer to {method} {self.path(ns, rest)} names "
                                 "no task", endpoint=f"{method} {rest}")
        return ext_id

    async def wait_task(self, ext_id: str, *, timeout: float = 600.0, poll: float = 0.5,
                        poll_cap: float = 5.0, expect: str = "task") -> V4Task:
        """Poll a prism task until SUCCEEDED (returned); FAILED or CANCELED raise
        PrismTaskError with Prism's messages. Paced by `expect` as v3's `wait_task`."""
        endpoint = f"GET {self.path('prism', 'config/tasks/' + ext_id)}"

        async def look() -> V4Task:
            return V4Task.from_api(await self.get("prism", f"config/tasks/{ext_id}"),
                                   endpoint=endpoint)

        seen: list[V4Task] = []
        with trio.move_on_after(timeout):
            await self.http.pacer.until(look, lambda t: t.done, expect=expect, poll=poll,
                                        poll_cap=poll_cap, seen=seen)
        task = seen[-1] if seen else None
        if task is None or not task.done:
            last = f" (last seen {task.status})" if task else ""
            raise PrismTimeoutError(f"Prism at {self.host}: task {ext_id} did not finish "
                                    f"within {timeout:g} s{last}", endpoint=endpoint)
        if task.status != "SUCCEEDED":
            raise PrismTaskError(f"Prism at {self.host}: {task.operation} task {ext_id} "
                                 f"{task.status}: {task.error or 'no detail given'}",
                                 endpoint=endpoint)
        return task

    async def run(self, method: str, ns: str, rest: str, *, timeout: float = 600.0,
                  poll: float = 0.5, expect: str = "", **kw: Any) -> V4Task:
        """A change and the wait for its task (paced as tasks of kind `expect`, by default
        the method and the path's last word)."""
        task = await self.task_of(method, ns, rest, **kw)
        kind = expect or " ".join([method, ns, *(p for p in rest.split("/")
                                                  if not _ID.fullmatch(p))])
        return await self.wait_task(task, timeout=timeout, poll=poll, expect=kind)


class JwtCookieAuth(httpx.Auth):
    """The only credential of a Prism Element CBT call: the JWT `discover-cluster` issued, as
    the `NTNX_IGW_SESSION` cookie (cookie name from third-party evidence, docs 1.1)."""

    def __init__(self, jwt: Secret) -> None:
        self._jwt = jwt

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Cookie"] = f"NTNX_IGW_SESSION={self._jwt.reveal()}"
        yield request
