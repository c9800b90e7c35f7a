"""Bacula-style plugin strings: ``ahvbackup: key=value key2="value with spaces" key3='x'``.

What a FileSet's ``Plugin = "..."`` line hands to the plugin. The leading name before ``:``
is whatever the FileSet says and is kept. Items are separated by any whitespace, newlines
included, and a backslash at the end of a line continues it. Values may be quoted:

- inside ``"..."``, ``\\"`` is a quote, ``\\\\`` a backslash, a backslash-newline is
  removed, and any other backslash is kept as written;
- inside ``'...'`` everything is literal;
- quoted and unquoted parts join (``a"b c"`` is ``ab c``), as in a shell.

Parsing keeps keys as written (``--vcpu`` stays ``--vcpu``) and in order, duplicates
included; the loader normalizes them and refuses duplicates.
"""

from __future__ import annotations

__all__ = ["PluginItem", "PluginString", "PluginStringError", "location", "parse_plugin_string"]

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import ConfigError

_NAME = re.compile(r"\s*([^\s=:'\"\\]+)\s*:")
_KEY = re.compile(r"(--)?[A-Za-z_][A-Za-z0-9_-]*")
_SOURCE = "plugin string"


class PluginStringError(ConfigError):
    """A plugin string that does not parse; `position` is the offending character's offset."""

    def __init__(self, message: str, *, position: int) -> None:
        super().__init__(message)
        self.position = position


class PluginItem(NamedTuple):
    """One ``key=value``: the key as written, its unquoted value, the key's offset."""

    key: str
    value: str
    position: int


@dataclass(frozen=True)
class PluginString:
    """A parsed plugin string. Its repr shows keys only: values may be secrets."""

    name: str
    items: tuple[PluginItem, ...]
    text: str = field(repr=False, compare=False)

    def where(self, position: int) -> str:
        """``line L, column C`` (``column C`` for a one-line string) of an offset."""
        return location(self.text, position)

    def keys(self) -> list[str]:
        return [item.key for item in self.items]

    def __repr__(self) -> str:
        return f"PluginString(name={self.name!r}, keys={self.keys()!r})"


def location(text: str, position: int) -> str:
    """Human position of an offset in `text`, counting lines and columns from 1."""
    col = position - (text.rfind("\n", 0, position) + 1) + 1
    if "\n" not in text:
        return f"column {col}"
    return f"line {text.count(chr(10), 0, position) + 1}, column {col}"


def _continuation(text: str, i: int) -> int:
    """Length of a backslash-newline at `i` (2 or 3 with CR), else 0."""
    if text.startswith("\\\n", i):
        return 2
    if text.startswith("\\\r\n", i):
        return 3
    return 0


def _error(text: str, position: int, problem: str) -> PluginStringError:
    return PluginStringError(f"{_SOURCE}: {location(text, position)}: {problem}",
                             position=position)


def _value(text: str, i: int) -> tuple[str, int]:
    """Scan one value from `i` up to unquoted whitespace; return it and the next offset."""
    out: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            break
        if c == "\\":
            skip = _continuation(text, i)
            if skip:
                i += skip
                continue
            out.append(c)
            i += 1
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise _error(text, i, "single quote opened here is never closed")
            out.append(text[i + 1 : end])
            i = end + 1
        elif c == '"':
            opened = i
            i += 1
            while True:
                if i >= n:
                    raise _error(text, opened, "double quote opened here is never closed")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    skip = _continuation(text, i)
                    if skip:
                        i += skip
                        continue
                    if i + 1 < n and text[i + 1] in '"\\':
                        out.append(text[i + 1])
                        i += 2
                        continue
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out), i


def parse_plugin_string(text: str) -> PluginString:
    """Parse a plugin string into its name and ordered items.

    Raises `PluginStringError` (a `ConfigError`) naming the line and column of an item that
    is not ``key=value`` or of a quote that is never closed. Messages never quote a value.
    """
    m = _NAME.match(text)
    name, i = (m.group(1), m.end()) if m else ("", 0)
    items: list[PluginItem] = []
    n = len(text)
    while True:
        while i < n:
            if text[i].isspace():
                i += 1
            elif skip := _continuation(text, i):
                i += skip
            else:
                break
        if i >= n:
            break
        km = _KEY.match(text, i)
        if not km or not text.startswith("=", km.end()):
            raise _error(text, i, "expected key=value")
        value, end = _value(text, km.end() + 1)
        items.append(PluginItem(km.group(), value, i))
        i = end
    return PluginString(name=name, items=tuple(items), text=text)
