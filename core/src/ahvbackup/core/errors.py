"""The exception tree. One root, a subtree per area; the CLI maps each to an exit code.

Messages are written for the operator: they name the key, value, VM, disk or endpoint at fault
and never contain a secret.
"""

from __future__ import annotations

__all__ = [
    "AhvBackupError",
    "ApiAuthError",
    "ApiError",
    "ApiNotFoundError",
    "ApiRateLimitedError",
    "ApiServerError",
    "ConfigError",
    "CredentialsRefused",
    "DataPathError",
    "ExitCode",
    "HypervisorError",
    "Interrupted",
    "JobError",
    "PluginError",
    "SinkError",
    "StreamFormatError",
    "TargetError",
    "TransportError",
    "our_errors",
]

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of the `ahvbackup` command (documented in docs/cli.md)."""

    OK = 0
    FAILED = 1  # the job ran and at least one VM or disk failed
    CONFIG = 2  # bad configuration, plugin string or command line; nothing was done
    UNAVAILABLE = 3  # Prism, a peer or a repository could not be reached
    CORRUPT = 4  # a stream or backup failed verification
    INTERRUPTED = 130  # SIGINT (Ctrl-C): the job was cancelled and cleaned up
    TERMINATED = 143  # SIGTERM: the same


class AhvBackupError(Exception):
    """Root of every error ahvbackup raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED


class Interrupted(AhvBackupError):
    """The job was stopped by a signal, after releasing what it had created."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = ExitCode.TERMINATED if signum == 15 else ExitCode.INTERRUPTED


class ConfigError(AhvBackupError):
    """Bad configuration: an unknown key, a bad value, a missing key, an unsafe file mode."""

    exit_code = ExitCode.CONFIG


class PluginError(ConfigError):
    """A configured driver is not installed or does not honour its contract."""


class HypervisorError(AhvBackupError):
    """Something the hypervisor (Prism) did or refused."""

    exit_code = ExitCode.UNAVAILABLE


class ApiError(HypervisorError):
    """An API call failed; carries the HTTP status and Prism's own message."""

    def __init__(self, message: str, *, status: int | None = None, endpoint: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint


class ApiAuthError(ApiError):
    """401 or 403: wrong credentials or a role without the needed permission."""


class ApiNotFoundError(ApiError):
    """404: the entity or route does not exist (PE-only routes answer 404 on Prism Central)."""


class ApiRateLimitedError(ApiError):
    """429 that outlasted the retry budget."""


class ApiServerError(ApiError):
    """5xx that outlasted the retry budget, or an answer that does not parse."""


class DataPathError(AhvBackupError):
    """Reading or writing disk data failed (iSCSI, REST image transfer)."""


class TransportError(AhvBackupError):
    """The DR channel failed: authentication, framing, connection."""


class CredentialsRefused(TransportError):
    """A DR peer did not prove its credentials, or refused ours: retrying cannot help."""


class TargetError(AhvBackupError):
    """A restore target could not take the data."""


class SinkError(AhvBackupError):
    """The sink (repository, Bacula) could not store or return a stream."""


class StreamFormatError(AhvBackupError):
    """A disk stream is truncated, reordered or corrupt. Nothing is restored from it."""

    exit_code = ExitCode.CORRUPT


class JobError(AhvBackupError):
    """A job finished with failed VMs or disks; the message lists them."""


def our_errors(exc: BaseException) -> list[AhvBackupError] | None:
    """The AhvBackupErrors inside `exc` (itself or nested exception groups from nurseries), or
    None when anything else is in there (a bug, a cancellation) that must propagate."""
    if isinstance(exc, AhvBackupError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found: list[AhvBackupError] = []
        for inner in exc.exceptions:
            sub = our_errors(inner)
            if sub is None:
                return None
            found += sub
        return found
    return None
