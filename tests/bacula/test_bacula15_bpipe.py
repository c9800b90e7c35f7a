"""The real-Bacula bpipe scenarios of test_bacula_real.py (Debian's 9.6.7 there) run again here
against Bacula 15.0.3 (lab15.py): the same test functions, with `lab_for` giving a 15.0.3 lab.

Two file daemons side by side runs on 9.6.7 only: it tests Bacula's scheduling of our jobs,
not our bpipe commands, and costs half a minute of the suite's budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import test_bacula_real as real
from lab import BaculaLab
from lab15 import lab15
from test_bacula_real import (  # noqa: F401  (collected here, on 15.0.3)
    test_full_and_incremental_through_bpipe_restore_both_points,
    test_full_backup_through_bpipe_restores_byte_identical_and_a_bad_reader_fails,
)

pytestmark = pytest.mark.peer


@pytest.fixture(autouse=True)
def on_bacula15(monkeypatch: pytest.MonkeyPatch) -> None:
    def lab_for(tmp: Path, **kw: Any) -> BaculaLab:
        return lab15(tmp / "lab", **kw)

    monkeypatch.setattr(real, "lab_for", lab_for)
