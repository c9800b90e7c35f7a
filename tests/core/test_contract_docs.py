"""docs/plugins.md states the restore-target and DR-transport contracts exactly as the code's
docstrings do."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from ahvbackup.core import drivers

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
#: the contract a restore target implements, in the order a reader meets it
RESTORE_CONTRACT = (drivers.RestoreTarget, drivers.RestoreRequest, drivers.ClusterAccess,
                    drivers.VmRestore, drivers.DiskWriter)
#: the contract a DR transport implements
DR_CONTRACT = (drivers.DrTransport,)


def _line(text: str | None) -> str:
    return " ".join((text or "").split())


def contract_text(classes: tuple[type, ...] = RESTORE_CONTRACT) -> str:
    """The reference section as docs/plugins.md must hold it (generated from the code)."""
    out = []
    for cls in classes:
        out.append(f"### `{cls.__name__}`\n\n{inspect.getdoc(cls)}\n")
        if dataclasses.is_dataclass(cls):
            out += [f"- `{f.name}: {f.type}`" for f in dataclasses.fields(cls)]
        notes = inspect.get_annotations(cls)
        for name, member in list(vars(cls).items()):
            if getattr(member, "__isabstractmethod__", False):
                doc = _line(inspect.getdoc(member))
                out.append(f"- `{name}{inspect.signature(member)}`" + (f": {doc}" if doc else ""))
            elif "ClassVar" in str(notes.get(name, "")):
                out.append(f"- `{name}` (class attribute, default `{member!r}`)")
        out.append("")
    return "\n".join(out)


def test_the_restore_target_contract_is_documented_as_coded() -> None:
    assert contract_text() in DOC.read_text(), (
        "docs/plugins.md's restore-target reference differs from the code; regenerate it with "
        "tests/core/test_contract_docs.py:contract_text()")


def test_the_dr_transport_contract_is_documented_as_coded() -> None:
    assert contract_text(DR_CONTRACT) in DOC.read_text(), (
        "docs/plugins.md's DR-transport reference differs from the code; regenerate it with "
        "tests/core/test_contract_docs.py:contract_text(DR_CONTRACT)")
