"""Fixtures for the Bacula tests: backend processes that are always reaped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import BACKEND, Backend


@pytest.fixture
def spawn() -> Iterator[Callable[..., Backend]]:
    """Start backend processes; each is killed (by its own PID) at the end of the test."""
    if not BACKEND.exists():
        pytest.fail(f"{BACKEND} is missing: install the bacula area (make dev)")
    started: list[Backend] = []

    def _spawn(**kwargs: object) -> Backend:
        b = Backend.spawn(**kwargs)
        started.append(b)
        return b

    yield _spawn
    for b in started:
        b.kill()


@pytest.fixture
def base_params(tmp_path: Path) -> list[str]:
    """Parameters that keep a session inside tmp_path (log, state, scratch)."""
    return [
        f"debug_log={tmp_path / 'backend.log'}",
        f"state_dir={tmp_path / 'state'}",
        f"working_dir={tmp_path / 'work'}",
        "verbose=2",
    ]
