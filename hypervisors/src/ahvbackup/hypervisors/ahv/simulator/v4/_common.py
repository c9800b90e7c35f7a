"""What every v4 route module shares: versions, envelopes, errors, paging, tasks, ETags, replay.

Shapes follow the official v4 SDKs' models (docs/nutanix-api.md 1.3-1.6): every answer is
``{"data": ..., "metadata": ApiResponseMetadata, "$objectType": "<ns>.v4...ApiResponse"}`` with
``$objectType`` on the data items (the SDKs pick model classes by it), and errors are
``<ns>.v4.error.ErrorResponse`` carrying a list of ``AppMessage``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._http import Handler, listener
from ..errors import BadRequest, SimulatorError
from ..tokens import StoredAnswer

if TYPE_CHECKING:
    from ..model import Task
    from ..simulator import Simulator

#: the released versions served per namespace (the highest is what the SDKs of
#: docs/nutanix-api.md ship: vmm/clustermgmt/volumes v4.3, dataprotection/prism v4.4)
VERSIONS: dict[str, tuple[str, ...]] = {
    "vmm": ("v4.0", "v4.1", "v4.2", "v4.3"),
    "clustermgmt": ("v4.0", "v4.1", "v4.2", "v4.3"),
    "volumes": ("v4.0", "v4.1", "v4.2", "v4.3"),
    "dataprotection": ("v4.0", "v4.1", "v4.2", "v4.3", "v4.4"),
    "prism": ("v4.0", "v4.1", "v4.2", "v4.3", "v4.4"),
}
NAMESPACES = tuple(VERSIONS)
TASK_PREFIX = "ZXJnb24=:"  # base64("ergon") + ":" (docs/nutanix-api.md 3.3)
_MAX_LIMIT = 100
_DEFAULT_LIMIT = 50


class _VersionConvertor(Convertor[str]):
    """A ``v4.N`` path segment (any released v4 minor; each route checks its namespace's)."""

    regex = r"v4\.[0-9]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("v4ver", _VersionConvertor())


def prefix(ns: str) -> str:
    """The route prefix of namespace ``ns``: ``/api/<ns>/{version:v4ver}``."""
    return f"/api/{ns}/{{version:v4ver}}"


def v4_namespace(path: str) -> str | None:
    """The v4 namespace a request path belongs to (None for v3 and everything else)."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "api" and parts[2] in VERSIONS and (
            parts[3].startswith("v4") or parts[3] == "unversioned"):
        return parts[2]
    return None


def is_v4_path(path: str) -> bool:
    return v4_namespace(path) is not None or path.rstrip("/") == "/api/actuator/versionroutes"


def sim_of(request: Request) -> Simulator:
    return listener(request).sim


# ---- values ---------------------------------------------------------------------------------

def ts(epoch: float) -> str:
    """An RFC 3339 timestamp with microseconds, as v4 answers carry them."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def parse_ts(value: Any, where: str) -> float:
    if not isinstance(value, str):
        raise BadRequest(f"{where}: an RFC 3339 date-time is required (got {value!r})")
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as err:
        raise BadRequest(f"{where}: not an RFC 3339 date-time ({value!r})") from err


def ipv4(value: str) -> dict[str, Any]:
    return {"ipv4": {"value": value, "prefixLength": 32}}


def task_ext_id(task_uuid: str) -> str:
    return TASK_PREFIX + task_uuid


def task_ref(task: Task | str) -> dict[str, Any]:
    uuid = task if isinstance(task, str) else task.uuid
    return {"extId": task_ext_id(uuid), "$objectType": "prism.v4.config.TaskReference"}


def etag_of(*parts: Any) -> str:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:20]
    return f'"{digest}"'


def check_if_match(request: Request, current: str, kind: str) -> None:
    """Refuse a change without ``If-Match`` (428) or with a stale one (412)."""
    sent = request.headers.get("if-match")
    if sent is None:
        raise PreconditionRequired(
            f"If-Match: required; GET the {kind} and send its ETag", kind=kind)
    if sent.strip().removeprefix("W/") != current:
        raise PreconditionFailed(
            f"If-Match: {sent!r} does not match the {kind}'s current ETag; GET it again",
            kind=kind, details={"etag": current})


class PreconditionRequired(SimulatorError):
    status = 428
    reason = "PRECONDITION_REQUIRED"


class PreconditionFailed(SimulatorError):
    status = 412
    reason = "PRECONDITION_FAILED"


class Unauthorized(SimulatorError):
    status = 401
    reason = "AUTHENTICATION_REQUIRED"


# ---- envelopes ------------------------------------------------------------------------------

def metadata(*, links: Sequence[dict[str, str]] = (), total: int | None = None,
             paginated: bool = False, extra: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {
        "flags": [
            {"name": "hasError", "value": False, "$objectType": "common.v1.config.Flag"},
            {"name": "isPaginated", "value": paginated, "$objectType": "common.v1.config.Flag"},
        ],
        "links": [{"href": h["href"], "rel": h["rel"], "$objectType": "common.v1.response.ApiLink"}
                  for h in links],
        "$objectType": "common.v1.response.ApiResponseMetadata",
    }
    if total is not None:
        out["totalAvailableResults"] = total
    if extra:
        out["extraInfo"] = [{"name": e["name"], "value": e["value"],
                             "$objectType": "common.v1.config.KVPair"} for e in extra]
    return out


def answer(request: Request, data: Any, *, item_type: str, status: int = 200,
           meta: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
           is_list: bool = False) -> JSONResponse:
    """One v4 answer: ``data`` (an object, or a list when ``is_list``) in its envelope."""
    body: dict[str, Any] = {
        "data": data,
        "metadata": meta or metadata(links=[{"href": str(request.url), "rel": "self"}]),
        "$dataItemDiscriminator": f"List<{item_type}>" if is_list else item_type,
        "$objectType": request.scope.get("v4.response_type", ""),
    }
    return JSONResponse(body, status_code=status, headers=headers)


def entity(item_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A top-level data entity: its fields plus ``$objectType`` and ``$reserved`` (where the
    SDKs keep the ``ETag``)."""
    return {**fields, "$objectType": item_type, "$reserved": {"$fv": "v4.r0"}}


def error_body(ns: str, response_type: str, *, status: int, reason: str, message: str,
               details: dict[str, Any] | None = None) -> dict[str, Any]:
    msg = {
        "message": message,
        "severity": "ERROR",
        "code": f"{ns.upper()}-{status}{_REASON_NUMBERS.get(reason, 0):02d}",
        "locale": "en_US",
        "errorGroup": reason,
        "argumentsMap": {str(k): str(v) for k, v in (details or {}).items()},
        "$objectType": f"{ns}.v4.error.AppMessage",
    }
    return {
        "data": {
            "error": [msg],
            "$errorItemDiscriminator": f"List<{ns}.v4.error.AppMessage>",
            "$objectType": f"{ns}.v4.error.ErrorResponse",
        },
        "$dataItemDiscriminator": f"{ns}.v4.error.ErrorResponse",
        "$objectType": response_type or f"{ns}.v4.error.ErrorResponse",
    }


_REASON_NUMBERS = {
    "INVALID_REQUEST": 1, "ENTITY_NOT_FOUND": 2, "ACCESS_DENIED": 3,
    "AUTHENTICATION_REQUIRED": 4, "CONCURRENT_REQUESTS_NOT_ALLOWED": 5,
    "PRECONDITION_FAILED": 6, "PRECONDITION_REQUIRED": 7, "ACTION_NOT_SUPPORTED": 8,
}


# ---- paging and filters ---------------------------------------------------------------------

def _int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: an integer is required (got {raw!r})") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: must be {lo}..{hi} (got {value})")
    return value


_CLAUSE = re.compile(
    r"\s*(?:(?P<attr>[A-Za-z_/]+)\s+(?P<op>eq|ne)\s+(?P<value>'(?:[^']|'')*'|[^\s)]+)"
    r"|startswith\(\s*(?P<sattr>[A-Za-z_/]+)\s*,\s*'(?P<svalue>(?:[^']|'')*)'\s*\))\s*")


def odata_filter(expr: str | None, attrs: dict[str, Callable[[Any], Any]]) -> Callable[[Any], bool]:
    """A predicate for the OData ``$filter`` subset the simulator understands: clauses
    ``attr eq 'v'``, ``attr ne 'v'`` and ``startswith(attr, 'v')`` joined by ``and``."""
    if not expr:
        return lambda item: True
    tests: list[Callable[[Any], bool]] = []
    for clause in re.split(r"\s+and\s+", expr.strip()):
        m = _CLAUSE.fullmatch(clause)
        if not m:
            raise BadRequest(f"$filter: cannot parse {clause!r} (the simulator supports "
                             "attr eq 'v', attr ne 'v', startswith(attr, 'v'), joined by and)")
        attr = m.group("attr") or m.group("sattr")
        if attr not in attrs:
            raise BadRequest(f"$filter: unknown attribute {attr!r} (known: "
                             f"{', '.join(sorted(attrs))})")
        tests.append(_clause_test(attrs[attr], m))
    return lambda item: all(t(item) for t in tests)


def _clause_test(get: Callable[[Any], Any], m: re.Match[str]) -> Callable[[Any], bool]:
    if m.group("sattr"):
        start = m.group("svalue").replace("''", "'")
        return lambda item: str(get(item)).startswith(start)
    raw = m.group("value")
    value = raw[1:-1].replace("''", "'") if raw.startswith("'") else raw
    if m.group("op") == "eq":
        return lambda item: str(get(item)) == value
    return lambda item: str(get(item)) != value


def list_answer(request: Request, items: list[Any], render: Callable[[Any], dict[str, Any]], *,
                item_type: str, attrs: dict[str, Callable[[Any], Any]] | None = None,
                extra: Sequence[dict[str, Any]] = ()) -> JSONResponse:
    """A paged list (``$page`` from 0, ``$limit`` 1..100, default 50; ``$filter``,
    ``$orderby attr [asc|desc]``) with ``totalAvailableResults`` and self/first/prev/next/last
    links."""
    page = _int_query(request, "$page", 0, 0, 10**9)
    limit = _int_query(request, "$limit", _DEFAULT_LIMIT, 1, _MAX_LIMIT)
    attrs = attrs or {}
    keep = odata_filter(request.query_params.get("$filter"), attrs)
    matched = [i for i in items if keep(i)]
    order = request.query_params.get("$orderby")
    if order:
        attr, _, direction = order.strip().partition(" ")
        if attr not in attrs:
            raise BadRequest(f"$orderby: unknown attribute {attr!r}")
        matched.sort(key=lambda i: str(attrs[attr](i)), reverse=direction.strip() == "desc")
    chunk = matched[page * limit:(page + 1) * limit]
    last = max(0, (len(matched) - 1) // limit)

    def href(p: int) -> str:
        return str(request.url.include_query_params(**{"$page": p, "$limit": limit}))

    links = [{"href": str(request.url), "rel": "self"}, {"href": href(0), "rel": "first"},
             {"href": href(last), "rel": "last"}]
    if page > 0:
        links.append({"href": href(min(page - 1, last)), "rel": "prev"})
    if page < last:
        links.append({"href": href(page + 1), "rel": "next"})
    meta = metadata(links=links, total=len(matched), paginated=True, extra=extra)
    return answer(request, [render(i) for i in chunk], item_type=item_type, meta=meta,
                  is_list=True)


# ---- the route decorator --------------------------------------------------------------------

def served(ns: str, response_type: str, *, replay: bool = False) -> Callable[[Handler], Handler]:
    """Mark a v4 handler: the namespace's versions only, errors in its envelope, and (``replay``,
    for changes) a repeated ``NTNX-Request-Id`` answered with the original answer."""

    def deco(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def wrapper(request: Request) -> Response:
            request.scope["v4.ns"] = ns
            request.scope["v4.response_type"] = f"{ns}.v4.{response_type}"
            version = request.path_params.get("version")
            if version is not None and version not in VERSIONS[ns]:
                from ..errors import EntityNotFound

                raise EntityNotFound("api version", f"{ns}/{version}")
            request_id = request.headers.get("ntnx-request-id") if replay else None
            if not request_id:
                return await fn(request)
            lis = listener(request)
            store = lis.sim.request_ids
            key = f"{request.scope['sim.user'].name}:{request_id}"  # one caller's ids only
            old = store.get(lis.name, key)
            if old is not None:
                if (old.method, old.path) != (request.method, request.url.path):
                    from ..errors import EntityConflict

                    raise EntityConflict(
                        f"NTNX-Request-Id {request_id!r} was already used for {old.method} "
                        f"{old.path}", details={"request_id": request_id})
                return Response(old.body, status_code=old.status, headers=dict(old.headers),
                                media_type="application/json")
            response = await fn(request)
            if 200 <= response.status_code < 300 and isinstance(response, JSONResponse):
                headers = tuple((k, v) for k, v in response.headers.items()
                                if k.lower() not in ("content-length", "set-cookie"))
                store.put(lis.name, key, StoredAnswer(
                    request.method, request.url.path, response.status_code,
                    bytes(response.body), headers))
            return response

        return wrapper

    return deco
