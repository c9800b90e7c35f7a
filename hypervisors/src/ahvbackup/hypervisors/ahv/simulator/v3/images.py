"""v3 images (Prism Central): list, get, create, delete, and the file upload/download."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .._http import guarded, injected_failure, json_body, run_blocking
from ..errors import BadRequest, EntityNotFound, InvalidRequest, SimulatorError
from ._common import (
    _READ_BLOCK,
    _Attrs,
    _base_url,
    _json,
    _list_response,
    _metadata_uuid,
    _sim,
    _uuid_param,
)
from .render import render_image

_IMAGE_ATTRS: _Attrs = {
    "name": lambda i: i.name,
    "image_name": lambda i: i.name,
    "uuid": lambda i: i.uuid,
    "image_type": lambda i: i.image_type,
}


@guarded("image", "read")
async def images_list(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="image", empty_ok=True)
    base = _base_url(request)
    return _list_response(body, kind="image", items=list(sim.images.values()),
                          attrs=_IMAGE_ATTRS, render=lambda i: render_image(sim, i, base_url=base))


@guarded("image", "read")
async def images_get(request: Request) -> Response:
    sim = _sim(request)
    image = sim.image(_uuid_param(request, "image"))
    return _json(render_image(sim, image, base_url=_base_url(request)))


@guarded("image", "create")
async def images_create(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="image")
    spec = body.get("spec") or {}
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("spec.name: required (got nothing)", kind="image")
    res = spec.get("resources") or {}
    image_type = res.get("image_type", "DISK_IMAGE")
    if image_type not in ("DISK_IMAGE", "ISO_IMAGE"):
        raise InvalidRequest(f"spec.resources.image_type: DISK_IMAGE or ISO_IMAGE "
                             f"(got {image_type!r})", kind="image")
    src = res.get("data_source_reference") or {}
    if src and src.get("kind") != "vm_disk":
        raise InvalidRequest("spec.resources.data_source_reference.kind: must be vm_disk "
                             f"(got {src.get('kind')!r})", kind="image")
    uuid = _metadata_uuid(body, "image")
    image = await run_blocking(request, lambda: sim.create_image(
        name=name, description=spec.get("description", ""), image_type=image_type,
        source_uri=res.get("source_uri"), source_vmdisk=src.get("uuid"), uuid=uuid,
        fail=injected_failure(request),
    ))
    return _json(render_image(sim, image, base_url=_base_url(request)), 202)


@guarded("image", "delete")
async def images_delete(request: Request) -> Response:
    sim = _sim(request)
    image = sim.image(_uuid_param(request, "image"))
    rendered = render_image(sim, image, base_url=_base_url(request))
    task = await run_blocking(request, lambda: sim.delete_image(
        image.uuid, fail=injected_failure(request)))
    rendered["status"]["state"] = "DELETE_PENDING"
    rendered["status"]["execution_context"] = {"task_uuid": [task.uuid]}
    rendered.pop("spec", None)
    return _json(rendered, 202)


class _RangeError(SimulatorError):
    status = 416
    reason = "INVALID_REQUEST"


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single ``bytes=`` range, None for the whole file."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        raise _RangeError(f"Range: only one 'bytes=first-last' range is supported (got "
                          f"{header!r})", kind="image")
    first_s, last_s = m.groups()
    if not first_s:
        n = int(last_s)
        if n == 0:
            raise _RangeError(f"Range: empty suffix range {header!r}", kind="image")
        return max(0, size - n), size - 1
    first = int(first_s)
    last = min(int(last_s), size - 1) if last_s else size - 1
    if first >= size or (last_s and int(last_s) < first):
        raise _RangeError(f"Range: {header!r} is not satisfiable for a file of {size} bytes",
                          kind="image")
    return first, last


@guarded("image", "read")
async def image_file_get(request: Request) -> Response:
    sim = _sim(request)
    image = sim.image(_uuid_param(request, "image"))
    if image.size is None or image.disk_id is None:
        raise EntityNotFound("image file", image.uuid)
    if not sim.task_done(image.task_uuid):
        raise _NotReady(image.uuid)
    size = image.size
    try:
        rng = _parse_range(request.headers.get("range"), size)
    except _RangeError:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    first, last = rng if rng else (0, size - 1)
    length = last - first + 1 if size else 0
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(length)}
    status = 200
    if rng is not None:
        status = 206
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    uuid = image.uuid
    stats = sim.stats

    async def chunks() -> AsyncIterator[bytes]:
        stats.active_image_reads += 1
        stats.peak_concurrent_image_reads = max(stats.peak_concurrent_image_reads,
                                                stats.active_image_reads)
        try:
            pos, end = first, first + length
            while pos < end:
                n = min(_READ_BLOCK, end - pos)
                yield await run_blocking(request, sim.read_image, uuid, pos, n)
                pos += n
        finally:
            stats.active_image_reads -= 1

    return StreamingResponse(chunks(), status_code=status, headers=headers,
                             media_type="application/octet-stream")


class _NotReady(SimulatorError):
    status = 409
    reason = "ENTITY_NOT_CONFIGURED"

    def __init__(self, uuid: str) -> None:
        super().__init__(
            f"image {uuid!r} is not ready yet (its create task is still running)", kind="image"
        )


_CHECKSUMS = {"SHA_1": "sha1", "SHA_256": "sha256"}


@guarded("image", "update")
async def image_file_put(request: Request) -> Response:
    sim = _sim(request)
    uuid = _uuid_param(request, "image")
    sim.image(uuid)
    ctype = request.headers.get("x-nutanix-checksum-type")
    expected = request.headers.get("x-nutanix-checksum-bytes")
    if ctype is not None and ctype not in _CHECKSUMS:
        raise BadRequest(f"X-Nutanix-Checksum-Type: SHA_1 or SHA_256 (got {ctype!r})",
                         kind="image")
    digest = hashlib.new(_CHECKSUMS[ctype]) if ctype else None
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else 0
    disk_id = await run_blocking(request, sim.start_upload, uuid, size)
    ok = False
    try:
        buf = bytearray()
        written = 0

        async def flush() -> None:
            nonlocal written
            if not buf:
                return
            end = written + len(buf)
            if end > sim.store.size(disk_id):
                await run_blocking(request, sim.store.resize, disk_id, end)
            data = bytes(buf)
            await run_blocking(request, sim.store.write, disk_id, written, data)
            written = end
            buf.clear()

        async for chunk in request.stream():
            if digest is not None:
                digest.update(chunk)
            buf += chunk
            if len(buf) >= _READ_BLOCK:
                await flush()
        await flush()
        if digest is not None and expected and digest.hexdigest() != expected.lower():
            raise BadRequest(
                f"X-Nutanix-Checksum-Bytes: the uploaded data has {ctype} {digest.hexdigest()} "
                f"(expected {expected})", kind="image",
            )
        ok = True
    finally:
        await run_blocking(request, lambda: sim.finish_upload(uuid, ok=ok))
    return Response(status_code=200)
