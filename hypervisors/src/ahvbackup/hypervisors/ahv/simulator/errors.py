"""The requests the simulator refuses, each carrying what the v3 error envelope needs.

Kept apart from the model and the routes so that both can raise them without importing each
other.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "EntityConflict",
    "EntityNotFound",
    "Forbidden",
    "InvalidRequest",
    "SimulatorError",
]

from typing import Any

from ahvbackup.core.errors import AhvBackupError


class SimulatorError(AhvBackupError):
    """A request the simulator refuses; carries what the v3 error envelope needs."""

    status = 400
    reason = "INVALID_REQUEST"

    def __init__(self, message: str, *, kind: str = "", details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.details = details or {}


class BadRequest(SimulatorError):
    status = 400
    reason = "INVALID_REQUEST"


class Forbidden(SimulatorError):
    status = 403
    reason = "ACCESS_DENIED"


class EntityNotFound(SimulatorError):
    status = 404
    reason = "ENTITY_NOT_FOUND"

    def __init__(self, kind: str, uuid: str):
        super().__init__(f"{kind} {uuid!r} not found", kind=kind, details={"uuid": uuid})


class EntityConflict(SimulatorError):
    status = 409
    reason = "CONCURRENT_REQUESTS_NOT_ALLOWED"


class InvalidRequest(SimulatorError):
    status = 422
    reason = "INVALID_REQUEST"
