"""Conformance checks for drivers, shipped so third-party plugins run the same checks as ours.

Use in a plugin's tests::

    from ahvbackup.core.testing import check_driver_class, check_entry_points
    def test_contract():
        check_driver_class(MyTarget, kind="target", name="mytarget")

Each check raises `AssertionError` with a message naming the driver and the broken rule.
"""

from __future__ import annotations

__all__ = [
    "MakeDrPair",
    "check_dr_transport",
    "check_driver_class",
    "check_entry_points",
    "check_hook_plugin",
    "check_restore_target",
]

import dataclasses
import inspect
import random
import tempfile
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import marshmallow
import pluggy
import trio
import trio.testing

from . import hookspecs
from .drivers import (
    ClusterAccess,
    Driver,
    DrTransport,
    RestoreRequest,
    RestoreTarget,
    SourceRange,
)
from .errors import TransportError
from .model import DiskInfo
from .plugins import DRIVER_KINDS, HOOKS_GROUP, load_driver


def check_driver_class(cls: Any, *, kind: str, name: str | None = None) -> None:
    """The class is a concrete subclass of its kind's base, with a name and a valid schema."""
    spec = DRIVER_KINDS.get(kind)
    assert spec is not None, f"unknown driver kind {kind!r} (kinds: {', '.join(DRIVER_KINDS)})"
    label = f"{kind} driver {getattr(cls, '__qualname__', cls)!r}"
    assert isinstance(cls, type) and issubclass(cls, spec.base), (
        f"{label} must subclass ahvbackup.core.drivers.{spec.base.__name__}"
    )
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    assert not abstract, f"{label} leaves abstract methods unimplemented: {', '.join(abstract)}"
    assert isinstance(cls.name, str) and cls.name, f"{label} must set a non-empty `name`"
    if name is not None:
        assert cls.name == name, (
            f"{label} declares name {cls.name!r} but is registered as {name!r}"
        )
    schema = cls.config_schema
    if schema is not None:
        assert isinstance(schema, type) and issubclass(schema, marshmallow.Schema), (
            f"{label}: config_schema must be a marshmallow.Schema subclass"
        )
        schema()  # constructible without arguments
    assert issubclass(cls, Driver)


def check_hook_plugin(plugin: object) -> None:
    """Every `ahvbackup_*` function of the plugin matches a declared hook and its arguments."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)  # raises PluginValidationError on unknown arguments
    pm.check_pending()  # raises on an ahvbackup_* hookimpl with no spec
    names = [n for n, _ in inspect.getmembers(plugin) if n.startswith("ahvbackup_")]
    assert names, f"hook plugin {plugin!r} implements no ahvbackup_* hook"


def check_entry_points() -> list[str]:
    """Load every registered driver and hook entry point and check its contract.

    Returns the names checked, as ``group:name``, so a caller can assert on coverage.
    """
    checked: list[str] = []
    for kind, spec in DRIVER_KINDS.items():
        for ep in entry_points(group=spec.namespace):
            cls = load_driver(kind, ep.name)
            check_driver_class(cls, kind=kind, name=ep.name)
            checked.append(f"{spec.namespace}:{ep.name}")
    for ep in entry_points(group=HOOKS_GROUP):
        check_hook_plugin(ep.load())
        checked.append(f"{HOOKS_GROUP}:{ep.name}")
    return checked


# restore targets ----------------------------------------------------------------------------

#: (location a disk was restored to, the exact bytes it must hold) -> whether it holds them
Matches = Callable[[str, bytes], bool]


def _files_under(dest: Path) -> list[str]:
    return sorted(str(p) for p in dest.rglob("*") if not p.is_dir()) if dest.exists() else []


async def check_restore_target(target: RestoreTarget, *, dest: Path, matches: Matches,
                               leftovers: Callable[[], list[str]] | None = None,
                               cluster: ClusterAccess | None = None) -> None:
    """Hold a restore target to its contract (`RestoreTarget`, `VmRestore`, `DiskWriter`).

    - Two disks, one of an odd size, written with data ranges in disk order (one given with
      `copy` from a local file), zero ranges and ranges never given between them: each
      disk's location `matches` the exact image, the two locations differ, and `commit`
      answers.
    - `abort` after one disk finished and another was half written leaves nothing
      (`leftovers`, by default the files under `dest`), and a second `abort` is harmless.
    - A VM name that climbs out of the destination (``../../x``) still restores inside it.

    A file target passes `dest` (empty) and `matches` reading its file format; a cluster
    target passes `leftovers` listing what it would leave on the cluster, and the `cluster`
    access its `begin_vm` gets (a session and a release stack; the VMs are restored without
    a manifest, as a Bacula restore may hand them).
    """
    label = f"restore target {type(target).__qualname__!r}"
    left = leftovers or (lambda: _files_under(dest))
    before = left()
    sizes = (3 << 20, (1 << 20) + 512)
    rng = random.Random(7)
    images = [bytearray(n) for n in sizes]
    vm = await target.begin_vm(RestoreRequest(vm_name="../../check-vm", dest=dest),
                               cluster=cluster)
    where = []
    for i, size in enumerate(sizes):
        disk = DiskInfo(uuid=f"check-disk-{i}", bus="scsi", index=i, size=size)
        writer = await vm.open_disk(disk, size=size)
        pos = 0
        for kind, length in (("data", 4096), ("zero", 65536), ("data", 512 << 10),
                             ("copy", 70001), ("skip", 8192), ("zero", 4096), ("data", 512)):
            if kind == "data":
                chunk = rng.randbytes(length)
                images[i][pos : pos + length] = chunk
                await writer.write(pos, memoryview(chunk))
            elif kind == "copy":  # bytes at an odd place of a local file
                chunk = rng.randbytes(length)
                images[i][pos : pos + length] = chunk
                with tempfile.TemporaryFile() as src:
                    src.write(b"-" * 1001 + chunk + b"-" * 999)
                    src.flush()
                    await writer.copy(pos, SourceRange(fd=src.fileno(), offset=1001,
                                                       length=length))
            elif kind == "zero":
                await writer.zero(pos, length)
            pos += length
        where.append(await writer.finish())
    assert isinstance(await vm.commit(), str), f"{label}: commit must say where the VM is"
    assert where[0] != where[1], f"{label}: two disks were restored to one place {where[0]}"
    for i, location in enumerate(where):
        assert matches(location, bytes(images[i])), \
            f"{label}: disk {i} at {location} is not the bytes written (zeros where not given)"
        if not leftovers:
            assert Path(location).resolve().is_relative_to(dest.resolve()), \
                f"{label}: {location} is outside the destination {dest}"

    committed = left()
    aborted = await target.begin_vm(RestoreRequest(vm_name="check-abort", dest=dest),
                                    cluster=cluster)
    done = await aborted.open_disk(DiskInfo(uuid="a0", bus="scsi", index=0, size=1 << 20),
                                   size=1 << 20)
    await done.write(0, memoryview(b"x" * 4096))
    await done.finish()
    half = await aborted.open_disk(DiskInfo(uuid="a1", bus="scsi", index=1, size=1 << 20),
                                   size=1 << 20)
    await half.write(0, memoryview(b"y" * 4096))
    await aborted.abort()
    await aborted.abort()  # harmless the second time
    new = sorted(set(left()) - set(committed))
    assert new == [], f"{label}: abort left {new}"
    assert set(before) <= set(committed), f"{label}: a restore removed what was there before"


# DR transports ------------------------------------------------------------------------------

#: ``make_pair(wrong)`` -> (client, server) drivers of one transport. With ``wrong=""`` their
#: credentials match; with ``"client"`` (or ``"server"``) that side has credentials the other
#: must refuse, and the other side's are the good ones of ``make_pair("")``
MakeDrPair = Callable[[str], tuple[DrTransport, DrTransport]]


def _at(driver: DrTransport, **changes: object) -> DrTransport:
    """The same driver with other configuration values (`dr_port`, `dr_host`)."""
    return type(driver)(dataclasses.replace(driver.config, **changes))  # type: ignore[arg-type]


class _Listening:
    """One `serve` on a free loopback port, handing each authenticated server stream out."""

    def __init__(self, server: DrTransport, nursery: trio.Nursery, host: str) -> None:
        self.server, self.nursery, self.host = server, nursery, host
        self.send, self.streams = trio.open_memory_channel[trio.abc.Stream](100)
        self.port = 0
        self.handled = 0

    async def start(self) -> _Listening:
        async def handler(stream: trio.abc.Stream) -> None:
            self.handled += 1
            await self.send.send(stream)
            await trio.sleep_forever()  # the check closes the stream; serve is cancelled at the end

        self.port = await self.nursery.start(
            lambda task_status: _at(self.server, dr_port=0).serve(
                handler, host=self.host, task_status=task_status))
        return self

    def client(self, client: DrTransport) -> DrTransport:
        return _at(client, dr_host=self.host, dr_port=self.port)

    async def pair(self, client: DrTransport) -> tuple[trio.abc.Stream, trio.abc.Stream]:
        with trio.fail_after(30):
            near = await self.client(client).connect()
            return near, await self.streams.receive()


async def check_dr_transport(make_pair: MakeDrPair, *, host: str = "127.0.0.1") -> None:
    """Hold a DR transport to its contract (`DrTransport`), on real sockets on `host`.

    - `connect` and `serve` give streams that pass `trio.testing.check_two_way_stream`
      (sending, receiving, closing, cancelling, in both directions at once), and a payload
      larger than any frame arrives whole.
    - A client with wrong credentials, and a server with wrong credentials, are each refused
      on both sides: `connect` raises a `TransportError`, the server's handler never runs,
      and the listener goes on serving a good client.
    """
    good_client, good_server = make_pair("")
    label = f"DR transport {type(good_client).__qualname__!r}"
    async with trio.open_nursery() as nursery:
        listening = await _Listening(good_server, nursery, host).start()

        async def streams() -> tuple[trio.abc.Stream, trio.abc.Stream]:
            return await listening.pair(good_client)

        await trio.testing.check_two_way_stream(streams, None)
        near, far = await streams()
        big = random.Random(5).randbytes((3 << 20) + 17)
        got = bytearray()

        async def take() -> None:
            while chunk := await far.receive_some():
                got.extend(chunk)

        async with trio.open_nursery() as both:
            both.start_soon(take)
            await near.send_all(big)
            await near.aclose()
        await far.aclose()
        assert got == big, f"{label}: a {len(big)}-byte payload arrived as {len(got)} bytes"

        for wrong in ("client", "server"):
            client, server = make_pair(wrong)
            there = await _Listening(server, nursery, host).start()
            try:
                with trio.fail_after(30):
                    stream = await there.client(client).connect()
            except TransportError:
                pass
            else:
                await stream.aclose()
                raise AssertionError(f"{label}: a {wrong} with wrong credentials was not "
                                     "refused by connect()")
            await trio.testing.wait_all_tasks_blocked()
            assert there.handled == 0, \
                f"{label}: the server ran its handler for a {wrong} with wrong credentials"
            if wrong == "client":
                near, far = await there.pair(good_client)
                await near.send_all(b"after a refusal")
                assert await far.receive_some() == b"after a refusal", \
                    f"{label}: the listener stopped serving after refusing a peer"
                await near.aclose()
                await far.aclose()
        nursery.cancel_scope.cancel()
