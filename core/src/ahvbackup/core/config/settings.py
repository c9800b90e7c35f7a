"""A plugin's own configuration keys, typed: a frozen dataclass whose fields carry their
marshmallow field.

::

    @dataclass(frozen=True)
    class MyKeys(PluginSettings):
        chap_user: str | None = setting(Text(empty=None), None)
        retries: int = setting(Int(minimum=0), 3)

    class MyTarget(RestoreTarget):
        config_schema = MyKeys.schema()           # the keys join the configuration
        def open_disk(self, ...):
            keys = self.config.settings(MyKeys)   # typed: keys.retries is an int

A hook plugin returns ``MyKeys.fields()`` from ``ahvbackup_config_fields``.
"""

from __future__ import annotations

__all__ = ["PluginSettings", "setting"]

import copy
import dataclasses
from typing import Any, TypeVar

import marshmallow
from marshmallow import fields as mm_fields

T = TypeVar("T")

_FIELD = "ahvbackup_config_field"


def setting(config_field: mm_fields.Field[Any], default: T) -> T:
    """A dataclass field for one key: `config_field` checks and loads it, `default` is its
    value when no source sets it (an immutable value)."""
    loaded = copy.copy(config_field)
    loaded.load_default = default
    return dataclasses.field(default=default, metadata={_FIELD: loaded})


@dataclasses.dataclass(frozen=True)
class PluginSettings:
    """Base of a plugin's typed keys. Subclasses are frozen dataclasses built with `setting`."""

    @classmethod
    def fields(cls) -> dict[str, mm_fields.Field[Any]]:
        """The keys as marshmallow fields, for ``ahvbackup_config_fields``."""
        out = {}
        for f in dataclasses.fields(cls):
            if _FIELD not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting(field, default)")
            out[f.name] = f.metadata[_FIELD]
        return out

    @classmethod
    def schema(cls) -> type[marshmallow.Schema]:
        """The keys as a marshmallow schema, for a driver's `config_schema`."""
        return marshmallow.Schema.from_dict(cls.fields(), name=f"{cls.__name__}Schema")
