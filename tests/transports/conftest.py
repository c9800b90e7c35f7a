"""Fixtures for the transports tests: real tgtd targets on free ports, stopped by PID."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import peers_required, require_peer

from ahvbackup.transports.iscsi.testing import TgtdTarget

INITIATOR_IQN = "iqn.2024-01.test.ahvbackup:initiator"


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating-per-block test data (every 512-byte block differs)."""
    import hashlib

    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.blake2b(f"{seed}:{block}".encode(), digest_size=64).digest() * 8
        block += 1
    return bytes(out[:size])


@pytest.fixture
def tgtd(tmp_path: Path) -> Iterator[Callable[..., TgtdTarget]]:
    """Factory: `tgtd(size=..., data=..., chap=(u, s), mutual=(u, s), params={...})` starts a
    tgtd with LUN 1 backed by a file in tmp_path and returns it; all are stopped afterwards."""
    require_peer("tgtd", "tgtadm")
    if os.geteuid() != 0:
        msg = "tgtd needs root (its control socket lives in /var/run/tgtd)"
        if peers_required():
            pytest.fail(msg)
        pytest.skip(msg)
    started: list[TgtdTarget] = []

    def make(*, size: int = 16 << 20, data: bytes | None = None,
             chap: tuple[str, str] | None = None, mutual: tuple[str, str] | None = None,
             params: dict[str, str] | None = None, blocksize: int | None = None) -> TgtdTarget:
        image = tmp_path / f"lun{len(started)}.img"
        with open(image, "wb") as f:
            if data is not None:
                f.write(data)
            f.truncate(size if data is None else len(data))
        target = TgtdTarget(image=image, chap=chap, mutual=mutual, params=params or {},
                            blocksize=blocksize, log_path=tmp_path / f"tgtd{len(started)}.log")
        started.append(target)
        return target.start()

    yield make
    for target in started:
        target.stop()
