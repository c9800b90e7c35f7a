"""Client-side refinements of `ahvbackup.core.errors.ApiError`.

Statuses map onto the core tree (401/403 ApiAuthError, 404 ApiNotFoundError, 429
ApiRateLimitedError, 5xx ApiServerError); these cover what has no status: a host that cannot be
reached, a certificate that does not verify, a Prism task or snapshot that failed or took too long.
"""

from __future__ import annotations

__all__ = ["PrismConnectionError", "PrismTaskError", "PrismTimeoutError", "PrismTlsError"]

from ahvbackup.core.errors import ApiError


class PrismConnectionError(ApiError):
    """Prism could not be reached or dropped the connection (no HTTP status)."""


class PrismTlsError(PrismConnectionError):
    """Prism's certificate did not verify against the configured CA."""


class PrismTaskError(ApiError):
    """A Prism task (or PE snapshot) ended FAILED, ABORTED or ERROR."""


class PrismTimeoutError(ApiError):
    """A Prism task (or PE snapshot) did not finish in the time the caller allowed."""
