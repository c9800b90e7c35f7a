"""A real TLS listener (trustme CA): verification on by default, CA bundles, insecure mode, and
no secret in any output at verbose=3."""

from __future__ import annotations

import base64
import functools
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from ahvbackup.core import log as ahvlog
from ahvbackup.core.errors import AhvBackupError
from ahvbackup.core.secret import Secret
from ahvbackup.hypervisors.ahv.client import PrismClient, PrismTlsError

PASSWORD = "Tr1cky-pa55:word"
SESSION = "sess-7f3a9c1d5e"


class TinyPrism:
    """An HTTPS server speaking just enough HTTP/1.1: `/users/me` needs Basic auth or the
    session cookie it sets; `/slow` answers 429 once, then 200; everything else is 403."""

    def __init__(self) -> None:
        self.throttled = False

    def answer(self, head: bytes) -> tuple[int, dict[str, str], bytes]:
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = dict(
            (k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:] if x)
        )
        basic = "Basic " + base64.b64encode(f"backup:{PASSWORD}".encode()).decode()
        if headers.get("authorization") != basic and headers.get("cookie") != f"S={SESSION}":
            return 401, {"content-type": "text/html"}, b"<html>401 Unauthorized</html>"
        extra = {"set-cookie": f"S={SESSION}; Secure; HttpOnly"}
        if path.endswith("/users/me"):
            body = {"metadata": {"uuid": "u"}, "status": {"name": "backup"}}
            return 200, extra, json.dumps(body).encode()
        if path.endswith("/slow"):
            if self.throttled:
                return 200, extra, b"{}"
            self.throttled = True
            return 429, {"retry-after": "0"}, b"{}"
        msg = {"message_list": [{"message": "denied", "reason": "ACCESS_DENIED"}]}
        return 403, extra, json.dumps(msg).encode()

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            status, headers, body = self.answer(data.split(b"\r\n\r\n")[0])
            head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            await stream.send_all(head.encode() + b"\r\n" + body)
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def prism_url(ca: trustme.CA) -> AsyncIterator[str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    server = TinyPrism()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve, server.handle, 0, ctx)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        yield f"https://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def test_the_configured_ca_is_trusted(prism_url: str, ca_file: str) -> None:
    async with PrismClient(prism_url, user="backup", password=Secret(PASSWORD),
                           verify=ca_file, rate_rpm=0) as pc:
        assert (await pc.me()).name == "backup"


async def test_an_unknown_ca_fails_and_says_what_to_do(prism_url: str) -> None:
    async with PrismClient(prism_url, user="backup", password=Secret(PASSWORD),
                           rate_rpm=0) as pc:
        with pytest.raises(PrismTlsError) as info:
            await pc.me()
    text = str(info.value)
    assert "certificate verification failed" in text
    assert "prism_ca_cert" in text
    assert "prism_insecure" in text
    assert prism_url.removeprefix("https://") in text


async def test_insecure_connects_to_an_unknown_ca(prism_url: str) -> None:
    async with PrismClient(prism_url, user="backup", password=Secret(PASSWORD),
                           verify=False, rate_rpm=0) as pc:
        assert (await pc.me()).name == "backup"


async def test_no_secret_in_any_output_at_verbose_3(
    prism_url: str, ca_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Everything we log at the most verbose level, every error message and traceback, never
    holds the password, the Basic credentials or the session cookie. httpx/httpcore debug
    records (httpcore logs response headers, Set-Cookie included) are clean once through the
    secret filter every handler of ours carries."""
    debug_log = tmp_path / "debug.log"
    ahvlog.configure_logging(verbose=3, debug_log=debug_log, stderr=True)
    ours: list[str] = []
    libraries: list[str] = []

    class Collect(logging.Handler):
        def __init__(self, into: list[str]) -> None:
            super().__init__(level=1)
            self.into = into
            self.setFormatter(logging.Formatter("%(name)s %(message)s"))

        def emit(self, record: logging.LogRecord) -> None:
            self.into.append(self.format(record))

    raw = Collect(ours)  # unfiltered: nothing secret is logged by us in the first place
    filtered = Collect(libraries)
    filtered.addFilter(ahvlog.SecretFilter())
    hooked = [(logging.getLogger("ahvbackup"), raw), (logging.getLogger("httpx"), filtered),
              (logging.getLogger("httpcore"), filtered)]
    saved = [(lg, lg.level) for lg, _ in hooked]
    for lg, handler in hooked:
        lg.setLevel(1)
        lg.addHandler(handler)
    errors: list[BaseException] = []
    try:
        async with PrismClient(prism_url, user="backup", password=Secret(PASSWORD),
                               verify=ca_file, rate_rpm=0, max_attempts=3) as pc:
            await pc.me()
            await pc.me()
            await pc.request("GET", "/api/nutanix/v3/slow")
        for attempt in (
            PrismClient(prism_url, user="backup", password=Secret(PASSWORD), verify=ca_file),
            PrismClient(prism_url, user="backup", password=Secret(PASSWORD)),
            PrismClient(prism_url, user="backup", password=Secret("nearly-" + PASSWORD),
                        verify=ca_file),
            PrismClient("https://127.0.0.1:1", user="backup", password=Secret(PASSWORD),
                        max_attempts=2, retry_budget=1),
        ):
            async with attempt:
                try:
                    await attempt.create_vm({"name": "x"})
                except AhvBackupError as err:
                    errors.append(err)
                    logging.getLogger("ahvbackup.test").exception("failed as expected")
    finally:
        for (lg, handler), (_, level) in zip(hooked, saved, strict=True):
            lg.setLevel(level)
            lg.removeHandler(handler)
        ahvlog.reset_logging()

    assert len(errors) == 4
    assert any(r.startswith("httpx ") for r in libraries), "httpx not logging: test is blind"
    assert any("set-cookie" in r for r in libraries), "httpcore not logging: test is blind"
    assert any("retry" in r for r in ours)
    out = capsys.readouterr()
    basic = base64.b64encode(f"backup:{PASSWORD}".encode()).decode()
    texts = {
        "stderr": out.err, "stdout": out.out, "debug_log": debug_log.read_text(),
        "our log records": "\n".join(ours),
        "httpx/httpcore records": "\n".join(libraries),
        "errors": "\n".join(f"{e!s} {e!r} {e.__cause__!r}" for e in errors),
    }
    for where, text in texts.items():
        for secret in (PASSWORD, basic, SESSION):
            assert secret not in text, f"{secret!r} leaked into {where}"
    assert "GET /users/me -> 200" in texts["debug_log"], "verbose=3 trace missing: test is blind"
    assert "failed as expected" in texts["debug_log"]


async def test_a_plain_http_answer_to_https_is_a_tls_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        async with PrismClient(f"https://127.0.0.1:{port}", user="b", password=Secret("x"),
                               rate_rpm=0) as pc:
            with pytest.raises(PrismTlsError, match="TLS failed") as info:
                await pc.me()
        nursery.cancel_scope.cancel()
    assert isinstance(info.value.__cause__, httpx.ConnectError)
