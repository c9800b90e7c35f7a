"""The v3 API (``/api/nutanix/v3``) and a PE v2.0 call, as Prism Central and Element serve them.

``pc_routes()`` and ``pe_routes()`` list what each listener answers; a route missing from a
listener answers 404 there, as the PE-only ``vm_snapshots`` and ``data/changed_regions`` do on a
real Prism Central.
"""

from __future__ import annotations

__all__ = ["V3", "pc_routes", "pe_routes"]

import hashlib
import re
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ._http import BadRequest, guarded, injected_failure, json_body, listener, run_blocking
from .model import Disk, Nic, Vm, rfc3339
from .simulator import EntityNotFound, InvalidRequest, Simulator, SimulatorError
from .v3_render import (
    API_VERSION,
    render_cluster,
    render_image,
    render_pc_cluster,
    render_snapshot,
    render_subnet,
    render_task,
    render_user,
    render_vm,
)

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


# ---- list handling --------------------------------------------------------------------------

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


# ---- clusters, subnets, users ---------------------------------------------------------------

@guarded("cluster", "read")
async def clusters_list(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    body = await json_body(request, kind="cluster", empty_ok=True)
    if lis.is_pc:
        items: list[Any] = [None, *sim.clusters.values()]
    else:
        items = [sim.cluster(lis.cluster_uuid or "")]

    def render(c: Any) -> dict[str, Any]:
        return render_pc_cluster(sim) if c is None else render_cluster(sim, c)

    names: _Attrs = {"name": lambda c: sim.pc_name if c is None else c.name}
    return _list_response(body, kind="cluster", items=items, attrs=names, render=render)


@guarded("cluster", "read")
async def clusters_get(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    uuid = _uuid_param(request, "cluster")
    if lis.is_pc and uuid == sim.pc_uuid:
        return _json(render_pc_cluster(sim))
    if not lis.is_pc and uuid != lis.cluster_uuid:
        raise EntityNotFound("cluster", uuid)
    return _json(render_cluster(sim, sim.cluster(uuid)))


def _subnets(request: Request) -> list[Any]:
    sim, lis = _sim(request), listener(request)
    subnets = list(sim.subnets.values())
    return [s for s in subnets if lis.is_pc or s.cluster_uuid == lis.cluster_uuid]


@guarded("subnet", "read")
async def subnets_list(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="subnet", empty_ok=True)
    attrs: _Attrs = {"name": lambda s: s.name, "subnet_name": lambda s: s.name,
                     "vlan_id": lambda s: s.vlan_id, "cluster_uuid": lambda s: s.cluster_uuid}
    return _list_response(body, kind="subnet", items=_subnets(request), attrs=attrs,
                          render=lambda s: render_subnet(sim, s))


@guarded("subnet", "read")
async def subnets_get(request: Request) -> Response:
    uuid = _uuid_param(request, "subnet")
    for s in _subnets(request):
        if s.uuid == uuid:
            return _json(render_subnet(_sim(request), s))
    raise EntityNotFound("subnet", uuid)


@guarded("user", "read")
async def users_me(request: Request) -> Response:
    return _json(render_user(_sim(request), request.scope["sim.user"]))


# ---- VMs ------------------------------------------------------------------------------------

def _vms(request: Request) -> list[Vm]:
    sim, lis = _sim(request), listener(request)
    vms = list(sim.vms.values())  # a snapshot: worker threads may add VMs meanwhile
    return [v for v in vms if lis.is_pc or v.cluster_uuid == lis.cluster_uuid]


def _vm(request: Request, uuid: str) -> Vm:
    lis = listener(request)
    vm = lis.sim.vm(uuid)
    if not lis.is_pc and vm.cluster_uuid != lis.cluster_uuid:
        raise EntityNotFound("vm", uuid)
    return vm


_VM_ATTRS: _Attrs = {
    "vm_name": lambda v: v.name,
    "name": lambda v: v.name,
    "uuid": lambda v: v.uuid,
    "power_state": lambda v: v.power_state,
    "cluster_uuid": lambda v: v.cluster_uuid,
    "cluster": lambda v: v.cluster_uuid,
}


@guarded("vm", "read")
async def vms_list(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="vm", empty_ok=True)
    return _list_response(body, kind="vm", items=_vms(request), attrs=_VM_ATTRS,
                          render=lambda v: render_vm(sim, v))


@guarded("vm", "read")
async def vms_get(request: Request) -> Response:
    return _json(render_vm(_sim(request), _vm(request, _uuid_param(request, "vm"))))


def _int(value: Any, where: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{where}: must be an integer >= {minimum} (got {value!r})", kind="vm")
    return value


def _parse_vm(
    request: Request, body: dict[str, Any], *, uuid: str, old: Vm | None
) -> Vm:
    """A ``Vm`` record from a v3 VM intent (create: ``old`` None; update: the full new spec)."""
    sim, lis = _sim(request), listener(request)
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise InvalidRequest("spec: required object is missing", kind="vm")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("spec.name: required (got nothing)", kind="vm")
    res = spec.get("resources") or {}
    if old is not None:
        cluster_uuid = old.cluster_uuid
    else:
        cluster_uuid = ((spec.get("cluster_reference") or {}).get("uuid")
                        or lis.cluster_uuid or "")
        if not cluster_uuid and len(sim.clusters) == 1:
            cluster_uuid = next(iter(sim.clusters))
        if cluster_uuid not in sim.clusters or (lis.cluster_uuid not in (None, cluster_uuid)):
            raise InvalidRequest(
                f"spec.cluster_reference.uuid: unknown cluster {cluster_uuid!r}", kind="vm"
            )
    cluster = sim.clusters[cluster_uuid]
    old_disks = {d.uuid: d for d in old.disks} if old else {}
    disks: list[Disk] = []
    used: dict[str, set[int]] = {}
    for i, d in enumerate(res.get("disk_list") or []):
        where = f"spec.resources.disk_list[{i}]"
        props = d.get("device_properties") or {}
        addr = props.get("disk_address") or {}
        device_type = props.get("device_type", "DISK")
        if device_type not in ("DISK", "CDROM"):
            raise InvalidRequest(f"{where}.device_properties.device_type: DISK or CDROM "
                                 f"(got {device_type!r})", kind="vm")
        adapter = addr.get("adapter_type", "SCSI" if device_type == "DISK" else "IDE")
        prev = old_disks.get(d.get("uuid", ""))
        size = d.get("disk_size_bytes")
        if size is None and d.get("disk_size_mib") is not None:
            size = _int(d["disk_size_mib"], f"{where}.disk_size_mib") * _MiB
        source = d.get("data_source_reference") or {}
        image_uuid = None
        if source:
            if source.get("kind") != "image":
                raise InvalidRequest(f"{where}.data_source_reference.kind: only 'image' is "
                                     f"supported (got {source.get('kind')!r})", kind="vm")
            image_uuid = source.get("uuid")
            if prev is None:
                image = sim.image(str(image_uuid))
                if image.size is None:
                    raise InvalidRequest(f"{where}: image {image_uuid!r} has no data", kind="vm")
                size = max(size or 0, image.size)
        if device_type == "DISK":
            if prev is None and size is None:
                raise InvalidRequest(
                    f"{where}: disk_size_bytes (or disk_size_mib, or an image "
                    "data_source_reference) is required for a new disk", kind="vm",
                )
            if size is None and prev is not None:
                size = prev.size
            size = _int(size, f"{where}.disk_size_bytes", minimum=1)
        ctr = ((d.get("storage_config") or {}).get("storage_container_reference") or {})
        container_uuid = prev.container_uuid if prev else cluster.container(ctr.get("uuid")).uuid
        taken = used.setdefault(adapter, set())
        index = addr.get("device_index")
        if index is None:
            index = prev.device_index if prev else next(n for n in range(1024) if n not in taken)
        index = _int(index, f"{where}.device_properties.disk_address.device_index")
        if index in taken:
            raise InvalidRequest(f"{where}: {adapter}.{index} is used by another disk", kind="vm")
        taken.add(index)
        disks.append(Disk(
            uuid=prev.uuid if prev else str(uuidlib.uuid4()),
            device_type=device_type,
            adapter_type=adapter,
            device_index=index,
            size=size or 0,
            container_uuid=container_uuid,
            source_image=prev.source_image if prev else image_uuid,
        ))
    old_nics = {n.uuid: n for n in old.nics} if old else {}
    nics: list[Nic] = []
    for i, n in enumerate(res.get("nic_list") or []):
        subnet_uuid = (n.get("subnet_reference") or {}).get("uuid")
        if subnet_uuid not in sim.subnets:
            raise InvalidRequest(f"spec.resources.nic_list[{i}].subnet_reference.uuid: unknown "
                                 f"subnet {subnet_uuid!r}", kind="vm")
        prev_nic = old_nics.get(n.get("uuid", ""))
        ips = n.get("ip_endpoint_list") or []
        nics.append(Nic(
            uuid=prev_nic.uuid if prev_nic else str(uuidlib.uuid4()),
            mac=n.get("mac_address") or (prev_nic.mac if prev_nic else _mac()),
            subnet_uuid=subnet_uuid,
            ip=ips[0].get("ip") if ips else None,
            connected=n.get("is_connected", True),
        ))
    power = res.get("power_state", old.power_state if old else "OFF")
    if power not in ("ON", "OFF"):
        raise InvalidRequest(f"spec.resources.power_state: ON or OFF (got {power!r})", kind="vm")
    ngt = ((res.get("guest_tools") or {}).get("nutanix_guest_tools")) or {}
    enabled = ngt.get("state", "ENABLED" if old and old.ngt_enabled else "DISABLED") == "ENABLED"
    if "ngt_state" in ngt:
        installed = ngt["ngt_state"] == "INSTALLED"
    else:
        installed = old.ngt_installed if old else enabled
    boot = (res.get("boot_config") or {}).get("boot_type", old.boot_type if old else "LEGACY")
    return Vm(
        uuid=uuid,
        name=name,
        cluster_uuid=cluster_uuid,
        description=spec.get("description", ""),
        num_sockets=_int(res.get("num_sockets", 1), "spec.resources.num_sockets", minimum=1),
        num_vcpus_per_socket=_int(res.get("num_vcpus_per_socket", 1),
                                  "spec.resources.num_vcpus_per_socket", minimum=1),
        memory_mib=_int(res.get("memory_size_mib", 1024), "spec.resources.memory_size_mib",
                        minimum=1),
        power_state=power,
        boot_type=boot,
        disks=disks,
        nics=nics,
        ngt_installed=installed,
        ngt_enabled=enabled,
        ngt_capabilities=list(ngt.get("enabled_capability_list",
                                      old.ngt_capabilities if old else [])),
        spec_version=old.spec_version if old else 0,
    )


def _mac() -> str:
    b = uuidlib.uuid4().bytes
    return "50:6b:8d:" + ":".join(f"{x:02x}" for x in b[:3])


@guarded("vm", "create")
async def vms_create(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="vm")
    uuid = _metadata_uuid(body, "vm") or str(uuidlib.uuid4())
    if uuid in sim.vms:
        return _json(render_vm(sim, sim.vms[uuid]), 202)
    vm = _parse_vm(request, body, uuid=uuid, old=None)
    vm = await run_blocking(request, lambda: sim.create_vm(vm, fail=injected_failure(request)))
    return _json(render_vm(sim, vm), 202)


@guarded("vm", "update")
async def vms_update(request: Request) -> Response:
    sim = _sim(request)
    uuid = _uuid_param(request, "vm")
    old = _vm(request, uuid)
    body = await json_body(request, kind="vm")
    spec_version = (body.get("metadata") or {}).get("spec_version")
    new = _parse_vm(request, body, uuid=uuid, old=old)
    vm = await run_blocking(request, lambda: sim.update_vm(
        new, spec_version=spec_version, fail=injected_failure(request)))
    return _json(render_vm(sim, vm), 202)


@guarded("vm", "delete")
async def vms_delete(request: Request) -> Response:
    sim = _sim(request)
    vm = _vm(request, _uuid_param(request, "vm"))
    rendered = render_vm(sim, vm)
    task = await run_blocking(request, lambda: sim.delete_vm(vm.uuid,
                                                             fail=injected_failure(request)))
    rendered["status"]["state"] = "DELETE_PENDING"
    rendered["status"]["execution_context"] = {"task_uuid": [task.uuid]}
    rendered.pop("spec", None)
    return _json(rendered, 202)


# ---- images (Prism Central) -----------------------------------------------------------------

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


# ---- tasks, idempotence identifiers ---------------------------------------------------------

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


# ---- vm snapshots and changed regions (Prism Element only) ----------------------------------

@guarded("vm_snapshot", "create")
async def snapshots_create(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    body = await json_body(request, kind="vm_snapshot")
    spec = body.get("spec") or {}
    vm_uuid = (spec.get("resources") or {}).get("entity_uuid")
    if not isinstance(vm_uuid, str) or not vm_uuid:
        raise InvalidRequest("spec.resources.entity_uuid: required (the VM to snapshot)",
                             kind="vm_snapshot")
    uuid = _metadata_uuid(body, "vm_snapshot")
    expiration = spec.get("expiration_time_msecs")
    snap = await run_blocking(request, lambda: sim.create_vm_snapshot(
        vm_uuid=vm_uuid,
        name=str(spec.get("name") or f"snapshot-{int(time.time())}"),
        snapshot_type=spec.get("snapshot_type", "CRASH_CONSISTENT"),
        cluster_uuid=lis.cluster_uuid or "",
        uuid=uuid,
        expiration_time_msecs=expiration if isinstance(expiration, int) else None,
        fail=injected_failure(request),
    ))
    return _json(render_snapshot(sim, snap), 202)


def _snapshot(request: Request, uuid: str) -> Any:
    lis = listener(request)
    snap = lis.sim.snapshot(uuid)
    if snap.cluster_uuid != lis.cluster_uuid:
        raise EntityNotFound("vm_snapshot", uuid)
    return snap


@guarded("vm_snapshot", "read")
async def snapshots_get(request: Request) -> Response:
    return _json(render_snapshot(_sim(request),
                                 _snapshot(request, _uuid_param(request, "vm_snapshot"))))


@guarded("vm_snapshot", "read")
async def snapshots_list(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    body = await json_body(request, kind="vm_snapshot", empty_ok=True)
    items = [s for s in list(sim.snapshots.values()) if s.cluster_uuid == lis.cluster_uuid]
    attrs: _Attrs = {"entity_uuid": lambda s: s.vm_uuid, "name": lambda s: s.name,
                     "uuid": lambda s: s.uuid, "snapshot_type": lambda s: s.snapshot_type}
    return _list_response(body, kind="vm_snapshot", items=items, attrs=attrs,
                          render=lambda s: render_snapshot(sim, s))


@guarded("vm_snapshot", "delete")
async def snapshots_delete(request: Request) -> Response:
    sim = _sim(request)
    snap = _snapshot(request, _uuid_param(request, "vm_snapshot"))
    rendered = render_snapshot(sim, snap)
    task = await run_blocking(request, lambda: sim.delete_vm_snapshot(
        snap.uuid, fail=injected_failure(request)))
    rendered["status"]["state"] = "DELETE_PENDING"
    rendered["status"]["execution_context"] = {"task_uuid": [task.uuid]}
    return _json(rendered, 202)


@guarded("vm_snapshot", "read")
async def changed_regions(request: Request) -> Response:
    sim = _sim(request)
    body = await json_body(request, kind="changed_regions")
    path = body.get("snapshot_file_path")
    if not isinstance(path, str) or not path:
        raise InvalidRequest("snapshot_file_path: required", kind="changed_regions")
    ref = body.get("reference_snapshot_file_path") or None
    start = body.get("start_offset", 0)
    end = body.get("end_offset")
    for key, value in (("start_offset", start), ("end_offset", end)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidRequest(f"{key}: must be a non-negative integer (got {value!r})",
                                 kind="changed_regions")
    result = await run_blocking(request, lambda: sim.changed_regions(
        path, reference_snapshot_file_path=ref, start_offset=start, end_offset=end))
    out: dict[str, Any] = {
        "region_list": [
            {"offset": r.offset, "length": r.length, "type": r.type} for r in result.regions
        ],
        "file_size": result.file_size,
    }
    if result.next_offset is not None:
        out["next_offset"] = result.next_offset
    return _json(out)


@guarded("storage_container", "read")
async def v2_storage_containers(request: Request) -> Response:
    sim, lis = _sim(request), listener(request)
    cluster = sim.cluster(lis.cluster_uuid or "")
    entities = [
        {"id": f"{cluster.cluster_id}::{n + 1}", "storage_container_uuid": c.uuid,
         "name": c.name, "cluster_uuid": cluster.uuid}
        for n, c in enumerate(cluster.containers)
    ]
    n = len(entities)
    return _json({"metadata": {"grand_total_entities": n, "total_entities": n, "count": n},
                  "entities": entities})


# ---- route tables ---------------------------------------------------------------------------

def _common() -> list[Route]:
    return [
        Route(f"{V3}/clusters/list", clusters_list, methods=["POST"]),
        Route(f"{V3}/clusters/{{uuid}}", clusters_get, methods=["GET"]),
        Route(f"{V3}/subnets/list", subnets_list, methods=["POST"]),
        Route(f"{V3}/subnets/{{uuid}}", subnets_get, methods=["GET"]),
        Route(f"{V3}/users/me", users_me, methods=["GET"]),
        Route(f"{V3}/vms/list", vms_list, methods=["POST"]),
        Route(f"{V3}/vms", vms_create, methods=["POST"]),
        Route(f"{V3}/vms/{{uuid}}", vms_get, methods=["GET"]),
        Route(f"{V3}/vms/{{uuid}}", vms_update, methods=["PUT"]),
        Route(f"{V3}/vms/{{uuid}}", vms_delete, methods=["DELETE"]),
        Route(f"{V3}/tasks/list", tasks_list, methods=["POST"]),
        Route(f"{V3}/tasks/{{uuid}}", tasks_get, methods=["GET"]),
    ]


def pc_routes() -> list[Route]:
    return [
        *_common(),
        Route(f"{V3}/idempotence_identifiers", idempotence_create, methods=["POST"]),
        Route(f"{V3}/images/list", images_list, methods=["POST"]),
        Route(f"{V3}/images", images_create, methods=["POST"]),
        Route(f"{V3}/images/{{uuid}}", images_get, methods=["GET"]),
        Route(f"{V3}/images/{{uuid}}", images_delete, methods=["DELETE"]),
        Route(f"{V3}/images/{{uuid}}/file", image_file_get, methods=["GET"]),
        Route(f"{V3}/images/{{uuid}}/file", image_file_put, methods=["PUT"]),
    ]


def pe_routes() -> list[Route]:
    return [
        *_common(),
        Route(f"{V3}/vm_snapshots/list", snapshots_list, methods=["POST"]),
        Route(f"{V3}/vm_snapshots", snapshots_create, methods=["POST"]),
        Route(f"{V3}/vm_snapshots/{{uuid}}", snapshots_get, methods=["GET"]),
        Route(f"{V3}/vm_snapshots/{{uuid}}", snapshots_delete, methods=["DELETE"]),
        Route(f"{V3}/data/changed_regions", changed_regions, methods=["POST"]),
        Route("/api/nutanix/v2.0/storage_containers", v2_storage_containers, methods=["GET"]),
        Route("/PrismGateway/services/rest/v2.0/storage_containers", v2_storage_containers,
              methods=["GET"]),
    ]
