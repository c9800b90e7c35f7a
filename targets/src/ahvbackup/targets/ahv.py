"""The `ahv` target: a backup restored as a new VM on a Nutanix AHV cluster.

`begin_vm` checks everything that can be checked before a byte moves (the VM's name is free on
the target cluster, the cluster and containers exist, every NIC's subnet is mapped or present
there) and creates the VM, powered off and without disks, under an idempotence identifier
recorded on the cleanup ledger first: a role that may not create VMs (403), a name collision or
an unmapped subnet is then one line, and nothing was made.

Each disk is written to a staged disk on the target cluster, by the restore's `data_path`
(`auto`: iSCSI when the cluster's iSCSI portal answers):

- **iscsi**: a volume group with one empty disk of the disk's size in the target container,
  our IQN attached, written with the project's own initiator. Only data ranges are written
  (a new disk reads as zeros, so `zero` ranges are skipped); contiguous ranges are coalesced
  into writes of up to 4 MiB, one in flight while the next is gathered.
- **rest**: an image without a source, and the disk's bytes, zeros included, streamed into
  ``PUT /images/{uuid}/file`` on one connection as the ranges arrive (no staging file, memory
  bounded by one range).

`commit` gives the VM its disks, each cloned from its staged disk (at the disk's own bus and
index), releases the staged disks, powers the VM on when asked, and only then lets the VM go
from the ledger. `abort`, an error, a cancellation and a killed job (the next run's sweep) all
remove the VM and every staged disk.
"""

from __future__ import annotations

__all__ = ["AhvTarget", "AhvVmRestore"]

import contextlib
import http.client
import ipaddress
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import trio

from ahvbackup.core.drivers import (
    ClusterAccess,
    ClusterPlace,
    DiskStage,
    DiskWriter,
    HttpUpload,
    HypervisorSession,
    IscsiSource,
    Network,
    NewDisk,
    NewNic,
    NewVm,
    RestoreRequest,
    RestoreTarget,
    VmRestore,
    VmShape,
)
from ahvbackup.core.errors import AhvBackupError, ConfigError, TargetError
from ahvbackup.core.ledger import Record
from ahvbackup.core.model import DiskInfo

log = logging.getLogger("ahvbackup.target.ahv")

#: the most bytes gathered into one iSCSI write
COALESCE = 4 << 20
#: how long the data-path probe waits for the iSCSI portal
PROBE_SECONDS = 3.0
_ZEROS = memoryview(bytes(1 << 20))


# the plan: everything decided before anything is created ---------------------------------------


@dataclass
class _Plan:
    vm: NewVm
    place: ClusterPlace
    source_name: str
    containers: dict[str, str] = field(default_factory=dict)  # source container -> target uuid
    default_container: str = ""


def _find_place(places: list[ClusterPlace], wanted: str | None, source: str) -> ClusterPlace:
    if wanted:
        for p in places:
            if wanted in (p.uuid, p.name):
                return p
        raise ConfigError(f"target_cluster: no cluster {wanted!r} (clusters: "
                          f"{', '.join(sorted(p.name for p in places)) or 'none'})")
    for p in places:
        if p.uuid == source:
            return p
    if len(places) == 1:
        return places[0]
    names = ", ".join(sorted(p.name for p in places))
    raise ConfigError("target_cluster: the backed-up VM's cluster is not known here; name the "
                      f"cluster to restore to (clusters: {names})")


def _container(place: ClusterPlace, wanted: str) -> str | None:
    for uuid, name in place.containers:
        if wanted in (uuid, name):
            return uuid
    return None


def _matches(net: Network, key: str) -> bool:
    if key in (net.uuid, net.name):
        return True
    if net.cidr:
        with contextlib.suppress(ValueError):
            return ipaddress.ip_network(key, strict=False) == ipaddress.ip_network(net.cidr)
    return False


def _map_nics(shape: VmShape, nets: list[Network], place: ClusterPlace, mapping: dict[str, str],
              *, keep_macs: bool) -> tuple[NewNic, ...]:
    by_uuid = {n.uuid: n for n in nets}
    here = [n for n in nets if n.cluster_uuid == place.uuid]
    for key, wanted in mapping.items():
        if not any(_matches(n, wanted) for n in here):
            raise ConfigError(f"network_map: {key}={wanted}: cluster {place.name} has no subnet "
                              f"{wanted!r} (it has {', '.join(sorted(n.name for n in here))})")
    out = []
    for i, nic in enumerate(shape.nics):
        src = by_uuid.get(nic.network_uuid) or Network(nic.network_uuid, "", "", "")
        dst_key = next((d for s, d in mapping.items() if _matches(src, s)), None)
        dst: Network | None
        if dst_key is not None:
            dst = next(n for n in here if _matches(n, dst_key))
        elif src.cluster_uuid == place.uuid:
            dst = src
        else:
            dst = next((n for n in here if src.name and n.name == src.name), None)
            if dst is None:
                what = src.name or src.uuid
                cidr = f", {src.cidr}" if src.cidr else ""
                raise ConfigError(
                    f"network_map: NIC {i} is on subnet {what!r} ({src.uuid}{cidr}), which "
                    f"cluster {place.name} does not have and network_map does not map; add "
                    f"network_map={what}=<a subnet of {place.name}>")
        out.append(NewNic(network_uuid=dst.uuid, mac=nic.mac if keep_macs else None))
    return tuple(out)


async def _plan(config: Any, request: RestoreRequest, session: HypervisorSession) -> _Plan:
    manifest = request.manifest
    shape = request.shape or VmShape("")
    source_cluster = shape.cluster_uuid or (manifest.vm.cluster_uuid if manifest else "")
    source_name = manifest.vm.name if manifest is not None else request.vm_name
    place = _find_place(await session.restore_places(), config.target_cluster, source_cluster)
    name = config.restore_vm_name or f"{source_name}-restored"
    vms = await session.list_vms()
    if any(v.name == name and v.cluster_uuid == place.uuid for v in vms):
        raise ConfigError(f"restore_vm_name: a VM named {name!r} already exists on cluster "
                          f"{place.name}; choose another restore_vm_name")
    if not place.containers:
        raise ConfigError(f"target_container: cluster {place.name} lists no storage container")
    plan = _Plan(vm=NewVm(name="", cluster_uuid="", sockets=1, cores_per_socket=1,
                          memory_mib=1), place=place, source_name=source_name,
                 default_container=place.containers[0][0])
    if config.target_container:
        found = _container(place, config.target_container)
        if found is None:
            raise ConfigError(f"target_container: cluster {place.name} has no container "
                              f"{config.target_container!r} (it has "
                              f"{', '.join(n for _, n in place.containers)})")
        plan.default_container = found
    else:
        for d in manifest.disks if manifest is not None else ():
            if d.container and d.container not in plan.containers:
                found = _container(place, d.container)
                if found is None:
                    raise ConfigError(
                        f"target_container: disk {d.label} was in container {d.container!r}, "
                        f"which cluster {place.name} does not have; set target_container")
                plan.containers[d.container] = found
    original_gone = manifest is None or all(v.uuid != manifest.vm.uuid for v in vms)
    same_cluster = place.uuid == source_cluster
    nics = _map_nics(shape, await session.list_networks(), place, config.network_map_dict,
                     keep_macs=same_cluster and original_gone)
    vcpu = config.vcpu
    plan.vm = NewVm(
        name=name, cluster_uuid=place.uuid,
        sockets=vcpu if vcpu else shape.sockets,
        cores_per_socket=1 if vcpu else shape.cores_per_socket,
        memory_mib=config.memory_mib or shape.memory_mib,
        boot_type=shape.boot_type, machine_type=shape.machine_type, nics=nics,
        description=shape.description or f"restored by ahvbackup from {source_name}",
    )
    return plan


# a task that holds a connection across the job's calls ------------------------------------------


class _Reply:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class _Host:
    """Runs calls on a connection opened by `opener`, in a task of its own.

    The job calls a writer from a new task each time (`trio.from_thread.run`), and a trio
    connection such as an iSCSI session lives inside one task's `async with`. So each disk's
    session lives in a system task of its own, and calls reach it through a channel. `close`
    ends it cleanly (logout); `cancel` ends it at once.
    """

    def __init__(self, opener: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
        self._opener = opener
        self._send, self._recv = trio.open_memory_channel[
            tuple[Callable[[Any], Awaitable[None]], _Reply]](0)
        self._scope = trio.CancelScope()
        self._ready = trio.Event()
        self._done = trio.Event()
        self.error: BaseException | None = None
        trio.lowlevel.spawn_system_task(self._main)

    async def _main(self) -> None:
        try:
            with self._scope:
                async with self._opener() as conn, self._recv:
                    self._ready.set()
                    async for fn, reply in self._recv:
                        try:
                            await fn(conn)
                        except Exception as err:
                            reply.error = err
                        finally:
                            reply.done.set()
        except trio.Cancelled:
            raise
        except BaseException as err:  # a system task must not raise: kept for the caller
            self.error = err
        finally:
            self._ready.set()
            self._done.set()

    def _failure(self) -> AhvBackupError:
        err = self.error
        if isinstance(err, AhvBackupError):
            return err
        return TargetError(f"ahv target: the disk's connection ended ({err or 'closed'})")

    async def started(self) -> None:
        await self._ready.wait()
        if self._done.is_set():
            raise self._failure()

    async def submit(self, fn: Callable[[Any], Awaitable[None]]) -> _Reply:
        await self.started()
        reply = _Reply()
        try:
            await self._send.send((fn, reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._failure() from None
        return reply

    @staticmethod
    async def wait(reply: _Reply) -> None:
        await reply.done.wait()
        if reply.error is not None:
            if isinstance(reply.error, AhvBackupError):
                raise reply.error
            raise TargetError(f"ahv target: {reply.error}") from reply.error

    async def close(self) -> None:
        await self._send.aclose()
        await self._done.wait()
        if self.error is not None:
            raise self._failure()

    async def cancel(self, *, grace: float = 10.0) -> None:
        """End the task without caring for its result: let the call in flight end and the
        connection close cleanly (an iSCSI logout needs the session's receiver still running),
        or after `grace` seconds cut it off."""
        with trio.CancelScope(shield=True):
            await self._send.aclose()
            with trio.move_on_after(grace):
                await self._done.wait()
            self._scope.cancel()
            await self._done.wait()


# the disk writers --------------------------------------------------------------------------------


class _Writer(DiskWriter):
    location = ""

    async def cancel(self) -> None: ...


class _IscsiWriter(_Writer):
    """Data ranges coalesced into block-aligned iSCSI writes; zero ranges skipped."""

    def __init__(self, source: IscsiSource, *, initiator: str, size: int, label: str) -> None:
        from ahvbackup.transports.iscsi import IscsiSession

        self.size = size
        self.label = label
        self.block = 512
        self._buf = bytearray()
        self._start = 0  # disk offset of _buf[0]
        self._pending: _Reply | None = None
        self._host = _Host(lambda: IscsiSession.connect(
            portal=source.portal, target_iqn=source.target_iqn, initiator_iqn=initiator,
            lun=source.lun, queue_depth=8, max_transfer=1 << 20))

    async def start(self) -> None:
        await self._host.started()

        async def check(s: Any) -> None:
            self.block = s.capacity.block_size if s.capacity else 512
            if s.size < self.size:
                raise TargetError(f"ahv target: disk {self.label}: the staged LUN holds "
                                  f"{s.size} bytes, {self.size} are needed")

        reply = await self._host.submit(check)
        await self._host.wait(reply)

    async def write(self, offset: int, data: memoryview) -> None:
        if self._buf and offset == self._start + len(self._buf) \
                and len(self._buf) + len(data) <= COALESCE:
            self._buf += data
            return
        await self._flush()
        self._start = offset
        self._buf = bytearray(data)

    async def zero(self, offset: int, length: int) -> None:
        del offset, length  # the staged disk is new: it reads as zeros already

    async def _flush(self) -> None:
        if not self._buf:
            return
        buf, start = self._buf, self._start
        self._buf = bytearray()
        bs = self.block
        head, tail = start % bs, (start + len(buf)) % bs
        if self._pending is not None:  # one write in flight at a time
            pending, self._pending = self._pending, None
            await self._host.wait(pending)
        if head or tail:  # read-modify-write of the partial blocks at the edges
            lo, hi = start - head, start + len(buf) + ((bs - tail) % bs)
            edges = bytearray(hi - lo)

            async def read_edges(s: Any) -> None:
                await s.read_into(lo, memoryview(edges)[:bs])
                await s.read_into(hi - bs, memoryview(edges)[-bs:])

            await self._host.wait(await self._host.submit(read_edges))
            edges[head:head + len(buf)] = buf
            buf, start = edges, lo

        async def put(s: Any) -> None:
            await s.write(start, memoryview(buf))

        self._pending = await self._host.submit(put)

    async def finish(self) -> str:
        await self._flush()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await self._host.wait(pending)
        await self._host.close()
        return self.location

    async def cancel(self) -> None:
        await self._host.cancel()


class _RestWriter(_Writer):
    """The whole disk, zeros included, as the body of one PUT (blocking I/O in threads)."""

    def __init__(self, upload: HttpUpload, *, label: str) -> None:
        self.upload = upload
        self.label = label
        self.pos = 0
        self.conn: http.client.HTTPConnection | None = None

    def _open(self) -> None:
        url = urllib.parse.urlsplit(self.upload.url)
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443,
                                               context=self.upload.ssl_context, timeout=120)
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=120)
        conn.putrequest("PUT", url.path + (f"?{url.query}" if url.query else ""),
                        skip_accept_encoding=True)
        for key, value in self.upload.headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(self.upload.size))
        conn.endheaders()
        self.conn = conn

    def _fail(self, err: OSError) -> TargetError:
        return TargetError(f"ahv target: disk {self.label}: upload to the image failed at "
                           f"byte {self.pos}: {err}")

    def _zeros(self, end: int) -> None:
        assert self.conn is not None
        while self.pos < end:
            n = min(len(_ZEROS), end - self.pos)
            self.conn.send(_ZEROS[:n])
            self.pos += n

    def _send(self, offset: int, data: memoryview) -> None:
        assert self.conn is not None
        try:
            self._zeros(offset)
            self.conn.send(data)
            self.pos = offset + len(data)
        except OSError as err:
            raise self._fail(err) from err

    def _zero(self, end: int) -> None:
        try:
            self._zeros(end)
        except OSError as err:
            raise self._fail(err) from err

    def _end(self) -> None:
        assert self.conn is not None
        try:
            self._zeros(self.upload.size)
            resp = self.conn.getresponse()
            body = resp.read()
        except OSError as err:
            raise self._fail(err) from err
        finally:
            self.conn.close()
        if resp.status >= 300:
            text = body.decode("utf-8", "replace")[:300]
            raise TargetError(f"ahv target: disk {self.label}: the image upload was refused "
                              f"({resp.status}): {text}")

    async def start(self) -> None:
        try:
            await trio.to_thread.run_sync(self._open)
        except OSError as err:
            raise self._fail(err) from err

    async def write(self, offset: int, data: memoryview) -> None:
        await trio.to_thread.run_sync(self._send, offset, data)

    async def zero(self, offset: int, length: int) -> None:
        await trio.to_thread.run_sync(self._zero, offset + length)

    async def finish(self) -> str:
        await trio.to_thread.run_sync(self._end)
        return self.location

    async def cancel(self) -> None:
        if self.conn is not None:
            self.conn.close()


# the VM ------------------------------------------------------------------------------------------


@dataclass
class _Disk:
    info: DiskInfo
    container: str
    stage: DiskStage
    writer: _Writer


class AhvVmRestore(VmRestore):
    """One VM restored onto the cluster (see the module's docstring)."""

    def __init__(self, config: Any, plan: _Plan, cluster: ClusterAccess, vm_id: str,
                 *, path: str, initiator: str) -> None:
        self.config = config
        self.plan = plan
        self.cluster = cluster
        self.vm_id = vm_id
        self.path = path
        self.initiator = initiator
        self.disks: list[_Disk] = []
        self.records: list[Record] = []  # everything made for this VM, oldest first
        rec = cluster.stack.held("vm", vm_id)
        if rec is not None:
            self.records.append(rec)
        self.vm_record = rec
        self.committed = False

    def _container(self, disk: DiskInfo) -> str:
        return self.plan.containers.get(disk.container, self.plan.default_container)

    async def open_disk(self, disk: DiskInfo, *, size: int) -> DiskWriter:
        session, stack = self.cluster.session, self.cluster.stack
        container = self._container(disk)
        name = f"{self.plan.vm.name}-{disk.label}"
        writer: _IscsiWriter | _RestWriter
        if self.path == "iscsi":
            source, stage = await session.stage_empty_iscsi(
                cluster_uuid=self.plan.place.uuid, container_uuid=container, size=size,
                name=name, initiator_iqn=self.initiator, stack=stack)
            self.records += stage.records
            writer = _IscsiWriter(source, initiator=self.initiator, size=size, label=disk.label)
        else:
            upload, stage = await session.stage_upload(
                cluster_uuid=self.plan.place.uuid, size=size, name=name, stack=stack)
            self.records += stage.records
            writer = _RestWriter(upload, label=disk.label)
        writer.location = f"{self.vm_id}/{disk.label}"
        self.disks.append(_Disk(disk, container, stage, writer))
        await writer.start()
        return writer

    async def commit(self) -> str:
        session, stack = self.cluster.session, self.cluster.stack
        ordered = sorted(self.disks, key=lambda d: (d.info.bus.lower(), d.info.index))
        await session.attach_disks(self.vm_id, [
            NewDisk(stage=d.stage, bus=d.info.bus, index=d.info.index, container_uuid=d.container)
            for d in ordered])
        for d in reversed(self.disks):  # the VM's disks are clones: the staging can go
            for rec in reversed(d.stage.records):
                await self._release(rec)
        if self.config.power_on:
            await session.power_on(self.vm_id)
        if self.vm_record is not None:
            stack.keep(self.vm_record)
            self.records.remove(self.vm_record)
        self.committed = True
        log.info("restored VM %s (%s) on cluster %s from %s", self.plan.vm.name, self.vm_id,
                 self.plan.place.name, self.plan.source_name)
        return self.vm_id

    async def _release(self, rec: Record) -> None:
        stack = self.cluster.stack
        if rec in self.records:
            self.records.remove(rec)
        if stack.held(rec.kind, rec.resource_id) is rec:
            await stack.release(rec)

    async def abort(self) -> None:
        with trio.CancelScope(shield=True):
            for d in self.disks:
                await d.writer.cancel()
            for rec in reversed(list(self.records)):
                await self._release(rec)


class AhvTarget(RestoreTarget):
    name = "ahv"
    summary = "a new VM on a Nutanix AHV cluster (disks over iSCSI or REST)"
    needs_cluster = True

    async def begin_vm(self, request: RestoreRequest, *,
                       cluster: ClusterAccess | None) -> AhvVmRestore:
        if cluster is None:
            raise TargetError("target=ahv: this restore has no session with a cluster (the "
                              "Bacula restore paths cannot restore to AHV yet)")
        cfg = self.config
        session = cluster.session
        plan = await _plan(cfg, request, session)
        path = await _data_path(cfg, session, plan.place.uuid)
        initiator = ""
        if path == "iscsi":
            from ahvbackup.transports.iscsi.datapath import initiator_iqn

            initiator = initiator_iqn(cfg)
        vm_id = await session.create_vm(plan.vm, stack=cluster.stack)
        log.info("restoring %s as VM %s (%s) on cluster %s over %s", plan.source_name,
                 plan.vm.name, vm_id, plan.place.name, path)
        return AhvVmRestore(cfg, plan, cluster, vm_id, path=path, initiator=initiator)


async def _data_path(config: Any, session: HypervisorSession, cluster_uuid: str) -> str:
    """iscsi or rest: `data_path`, with `auto` probing the cluster's iSCSI portal."""
    wanted = str(config.data_path)
    if wanted in ("iscsi", "rest"):
        return wanted
    if wanted != "auto":
        raise ConfigError(f"data_path: the ahv target writes over iscsi or rest (got {wanted!r})")
    portal = await session.iscsi_portal(cluster_uuid)
    if portal is None:
        return "rest"
    with trio.move_on_after(PROBE_SECONDS):
        try:
            stream = await trio.open_tcp_stream(*portal)
        except OSError as err:
            log.info("data_path=auto: restoring over rest (nothing answers on iSCSI at %s:%d: "
                     "%s)", portal[0], portal[1], err.strerror or err)
            return "rest"
        await stream.aclose()
        return "iscsi"
    return "rest"
