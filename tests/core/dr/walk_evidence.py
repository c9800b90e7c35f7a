"""Evidence for the DR keys in the configuration walk (tests/core/test_config_walk.py): each
key, set, changes what a DR push or receiver does. The receiver is served in-process through
the configured transport on loopback, the source is `DrPushJob` against the walk's simulator.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio
import trustme
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.config import ConfigSources, ModeView, assemble_config
from ahvbackup.core.dr.daemon import ReceiverDaemon
from ahvbackup.core.dr.receiver import Receiver
from ahvbackup.core.drivers import DrTransport, dr_transport_name
from ahvbackup.core.errors import AhvBackupError, ConfigError
from ahvbackup.core.jobs.dr_push import DrCycleResult, DrPushJob
from ahvbackup.core.plugins import Hooks, load_driver

HOST = "127.0.0.1"
TOKEN = "3c" * 32
RECEIVER = ModeView("a walk receiver", ("receiver",))
PUSH = ModeView("a walk push", ("bitmap-push", "seed"))


class WalkLike(Protocol):
    world: World

    def keys(self, **extra: Any) -> dict[str, str]: ...


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(where: Path, **keys: object) -> AsyncIterator[tuple[Receiver, int]]:
    """A receiver with `keys` on a free port of 127.0.0.1, state under `where`."""
    port = _port()
    overrides = {"dr_host": HOST, "dr_port": port, "state_dir": where, "debug_log": "",
                 **keys}
    cfg = assemble_config(ConfigSources(overrides={k: str(v) for k, v in overrides.items()}),
                          hooks=Hooks(), view=RECEIVER)
    transport = load_driver("transport", dr_transport_name(cfg), base=DrTransport)(cfg)
    daemon = ReceiverDaemon(cfg, transport=transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(transport.serve, daemon.receiver.handle, host=HOST))
        yield daemon.receiver, port
        nursery.cancel_scope.cancel()


def job(w: WalkLike, port: int, **keys: object) -> DrPushJob:
    base = {"vm": "walk-b", "dr_host": HOST, "dr_port": port, "dr_auth_token": TOKEN,
            "data_path": "rest"}
    cfg = assemble_config(ConfigSources(overrides=w.keys(**{**base, **keys})), hooks=Hooks(),
                          view=PUSH, require=("prism_central", "user", "password"))
    return DrPushJob(cfg, hooks=Hooks())


async def pushed(w: WalkLike, port: int, **keys: object) -> DrCycleResult:
    result = await job(w, port, **keys).run()
    assert result.ok, result.to_json()
    return result


async def refused(w: WalkLike, port: int, **keys: object) -> str:
    try:
        result = await job(w, port, **keys).run()
    except AhvBackupError as err:
        return str(err)
    assert not result.ok, f"expected a failure with {keys}"
    return "; ".join(v.error or "" for v in result.vms)


def vm_uuid(w: WalkLike) -> str:
    return next(v.uuid for v in w.world.sim.vms.values() if v.name == "walk-b")


async def dr_channel(w: WalkLike, tmp: Path) -> None:
    """dr_host, dr_port and dr_auth_token pick the receiver and prove the source to it."""
    async with serving(tmp / "rx", dr_auth_token=TOKEN) as (rx, port):
        await pushed(w, port, mode="seed")
        assert [p.point for p in rx.points(vm_uuid(w))] == [1]
        assert "cannot connect" in await refused(w, _port())
        assert "cannot connect" in await refused(w, port, dr_host="127.0.0.9")
        assert "refused our dr_auth_token" in await refused(w, port, dr_auth_token="9d" * 32)
        assert [p.point for p in rx.points(vm_uuid(w))] == [1]


async def dr_mtls(w: WalkLike, tmp: Path) -> None:
    """dr_auth_cert, dr_auth_key and dr_ca_cert: an mTLS channel, refused with another CA."""
    ca, stranger = trustme.CA(), trustme.CA()
    sides: dict[str, dict[str, str]] = {}
    for name, signer in (("source", ca), ("receiver", ca), ("other", stranger)):
        leaf = signer.issue_cert(HOST)
        cert, key, root = tmp / f"{name}.pem", tmp / f"{name}.key", tmp / f"{name}-ca.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        signer.cert_pem.write_to_path(str(root))
        os.chmod(key, 0o600)
        sides[name] = {"dr_auth_cert": str(cert), "dr_auth_key": str(key),
                       "dr_ca_cert": str(root)}
    async with serving(tmp / "rx", **sides["receiver"]) as (rx, port):
        await pushed(w, port, dr_auth_token=None, mode="seed", **sides["source"])
        assert [p.point for p in rx.points(vm_uuid(w))] == [1]
        mixed = {**sides["source"], "dr_ca_cert": sides["other"]["dr_ca_cert"]}
        assert "refused" in await refused(w, port, dr_auth_token=None, **mixed)
        mixed = {**sides["other"], "dr_ca_cert": sides["source"]["dr_ca_cert"]}
        assert "refused" in await refused(w, port, dr_auth_token=None, **mixed)
        os.chmod(sides["source"]["dr_auth_key"], 0o644)
        with pytest.raises(ConfigError, match="dr_auth_key"):
            job(w, port, dr_auth_token=None, **sides["source"])


async def dr_points(w: WalkLike, tmp: Path) -> None:
    """dr_restore_points keeps that many points; push_apply_remote=yes applies deltas into
    whole images (=no is refused by name)."""
    uuid = vm_uuid(w)
    async with serving(tmp / "rx", dr_auth_token=TOKEN, dr_restore_points=1,
                       push_apply_remote="yes") as (rx, port):
        await pushed(w, port, mode="seed")
        w.world.sim.write_disk(uuid, 0, 4096, b"\x5a" * 8192)
        result = await pushed(w, port)
        assert result.vms[0].base == 1 and result.vms[0].data_bytes < MiB
        (point,) = rx.points(uuid)
        assert point.point == 2
        assert point.disks[0].path.read_bytes() == w.world.sim.read_disk(uuid, 0, 0, MiB)
    with pytest.raises(ConfigError, match="push_apply_remote=False: keeping DR deltas"):
        async with serving(tmp / "rx2", dr_auth_token=TOKEN, push_apply_remote="no"):
            pass


async def dr_throttle(w: WalkLike, tmp: Path) -> None:
    """max_bandwidth_mbps caps the push's wire bytes."""
    async with serving(tmp / "rx", dr_auth_token=TOKEN) as (_rx, port):
        start = trio.current_time()
        result = await pushed(w, port, mode="seed", max_bandwidth_mbps=16)  # 2 MB/s
        took = trio.current_time() - start
        floor = (result.vms[0].bytes_pushed - (64 << 10)) / 2_000_000
        assert took >= floor > 0.45, (took, floor)


async def dr_interval(w: WalkLike, tmp: Path) -> None:
    """push_interval spaces the cycles of a loop."""
    async with serving(tmp / "rx", dr_auth_token=TOKEN) as (_rx, port):
        starts: list[float] = []
        loop = job(w, port, push_interval=1)
        with trio.move_on_after(10):
            async with trio.open_nursery() as nursery:
                def cycle(r: DrCycleResult) -> None:
                    assert r.ok, r.to_json()
                    starts.append(trio.current_time() - r.seconds)
                    if len(starts) == 2:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(loop.loop, cycle)
        assert len(starts) == 2 and starts[1] - starts[0] >= 0.95, starts


DR_EVIDENCE: dict[str, Callable[..., Awaitable[None]]] = {
    "dr_host": dr_channel,
    "dr_port": dr_channel,
    "dr_auth_token": dr_channel,
    "dr_auth_cert": dr_mtls,
    "dr_auth_key": dr_mtls,
    "dr_ca_cert": dr_mtls,
    "dr_restore_points": dr_points,
    "push_apply_remote": dr_points,
    "max_bandwidth_mbps": dr_throttle,
    "push_interval": dr_interval,
}
