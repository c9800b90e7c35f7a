"""A value that must never be shown: passwords, CHAP secrets, PSKs."""

from __future__ import annotations

__all__ = ["Secret", "known_secrets"]

import weakref

_live: weakref.WeakSet[Secret] = weakref.WeakSet()


class Secret:
    """Holds a secret string; `repr`, `str` and formatting show a mask, `reveal()` the value.

    Every live secret is also known to the log filter, which masks it should it reach a
    message by another road (a URL, an exception from a library).
    """

    __slots__ = ("__weakref__", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        if value:
            _live.add(self)

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return "********" if self._value else ""

    def __format__(self, spec: str) -> str:
        return str(self)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not picklable")


def known_secrets() -> list[str]:
    """Values of every live secret, longest first (so a longer one is masked whole)."""
    return sorted((s._value for s in _live if len(s._value) >= 3), key=len, reverse=True)
