"""The configuration docs and the annotated example follow the key table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from marshmallow import ValidationError

from ahvbackup.core.config import KEYS, Key, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "packaging" / "ahvbackup.conf"
RUNTIME_DEFAULTS = {"source", "probed", "<orig>-restored", "<working_dir>/repository"}


def example_lines() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"#?([a-z_]+) = (.*)", line)
        if m:
            found.setdefault(m.group(1), []).append(m.group(2))
    return found


def test_every_key_is_in_the_reference_table() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", doc, flags=re.MULTILINE))
    assert rows == {k.name for k in KEYS}
    for k in KEYS:
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{k.name}` |"))
        if k.default_text:
            assert f"`{k.default_text}`" in row, k.name


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_the_example_shows_every_key_once_with_a_valid_value(key: Key) -> None:
    lines = example_lines()
    assert len(lines.get(key.name, [])) == 1, f"{key.name} must appear once in {EXAMPLE}"
    value = lines[key.name][0]
    if key.default_text and key.default_text not in RUNTIME_DEFAULTS:
        assert value == key.default_text, f"{key.name}: example shows {value!r}"
    try:
        key.field.deserialize(value)
    except ValidationError as err:
        pytest.fail(f"{key.name} = {value}: {err.messages}")


def test_the_example_loads_as_shipped() -> None:
    assert load_config(files=[EXAMPLE]).sources["vm"] == "default"
