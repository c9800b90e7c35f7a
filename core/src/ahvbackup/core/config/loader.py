"""Load configuration from files, a plugin string and command-line overrides.

Precedence, lowest first: built-in defaults < config files (in the order given) < the plugin
string < command-line overrides. Each source is checked on its own (unknown keys, duplicate
keys, bad values, each reported at its file and line), so a mistake in a file is reported
even when a later source sets the same key. All problems are reported together, sorted, one
per line, each line complete on its own.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CONFIG_FILE", "MAX_FILE_BYTES", "check_file_mode", "load_config",
           "read_key_value_file"]

import grp
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import marshmallow
from marshmallow import fields as mm_fields

from ..errors import ConfigError, PluginError
from ..log import TRACE
from ..secret import Secret
from .fields import SecretField, closest, shorten
from .keys import ALIASES, BY_NAME, KEYS, SECRET_KEYS, build_schema, canonical_key
from .model import Config, HostPort, looks_secret
from .plugin_string import PluginStringError, parse_plugin_string

#: where the command line and the Bacula backend look when no file is named
DEFAULT_CONFIG_FILE = Path("/opt/bacula/etc/ahvbackup.conf")

_log = logging.getLogger("ahvbackup.config")
_KEY_SYNTAX = re.compile(r"(--)?[A-Za-z_][A-Za-z0-9_-]*")
_LAST = 1 << 30
#: configuration files and passfiles are small; anything larger is a mistake (or /dev/zero)
MAX_FILE_BYTES = 1 << 20
_NAME_MAX = 64


@dataclass(frozen=True)
class _Item:
    written: str
    key: str
    value: str
    where: str  # "ahvbackup.conf:12", "plugin string", "command line"
    order: tuple[int, int]  # (source rank, line or offset), for sorting problems
    base: Path | None = None  # folder that relative paths are relative to


@dataclass(frozen=True, order=True)
class _Problem:
    order: tuple[int, int, str]
    text: str


class _Problems:
    def __init__(self) -> None:
        self.items: list[_Problem] = []

    def add(self, order: tuple[int, int], key: str, text: str) -> None:
        self.items.append(_Problem((order[0], order[1], key), text))

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError("\n".join(p.text for p in sorted(self.items)))


# files ---------------------------------------------------------------------------------------

def _cannot_read(what: str, path: Path, err: OSError) -> ConfigError:
    if isinstance(err, FileNotFoundError):
        return ConfigError(f"{what} {path}: not found")
    if isinstance(err, PermissionError):
        return ConfigError(f"{what} {path}: cannot read it (permission denied for this user)")
    return ConfigError(f"{what} {path}: cannot read it ({err.strerror or err})")


def check_file_mode(path: Path, *, what: str) -> None:
    """Refuse a file that holds a secret when its group or others have any access to it.

    `what` names the file in the message (``passfile``, ``config file``, ``DR key``). The
    message says the mode found and the mode expected, with the command that fixes it.
    """
    try:
        st = path.stat()
    except OSError as err:
        raise _cannot_read(what, path, err) from err
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    if mode & 0o004:
        how = "readable by others"
    elif mode & 0o040:
        how = f"readable by its group ({_group_name(st.st_gid)})"
    elif mode & 0o022:
        how = "writable by others"
    else:
        how = "open to others"
    raise ConfigError(
        f"{what} {path}: mode {mode:04o} is {how}; expected 0600 (chmod 600 {path})"
    )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _unquote(value: str) -> str | None:
    """Strip one pair of surrounding quotes; None when a quote is opened but never closed."""
    if value[:1] in {'"', "'"}:
        q = value[0]
        if len(value) < 2 or value[-1] != q:
            return None
        inner = value[1:-1]
        if q == '"':
            inner = re.sub(r'\\(["\\])', r"\1", inner)
        return inner
    return value


def _read_small_file(path: Path, *, what: str) -> str:
    """The text of a regular file of at most `MAX_FILE_BYTES`, a leading UTF-8 BOM dropped.

    Anything else (a device such as /dev/zero, a FIFO, a directory, a huge file) is refused
    by name before a byte is read: the open is non-blocking, so a FIFO cannot hang us, and
    the type and size are checked on the opened descriptor, so a swap after a check cannot
    slip past it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise _cannot_read(what, path, err) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path}: is {_file_kind(st.st_mode)}, not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{what} {path}: {st.st_size} bytes; the limit is "
                              f"{MAX_FILE_BYTES} (1 MiB)")
        data = b""
        while len(data) <= MAX_FILE_BYTES and (more := os.read(fd, MAX_FILE_BYTES + 1 - len(data))):
            data += more
    except OSError as err:
        raise _cannot_read(what, path, err) from err
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # it grew after the check
        raise ConfigError(f"{what} {path}: larger than the limit of {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "an unusual file"


def read_key_value_file(path: Path, *, what: str) -> list[tuple[str, str, int]]:
    """Read a ``key = value`` file into (key as written, value, line) triples.

    Lines whose first non-blank character is ``#`` are comments; a ``#`` elsewhere is part
    of the value. A value may be wrapped in double or single quotes to keep blanks at its
    ends (``\\"`` and ``\\\\`` inside double quotes). Errors name the file and line and
    never quote the line, which might be a password. The file must be a regular file of at
    most 1 MiB; a UTF-8 byte order mark at its start is ignored.
    """
    text = _read_small_file(path, what=what)
    out: list[tuple[str, str, int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        key, sep, value = s.partition("=")
        key = key.strip()
        if not sep or not _KEY_SYNTAX.fullmatch(key):
            raise ConfigError(f"{path}:{lineno}: not a 'key = value' line")
        unquoted = _unquote(value.strip())
        if unquoted is None:
            raise ConfigError(f"{path}:{lineno}: {key}: quote opened but never closed")
        out.append((key, unquoted, lineno))
    return out


# sources -------------------------------------------------------------------------------------

def _file_items(path: Path, rank: int) -> list[_Item]:
    base = path.parent
    return [
        _Item(k, canonical_key(k), v, f"{path}:{line}", (rank, line), base)
        for k, v, line in read_key_value_file(path, what="config file")
    ]


def _plugin_items(text: str, rank: int) -> list[_Item]:
    parsed = parse_plugin_string(text)
    return [
        _Item(it.key, canonical_key(it.key), it.value, "plugin string", (rank, it.position))
        for it in parsed.items
    ]


def _override_items(overrides: Mapping[str, object], rank: int) -> list[_Item]:
    items = []
    for i, (k, v) in enumerate(overrides.items()):
        if isinstance(v, bool):
            text = "yes" if v else "no"
        elif isinstance(v, Secret):
            text = v.reveal()
        else:
            text = "" if v is None else str(v)
        items.append(_Item(k, canonical_key(k), text, "command line", (rank, i)))
    return items


def _is_secret(key: str, schema_fields: Mapping[str, mm_fields.Field[Any]]) -> bool:
    f = schema_fields.get(key)
    return isinstance(f, SecretField) or key in SECRET_KEYS or looks_secret(key)


def _phrase(message: str, hidden: bool) -> str:
    text = message.strip().rstrip(".")
    text = text[:1].lower() + text[1:]
    if hidden:
        return re.sub(r"\s*\(got .*\)$", "", text) + " (value hidden)"
    return text


# the loader ----------------------------------------------------------------------------------

def load_config(
    *,
    files: Sequence[Path] = (),
    plugin_string: str | None = None,
    overrides: Mapping[str, object] | None = None,
    extra_fields: Mapping[str, mm_fields.Field[Any]] | None = None,
    require: Iterable[str] = (),
) -> Config:
    """Load, check and merge every source into a `Config`.

    `require` names keys the operation at hand needs (``password`` is satisfied by a
    passfile). Every problem found is reported in one `ConfigError` (exit code 2): one line
    per problem, ``where: key: problem``, sorted by source and line.
    """
    extra_fields = dict(extra_fields or {})
    clash = sorted(set(extra_fields) & set(BY_NAME))
    if clash:
        raise PluginError(
            f"{clash[0]}: a plugin declares a configuration key that ahvbackup already has"
        )
    schema = build_schema(extra_fields)
    all_fields: dict[str, mm_fields.Field[Any]] = {**{k.name: k.field for k in KEYS},
                                                     **extra_fields}
    known = sorted(all_fields)
    require = tuple(require)
    unknown_required = [k for k in require if k not in all_fields]
    if unknown_required:
        raise ValueError(f"require names unknown keys: {', '.join(unknown_required)}")

    problems = _Problems()
    sources: list[tuple[str, list[_Item]]] = []
    for rank, path in enumerate(files):
        path = Path(path)
        _log.debug("reading config file %s", path)
        try:
            items = _file_items(path, rank)
        except ConfigError as err:
            problems.add((rank, 0), "", str(err))
            continue
        if any(_is_secret(it.key, all_fields) for it in items):
            try:
                check_file_mode(path, what="config file with secrets")
            except ConfigError as err:
                problems.add((rank, 0), "", str(err))
        sources.append((str(path), items))
    rank = len(files)
    if plugin_string is not None:
        try:
            items = _plugin_items(plugin_string, rank)
        except PluginStringError as err:
            problems.add((rank, err.position), "", str(err))
        else:
            _log.debug("plugin string has %d item(s)", len(items))
            sources.append(("plugin string", items))
    rank += 1
    if overrides:
        sources.append(("command line", _override_items(overrides, rank)))

    typed: dict[str, object] = {}
    where: dict[str, str] = {}
    for _label, items in sources:
        checked = _check_source(items, all_fields, known, schema, problems)
        for item, value in checked:
            typed[item.key] = value
            where[item.key] = item.where

    problems.raise_if_any()
    return _finish(typed, where, sources, extra_fields, require, problems)


def _check_source(
    items: list[_Item],
    all_fields: Mapping[str, mm_fields.Field[Any]],
    known: list[str],
    schema: marshmallow.Schema,
    problems: _Problems,
) -> list[tuple[_Item, object]]:
    """Unknown keys, duplicates and bad values of one source; returns the good items typed."""
    first: dict[str, _Item] = {}
    good: list[_Item] = []
    for item in items:
        if item.key not in all_fields:
            # no suggestion for a huge name: difflib is quadratic in its length
            hint = (closest(item.key.replace("-", "_"), [*known, *ALIASES])
                    if len(item.key) <= _NAME_MAX else None)
            text = f"{item.where}: {shorten(item.written)}: unknown key"
            if hint:
                text += f" (did you mean {hint!r}?)"
            problems.add(item.order, item.key, text)
            continue
        if item.key in first:
            prev = first[item.key]
            at = prev.where.rpartition(":")[2] if prev.base else ""
            also = f" (first set on line {at})" if at else ""
            problems.add(item.order, item.key,
                         f"{item.where}: {shorten(item.written)}: set more than once{also}")
            continue
        first[item.key] = item
        good.append(item)
    try:
        loaded = schema.load({it.key: it.value for it in good}, partial=True)
    except marshmallow.ValidationError as err:
        messages = err.messages if isinstance(err.messages, dict) else {}
        loaded = err.valid_data if isinstance(err.valid_data, dict) else {}
        for it in good:
            if it.key in messages:
                msgs = messages[it.key]
                msg = "; ".join(str(m) for m in msgs) if isinstance(msgs, list) else str(msgs)
                hidden = _is_secret(it.key, all_fields)
                problems.add(it.order, it.key,
                             f"{it.where}: {it.written}: {shorten(_phrase(msg, hidden), 200)}")
    out: list[tuple[_Item, object]] = []
    for it in good:
        if it.key not in loaded:
            continue
        value = loaded[it.key]
        if isinstance(value, Path) and it.base is not None and not value.is_absolute():
            value = it.base / value
        out.append((it, value))
    return out


def _passfile_password(path: Path) -> tuple[Secret, str]:
    check_file_mode(path, what="passfile")
    lines = read_key_value_file(path, what="passfile")
    found: tuple[str, int] | None = None
    for key, value, line in lines:
        if key != "password":
            hint = " (did you mean 'password'?)" if closest(key, ["password"]) else ""
            raise ConfigError(f"{path}:{line}: {key}: unknown key in a passfile{hint}")
        if found is not None:
            raise ConfigError(f"{path}:{line}: password: set more than once")
        if not value:
            raise ConfigError(f"{path}:{line}: password: must not be empty")
        found = (value, line)
    if found is None:
        raise ConfigError(f"passfile {path}: no 'password = ...' line")
    return Secret(found[0]), f"{path}:{found[1]}"


def _finish(
    typed: dict[str, object],
    where: dict[str, str],
    sources: list[tuple[str, list[_Item]]],
    extra_fields: Mapping[str, mm_fields.Field[Any]],
    require: tuple[str, ...],
    problems: _Problems,
) -> Config:
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    for k in KEYS:
        if k.name in typed:
            values[k.name], origin[k.name] = typed[k.name], where[k.name]
        else:
            values[k.name], origin[k.name] = k.default, "default"
    extra: dict[str, object] = {}
    for name, f in extra_fields.items():
        if name in typed:
            extra[name], origin[name] = typed[name], where[name]
        elif f.load_default is not marshmallow.missing:
            d = f.load_default
            extra[name], origin[name] = (d() if callable(d) else d), "default"

    if values["password"] is not None and values["passfile"] is not None:
        problems.add((_LAST, 0), "password",
                     f"{where['password']}: password: set inline while passfile is set "
                     f"({where['passfile']}); keep one")
    elif values["passfile"] is not None:
        passfile = values["passfile"]
        assert isinstance(passfile, Path)
        try:
            values["password"], origin["password"] = _passfile_password(passfile)
        except ConfigError as err:
            problems.add((_LAST, 0), "passfile", str(err))

    pc = values["prism_central"]
    if isinstance(pc, HostPort):
        if pc.port is not None and origin["prism_port"] != "default" and (
            pc.port != values["prism_port"]
        ):
            problems.add((_LAST, 1), "prism_port",
                         f"{origin['prism_port']}: prism_port: {values['prism_port']} "
                         f"disagrees with the port in prism_central ({pc}, "
                         f"{origin['prism_central']})")
        if pc.port is not None:
            origin["prism_port"] = origin["prism_central"]
        port = pc.port if pc.port is not None else values["prism_port"]
        assert isinstance(port, int)
        values["prism_central"], values["prism_port"] = HostPort(pc.host, port), port

    if values["repository"] is None:
        working = values["working_dir"]
        assert isinstance(working, Path)
        values["repository"] = working / "repository"

    looked = ", ".join(label for label, _ in sources) or "configuration"
    for key in require:
        if key == "password" and values["password"] is not None:
            continue
        value = values[key] if key in values else extra.get(key)
        if value is None or value == ():
            also = " (or passfile)" if key == "password" else ""
            problems.add((_LAST, 2), key, f"{looked}: {key}: required{also} but not set")
    for name, f in extra_fields.items():
        if f.required and name not in extra:
            problems.add((_LAST, 2), name, f"{looked}: {name}: required but not set")

    problems.raise_if_any()
    config = Config(
        **values,  # type: ignore[arg-type]
        extra=MappingProxyType(extra),
        sources=MappingProxyType(origin),
        warnings=tuple(_warnings(values, origin)),
    )
    for key, value in config.redacted().items():
        _log.log(TRACE, "config %s = %r (%s)", key, value, origin.get(key, "default"))
    return config


def _warnings(values: Mapping[str, object], origin: Mapping[str, str]) -> list[str]:
    out = []
    if values["password"] is not None and values["passfile"] is None:
        out.append(
            f"password is set inline ({origin['password']}); put it in a passfile "
            "(mode 0600) and set passfile= instead"
        )
    if values["prism_insecure"]:
        out.append(
            f"prism_insecure=yes ({origin['prism_insecure']}): Prism's TLS certificate is "
            "not verified; use this only in a lab"
        )
    token = values["dr_auth_token"]
    if isinstance(token, Secret):
        if origin["dr_auth_token"] == "plugin string":
            out.append(
                "dr_auth_token is set in the plugin string, which Bacula keeps in its "
                "configuration and catalog; set it in a config file (mode 0600) instead"
            )
        if len(token.reveal()) < 32:
            out.append(
                "dr_auth_token is shorter than 32 characters; generate one with: "
                "openssl rand -hex 32"
            )
    return out
