"""Serving a simulator: Prism Central on ``host:port``, each Prism Element on its own loopback IP.

Every PE listens on its cluster's ``external_ip`` (127.0.0.2, 127.0.0.3, ...) on the same port
as Prism Central, as real PEs answer on 9440 at their virtual IP. Port 0 picks a free port for
Prism Central and binds the PEs on the same number, retrying on a conflict.
"""

from __future__ import annotations

__all__ = ["Endpoints", "serve_simulator"]

import errno
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ahvbackup.core.errors import ConfigError

from .app import pc_app, pe_app
from .simulator import Simulator
from .tls import CertificateAuthority

_log = logging.getLogger("ahvbackup.simulator.http")
_RETRIES = 20


@dataclass(frozen=True)
class Endpoints:
    """Where a served simulator answers."""

    pc_url: str
    pe_urls: dict[str, str]
    ca_path: Path | None
    port: int
    dsips: dict[str, str]
    #: cluster uuid -> (DSIP, port) of its iSCSI target (volume groups); empty when not served
    iscsi_portals: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def pe_url(self) -> str:
        """The first Prism Element's URL (the common single-cluster case)."""
        return next(iter(self.pe_urls.values()))


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_all(hosts: list[str], port: int) -> tuple[int, list[socket.socket]]:
    """Bind every host on one port (port 0: the first host's free port, retried on conflict)."""
    for _ in range(_RETRIES):
        socks: list[socket.socket] = []
        try:
            first = _bind(hosts[0], port)
            socks.append(first)
            chosen = first.getsockname()[1]
            for h in hosts[1:]:
                socks.append(_bind(h, chosen))
        except OSError as err:
            for s in socks:
                s.close()
            if port != 0 or err.errno != errno.EADDRINUSE:
                raise ConfigError(
                    f"simulator: cannot listen on port {port or 'auto'} at "
                    f"{', '.join(hosts)}: {err.strerror}"
                ) from err
        else:
            return chosen, socks
    raise ConfigError(
        f"simulator: no free port shared by {', '.join(hosts)} after {_RETRIES} tries"
    )


def _config(cert: tuple[Path, Path] | None) -> Config:
    config = Config()
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = _log
    config.graceful_timeout = 0.5
    if cert is not None:
        config.certfile, config.keyfile = str(cert[0]), str(cert[1])
    return config


@asynccontextmanager
async def serve_simulator(
    sim: Simulator, *, host: str = "127.0.0.1", port: int = 0, tls: bool = True,
    iscsi_port: int | None = None, iscsi: bool = True,
) -> AsyncIterator[Endpoints]:
    """Serve every listener of ``sim`` until the block ends; yields the ``Endpoints``.

    Each cluster's volume groups are served over iSCSI on its DSIP (unless ``iscsi`` is
    false) at ``iscsi_port``: by default 3260, or a free port shared by all DSIPs when
    ``port`` is 0 (tests run side by side)."""
    if iscsi_port is None:
        iscsi_port = 3260 if port else 0
    clusters = list(sim.clusters.values())
    hosts = [host, *(c.external_ip for c in clusters)]
    ca = CertificateAuthority(sim.state_dir) if tls else None
    chosen, socks = _bind_all(hosts, port)
    scheme = "https" if tls else "http"
    # Any: hypercorn types the ASGI callable its own way, which starlette's Scope does not meet
    apps: list[Any] = [pc_app(sim), *(pe_app(sim, c.uuid) for c in clusters)]
    names = ["pc", *(f"pe{n + 1}" for n in range(len(clusters)))]
    shown_pc = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        async with trio.open_nursery() as nursery:
            for app, name, h, sock in zip(apps, names, hosts, socks, strict=True):
                cert = ca.issue(name, shown_pc if h == host else h,
                                dns=("localhost",) if h == host else ()) if ca else None
                config = _config(cert)
                sockets = Sockets(
                    secure_sockets=[sock] if tls else [], insecure_sockets=[] if tls else [sock],
                    quic_sockets=[],
                )
                await nursery.start(partial(
                    worker_serve, wrap_app(app, config.wsgi_max_body_size, "asgi"),
                    config, sockets=sockets,
                ))
            portals = await _serve_iscsi(sim, clusters, iscsi_port if iscsi else None,
                                         nursery)
            yield Endpoints(
                pc_url=f"{scheme}://{shown_pc}:{chosen}",
                pe_urls={c.uuid: f"{scheme}://{c.external_ip}:{chosen}" for c in clusters},
                ca_path=ca.ca_path if ca else None,
                port=chosen,
                dsips={c.uuid: c.dsip for c in clusters},
                iscsi_portals=portals,
            )
            nursery.cancel_scope.cancel()
    finally:
        for s in socks:
            s.close()



def _in_trio(token: trio.lowlevel.TrioToken, fn: Any, *args: Any) -> None:
    """Call `fn` on the trio thread (the model calls back from request worker threads)."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        trio.from_thread.run_sync(fn, *args, trio_token=token)
    else:
        fn(*args)


async def _serve_iscsi(sim: Simulator, clusters: list[Any], port: int | None,
                       nursery: trio.Nursery) -> dict[str, tuple[str, int]]:
    """Start one iSCSI target per cluster on its DSIP (volume groups); returns the portals."""
    if port is None or not clusters:
        return {}
    from ahvbackup.transports.iscsi.target import IscsiTarget

    vgs = sim.volume_groups
    chosen, socks = _bind_all([c.dsip for c in clusters], port)
    for s in socks:  # trio binds its own listeners; the probe only settled the shared port
        s.close()
    portals: dict[str, tuple[str, int]] = {}
    for c in clusters:
        target = IscsiTarget(exports=partial(vgs.exports, c.uuid), name=f"iscsi-{c.name}")
        vgs.on_detach(partial(_in_trio, trio.lowlevel.current_trio_token(),
                              target.drop_sessions))
        host, bound = await nursery.start(target.serve, c.dsip, chosen)
        portals[c.uuid] = (host, bound)
    return portals
