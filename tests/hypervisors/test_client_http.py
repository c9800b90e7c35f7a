"""The HTTP layer against a tiny scripted Prism: retries, backoff, errors, session cookies."""

from __future__ import annotations

import base64
import itertools
import logging
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ahvbackup.core.errors import (
    ApiAuthError,
    ApiError,
    ApiNotFoundError,
    ApiRateLimitedError,
    ApiServerError,
    ConfigError,
)
from ahvbackup.core.secret import Secret
from ahvbackup.hypervisors.ahv.client import PrismClient, PrismConnectionError
from ahvbackup.hypervisors.ahv.client.http import backoff_delay, parse_retry_after, prism_message

PASSWORD = "s3cret-Pa55word"
USER_OK = {"metadata": {"uuid": "u1"}, "status": {"name": "backup"}}

Reply = httpx.Response | Exception
Script = Callable[[httpx.Request], Reply]


class FakePrism:
    """Plays Prism: checks auth like Prism does (Basic or the session cookie it handed out),
    counts Basic logins, and answers each request from a script (a list used in order, then
    its last entry, or a function)."""

    def __init__(self, replies: list[Reply] | Script) -> None:
        self.replies = replies
        self.requests: list[httpx.Request] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.basic_logins = 0
        self.sessions: set[str] = set()
        self.expected = "Basic " + base64.b64encode(f"backup:{PASSWORD}".encode()).decode()

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.headers.append(dict(request.headers))
        self.times.append(trio.current_time())
        await trio.sleep(0)
        cookie = request.headers.get("cookie", "")
        auth = request.headers.get("authorization")
        session = None
        if auth is not None:
            if auth != self.expected:
                return httpx.Response(401, text="<html><body>Unauthorized</body></html>",
                                      headers={"content-type": "text/html"})
            self.basic_logins += 1
            session = f"tok{self.basic_logins}"
            self.sessions.add(session)
        elif cookie.removeprefix("NTNX_IAM_SESSION=") not in self.sessions:
            return httpx.Response(401, text="session expired")
        if callable(self.replies):
            reply = self.replies(request)
        else:
            reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        if session is not None:
            reply.headers["set-cookie"] = f"NTNX_IAM_SESSION={session}; Path=/; Secure; HttpOnly"
        return reply


def client(fake: FakePrism, **kw: Any) -> PrismClient:
    kw.setdefault("rate_rpm", 0)
    kw.setdefault("rng", random.Random(7))
    return PrismClient(
        "https://pc.example:9440", user="backup", password=Secret(PASSWORD),
        transport=fake.transport(), **kw,
    )


def v3_error(status: int, message: str, reason: str = "X") -> httpx.Response:
    return httpx.Response(status, json={
        "api_version": "3.1", "code": status, "state": "ERROR",
        "message_list": [{"message": message, "reason": reason}],
    })


# -- retries -------------------------------------------------------------------------------


async def test_429_is_retried_after_retry_after(autojump_clock: trio.abc.Clock) -> None:
    throttled = httpx.Response(429, headers={"retry-after": "7"}, json={})
    fake = FakePrism([throttled, throttled, httpx.Response(200, json=USER_OK)])
    start = trio.current_time()
    async with client(fake) as pc:
        user = await pc.me()
    assert user.name == "backup"
    assert len(fake.requests) == 3
    assert trio.current_time() - start == pytest.approx(14.0)


async def test_429_gives_up_after_the_attempt_cap(autojump_clock: trio.abc.Clock) -> None:
    fake = FakePrism([httpx.Response(429, headers={"retry-after": "2"},
                                     json={"message_list": [{"message": "slow down",
                                                             "reason": "RATE_LIMITED"}]})])
    async with client(fake, max_attempts=4, retry_budget=600) as pc:
        with pytest.raises(ApiRateLimitedError) as info:
            await pc.me()
    assert len(fake.requests) == 4
    text = str(info.value)
    assert "gave up after 4 attempts over 6.0 s" in text
    assert "slow down [RATE_LIMITED]" in text
    assert "GET /users/me" in text
    assert info.value.status == 429


async def test_retry_after_beyond_the_budget_gives_up_early(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakePrism([httpx.Response(429, headers={"retry-after": "25"}, json={})])
    start = trio.current_time()
    async with client(fake, max_attempts=10, retry_budget=60) as pc:
        with pytest.raises(ApiRateLimitedError, match=r"gave up after 3 attempts over 50\.0 s "
                                                      r"\(Prism asked to wait 25 s more\)"):
            await pc.me()
    assert trio.current_time() - start == pytest.approx(50.0)


async def test_5xx_backoff_is_jittered_and_capped(autojump_clock: trio.abc.Clock) -> None:
    fake = FakePrism([httpx.Response(503, json={})])
    async with client(fake, max_attempts=6, retry_budget=1000, backoff_base=1.0,
                      backoff_cap=4.0) as pc:
        with pytest.raises(ApiServerError, match=r"\(503\); gave up after 6 attempts"):
            await pc.get_vm("v1")
    gaps = [b - a for a, b in itertools.pairwise(fake.times)]
    assert len(gaps) == 5
    assert all(0 <= gap <= min(4.0, 2.0 ** n) for n, gap in enumerate(gaps))
    assert len(set(gaps)) == 5, "jitter should make every wait different"


async def test_a_create_without_idempotence_uuid_is_not_retried_on_5xx(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakePrism([v3_error(502, "upstream reset"), httpx.Response(202, json={})])
    async with client(fake) as pc:
        with pytest.raises(ApiServerError, match="POST /vms failed on the server"):
            await pc.create_vm({"name": "x", "resources": {}})
    assert len(fake.requests) == 1


async def test_a_create_with_idempotence_uuid_is_retried(autojump_clock: trio.abc.Clock) -> None:
    created = httpx.Response(202, json={
        "metadata": {"uuid": "fixed-1"}, "status": {"execution_context": {"task_uuid": "t1"}},
    })
    fake = FakePrism([v3_error(503, "busy"), httpx.ReadError("reset by peer"), created])
    async with client(fake) as pc:
        result = await pc.create_vm({"name": "x", "resources": {}}, uuid="fixed-1")
    assert (result.uuid, result.task_uuid) == ("fixed-1", "t1")
    assert len(fake.requests) == 3
    assert all(r.content == fake.requests[0].content for r in fake.requests)


async def test_429_is_retried_even_for_a_create(autojump_clock: trio.abc.Clock) -> None:
    created = httpx.Response(202, json={"metadata": {"uuid": "v9"}})
    fake = FakePrism([httpx.Response(429, headers={"retry-after": "1"}), created])
    async with client(fake) as pc:
        assert (await pc.create_vm({"name": "x"})).uuid == "v9"


async def test_a_dropped_read_is_retried_but_not_a_dropped_create(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakePrism([httpx.ReadError("connection reset"), httpx.Response(200, json=USER_OK)])
    async with client(fake) as pc:
        assert (await pc.me()).name == "backup"
    fake = FakePrism([httpx.ReadError("connection reset"), httpx.Response(202, json={})])
    async with client(fake) as pc:
        with pytest.raises(PrismConnectionError, match=r"pc\.example:9440: POST /vms failed"):
            await pc.create_vm({"name": "x"})
    assert len(fake.requests) == 1


async def test_unreachable_host_names_host_and_reason(autojump_clock: trio.abc.Clock) -> None:
    fake = FakePrism([httpx.ConnectError("Connection refused")])
    async with client(fake, max_attempts=3) as pc:
        with pytest.raises(PrismConnectionError) as info:
            await pc.list_vms()
    assert "Prism at pc.example:9440" in str(info.value)
    assert "after 3 attempts" in str(info.value)
    assert "Connection refused" in str(info.value)


# -- errors ----------------------------------------------------------------------------------


async def test_403_names_user_endpoint_and_prism_message() -> None:
    fake = FakePrism([v3_error(403, "Access denied for create on vm", "ACCESS_DENIED")])
    async with client(fake) as pc:
        with pytest.raises(ApiAuthError) as info:
            await pc.create_vm({"name": "x"})
    assert str(info.value) == (
        "Prism at pc.example:9440: user 'backup' lacks permission for POST /vms (403): "
        "Access denied for create on vm [ACCESS_DENIED]"
    )
    assert (info.value.status, info.value.endpoint) == (403, "POST /vms")


async def test_wrong_password_gives_a_clear_401_from_an_html_body() -> None:
    fake = FakePrism([httpx.Response(200, json=USER_OK)])
    pc = PrismClient("https://pc.example:9440", user="backup", password=Secret("wrong-one"),
                     transport=fake.transport(), rate_rpm=0)
    async with pc:
        with pytest.raises(ApiAuthError) as info:
            await pc.me()
    text = str(info.value)
    assert "user 'backup' was not accepted for GET /users/me (401): Unauthorized" in text
    assert "wrong-one" not in text
    assert len(fake.requests) == 1


async def test_404_and_other_4xx() -> None:
    fake = FakePrism([v3_error(404, "VM v1 not found", "ENTITY_NOT_FOUND"),
                      v3_error(409, "spec_version mismatch", "CONFLICT")])
    async with client(fake) as pc:
        with pytest.raises(ApiNotFoundError, match=r"GET /vms/v1 not found .*VM v1 not found"):
            await pc.get_vm("v1")
        with pytest.raises(ApiError, match=r"refused \(409\): spec_version mismatch") as info:
            await pc.get_vm("v1")
    assert type(info.value) is ApiError


async def test_a_success_that_is_not_json_is_a_server_error() -> None:
    fake = FakePrism([httpx.Response(200, text="<html>maintenance</html>")])
    async with client(fake) as pc:
        with pytest.raises(ApiServerError, match="not JSON"):
            await pc.me()


def test_url_with_credentials_is_refused() -> None:
    with pytest.raises(ConfigError, match="must not carry credentials") as info:
        PrismClient("https://backup:pw@pc:9440", user="backup", password=Secret("pw"))
    assert "pw@" not in str(info.value)


def test_missing_ca_bundle_names_the_key(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="prism_ca_cert"):
        PrismClient("https://pc:9440", user="backup", password=Secret("x"),
                    verify=str(tmp_path / "nope.pem"))


def test_insecure_warns_every_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ahvbackup.prism")
    for _ in range(2):
        PrismClient("https://pc:9440", user="b", password=Secret("x"), verify=False)
    PrismClient("https://pc:9440", user="b", password=Secret("x"))
    warnings = [r for r in caplog.records if r.name == "ahvbackup.prism"]
    assert len(warnings) == 2
    assert "verification is OFF" in warnings[0].getMessage()


# -- session cookie ----------------------------------------------------------------------------


async def test_basic_auth_is_sent_once_then_the_session_cookie() -> None:
    fake = FakePrism([httpx.Response(200, json=USER_OK)])
    async with client(fake) as pc:
        for _ in range(10):
            await pc.me()
    assert fake.basic_logins == 1
    later = fake.headers[1:]
    assert all("authorization" not in h for h in later)
    assert all(h["cookie"] == "NTNX_IAM_SESSION=tok1" for h in later)


async def test_an_expired_session_logs_in_again_once() -> None:
    fake = FakePrism([httpx.Response(200, json=USER_OK)])
    async with client(fake) as pc:
        await pc.me()
        fake.sessions.clear()
        await pc.me()
        await pc.me()
    assert fake.basic_logins == 2
    assert [("authorization" in h) for h in fake.headers] == [
        True, False, True, False,
    ]


# -- pure pieces ----------------------------------------------------------------------------


def test_retry_after_forms() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:10:00 GMT", now=now) == 0.0


@given(attempt=st.integers(1, 40), base=st.floats(0.01, 5), cap=st.floats(0.1, 60),
       seed=st.integers(0, 2**32))
def test_backoff_stays_under_the_cap(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, rng=random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** (attempt - 1))


def test_prism_messages() -> None:
    assert prism_message(b'{"message_list":[{"message":"a","reason":"R"},{"reason":"S"}]}') == (
        "a [R]; S"
    )
    v4 = b'{"data":{"error":[{"message":"VM busy","code":"VMM-1"}]}}'
    assert prism_message(v4) == "VM busy"
    assert prism_message(b"<html><h1>401</h1> Authorization Required</html>") == (
        "401 Authorization Required"
    )
    assert prism_message(b"") == "(no message)"
    assert len(prism_message(b"x" * 5000)) == 200
