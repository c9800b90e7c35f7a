"""Short-lived credentials and request replay for the v4 API.

``ClusterTokens``: the JWT that Prism Central hands out from ``$actions/discover-cluster`` and
that the Prism Element accepts as its session cookie for ``compute-changed-regions``. Signed with
HS256 by a key of this simulator process (a restarted simulator refuses old tokens, as a real
one would once they expire). The claims a real Prism puts in it are UNVERIFIED; these are the
simulator's own: ``sub`` (user), ``cluster`` (cluster uuid), ``rp`` (recovery point), ``exp``.

``RequestIds``: the answers to mutating v4 requests by listener, user and ``NTNX-Request-Id``, so
that a repeated id returns the original answer instead of doing the work twice (in memory, the
newest 2000; only successful answers are kept, so a refused request may be retried).
"""

from __future__ import annotations

__all__ = ["ClusterTokens", "RequestIds", "StoredAnswer"]

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

_KEEP = 2000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ClusterTokens:
    """Issue and verify the discover-cluster JWTs (``lifetime`` seconds, default 15 min)."""

    def __init__(self, lifetime: float = 900.0) -> None:
        self.lifetime = lifetime
        self._key = secrets.token_bytes(32)

    def issue(self, *, user: str, cluster_uuid: str, recovery_point: str) -> str:
        header = {"alg": "HS256", "typ": "JWT"}
        now = int(time.time())
        claims = {"sub": user, "cluster": cluster_uuid, "rp": recovery_point, "iat": now,
                  "exp": now + int(self.lifetime), "iss": "sim-prism-central"}
        signing = ".".join(_b64(json.dumps(p, separators=(",", ":")).encode())
                           for p in (header, claims))
        sig = hmac.new(self._key, signing.encode(), hashlib.sha256).digest()
        return f"{signing}.{_b64(sig)}"

    def verify(self, token: str, *, cluster_uuid: str) -> dict[str, Any] | None:
        """The claims of a valid, unexpired token for ``cluster_uuid``; None otherwise."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        signing = f"{parts[0]}.{parts[1]}"
        expected = hmac.new(self._key, signing.encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(expected, _unb64(parts[2])):
                return None
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, TypeError):
            return None
        if not isinstance(claims, dict) or claims.get("cluster") != cluster_uuid:
            return None
        if float(claims.get("exp", 0)) < time.time():
            return None
        return claims


@dataclass(frozen=True)
class StoredAnswer:
    method: str
    path: str
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


class RequestIds:
    """Answers by (listener, ``NTNX-Request-Id``); thread-safe, bounded."""

    def __init__(self) -> None:
        self._answers: OrderedDict[tuple[str, str], StoredAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, listener: str, request_id: str) -> StoredAnswer | None:
        with self._lock:
            return self._answers.get((listener, request_id))

    def put(self, listener: str, request_id: str, answer: StoredAnswer) -> None:
        with self._lock:
            self._answers[(listener, request_id)] = answer
            while len(self._answers) > _KEEP:
                self._answers.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
