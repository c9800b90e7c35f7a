"""Small filesystem helpers every durable write goes through."""

from __future__ import annotations

__all__ = ["atomic_write_bytes", "atomic_write_json", "ensure_dir", "fsync_dir", "io_failure"]

import errno
import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write, fsync, rename, fsync the directory: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o600) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", mode=mode)


def ensure_dir(path: Path, *, key: str, writable: bool = False) -> Path:
    """`path` as a folder (made, mode 0700, if missing); any problem is one line naming the
    configuration `key`, the path and the errno text, before anything is done. `writable`:
    this process must be able to write there too (a repository may be read-only: restores)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if writable and not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as err:
        raise ConfigError(f"{key} {path}: cannot use it as a folder "
                          f"({err.strerror or err})") from None
    return path


def io_failure(path: Path, err: OSError) -> str:
    """One line for a failed write: the path, the errno text and, for a full disk, what is
    free there (an operator's first question)."""
    text = f"{path}: {err.strerror or err}"
    try:
        st = os.statvfs(path.parent if not path.is_dir() else path)
        text += f" ({st.f_bavail * st.f_frsize / (1 << 20):.1f} MiB free of " \
                f"{st.f_blocks * st.f_frsize / (1 << 20):.1f} MiB)"
    except OSError:
        pass
    return text
