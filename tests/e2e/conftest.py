"""Worlds with the simulator's iSCSI target served (or not) on a free port of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.e2e.e2e_world import IWorld, iscsi_world


@pytest.fixture
async def iworld(tmp_path: Path) -> AsyncIterator[IWorld]:
    async with iscsi_world(tmp_path, iscsi=True) as w:
        yield w


@pytest.fixture
async def rest_only_world(tmp_path: Path) -> AsyncIterator[IWorld]:
    async with iscsi_world(tmp_path, iscsi=False) as w:
        yield w
