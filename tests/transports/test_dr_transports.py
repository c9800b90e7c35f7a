"""The DR transports (psk, mtls) on real loopback sockets: the contract check, wrong
credentials, and frames damaged on the way by a proxy between source and receiver."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trustme

from ahvbackup.core.config import Config, load_config
from ahvbackup.core.drivers import DrTransport, dr_transport_name
from ahvbackup.core.errors import ConfigError, TransportError
from ahvbackup.core.plugins import load_driver
from ahvbackup.core.testing import check_dr_transport, check_driver_class
from ahvbackup.transports.dr import framing
from ahvbackup.transports.dr.mtls import MtlsTransport
from ahvbackup.transports.dr.psk import PskTransport

TOKEN = "7f" * 32  # what `openssl rand -hex 32` gives
OTHER = "a5" * 32
HOST = "127.0.0.1"


def psk_config(token: str = TOKEN, **more: object) -> Config:
    return load_config(overrides={"dr_auth_token": token, "dr_host": HOST, **more})


def psk_pair(wrong: str) -> tuple[DrTransport, DrTransport]:
    return (PskTransport(psk_config(OTHER if wrong == "client" else TOKEN)),
            PskTransport(psk_config(OTHER if wrong == "server" else TOKEN)))


class Pki:
    """A CA, a stranger CA, and certificate files for both sides, keys mode 0600."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.ca, self.stranger = trustme.CA(), trustme.CA()
        self.ca.cert_pem.write_to_path(str(where / "ca.pem"))

    def config(self, name: str, *, ca: trustme.CA | None = None,
               expired: bool = False) -> Config:
        signer = ca or self.ca
        when = {}
        if expired:
            now = datetime.datetime.now(datetime.UTC)
            when = {"not_before": now - datetime.timedelta(days=30),
                    "not_after": now - datetime.timedelta(days=1)}
        leaf = signer.issue_cert(HOST, "localhost", common_name=name, **when)
        cert, key = self.where / f"{name}.pem", self.where / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o600)
        return load_config(overrides={"dr_auth_cert": str(cert), "dr_auth_key": str(key),
                                      "dr_ca_cert": str(self.where / "ca.pem"),
                                      "dr_host": HOST})

    def pair(self, wrong: str) -> tuple[DrTransport, DrTransport]:
        client = self.config(f"source-{wrong}",
                             ca=self.stranger if wrong == "client" else None)
        server = self.config(f"receiver-{wrong}",
                             ca=self.stranger if wrong == "server" else None)
        return MtlsTransport(client), MtlsTransport(server)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def test_entry_points_and_selection(pki: Pki) -> None:
    for name in ("psk", "mtls"):
        check_driver_class(load_driver("transport", name), kind="transport", name=name)
    assert dr_transport_name(psk_config()) == "psk"
    assert dr_transport_name(pki.config("s")) == "mtls"
    with pytest.raises(ConfigError, match="dr_auth_token and dr_auth_cert"):
        dr_transport_name(load_config(overrides={"dr_auth_token": TOKEN,
                                                 "dr_auth_cert": "/x.pem"}))
    with pytest.raises(ConfigError, match="no credentials"):
        dr_transport_name(load_config())


def test_bad_credentials_are_refused_before_connecting(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dr_auth_token: at least 32 bytes"):
        PskTransport(psk_config("short-token"))
    with pytest.raises(ConfigError, match=r"dr_auth_key.*required"):
        MtlsTransport(load_config(overrides={"dr_auth_cert": "/a.pem", "dr_ca_cert": "/c"}))
    loose = pki.config("loose")
    assert loose.dr_auth_key is not None
    os.chmod(loose.dr_auth_key, 0o644)
    with pytest.raises(ConfigError, match=r"mode 0644 is readable by others; expected 0600"):
        MtlsTransport(loose)


async def test_psk_passes_the_transport_check() -> None:
    await check_dr_transport(psk_pair)


async def test_mtls_passes_the_transport_check(pki: Pki) -> None:
    await check_dr_transport(pki.pair)


async def serve_once(server: DrTransport, nursery: trio.Nursery,
                     handler: Callable[[trio.abc.Stream], Awaitable[None]]) -> int:
    from dataclasses import replace

    port: int = await nursery.start(
        lambda task_status: type(server)(replace(server.config, dr_port=0)).serve(
            handler, host=HOST, task_status=task_status))
    return port


def at(driver: DrTransport, port: int) -> DrTransport:
    from dataclasses import replace

    return type(driver)(replace(driver.config, dr_port=port))


async def test_an_expired_certificate_is_refused_on_both_sides(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ahvbackup.dr")
    good_server = MtlsTransport(pki.config("receiver"))
    old_client = MtlsTransport(pki.config("old-source", expired=True))
    good_client = MtlsTransport(pki.config("source"))
    old_server = MtlsTransport(pki.config("old-receiver", expired=True))
    ran: list[str] = []

    async def handler(stream: trio.abc.Stream) -> None:
        ran.append("handler")

    async with trio.open_nursery() as nursery:
        port = await serve_once(good_server, nursery, handler)
        with pytest.raises(TransportError, match="refused"):
            await at(old_client, port).connect()
        port = await serve_once(old_server, nursery, handler)
        with pytest.raises(TransportError, match="certificate has expired"):
            await at(good_client, port).connect()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert ran == []
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("certificate has expired" in m for m in refusals), refusals


async def test_wrong_psk_is_named_without_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, server = psk_pair("client")

    async def handler(stream: trio.abc.Stream) -> None:
        raise AssertionError("a wrong key reached the handler")

    async with trio.open_nursery() as nursery:
        port = await serve_once(server, nursery, handler)
        with pytest.raises(TransportError, match="refused our dr_auth_token"):
            await at(client, port).connect()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert any("did not prove dr_auth_token" in r.getMessage() for r in caplog.records)
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert TOKEN not in text and OTHER not in text


# a proxy that damages the source's frames ---------------------------------------------------

#: the source waits longer than this between its handshake and its first frame, so the
#: proxy (which passes the handshake on as it comes) knows where the frames start
QUIET = 0.1


def split_frames(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        _, _, n = framing.HEADER.unpack_from(data, at)
        end = at + framing.HEADER.size + n + framing.TAG_SIZE
        out.append(data[at:end])
        at = end
    return out


def tamper(frames: list[bytes]) -> list[bytes]:
    hit = bytearray(frames[1])
    hit[framing.HEADER.size + 3] ^= 0x40
    return [frames[0], bytes(hit), *frames[2:]]


def oversize(frames: list[bytes]) -> list[bytes]:
    hit = bytearray(frames[1])
    kind, seq, _ = framing.HEADER.unpack_from(hit)
    framing.HEADER.pack_into(hit, 0, kind, seq, framing.MAX_PAYLOAD + 1)
    return [frames[0], bytes(hit), *frames[2:]]


DAMAGE: dict[str, tuple[Callable[[list[bytes]], list[bytes]], str]] = {
    "tampered": (tamper, "frame 1 failed authentication"),
    "replayed": (lambda f: [f[0], f[0], *f[1:]], "frame 0 replayed"),
    "reordered": (lambda f: [f[0], f[2], f[1], *f[3:]], "frame 2 out of order"),
    "oversized": (oversize, "oversized"),
    "truncated": (lambda f: [f[0], f[1][:40]], "truncated"),
}


async def damaging_proxy(source: trio.SocketStream, port: int,
                         change: Callable[[list[bytes]], list[bytes]], shaken: trio.Event) -> None:
    """Pass the handshake on as it comes (both ways); once the source has connected
    (`shaken`) and gone quiet, hold its frames until it closes, and pass them on changed."""
    receiver = await trio.open_tcp_stream(HOST, port)

    async def back() -> None:
        try:
            while data := await receiver.receive_some():
                await source.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as inner:
        inner.start_soon(back)
        while True:
            with trio.move_on_after(QUIET) as quiet:
                data = await source.receive_some()
                await receiver.send_all(data)
            if quiet.cancelled_caught and shaken.is_set():
                break
        rest = bytearray()
        while data := await source.receive_some():
            rest += data
        await receiver.send_all(b"".join(change(split_frames(bytes(rest)))))
        await receiver.send_eof()
    await receiver.aclose()


CASES = [("psk", d) for d in sorted(DAMAGE)] + [("mtls", "tampered"), ("mtls", "replayed")]


@pytest.mark.parametrize(("transport", "damage"), CASES)
async def test_a_damaged_frame_ends_the_channel_and_nothing_of_it_is_delivered(
        transport: str, damage: str, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    change, named = DAMAGE[damage]
    client, server = psk_pair("") if transport == "psk" else pki.pair("")
    pieces = [bytes([i]) * 1000 for i in range(1, 5)]  # one frame each
    delivered = bytearray()
    done, shaken = trio.Event(), trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            while data := await stream.receive_some():
                delivered.extend(data)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        port = await serve_once(server, nursery, handler)
        listeners = await nursery.start(
            trio.serve_tcp, lambda s: damaging_proxy(s, port, change, shaken), 0)
        with trio.fail_after(10):
            stream = await at(client, listeners[0].socket.getsockname()[1]).connect()
        shaken.set()
        await trio.sleep(2.5 * QUIET)
        for piece in pieces:
            await stream.send_all(piece)
        await stream.aclose()
        with trio.fail_after(10):
            await done.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert delivered == pieces[0], f"{damage}: delivered {len(delivered)} bytes"
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(named in m for m in problems), problems
    assert TOKEN not in caplog.text


async def test_psk_and_mtls_ends_refuse_each_other(pki: Pki,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A source and a receiver with different transports fail with a reason, not a hang."""
    async def handler(stream: trio.abc.Stream) -> None:
        raise AssertionError("reached the handler")

    async with trio.open_nursery() as nursery:
        tls_port = await serve_once(MtlsTransport(pki.config("receiver")), nursery, handler)
        psk_port = await serve_once(PskTransport(psk_config()), nursery, handler)
        with trio.fail_after(5), pytest.raises(TransportError):
            await at(PskTransport(psk_config()), tls_port).connect()
        with trio.fail_after(5), pytest.raises(TransportError):
            await at(MtlsTransport(pki.config("source")), psk_port).connect()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert any("does not speak the ahvbackup psk DR channel" in r.getMessage()
               for r in caplog.records)
