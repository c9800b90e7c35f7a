"""ahvbackup engine: everything the areas share, and nothing that knows about a plugin area."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ahvbackup-core")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from .hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
