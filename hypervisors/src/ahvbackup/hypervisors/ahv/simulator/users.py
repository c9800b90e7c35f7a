"""Simulator users, roles and session cookies.

Three roles model what a backup product meets on a real Prism: an administrator, a backup
service account that may take snapshots and make images but not touch VMs, and a read-only
account. Passwords are stored as salted PBKDF2 hashes; a verified credential is remembered (as a
digest, in memory only) so that Basic auth on every request stays cheap.
"""

from __future__ import annotations

__all__ = [
    "ROLES",
    "SEED_USERS",
    "Role",
    "Sessions",
    "User",
    "Users",
]

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

_ITERATIONS = 50_000
_READ = "read"


@dataclass(frozen=True)
class Role:
    """A role: which entity kinds it may change (reads are always allowed)."""

    name: str
    mutable_kinds: frozenset[str]
    simulator_control: bool = False

    def allows(self, kind: str, verb: str) -> bool:
        if kind == "simulator":
            return self.simulator_control
        return verb == _READ or "*" in self.mutable_kinds or kind in self.mutable_kinds


ROLES: dict[str, Role] = {
    "Prism Admin": Role("Prism Admin", frozenset({"*"}), simulator_control=True),
    "Backup Admin": Role(
        "Backup Admin",
        frozenset({"vm_snapshot", "recovery_point", "image", "volume_group",
                   "idempotence_identifier", "task"}),
    ),
    "Viewer": Role("Viewer", frozenset()),
}

SEED_USERS: tuple[tuple[str, str, str], ...] = (
    ("admin", "nutanix/4u", "Prism Admin"),
    ("backup", "backup/4u", "Backup Admin"),
    ("viewer", "viewer/4u", "Viewer"),
)


@dataclass
class User:
    name: str
    uuid: str
    role: str
    salt: str
    hash: str
    iterations: int = _ITERATIONS

    @property
    def role_def(self) -> Role:
        return ROLES[self.role]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _hash(password: str, salt: str, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()


class Users:
    """The user table (persisted with the inventory)."""

    def __init__(self) -> None:
        self._users: dict[str, User] = {}
        self._verified: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, name: str, password: str, role: str) -> User:
        if role not in ROLES:
            raise ValueError(f"role: unknown role {role!r} (choices: {', '.join(ROLES)})")
        salt = secrets.token_hex(16)
        user = User(name, str(uuid.uuid4()), role, salt, _hash(password, salt, _ITERATIONS))
        with self._lock:
            self._users[name] = user
            self._verified.pop(name, None)
        return user

    def remove(self, name: str) -> None:
        with self._lock:
            self._users.pop(name, None)
            self._verified.pop(name, None)

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._users.values()))

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, name: str, password: str) -> User | None:
        user = self._users.get(name)
        if user is None:
            return None
        digest = hashlib.sha256(f"{user.salt}:{password}".encode()).hexdigest()
        with self._lock:
            if self._verified.get(name) == digest:
                return user
        if not hmac.compare_digest(_hash(password, user.salt, user.iterations), user.hash):
            return None
        with self._lock:
            self._verified[name] = digest
        return user

    def to_json(self) -> list[dict[str, Any]]:
        return [u.to_json() for u in self._users.values()]

    def load(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._users = {r["name"]: User(**r) for r in rows}
            self._verified.clear()


class Sessions:
    """Session tokens handed out in cookies, valid until they expire (sliding)."""

    def __init__(self, *, lifetime: float = 900.0) -> None:
        self.lifetime = lifetime
        self._tokens: dict[str, tuple[str, str, float]] = {}
        self._lock = threading.Lock()

    def create(self, user: str, listener: str) -> str:
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            if len(self._tokens) > 10_000:
                self._tokens = {k: v for k, v in self._tokens.items() if v[2] > now}
            self._tokens[token] = (user, listener, now + self.lifetime)
        return token

    def lookup(self, token: str, listener: str) -> str | None:
        """The user of a live session of this listener (and extend it), else None."""
        now = time.monotonic()
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None or entry[1] != listener:
                return None
            if entry[2] <= now:
                del self._tokens[token]
                return None
            self._tokens[token] = (entry[0], listener, now + self.lifetime)
            return entry[0]

    def expire_all(self) -> None:
        with self._lock:
            self._tokens.clear()
