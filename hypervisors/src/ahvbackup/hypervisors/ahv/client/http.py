"""HTTP to one Prism endpoint: auth with session-cookie reuse, TLS, retries, errors, rate limit.

`PrismHttp` owns one `httpx.AsyncClient` (injectable transport, so tests run the simulator
in-process). Every request goes through the shared `TokenBucket`; 429/502/503/504 and
connection failures are retried while a time budget and an attempt cap allow, honouring
`Retry-After`, else waiting a capped exponential backoff with full jitter. What cannot be retried
becomes an `ApiError` from `ahvbackup.core.errors` carrying Prism's own message.

The password lives in a `Secret` and only ever reaches the `Authorization` header; no header, no
cookie and no request object is logged or put in a message.
"""

from __future__ import annotations

__all__ = [
    "RETRY_STATUSES",
    "V3",
    "PrismAuth",
    "PrismHttp",
    "backoff_delay",
    "error_for_response",
    "parse_retry_after",
    "prism_message",
]

import base64
import email.utils
import http.cookiejar
import json as jsonlib
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from ahvbackup.core.errors import (
    ApiAuthError,
    ApiError,
    ApiNotFoundError,
    ApiRateLimitedError,
    ApiServerError,
    ConfigError,
)
from ahvbackup.core.log import get_logger, mask_secrets, trace
from ahvbackup.core.plugins import Hooks
from ahvbackup.core.secret import Secret

from .errors import PrismConnectionError, PrismTlsError
from .pacing import TaskPacer
from .ratelimit import RateLimitedTransport, TokenBucket

log = get_logger("prism")

V3 = "/api/nutanix/v3"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class PrismAuth(httpx.Auth):
    """Basic auth on the first request, the session cookie Prism hands back after that.

    A 401 while presenting the cookie means the session expired: the request is sent once more
    with Basic auth, which also refreshes the cookie. A request whose body cannot be replayed
    (a streamed upload) always goes with Basic auth so that it never needs that second send.
    Cookie values are held as `Secret`s, so the log filter masks them should a library's debug
    output (httpcore logs response headers) ever reach a log.
    """

    def __init__(self, user: str, password: Secret) -> None:
        self.user = user
        self._password = password
        self._cookies: dict[str, Secret] = {}
        self.basic_logins = 0

    @property
    def has_session(self) -> bool:
        return bool(self._cookies)

    def _basic(self) -> str:
        raw = f"{self.user}:{self._password.reveal()}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _remember(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            return
        for header in response.headers.get_list("set-cookie"):
            pair = header.split(";", 1)[0]
            name, sep, value = pair.partition("=")
            if sep and name.strip():
                self._cookies[name.strip()] = Secret(value.strip())

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        replayable = isinstance(request.stream, httpx.ByteStream)
        if self._cookies and replayable:
            sent = dict(self._cookies)
            request.headers["Cookie"] = "; ".join(f"{k}={v.reveal()}" for k, v in sent.items())
            response = yield request
            if response.status_code != 401:
                self._remember(response)
                return
            if self._cookies == sent:
                self._cookies.clear()
            del request.headers["Cookie"]
        request.headers["Authorization"] = self._basic()
        self.basic_logins += 1
        response = yield request
        self._remember(response)


class HeaderRedactor(logging.Filter):
    """Masks cookie and authorization header values in httpcore's debug records, which print
    raw response headers (a session cookie arrives in the very first one, before any filter
    could know its value)."""

    _HEADER = re.compile(
        r"(\(b'(?:set-cookie|cookie|authorization|x-ntnx-api-key)', b')[^']*(')", re.IGNORECASE
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "'" in record.msg:
            try:
                text = record.getMessage()
            except (TypeError, ValueError, KeyError):
                return True
            record.msg, record.args = self._HEADER.sub(r"\1********\2", text), None
        return True


_REDACTED_LOGGERS = ("httpcore.http11", "httpcore.http2", "httpcore.proxy")


def _redact_library_logs() -> None:
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, HeaderRedactor) for f in logger.filters):
            logger.addFilter(HeaderRedactor())


def _refuse_all_cookies() -> http.cookiejar.CookieJar:
    """httpx keeps cookies per client by default; `PrismAuth` does it instead, per endpoint,
    and must see exactly what is sent, so the client's own jar accepts nothing."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date), or None when
    absent or unreadable. `now` is the wall-clock time an HTTP date is measured from."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    return rng.uniform(0.0, min(cap, base * 2 ** max(0, attempt - 1)))


def prism_message(body: bytes, content_type: str = "") -> str:
    """Prism's own words from an error body: v3 `message_list[].message/reason`, v4
    `data.error[].message`, else the text itself (401s are often HTML), shortened."""
    data: Any = None
    if body:
        try:
            data = jsonlib.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
    if isinstance(data, Mapping):
        found: list[str] = []
        for item in data.get("message_list") or []:
            if isinstance(item, Mapping):
                text, reason = item.get("message"), item.get("reason")
                if text and reason:
                    found.append(f"{text} [{reason}]")
                elif text or reason:
                    found.append(str(text or reason))
        inner = data.get("data")
        errors = inner.get("error") if isinstance(inner, Mapping) else None
        if isinstance(errors, list):
            found += [
                str(e["message"]) for e in errors if isinstance(e, Mapping) and e.get("message")
            ]
        if found:
            return "; ".join(found)
        for key in ("message", "error_detail", "error", "detail"):
            if isinstance(data.get(key), str) and data[key]:
                return str(data[key])
    text = body.decode("utf-8", "replace")
    if "html" in content_type.lower() or text.lstrip().startswith("<"):
        text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:197] + "..."
    return text or "(no message)"


def error_for_response(
    *,
    status: int,
    body: bytes,
    content_type: str,
    host: str,
    method: str,
    path: str,
    user: str,
    gave_up: tuple[int, float] | None = None,
    retry_after: float | None = None,
) -> ApiError:
    """The error an HTTP failure becomes. `gave_up` is (attempts, seconds) once retries ran
    out; `retry_after` is the wait Prism last asked for."""
    msg = prism_message(body, content_type)
    where = f"Prism at {host}"
    endpoint = f"{method} {path}"
    tail = ""
    if gave_up is not None:
        attempts, seconds = gave_up
        tail = f"; gave up after {attempts} attempts over {seconds:.1f} s"
        if retry_after is not None:
            tail += f" (Prism asked to wait {retry_after:g} s more)"
    err: ApiError
    if status == 401:
        err = ApiAuthError(
            f"{where}: user '{user}' was not accepted for {endpoint} (401): {msg}; "
            "check prism_user and its password",
            status=status, endpoint=endpoint,
        )
    elif status == 403:
        err = ApiAuthError(
            f"{where}: user '{user}' lacks permission for {endpoint} (403): {msg}",
            status=status, endpoint=endpoint,
        )
    elif status == 404:
        err = ApiNotFoundError(
            f"{where}: {endpoint} not found (404): {msg}", status=status, endpoint=endpoint
        )
    elif status == 429:
        err = ApiRateLimitedError(
            f"{where}: {endpoint} rate limited (429){tail}: {msg}; "
            "lower prism_rate_rpm or run fewer jobs at once",
            status=status, endpoint=endpoint,
        )
    elif status >= 500:
        err = ApiServerError(
            f"{where}: {endpoint} failed on the server ({status}){tail}: {msg}",
            status=status, endpoint=endpoint,
        )
    else:
        err = ApiError(
            f"{where}: {endpoint} refused ({status}): {msg}", status=status, endpoint=endpoint
        )
    err.args = (mask_secrets(str(err)),)
    return err


def _display(path: str) -> str:
    return path[len(V3):] if path.startswith(V3 + "/") else path


_ID_SEGMENT = re.compile(r"/(?:[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}|[0-9a-fA-F]{32}|\d+)(?=/|$)")


def _labels(method: str, shown: str, **labels: str) -> dict[str, str]:
    """A Prism metric's labels; ids in the path become ``{id}``: one series per endpoint."""
    endpoint = _ID_SEGMENT.sub("/{id}", shown.split("?", 1)[0])
    return {"endpoint": endpoint, "method": method, **labels}


def _is_tls_failure(err: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, ssl.SSLError):
            return node
        node = node.__cause__ or node.__context__
    return None


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return mask_secrets(text)


def _ssl_context(verify: bool | str) -> ssl.SSLContext | bool:
    if isinstance(verify, bool):
        return verify
    try:
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"prism_ca_cert: cannot load CA bundle {verify} "
            f"({getattr(err, 'strerror', None) or err})"
        ) from err


class PrismHttp:
    """One Prism endpoint (PC or one PE). Use as `async with PrismHttp(...) as p:`.

    `verify` is True (system CAs), a CA bundle path (`prism_ca_cert`) or False
    (`prism_insecure=yes`, warned about every time a client is made). `limiter` lets several
    endpoints share one bucket; otherwise one is made from `rate_rpm`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        user: str,
        password: Secret,
        verify: bool | str = True,
        rate_rpm: int = 30,
        retry_budget: float = 60.0,
        max_attempts: int = 6,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] | None = None,
        limiter: TokenBucket | None = None,
        timeout: float = 60.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.userinfo:
            raise ConfigError("Prism URL must not carry credentials; use prism_user and a passfile")
        if url.scheme not in ("https", "http") or not url.host:
            raise ConfigError(f"Prism URL {base_url!r}: expected https://<host>:<port>")
        if not isinstance(password, Secret):
            raise TypeError("password must be an ahvbackup.core.secret.Secret")
        self.base_url = str(url).rstrip("/")
        self.host = url.netloc.decode("ascii")
        self.user = user
        self.auth = PrismAuth(user, password)
        self.limiter = limiter if limiter is not None else TokenBucket(rate_rpm)
        self.pacer = TaskPacer()  # task polls shaped by what tasks here took
        self.retry_budget = retry_budget
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._clock = clock or trio.current_time
        _redact_library_logs()
        self._rng = rng or random.Random()
        if verify is False:
            log.warning(
                "Prism at %s: TLS certificate verification is OFF (prism_insecure=yes); "
                "anyone on the network path can impersonate Prism and capture its password",
                self.host,
            )
        inner = transport or httpx.AsyncHTTPTransport(verify=_ssl_context(verify), retries=0)
        self._verify = verify
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            auth=self.auth,
            transport=RateLimitedTransport(inner, self.limiter),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            cookies=_refuse_all_cookies(),
            headers={"Accept": "application/json", "User-Agent": "ahvbackup"},
            follow_redirects=False,
        )

    def data_access(self) -> tuple[dict[str, str], ssl.SSLContext | None]:
        """Headers and TLS context for bulk disk bytes (image ranges), which the data path
        reads with its own connections: outside the API rate limit (meant for control-plane
        calls), straight into its buffers. The headers carry credentials: never log them."""
        headers = {"Authorization": self.auth._basic(), "User-Agent": "ahvbackup"}
        if not self.base_url.startswith("https:"):
            return headers, None
        ctx = _ssl_context(self._verify)
        if ctx is True:
            ctx = ssl.create_default_context()
        elif ctx is False:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        assert isinstance(ctx, ssl.SSLContext)
        return headers, ctx

    async def __aenter__(self) -> PrismHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send, retrying what is safe to retry; return the (read) successful response."""
        return await self._send(
            method, path, json=json, params=params, headers=headers,
            idempotent=idempotent, stream=False,
        )

    async def request_json(self, method: str, path: str, **kw: Any) -> Any:
        """`request`, then the JSON body (an unreadable body is an ApiServerError)."""
        resp = await self.request(method, path, **kw)
        try:
            return resp.json()
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiServerError(
                f"Prism at {self.host}: {method} {_display(path)} answered {resp.status_code} "
                f"with a body that is not JSON: {prism_message(resp.content)}",
                status=resp.status_code, endpoint=f"{method} {_display(path)}",
            ) from err

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: Any = None,
        idempotent: bool | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A successful response whose body is not read yet (downloads), or, with `content`
        an async byte iterator, a streamed upload. Retries stop once the body starts flowing;
        a streamed upload is never retried (its body cannot be replayed)."""
        resp = await self._send(
            method, path, headers=headers, content=content, idempotent=idempotent, stream=True
        )
        try:
            yield resp
        finally:
            await resp.aclose()

    def _retry_delay(self, attempt: int, started: float, wait: float | None) -> float | None:
        """How long to wait before attempt `attempt + 1`, or None when the budget is spent."""
        if attempt >= self.max_attempts:
            return None
        delay = wait if wait is not None else backoff_delay(
            attempt, base=self.backoff_base, cap=self.backoff_cap, rng=self._rng
        )
        if self._clock() - started + delay > self.retry_budget:
            return None
        return delay

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None,
        stream: bool,
    ) -> httpx.Response:
        method = method.upper()
        shown = _display(path)
        endpoint = f"{method} {shown}"
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS
        replayable = content is None or isinstance(content, bytes | bytearray | memoryview)
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            request = self.http.build_request(
                method, path, json=json, content=content, params=params, headers=headers
            )
            t0 = self._clock()
            try:
                resp = await self.http.send(request, stream=True)
                status = resp.status_code
                if not stream or status >= 400:
                    try:
                        await resp.aread()
                    finally:
                        await resp.aclose()
            except httpx.TransportError as err:
                tls = _is_tls_failure(err)
                if tls is not None:
                    verify_failed = isinstance(tls, ssl.SSLCertVerificationError) or (
                        "CERTIFICATE_VERIFY_FAILED" in str(tls)
                    )
                    what = "certificate verification failed" if verify_failed else "TLS failed"
                    Hooks.current().metric(name="prism_errors", value=1,
                                           labels=_labels(method, shown, status="tls"))
                    raise PrismTlsError(
                        f"Prism at {self.host}: {what} ({_reason(tls)}); set prism_ca_cert to "
                        "the CA that signed Prism's certificate, or prism_insecure=yes to skip "
                        "verification (not recommended)",
                        endpoint=endpoint,
                    ) from err
                never_sent = isinstance(err, httpx.ConnectError | httpx.ConnectTimeout)
                delay = None
                if replayable and (idempotent or never_sent):
                    delay = self._retry_delay(attempt, started, None)
                if delay is None:
                    Hooks.current().metric(name="prism_errors", value=1,
                                           labels=_labels(method, shown, status="connection"))
                    spent = self._clock() - started
                    tail = f" after {attempt} attempts over {spent:.1f} s" if attempt > 1 else ""
                    raise PrismConnectionError(
                        f"Prism at {self.host}: {endpoint} failed{tail}: "
                        f"{type(err).__name__}: {_reason(err)}",
                        endpoint=endpoint,
                    ) from err
                log.debug(
                    "Prism at %s: %s: %s; retry %d in %.2f s",
                    self.host, endpoint, type(err).__name__, attempt + 1, delay,
                )
                Hooks.current().metric(name="prism_retries", value=1,
                                       labels=_labels(method, shown, reason=type(err).__name__))
                await trio.sleep(delay)
                continue
            trace(log, "Prism at %s: %s -> %d (%.3f s)", self.host, endpoint, status,
                  self._clock() - t0)
            Hooks.current().metric(name="prism_requests", value=1,
                                   labels=_labels(method, shown, status=str(status)))
            if status < 400:
                return resp
            if status in RETRY_STATUSES and replayable and (status == 429 or idempotent):
                wait = parse_retry_after(resp.headers.get("retry-after"))
                delay = self._retry_delay(attempt, started, wait)
                if delay is not None:
                    log.debug(
                        "Prism at %s: %s answered %d; retry %d in %.2f s%s",
                        self.host, endpoint, status, attempt + 1, delay,
                        " (Retry-After)" if wait is not None else "",
                    )
                    Hooks.current().metric(name="prism_retries", value=1,
                                           labels=_labels(method, shown, reason=str(status)))
                    await trio.sleep(delay)
                    continue
                Hooks.current().metric(name="prism_errors", value=1,
                                       labels=_labels(method, shown, status=str(status)))
                raise error_for_response(
                    status=status, body=resp.content,
                    content_type=resp.headers.get("content-type", ""), host=self.host,
                    method=method, path=shown, user=self.user,
                    gave_up=(attempt, self._clock() - started), retry_after=wait,
                )
            Hooks.current().metric(name="prism_errors", value=1,
                                   labels=_labels(method, shown, status=str(status)))
            raise error_for_response(
                status=status, body=resp.content,
                content_type=resp.headers.get("content-type", ""), host=self.host,
                method=method, path=shown, user=self.user,
            )
