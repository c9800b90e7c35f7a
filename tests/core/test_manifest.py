"""The typed manifest: today's format 2 round-trips and checks itself; a manifest written by
the first releases (format 1, kept here as a file) still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ahvbackup.core.drivers import StoredBackup
from ahvbackup.core.manifest import FORMAT, Manifest, ManifestError

FORMAT1 = Path(__file__).parent / "data" / "manifest-format1.json"


def test_a_format_1_manifest_from_the_first_releases_loads() -> None:
    m = Manifest.from_bytes(FORMAT1.read_bytes(), name="format1")
    assert m.format == 1 and m.level == "incremental" and m.vm.name == "db-01"
    inc, full = m.disks
    assert (inc.kind, inc.reference_backup, inc.digest) == ("incremental",
                                                            "20261201T100000Z-aaaaaa", "")
    assert (full.kind, full.reference_backup, full.reference_snapshot) == ("full", "", "")
    assert m.removed_disks[0].label == "scsi.2"
    stored = StoredBackup.of(m)
    assert stored.disks == ("scsi.0", "scsi.1") and stored.bytes_stored == 1049362 + 2097938
    assert m.config["spec"]["name"] == "db-01"


def test_written_again_it_is_format_2_and_checks_its_digest() -> None:
    m = Manifest.from_bytes(FORMAT1.read_bytes())
    doc = json.loads(m.to_bytes())
    assert doc["format"] == FORMAT == 2 and len(doc["digest"]) == 64
    again = Manifest.from_json(doc)
    assert again.disks == m.disks and again.vm == m.vm
    doc["disks"][0]["size"] += 1
    with pytest.raises(ManifestError, match="digest does not match"):
        Manifest.from_json(doc)


@pytest.mark.parametrize(("edit", "named"), [
    (lambda d: d.pop("vm"), "vm must be an object"),
    (lambda d: d["disks"][0].pop("uuid"), "disks[0].uuid is missing"),
    (lambda d: d["disks"][1].update(index="1"), "disks[1].index must be an integer"),
    (lambda d: d["disks"][0].update(kind="delta"), "disks[0].kind must be one of"),
    (lambda d: d.update(format=9), "format 9 is not one this version reads"),
    (lambda d: d.update(level=None), "level must be a string"),
])
def test_a_wrongly_shaped_manifest_is_refused_naming_the_field(edit: object,
                                                               named: str) -> None:
    doc = json.loads(FORMAT1.read_text())
    edit(doc)  # type: ignore[operator]
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(doc, name="m")
    assert named in str(info.value)
