"""Fixtures for the Prism simulator tests: a fresh simulator and in-process clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from ahvbackup.hypervisors.ahv.simulator import Simulator, pc_app, pe_app

ADMIN = ("admin", "nutanix/4u")
BACKUP = ("backup", "backup/4u")
VIEWER = ("viewer", "viewer/4u")
V3 = "/api/nutanix/v3"


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    s = Simulator(tmp_path / "state", task_seconds=0.05, sync=False)
    yield s
    s.close()


def client(app: object, base_url: str, auth: tuple[str, str] | None = ADMIN) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url=base_url, auth=auth, timeout=30,
    )


@pytest.fixture
async def pc(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with client(pc_app(sim), "http://127.0.0.1:9440") as c:
        yield c


@pytest.fixture
async def pe(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with client(pe_app(sim), "http://127.0.0.2:9440") as c:
        yield c
