"""The receiver daemon (mode=receiver): a `Receiver` served through the configured transport.

It listens on dr_port (on dr_host when set, else every interface), keeps its VMs under its
own state_dir, tells systemd it is ready only once it listens (`sd_notify`, the
NOTIFY_SOCKET datagram protocol: no dependency), and stops on SIGTERM or SIGINT: the write
in flight finishes (writes run in threads that a cancellation waits for; a commit is
shielded), the partial point stays with its journal, and the source's next connection
resumes from the last durable offset.
"""

from __future__ import annotations

__all__ = ["ReceiverDaemon", "sd_notify"]

import logging
import os
import signal
import socket
from functools import partial
from pathlib import Path

import trio

from ..config import Config
from ..drivers import DrTransport
from ..errors import TransportError, our_errors
from .receiver import Receiver, ReceiverSettings

log = logging.getLogger("ahvbackup.dr.receiver")


def sd_notify(state: str) -> bool:
    """Send `state` (``READY=1``, ``STOPPING=1``, ...) to systemd when it runs us with
    Type=notify (NOTIFY_SOCKET set); False when there is no one to tell."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as err:
            log.warning("receiver: cannot notify systemd at %s (%s)", where, err.strerror)
            return False
    return True


class ReceiverDaemon:
    """One receiver: `config` gives dr_port, dr_host (the address to bind), state_dir,
    dr_restore_points and push_apply_remote; `transport` the configured DR transport."""

    def __init__(self, config: Config, *, transport: DrTransport) -> None:
        self.config = config
        self.transport = transport
        self.state_dir = Path(config.state_dir)
        self.receiver = Receiver(ReceiverSettings(
            state_dir=self.state_dir, restore_points=config.dr_restore_points,
            apply_remote=config.push_apply_remote))

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; returns the signal's number. A listener that
        cannot bind is one `TransportError` naming dr_port."""
        try:
            return await self._serve()
        except BaseExceptionGroup as group:
            errors = our_errors(group)
            if errors is None or len(errors) != 1:
                raise
            raise errors[0] from None

    async def _serve(self) -> int:
        host = self.config.dr_host
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    port = await nursery.start(partial(
                        self.transport.serve, self.receiver.handle, host=host))
                except (OSError, BaseExceptionGroup) as err:
                    raise self._cannot_listen(err) from None
                where = f"{host or '*'}:{port}"
                log.info("receiver: listening on %s (transport %s, state %s)", where,
                         self.transport.name, self.state_dir)
                sd_notify(f"READY=1\nSTATUS=listening on {where}")
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("receiver: %s: stopping; a push in flight keeps its durable "
                             "part and resumes when its source reconnects", name)
                    sd_notify(f"STOPPING=1\nSTATUS=stopping ({name})")
                    nursery.cancel_scope.cancel()
                    return int(signum)
        raise AssertionError("the signal receiver ended")  # pragma: no cover

    def _cannot_listen(self, err: BaseException) -> BaseException:
        """The bind error as one line naming dr_port (anything else is given back whole)."""
        leaf: BaseException = err
        if isinstance(err, BaseExceptionGroup):
            bind, rest = err.split(OSError)
            if bind is None or rest is not None:
                return err
            leaf = bind
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
        assert isinstance(leaf, OSError)
        where = f"{self.config.dr_host or '*'}:{self.config.dr_port}"
        return TransportError(f"dr_port: cannot listen on {where} ({leaf.strerror or leaf})")
