"""Fault injection and request counters of the simulator.

Tests and demos add rules that match requests by method and path; a matching rule can delay the
request, answer it with an error status (429 with Retry-After, 500, 503, ...), drop the connection
after the response has started, or let the request succeed but make the task it starts fail.
"""

from __future__ import annotations

__all__ = ["FaultRule", "Faults", "Stats"]

import itertools
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FaultRule:
    """One rule; ``count`` is how many more requests it applies to (None: every request)."""

    id: int
    method: str | None
    path: re.Pattern[str]
    status: int | None = None
    retry_after: float | None = None
    latency: float = 0.0
    drop: bool = False
    drop_after_bytes: int = 0
    task_fail: bool = False
    body: str | None = None
    count: int | None = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method.upper():
            return False
        return self.path.search(path) is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "method": self.method,
            "path": self.path.pattern,
            "status": self.status,
            "retry_after": self.retry_after,
            "latency": self.latency,
            "drop": self.drop,
            "drop_after_bytes": self.drop_after_bytes,
            "task_fail": self.task_fail,
            "body": self.body,
            "count": self.count,
            "hits": self.hits,
        }


class Faults:
    """The active fault rules; the first matching rule with uses left applies to a request."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(
        self,
        *,
        method: str | None = None,
        path: str = ".*",
        status: int | None = None,
        retry_after: float | None = None,
        latency: float = 0.0,
        drop: bool = False,
        drop_after_bytes: int = 0,
        count: int | None = 1,
        task_fail: bool = False,
        body: str | None = None,
    ) -> FaultRule:
        """Add a rule. ``path`` is a regular expression searched in the request path.

        ``status``: answer with this status (and ``Retry-After`` when ``retry_after`` is set)
        instead of running the request; ``body`` replaces the v3 error envelope with raw text.
        ``latency``: seconds to wait first. ``drop``: start the response, send at most
        ``drop_after_bytes`` of its body, then close the connection. ``task_fail``: run the
        request, but the task it starts ends FAILED (and its entity in state ERROR).
        """
        if status is not None and not 400 <= status <= 599:
            raise ValueError(f"status: must be an HTTP error status 400..599 (got {status})")
        if count is not None and count < 1:
            raise ValueError(f"count: must be at least 1 or None for always (got {count})")
        if latency < 0:
            raise ValueError(f"latency: must not be negative (got {latency})")
        try:
            pattern = re.compile(path)
        except re.error as err:
            raise ValueError(f"path: not a regular expression ({path!r}: {err})") from err
        rule = FaultRule(
            id=next(self._ids),
            method=method.upper() if method else None,
            path=pattern,
            status=status,
            retry_after=retry_after,
            latency=latency,
            drop=drop,
            drop_after_bytes=drop_after_bytes,
            task_fail=task_fail,
            body=body,
            count=count,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule_id: int) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def take(self, method: str, path: str) -> FaultRule | None:
        """The rule that applies to this request, its use counted (used-up rules are removed)."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    if rule.count is not None:
                        rule.count -= 1
                        if rule.count == 0:
                            self._rules.remove(rule)
                    return rule
        return None


@dataclass
class Stats:
    """Counters a test can read: requests per route and peaks of concurrent work.

    ``requests`` is keyed ``"<listener> <METHOD> <route template>"``, e.g.
    ``"pe1 POST /api/nutanix/v3/vm_snapshots"``, and ``by_route`` sums over listeners.
    A snapshot creation counts as running from its POST until its task is final.
    """

    requests: Counter[str] = field(default_factory=Counter)
    peak_concurrent_snapshot_creations: int = 0
    peak_concurrent_image_reads: int = 0
    active_image_reads: int = 0

    def by_route(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for key, n in self.requests.items():
            out[key.split(" ", 1)[1]] += n
        return out

    def reset(self) -> None:
        self.requests.clear()
        self.peak_concurrent_snapshot_creations = 0
        self.peak_concurrent_image_reads = self.active_image_reads

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(sorted(self.requests.items())),
            "peak_concurrent_snapshot_creations": self.peak_concurrent_snapshot_creations,
            "peak_concurrent_image_reads": self.peak_concurrent_image_reads,
            "active_image_reads": self.active_image_reads,
        }
