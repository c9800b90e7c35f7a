"""Configuration: every key of the whitepaper's section 7 plus ours, from files, plugin
strings and the command line, checked and loaded into one frozen `Config`.

Precedence, lowest first: defaults < config files (in order) < plugin string < command-line
overrides. See docs/configuration.md.
"""

from __future__ import annotations

from .fields import SecretField
from .keys import ALIASES, KEYS, MODES, SECRET_KEYS, Key, canonical_key
from .loader import DEFAULT_CONFIG_FILE, check_file_mode, load_config, read_key_value_file
from .model import Config, HostPort
from .plugin_string import (
    PluginItem,
    PluginString,
    PluginStringError,
    location,
    parse_plugin_string,
)

__all__ = [
    "ALIASES",
    "DEFAULT_CONFIG_FILE",
    "KEYS",
    "MODES",
    "SECRET_KEYS",
    "Config",
    "HostPort",
    "Key",
    "PluginItem",
    "PluginString",
    "PluginStringError",
    "SecretField",
    "canonical_key",
    "check_file_mode",
    "load_config",
    "location",
    "parse_plugin_string",
    "read_key_value_file",
]
