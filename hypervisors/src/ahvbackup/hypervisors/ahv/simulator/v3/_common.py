"""What the v3 route modules share: path and body helpers, and v3 list handling."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .._http import listener
from ..errors import BadRequest, InvalidRequest
from .render import API_VERSION

if TYPE_CHECKING:
    from ..simulator import Simulator

V3 = "/api/nutanix/v3"
_MiB = 1 << 20
_READ_BLOCK = 4 * _MiB
_MAX_LENGTH = 500
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _sim(request: Request) -> Simulator:
    return listener(request).sim


def _base_url(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def _uuid_param(request: Request, kind: str) -> str:
    value = str(request.path_params["uuid"])
    if not _UUID.match(value):
        raise BadRequest(f"uuid: not a UUID (got {value!r})", kind=kind)
    return value


def _metadata_uuid(body: dict[str, Any], kind: str) -> str | None:
    value = (body.get("metadata") or {}).get("uuid")
    if value is not None and (not isinstance(value, str) or not _UUID.match(value)):
        raise InvalidRequest(f"metadata.uuid: not a UUID (got {value!r})", kind=kind)
    return value


_Attrs = dict[str, Callable[[Any], Any]]


def _filtered(items: list[Any], expr: str | None, attrs: _Attrs, kind: str) -> list[Any]:
    """Apply a v3 (FIQL subset) filter: clauses ``attr==value`` / ``attr!=value`` joined by ``;``.

    Values are matched whole, as regular expressions (so ``vm_name==web-.*`` works).
    """
    if not expr:
        return items
    out = items
    for clause in expr.split(";"):
        m = re.fullmatch(r"\s*([A-Za-z_.]+)\s*(==|!=)\s*(.*?)\s*", clause)
        if not m:
            raise BadRequest(f"filter: cannot parse {clause!r} (expected attr==value)", kind=kind)
        attr, op, value = m.groups()
        if attr not in attrs:
            raise BadRequest(
                f"filter: unknown attribute {attr!r} for kind {kind} "
                f"(known: {', '.join(sorted(attrs))})", kind=kind,
            )
        try:
            pattern = re.compile(value)
        except re.error:
            pattern = re.compile(re.escape(value))
        get = attrs[attr]

        def keep(item: Any, get: Callable[[Any], Any] = get, pattern: re.Pattern[str] = pattern,
                 op: str = op) -> bool:
            hit = pattern.fullmatch(str(get(item))) is not None
            return hit if op == "==" else not hit

        out = [i for i in out if keep(i)]
    return out


def _list_response(
    body: dict[str, Any], *, kind: str, items: list[Any], attrs: _Attrs,
    render: Callable[[Any], dict[str, Any]],
) -> JSONResponse:
    offset = body.get("offset", 0)
    length = body.get("length", 20)
    if not isinstance(offset, int) or offset < 0:
        raise BadRequest(f"offset: must be a non-negative integer (got {offset!r})", kind=kind)
    if not isinstance(length, int) or length < 1:
        raise BadRequest(f"length: must be a positive integer (got {length!r})", kind=kind)
    length = min(length, _MAX_LENGTH)
    matched = _filtered(items, body.get("filter"), attrs, kind)
    sort_attr = body.get("sort_attribute")
    if sort_attr:
        if sort_attr not in attrs:
            raise BadRequest(f"sort_attribute: unknown attribute {sort_attr!r}", kind=kind)
        matched = sorted(matched, key=lambda i: str(attrs[sort_attr](i)),
                         reverse=body.get("sort_order") == "DESCENDING")
    page = matched[offset:offset + length]
    metadata: dict[str, Any] = {
        "kind": kind, "total_matches": len(matched), "offset": offset, "length": len(page),
    }
    for key in ("filter", "sort_attribute", "sort_order"):
        if body.get(key):
            metadata[key] = body[key]
    return _json({
        "api_version": API_VERSION,
        "metadata": metadata,
        "entities": [render(i) for i in page],
    })
