"""`make lint` holds in CI too: ruff over the tree and strict mypy over core stay clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def test_ruff_is_clean() -> None:
    done = _run(str(BIN / "ruff"), "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout[-4000:]


def test_mypy_is_clean_on_core() -> None:
    done = _run(str(BIN / "mypy"), "--no-incremental", "core/src")
    assert done.returncode == 0, done.stdout[-4000:]
