"""Prism v3 endpoints, each returning models (never raw dicts).

The same class talks to Prism Central and to a Prism Element: PE-only calls (`vm_snapshots`,
`data/changed_regions`) answer 404 on PC, so the `Prism` facade sends them to the PE of the VM's
cluster. Request bodies are built by small pure functions (`vm_list_body`, `snapshot_body`, ...)
so tests can check them without a server.
"""

from __future__ import annotations

__all__ = [
    "LIST_PAGE",
    "PrismClient",
    "changed_regions_body",
    "image_body",
    "list_body",
    "snapshot_body",
]

import copy
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import trio

from ahvbackup.core.errors import ApiServerError, ConfigError

from .errors import PrismTaskError, PrismTimeoutError
from .http import V3, PrismHttp, log
from .models import (
    ChangedRegions,
    Cluster,
    CreateResult,
    IdempotenceIds,
    Image,
    Region,
    Task,
    User,
    Vm,
    VmSnapshot,
    task_uuids,
)

LIST_PAGE = 250
SNAPSHOT_TYPES = ("CRASH_CONSISTENT", "APPLICATION_CONSISTENT")

M = TypeVar("M")


def list_body(kind: str, *, offset: int, length: int, filter: str | None = None) -> dict[str, Any]:
    """Body of a v3 `POST /<kind>s/list` page."""
    body: dict[str, Any] = {"kind": kind, "offset": offset, "length": length}
    if filter:
        body["filter"] = filter
    return body


def snapshot_body(
    vm_uuid: str,
    *,
    name: str,
    snapshot_type: str = "CRASH_CONSISTENT",
    uuid: str | None = None,
    expiration_time_msecs: int | None = None,
) -> dict[str, Any]:
    """Body of PE `POST /vm_snapshots`; `uuid` (from `idempotence_identifiers`) makes a retried
    create return the same snapshot instead of a second one."""
    if snapshot_type not in SNAPSHOT_TYPES:
        raise ConfigError(
            f"snapshot type: expected one of {', '.join(SNAPSHOT_TYPES)} (got {snapshot_type!r})"
        )
    spec: dict[str, Any] = {
        "name": name,
        "snapshot_type": snapshot_type,
        "resources": {"entity_uuid": vm_uuid},
    }
    if expiration_time_msecs is not None:
        spec["expiration_time_msecs"] = expiration_time_msecs
    metadata: dict[str, Any] = {"kind": "vm_snapshot"}
    if uuid:
        metadata["uuid"] = uuid
    return {"api_version": "3.0", "metadata": metadata, "spec": spec}


def changed_regions_body(
    snapshot_file_path: str, *, reference: str | None, start: int, end: int | None
) -> dict[str, Any]:
    """Body of PE `POST /data/changed_regions`; without `reference` Prism returns the
    allocation map of the snapshot file (what a full backup reads)."""
    body: dict[str, Any] = {"snapshot_file_path": snapshot_file_path, "start_offset": start}
    if reference:
        body["reference_snapshot_file_path"] = reference
    if end is not None:
        body["end_offset"] = end
    return body


def image_body(
    name: str,
    *,
    image_type: str = "DISK_IMAGE",
    description: str | None = None,
    source_uri: str | None = None,
    data_source: Mapping[str, Any] | None = None,
    cluster_uuid: str | None = None,
    uuid: str | None = None,
) -> dict[str, Any]:
    """Body of `POST /images`. `data_source` is a v3 reference (`{"kind": "vm_disk", "uuid":
    ...}`) to build the image from a disk; `cluster_uuid` places it on one cluster."""
    resources: dict[str, Any] = {"image_type": image_type}
    if source_uri:
        resources["source_uri"] = source_uri
    if data_source:
        resources["data_source_reference"] = dict(data_source)
    if cluster_uuid:
        resources["initial_placement_ref_list"] = [{"kind": "cluster", "uuid": cluster_uuid}]
    spec: dict[str, Any] = {"name": name, "resources": resources}
    if description:
        spec["description"] = description
    metadata: dict[str, Any] = {"kind": "image"}
    if uuid:
        metadata["uuid"] = uuid
    return {"api_version": "3.1", "metadata": metadata, "spec": spec}


def _update_body(vm: Vm, spec: Mapping[str, Any]) -> dict[str, Any]:
    """PUT body: the VM's own metadata (with its `spec_version`, so a concurrent change is
    refused instead of overwritten) and the new spec."""
    metadata = copy.deepcopy(dict(vm.raw.get("metadata") or {}))
    metadata.setdefault("kind", "vm")
    metadata.setdefault("uuid", vm.uuid)
    version = vm.raw.get("api_version", "3.1")
    return {"api_version": version, "metadata": metadata, "spec": dict(spec)}


class PrismClient(PrismHttp):
    """Prism v3 on one endpoint. `async with PrismClient(url, user=..., password=...) as pc:`."""

    async def __aenter__(self) -> PrismClient:
        return self

    # -- helpers ---------------------------------------------------------------------------

    async def _get(self, path: str, parse: Callable[..., M]) -> M:
        data = await self.request_json("GET", V3 + path)
        return parse(data, endpoint=f"GET {path}")

    async def _list_all(
        self, kind: str, parse: Callable[..., M], *, filter: str | None = None,
        length: int = LIST_PAGE,
    ) -> list[M]:
        path = f"/{kind}s/list"
        found: list[M] = []
        offset = 0
        while True:
            body = list_body(kind, offset=offset, length=length, filter=filter)
            data = await self.request_json("POST", V3 + path, json=body, idempotent=True)
            if not isinstance(data, Mapping) or not isinstance(data.get("entities", []), list):
                raise ApiServerError(
                    f"Prism at {self.host}: POST {path}: answer has no entities list",
                    endpoint=f"POST {path}",
                )
            entities = data.get("entities") or []
            found += [parse(e, endpoint=f"POST {path}") for e in entities]
            meta = data.get("metadata") or {}
            total = meta.get("total_matches")
            offset += len(entities)
            if not entities or not isinstance(total, int) or offset >= total:
                return found

    async def _task_of(self, method: str, path: str, **kw: Any) -> str | None:
        data = await self.request_json(method, V3 + path, **kw)
        tasks = task_uuids(data)
        return tasks[0] if tasks else None

    # -- identity, clusters -----------------------------------------------------------------

    async def me(self) -> User:
        """The logged-in user: the connectivity and credentials check."""
        return await self._get("/users/me", User.from_api)

    async def list_clusters(self) -> list[Cluster]:
        """Every cluster Prism lists, Prism Central itself included."""
        return await self._list_all("cluster", Cluster.from_api)

    async def aos_clusters(self) -> list[Cluster]:
        """The clusters that run VMs (Prism Central's own entry left out)."""
        return [c for c in await self.list_clusters() if not c.is_prism_central]

    async def get_cluster(self, uuid: str) -> Cluster:
        return await self._get(f"/clusters/{uuid}", Cluster.from_api)

    async def idempotence_identifiers(
        self, count: int = 1, *, client_identifier: str = "ahvbackup", valid_minutes: int = 60
    ) -> IdempotenceIds:
        """Reserve uuids for creates that must not happen twice when retried."""
        body = {
            "client_identifier": client_identifier, "count": count,
            "valid_duration_in_minutes": valid_minutes,
        }
        data = await self.request_json("POST", V3 + "/idempotence_identifiers", json=body)
        return IdempotenceIds.from_api(data, endpoint="POST /idempotence_identifiers")

    # -- VMs ----------------------------------------------------------------------------------

    async def list_vms(self, *, filter: str | None = None, length: int = LIST_PAGE) -> list[Vm]:
        """All VMs (every page), optionally with a v3 FIQL `filter` such as `vm_name==db.*`."""
        return await self._list_all("vm", Vm.from_api, filter=filter, length=length)

    async def get_vm(self, uuid: str) -> Vm:
        return await self._get(f"/vms/{uuid}", Vm.from_api)

    async def create_vm(
        self, spec: Mapping[str, Any], *, uuid: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CreateResult:
        """Create a VM from a v3 spec. With `uuid` (from `idempotence_identifiers`) the create
        is safe to retry on a dropped connection; without it, it is not retried."""
        meta: dict[str, Any] = {"kind": "vm", **(metadata or {})}
        if uuid:
            meta["uuid"] = uuid
        body = {"api_version": "3.1", "metadata": meta, "spec": dict(spec)}
        data = await self.request_json("POST", V3 + "/vms", json=body, idempotent=bool(uuid))
        return CreateResult.from_api(data, endpoint="POST /vms")

    async def update_vm(self, vm: Vm, spec: Mapping[str, Any]) -> str | None:
        """Replace `vm`'s spec (as read, `spec_version` included); returns the task uuid."""
        return await self._task_of("PUT", f"/vms/{vm.uuid}", json=_update_body(vm, spec))

    async def set_power(self, vm_uuid: str, *, on: bool) -> str | None:
        """Power a VM on or off (v3 does it by updating `power_state`); returns the task uuid,
        or None when the VM already was in that state."""
        vm = await self.get_vm(vm_uuid)
        want = "ON" if on else "OFF"
        if vm.power_state == want:
            return None
        spec = copy.deepcopy(dict(vm.raw.get("spec") or {}))
        spec.setdefault("resources", {})["power_state"] = want
        return await self.update_vm(vm, spec)

    async def delete_vm(self, uuid: str) -> str | None:
        return await self._task_of("DELETE", f"/vms/{uuid}")

    # -- images -------------------------------------------------------------------------------

    async def create_image(self, name: str, **kw: Any) -> CreateResult:
        """Create an image (see `image_body` for the options); returns its uuid and task."""
        body = image_body(name, **kw)
        data = await self.request_json(
            "POST", V3 + "/images", json=body, idempotent=bool(kw.get("uuid"))
        )
        return CreateResult.from_api(data, endpoint="POST /images")

    async def get_image(self, uuid: str) -> Image:
        return await self._get(f"/images/{uuid}", Image.from_api)

    async def delete_image(self, uuid: str) -> str | None:
        return await self._task_of("DELETE", f"/images/{uuid}")

    def image_file_url(self, uuid: str) -> str:
        """Absolute URL of an image's bytes, for `self.http` (which carries auth and TLS)."""
        return f"{self.base_url}{V3}/images/{uuid}/file"

    async def upload_image(
        self, uuid: str, body: AsyncIterable[bytes], *, size: int | None = None,
        checksum_type: str | None = None, checksum: str | None = None,
    ) -> None:
        """Stream `body` into the image (never held in memory whole). Not retried: an
        interrupted upload is restarted by the caller with a fresh iterator."""
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        if checksum_type and checksum:
            headers["X-Nutanix-Checksum-Type"] = checksum_type
            headers["X-Nutanix-Checksum-Bytes"] = checksum
        async with self.stream(
            "PUT", f"{V3}/images/{uuid}/file", headers=headers, content=body, idempotent=False
        ) as resp:
            await resp.aread()

    @asynccontextmanager
    async def open_image(
        self, uuid: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """`async with pc.open_image(uuid, offset=o, length=n) as chunks: async for c in
        chunks:` the image bytes from `offset` (all of them when `length` is None)."""
        headers = {}
        if offset or length is not None:
            last = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{last}"
        path = f"{V3}/images/{uuid}/file"
        async with self.stream("GET", path, headers=headers) as resp:
            _check_range(resp, offset, self.host, f"GET /images/{uuid}/file")
            yield resp.aiter_bytes()

    async def read_image_range(self, uuid: str, offset: int, buf: memoryview) -> int:
        """Fill `buf` with the image bytes at `offset`, streamed straight into it; returns how
        many bytes came (fewer than `len(buf)` only at the end of the image)."""
        want = len(buf)
        if want == 0:
            return 0
        async with self.open_image(uuid, offset=offset, length=want) as chunks:
            pos = 0
            async for chunk in chunks:
                n = min(len(chunk), want - pos)
                buf[pos : pos + n] = chunk[:n] if n < len(chunk) else chunk
                pos += n
                if pos == want:
                    break
            return pos

    # -- tasks --------------------------------------------------------------------------------

    async def get_task(self, uuid: str) -> Task:
        return await self._get(f"/tasks/{uuid}", Task.from_api)

    async def wait_task(
        self, uuid: str, *, timeout: float = 600.0, poll: float = 0.5, poll_cap: float = 5.0,
        expect: str = "task",
    ) -> Task:
        """Poll a task until it SUCCEEDED, which is returned; FAILED or ABORTED raise
        PrismTaskError with Prism's error detail. The first poll waits as long as the last
        task of kind `expect` took (`TaskPacer`), later ones back off to `poll_cap`."""
        seen: list[Task] = []
        with trio.move_on_after(timeout):
            await self.pacer.until(lambda: self.get_task(uuid), lambda t: t.done,
                                   expect=expect, poll=poll, poll_cap=poll_cap, seen=seen)
        task = seen[-1] if seen else None
        if task is None or not task.done:
            last = f" (last seen {task.status}, {task.percentage_complete or 0}%)" if task else ""
            raise PrismTimeoutError(
                f"Prism at {self.host}: task {uuid} did not finish within {timeout:g} s{last}",
                endpoint=f"GET /tasks/{uuid}",
            )
        if task.status != "SUCCEEDED":
            what = task.operation_type or "task"
            detail = task.error_detail or task.progress_message or "no detail given"
            code = f" [{task.error_code}]" if task.error_code else ""
            raise PrismTaskError(
                f"Prism at {self.host}: {what} task {uuid} {task.status}{code}: {detail}",
                endpoint=f"GET /tasks/{uuid}",
            )
        return task

    # -- PE: backup snapshots and changed regions ---------------------------------------------

    async def create_vm_snapshot(
        self, vm_uuid: str, *, name: str, snapshot_type: str = "CRASH_CONSISTENT",
        uuid: str | None = None, expiration_time_msecs: int | None = None,
    ) -> CreateResult:
        """Start a PE backup snapshot of a VM (CRASH_CONSISTENT or APPLICATION_CONSISTENT).
        With `uuid` from `idempotence_identifiers` a retried create cannot make two."""
        body = snapshot_body(
            vm_uuid, name=name, snapshot_type=snapshot_type, uuid=uuid,
            expiration_time_msecs=expiration_time_msecs,
        )
        data = await self.request_json(
            "POST", V3 + "/vm_snapshots", json=body, idempotent=bool(uuid)
        )
        return CreateResult.from_api(data, endpoint="POST /vm_snapshots")

    async def get_vm_snapshot(self, uuid: str) -> VmSnapshot:
        return await self._get(f"/vm_snapshots/{uuid}", VmSnapshot.from_api)

    async def list_vm_snapshots(self, *, vm_uuid: str | None = None) -> list[VmSnapshot]:
        """PE snapshots, all or those of one VM."""
        filt = f"entity_uuid=={vm_uuid}" if vm_uuid else None
        return await self._list_all("vm_snapshot", VmSnapshot.from_api, filter=filt)

    async def delete_vm_snapshot(self, uuid: str) -> str | None:
        return await self._task_of("DELETE", f"/vm_snapshots/{uuid}")

    async def wait_vm_snapshot(
        self, uuid: str, *, timeout: float = 600.0, poll: float = 0.5, poll_cap: float = 5.0
    ) -> VmSnapshot:
        """Poll until the snapshot is COMPLETE (returned) or ERROR (PrismTaskError), paced
        as `wait_task` is."""
        seen: list[VmSnapshot] = []
        with trio.move_on_after(timeout):
            await self.pacer.until(lambda: self.get_vm_snapshot(uuid),
                                   lambda s: s.state in ("COMPLETE", "ERROR"),
                                   expect="vm snapshot", poll=poll, poll_cap=poll_cap,
                                   seen=seen)
        snap = seen[-1] if seen else None
        if snap is None or snap.state not in ("COMPLETE", "ERROR"):
            last = f" (last seen {snap.state})" if snap else ""
            raise PrismTimeoutError(
                f"Prism at {self.host}: snapshot {uuid} not COMPLETE within {timeout:g} s{last}",
                endpoint=f"GET /vm_snapshots/{uuid}",
            )
        if snap.state == "ERROR":
            detail = "; ".join(snap.messages) or "no detail given"
            raise PrismTaskError(
                f"Prism at {self.host}: snapshot {uuid} of VM {snap.vm_uuid} failed: {detail}",
                endpoint=f"GET /vm_snapshots/{uuid}",
            )
        return snap

    async def changed_regions_page(
        self, snapshot_file_path: str, *, reference: str | None = None, start: int = 0,
        end: int | None = None,
    ) -> ChangedRegions:
        body = changed_regions_body(snapshot_file_path, reference=reference, start=start, end=end)
        data = await self.request_json(
            "POST", V3 + "/data/changed_regions", json=body, idempotent=True
        )
        return ChangedRegions.from_api(data, endpoint="POST /data/changed_regions")

    async def changed_regions(
        self, snapshot_file_path: str, *, reference: str | None = None, start: int = 0,
        end: int | None = None,
    ) -> AsyncIterator[Region]:
        """Every region from `start` to `end` (the file's end when None), following
        `next_offset` from page to page. Without `reference`: the allocation map."""
        while True:
            page = await self.changed_regions_page(
                snapshot_file_path, reference=reference, start=start, end=end
            )
            for region in page.regions:
                yield region
            nxt = page.next_offset
            if nxt is None or nxt <= start or (end is not None and nxt >= end):
                return
            if page.file_size is not None and nxt >= page.file_size:
                return
            log.debug("Prism at %s: changed regions continue at %d", self.host, nxt)
            start = nxt


def _check_range(resp: httpx.Response, offset: int, host: str, endpoint: str) -> None:
    """A 200 to a ranged GET is only right from offset 0 (the server sent the whole image)."""
    if resp.status_code == 206:
        got = resp.headers.get("content-range", "")
        if not got.startswith(f"bytes {offset}-"):
            raise ApiServerError(
                f"Prism at {host}: {endpoint}: asked for bytes from {offset}, got range {got!r}",
                status=206, endpoint=endpoint,
            )
    elif offset and resp.status_code == 200:
        raise ApiServerError(
            f"Prism at {host}: {endpoint} ignored the Range header (200 instead of 206)",
            status=200, endpoint=endpoint,
        )
