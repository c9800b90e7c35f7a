"""Names from elsewhere made into file names, and files opened strictly inside a folder.

Every path built from a remote or stored name (a VM name from Prism, a disk label, a manifest
field, a Bacula ``FNAME``) goes through here, because the backup host runs as root or as the
``bacula`` user and a VM named ``../../etc`` is one rename away for any Prism user.

- `safe_name` maps any name to one file name: no separators, no ``..``, no NUL or control
  characters, bounded length. Ordinary names map to themselves; any other name keeps its
  readable part plus ``~`` and a hash of the whole name, so two distinct names never share a
  file (``~`` never survives on its own, so a mapped name never equals an ordinary one).
- `open_inside` walks a folder one component at a time with ``O_NOFOLLOW`` descriptors, so a
  symlink planted in the destination is refused instead of followed, and a ``..`` component
  is refused by name.
"""

from __future__ import annotations

__all__ = ["ContainmentError", "check_part", "folders_inside", "open_inside", "safe_name"]

import contextlib
import errno
import hashlib
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from .errors import TargetError

#: longest readable part kept before the hash suffix (file names are at most 255 bytes)
MAX_NAME = 96
_PUNCTUATION = frozenset(" ._-+@,=()[]")


class ContainmentError(TargetError):
    """A path would leave its destination (``..``, a separator, a planted symlink)."""


def _ordinary(ch: str) -> bool:
    return ch in _PUNCTUATION or (ch.isalnum() and unicodedata.category(ch)[0] in "LN")


def safe_name(name: str) -> str:
    """`name` as one file name, stable and collision-free (see the module docstring)."""
    kept = "".join(ch if _ordinary(ch) else "_" for ch in name)
    if (kept == name and name.strip() == name and name and not name.startswith(".")
            and len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME):
        return name
    readable = kept.strip().lstrip(".")[:MAX_NAME].rstrip() or "_"
    while len(readable.encode("utf-8", "surrogatepass")) > MAX_NAME:
        readable = readable[:-1]
    digest = hashlib.blake2s(name.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return f"{readable}~{digest}"


def check_part(part: str, *, what: str) -> str:
    """`part` if it is usable as one path component as it is; else `ContainmentError`."""
    if part in {"", ".", ".."} or "/" in part or any(ord(c) < 32 or c == "\x7f" for c in part):
        raise ContainmentError(f"{what}: {_short(part)} is not a plain file name (a separator, "
                               "'..', or a control character); refused")
    return part


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def open_inside(dest: Path, parts: Sequence[str], *, flags: int, mode: int = 0o600,
                what: str = "restore") -> tuple[int, Path]:
    """Open ``dest/parts...`` (creating folders, mode 0700) without ever leaving `dest`.

    Each component is checked with `check_part` and entered with ``O_NOFOLLOW``, so a symlink
    anywhere below `dest` (a folder or the file itself) is refused. Returns the descriptor
    and the path. `dest` itself may be a symlink: the operator chose it.
    """
    if not parts:
        raise ContainmentError(f"{what}: no file name under {dest}")
    path = dest.joinpath(*parts)
    dir_fd = _enter(dest, parts[:-1], what=what, full=path)
    try:
        name = check_part(parts[-1], what=what)
        return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=dir_fd), path
    except OSError as err:
        raise _refusal(what, path, parts[-1], err) from err
    finally:
        os.close(dir_fd)


def folders_inside(dest: Path, parts: Sequence[str], *, what: str = "restore") -> Path:
    """``dest/parts...`` as folders (created, mode 0700), refused as `open_inside` refuses."""
    os.close(_enter(dest, parts, what=what, full=dest.joinpath(*parts)))
    return dest.joinpath(*parts)


def _enter(dest: Path, folders: Sequence[str], *, what: str, full: Path) -> int:
    """A descriptor of ``dest/folders...``, each folder made if missing and never a link."""
    for part in folders:
        check_part(part, what=what)
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise ContainmentError(f"{what}: destination {dest}: {err.strerror}") from err
    try:
        for part in folders:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=dir_fd)
            try:
                fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as err:
                raise _refusal(what, full, part, err) from err
            os.close(dir_fd)
            dir_fd = fd
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def _refusal(what: str, path: Path, part: str, err: OSError) -> TargetError:
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        return ContainmentError(f"{what}: {path}: {part!r} is a symlink or not a folder; "
                                "refused (restores never follow links in the destination)")
    return TargetError(f"{what}: cannot open {path} ({err.strerror})")
