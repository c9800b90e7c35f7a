"""marshmallow fields for configuration values, which always arrive as text.

Every field turns one `key = value` string into its typed value, or raises a
`marshmallow.ValidationError` whose message reads ``problem (got 'value')``: the loader puts
the source and the key in front. Plugin authors may use these fields for their own keys;
`SecretField` marks a key as secret (never echoed, masked everywhere, its file mode checked).
"""

from __future__ import annotations

__all__ = [
    "Bool",
    "Choice",
    "ConfigField",
    "Csv",
    "DriverName",
    "HostPortField",
    "IPv4",
    "Int",
    "NetworkMap",
    "Number",
    "PathField",
    "SecretField",
    "Text",
    "invalid",
    "shorten",
]

import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from marshmallow import ValidationError, fields

from ..secret import Secret
from .model import HostPort

_ECHO_MAX = 60
_NOT_ALLOWED: Any = object()


def shorten(text: str, limit: int = _ECHO_MAX) -> str:
    """`text` cut to `limit` characters, ending in ``...`` when cut (error lines stay short)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: object) -> str:
    return repr(shorten(str(value)))


def invalid(problem: str, value: object, *, suggestion: str | None = None) -> ValidationError:
    """The error for a bad value: ``problem (got 'value'; did you mean 'x'?)``."""
    tail = f"got {_shown(value)}"
    if suggestion is not None:
        tail += f"; did you mean {suggestion!r}?"
    return ValidationError(f"{problem} ({tail})")


def closest(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


class ConfigField(fields.Field[Any]):
    """Base: text in, typed value out. An empty value is refused unless `empty` is given.

    `empty` is what an empty value (``exclude =``) means, e.g. ``None`` for "not set".
    `kind` is the one-word type shown in documentation.
    """

    kind = "string"

    def __init__(self, *, empty: Any = _NOT_ALLOWED, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.empty = empty

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> Any:
        if not isinstance(value, str):
            raise invalid("must be text", value)
        if not value.strip():
            if self.empty is _NOT_ALLOWED:
                raise ValidationError("must not be empty")
            return self.empty
        return self.convert(value)

    def convert(self, text: str) -> Any:
        return text


class Text(ConfigField):
    """Free text (a user name, a cluster name). Control characters are refused."""

    def convert(self, text: str) -> Any:
        if any(ord(c) < 32 for c in text):
            raise invalid("must not contain control characters", text.encode("unicode_escape"))
        return text


class SecretField(ConfigField):
    """A secret: loads into `ahvbackup.core.secret.Secret`; never echoed in an error."""

    kind = "secret"

    def convert(self, text: str) -> Any:
        if "\n" in text or "\0" in text:
            raise ValidationError("must be one line")
        return Secret(text)


class DriverName(ConfigField):
    """The name of a driver entry point; whether it is installed is checked when it is loaded."""

    kind = "name"
    _pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

    def convert(self, text: str) -> Any:
        name = text.strip()
        if not self._pattern.fullmatch(name):
            raise invalid("must be a driver name (letters, digits, '-', '_', '.')", text)
        return name


class Int(ConfigField):
    """A whole number within optional bounds."""

    kind = "int"

    def __init__(self, *, minimum: int | None = None, maximum: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum

    def expected(self) -> str:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"must be a whole number from {lo} to {hi}"
        if lo == 1:
            return "must be a positive whole number"
        if lo == 0:
            return "must be a whole number, 0 or more"
        if lo is not None:
            return f"must be a whole number, {lo} or more"
        return "must be a whole number"

    def convert(self, text: str) -> Any:
        t = text.strip()
        if not re.fullmatch(r"[+-]?\d+", t):
            raise invalid(self.expected(), text)
        n = int(t)
        if (self.minimum is not None and n < self.minimum) or (
            self.maximum is not None and n > self.maximum
        ):
            raise invalid(self.expected(), text)
        return n


class Number(ConfigField):
    """A decimal number within bounds (a percentage)."""

    kind = "number"

    def __init__(self, *, minimum: float, maximum: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, text: str) -> Any:
        t = text.strip().removesuffix("%").strip()
        problem = f"must be a number from {self.minimum:g} to {self.maximum:g}"
        if not re.fullmatch(r"\d+(\.\d+)?|\.\d+", t):
            raise invalid(problem, text)
        n = float(t)
        if not self.minimum <= n <= self.maximum:
            raise invalid(problem, text)
        return n


_TRUE = frozenset({"yes", "true", "on", "1"})
_FALSE = frozenset({"no", "false", "off", "0"})


class Bool(ConfigField):
    """yes/no, true/false, on/off, 1/0 (any case)."""

    kind = "bool"

    def convert(self, text: str) -> Any:
        t = text.strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise invalid("must be yes or no (or true/false, on/off, 1/0)", text)


class Choice(ConfigField):
    """One of a fixed set of words (any case). `synonyms` maps other spellings to a choice."""

    kind = "enum"

    def __init__(self, choices: Iterable[str], *, synonyms: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choices = tuple(choices)
        self.synonyms = dict(synonyms or {})

    def convert(self, text: str) -> Any:
        t = text.strip().lower()
        if t in self.choices:
            return t
        if t in self.synonyms:
            return self.synonyms[t]
        raise invalid(
            f"must be one of {', '.join(self.choices)}", text, suggestion=closest(t, self.choices)
        )


class Csv(ConfigField):
    """Comma-separated values, loaded as a tuple; blanks around items are dropped."""

    kind = "csv"

    def convert(self, text: str) -> Any:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        if not items:
            raise invalid("must list at least one value", text)
        return items


class NetworkMap(ConfigField):
    """``src=dst,src2=dst2`` loaded as a tuple of (source, destination) pairs."""

    kind = "map"

    def convert(self, text: str) -> Any:
        pairs: list[tuple[str, str]] = []
        seen: set[str] = set()
        for item in (i.strip() for i in text.split(",")):
            if not item:
                continue
            src, sep, dst = item.partition("=")
            src, dst = src.strip(), dst.strip()
            if not sep or not src or not dst:
                raise invalid("each item must be source=destination", item)
            if src in seen:
                raise invalid(f"maps source {src!r} twice", text)
            seen.add(src)
            pairs.append((src, dst))
        if not pairs:
            raise invalid("must list at least one source=destination pair", text)
        return tuple(pairs)


_HOST = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")


def _check_port(port: str, value: str) -> int:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise invalid("port must be a whole number from 1 to 65535", value)
    return int(port)


class HostPortField(ConfigField):
    """``host``, ``host:port``, ``[v6addr]:port`` or a bare IPv6 address."""

    kind = "host[:port]"

    def __init__(self, *, allow_port: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_port = allow_port

    def convert(self, text: str) -> Any:
        t = text.strip()
        if "://" in t or "/" in t:
            raise invalid("must be host or host:port, without a scheme or path", text)
        port: int | None = None
        if t.startswith("["):
            host, sep, rest = t[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise invalid("must be [address] or [address]:port", text)
            if rest:
                port = _check_port(rest[1:], text)
        elif t.count(":") == 1:
            host, _, p = t.partition(":")
            port = _check_port(p, text)
        else:
            host = t
        if not host or not _HOST.fullmatch(host):
            raise invalid("must be a host name or IP address", text)
        if port is not None and not self.allow_port:
            raise invalid("must be a host name or IP address without a port", text)
        return HostPort(host, port) if self.allow_port else host


class IPv4(ConfigField):
    """An IPv4 address; ``auto`` and ``probed`` mean "discover it" (None)."""

    kind = "IPv4"

    def convert(self, text: str) -> Any:
        t = text.strip()
        if t.lower() in {"auto", "probed", "probe"}:
            return None
        try:
            return str(ipaddress.IPv4Address(t))
        except ValueError:
            raise invalid("must be an IPv4 address such as 10.0.0.50", text) from None


class PathField(ConfigField):
    """A file system path. Relative paths in a config file are relative to that file's folder."""

    kind = "path"

    def convert(self, text: str) -> Any:
        if "\0" in text:
            raise invalid("must be a path", text.replace("\0", "\\0"))
        return Path(text)
