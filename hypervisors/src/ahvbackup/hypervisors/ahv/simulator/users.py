"""Simulator users, roles and session cookies.

Three roles model what a backup product meets on a real Prism: an administrator, a backup
service account that may take snapshots and make images but not touch VMs, and a read-only
account. A user's role assignment covers everything, or is scoped to Prism Central projects
(``User.projects``): then the user sees, and may act on, only the VMs of those projects, as an
MSP's per-customer account does. Passwords are stored as salted PBKDF2 hashes; a verified
credential is remembered (as a digest, in memory only) so that Basic auth on every request
stays cheap.
"""

from __future__ import annotations

__all__ = [
    "ROLES",
    "SEED_USERS",
    "Role",
    "Sessions",
    "UnknownProject",
    "User",
    "Users",
]

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .model import Project

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
    #: the project UUIDs the role assignment is scoped to; empty: every entity
    projects: list[str] = field(default_factory=list)

    @property
    def role_def(self) -> Role:
        return ROLES[self.role]

    @property
    def scoped(self) -> bool:
        return bool(self.projects)

    def sees(self, project_uuid: str | None) -> bool:
        """May this user see entities of the project (``None``: of no project)?"""
        return not self.projects or project_uuid in self.projects

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "projects": list(self.projects)}


class UnknownProject(ValueError):
    """A project named (by name or UUID) that the simulator does not have."""


def _hash(password: str, salt: str, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()


class Users:
    """The user table and the projects role assignments are scoped to (persisted with the
    inventory)."""

    def __init__(self) -> None:
        self._users: dict[str, User] = {}
        self._verified: dict[str, str] = {}
        self._lock = threading.Lock()
        self.projects: dict[str, Project] = {}

    def add_project(self, name: str, *, description: str = "", uuid_: str | None = None
                    ) -> Project:
        """A new project (or the existing one of that name)."""
        if not name:
            raise ValueError("project: a name is required")
        with self._lock:
            for p in self.projects.values():
                if p.name == name:
                    return p
            project = Project(uuid_ or str(uuid.uuid4()), name, description, time.time())
            self.projects[project.uuid] = project
        return project

    def project(self, ref: str) -> Project:
        """The project named or with the UUID `ref`."""
        found = self.projects.get(ref) or next(
            (p for p in self.projects.values() if p.name == ref), None)
        if found is None:
            known = ", ".join(sorted(p.name for p in self.projects.values())) or "none"
            raise UnknownProject(f"project: no project {ref!r} (projects: {known})")
        return found

    def add(self, name: str, password: str, role: str, *, projects: tuple[str, ...] = ()
            ) -> User:
        """Add (or replace) a user; `projects` (names or UUIDs) scopes its role assignment."""
        if role not in ROLES:
            raise ValueError(f"role: unknown role {role!r} (choices: {', '.join(ROLES)})")
        scope = [self.project(p).uuid for p in projects]
        salt = secrets.token_hex(16)
        user = User(name, str(uuid.uuid4()), role, salt, _hash(password, salt, _ITERATIONS),
                    projects=scope)
        with self._lock:
            self._users[name] = user
            self._verified.pop(name, None)
        return user

    def assign(self, name: str, *, role: str, projects: tuple[str, ...] = ()) -> User:
        """Change a user's role assignment: `role` over `projects` (none: over everything)."""
        if role not in ROLES:
            raise ValueError(f"role: unknown role {role!r} (choices: {', '.join(ROLES)})")
        user = self._users.get(name)
        if user is None:
            raise KeyError(f"user: no user {name!r}")
        scope = [self.project(p).uuid for p in projects]
        with self._lock:
            user.role, user.projects = role, scope
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

    def to_json(self) -> dict[str, Any]:
        return {"users": [u.to_json() for u in self._users.values()],
                "projects": [p.to_json() for p in self.projects.values()]}

    def load(self, doc: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Load `to_json`'s document (or the bare user list of a state written before
        projects)."""
        rows = doc if isinstance(doc, list) else doc["users"]
        projects = [] if isinstance(doc, list) else doc.get("projects", [])
        with self._lock:
            self._users = {r["name"]: User(**r) for r in rows}
            self.projects = {p["uuid"]: Project(**p) for p in projects}
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
