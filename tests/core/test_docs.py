"""Docs and code must not drift: every hook appears in docs/plugins.md with its exact signature."""

from __future__ import annotations

import inspect
from pathlib import Path

from ahvbackup.core import hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def test_every_hook_is_documented_with_its_signature() -> None:
    text = DOC.read_text()
    hooks = [(n, f) for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if n.startswith("ahvbackup_")]
    assert hooks
    missing = [f"{n}{inspect.signature(f)}" for n, f in hooks
               if f"`{n}{inspect.signature(f)}`" not in text]
    assert not missing, f"docs/plugins.md lacks or misstates: {missing}"
    documented = {line.split("`")[1].split("(")[0] for line in text.splitlines()
                  if line.startswith("### `ahvbackup_")}
    assert documented == {n for n, _ in hooks}, "docs/plugins.md documents hooks that do not exist"
