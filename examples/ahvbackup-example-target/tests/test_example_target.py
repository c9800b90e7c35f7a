from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

from ahvbackup_example_target import Sha256Target

from ahvbackup.core.plugins import load_driver
from ahvbackup.core.testing import check_driver_class, check_restore_target


def test_found_by_its_entry_point_and_honours_the_contract() -> None:
    cls = load_driver("target", "sha256")
    assert cls is Sha256Target
    check_driver_class(cls, kind="target", name="sha256")


async def test_passes_the_restore_target_conformance_check(tmp_path: Path) -> None:
    def matches(location: str, image: bytes) -> bool:
        return Path(location).read_text().split()[0] == hashlib.sha256(image).hexdigest()

    await check_restore_target(Sha256Target(SimpleNamespace()), dest=tmp_path / "dest",
                               matches=matches)
