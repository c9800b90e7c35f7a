"""What a job writes streams with (compression, encryption) and the keys it reads them with,
from the configuration (docs/stream-format.md section 7).

Key files hold 64 hex digits (256 bits) and must be mode 0600, like the passfile; nothing of
a key is ever logged, only its id (a hash of it, which the stream header also carries).
"""

from __future__ import annotations

__all__ = ["load_stream_key", "stream_codec", "stream_keys"]

import logging
from pathlib import Path

from ..config import Config
from ..config.assembly import encryption_refusal
from ..config.loader import check_file_mode
from ..errors import ConfigError
from ..stream import Keyring, StreamCodec, StreamKey, parse_compression

log = logging.getLogger("ahvbackup.job")

#: the sink whose streams may be encrypted and, with compression=auto, are compressed
ENCRYPTING_SINK = "directory"
AUTO_COMPRESSION = f"zstd:{StreamCodec.ZSTD_DEFAULT}"
_KEY_HEX = 64


def load_stream_key(path: Path, *, key: str) -> StreamKey:
    """The key in the file `path`, named by configuration key `key` in errors."""
    what = f"{key} file"
    check_file_mode(path, what=what)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path} ({err.strerror})") from err
    text = raw.strip()
    if len(raw) > 4096 or len(text) != _KEY_HEX:
        raise ConfigError(f"{key}: {path} is not a key file (it must hold {_KEY_HEX} hex "
                          "digits; make one with: (umask 077; openssl rand -hex 32 > FILE))")
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{key}: {path} is not a key file (it must hold {_KEY_HEX} hex "
                          "digits)") from None
    return StreamKey(secret, source=str(path))


def stream_codec(config: Config) -> StreamCodec:
    """How the job stores payloads. encryption_key with a sink other than the directory
    repository is refused by name: nothing is accepted and then ignored."""
    key = None
    refused = encryption_refusal(config)  # assemble_config refuses it too; a job may be
    if refused:                           # built from a Config made another way
        raise ConfigError(refused[0])
    if config.encryption_key is not None:
        key = load_stream_key(config.encryption_key, key="encryption_key")
    text = config.compression
    if text == "auto":
        text = AUTO_COMPRESSION if config.sink == ENCRYPTING_SINK else "none"
    name, level = parse_compression(text)
    codec = StreamCodec(name, level, key)
    log.debug("streams: %s", codec.describe())
    return codec


def stream_keys(config: Config) -> Keyring:
    """Every key a restore, verify or consolidation may open streams with: the current one
    and the older ones (key rotation)."""
    keys: list[StreamKey] = []
    if config.encryption_key is not None:
        keys.append(load_stream_key(config.encryption_key, key="encryption_key"))
    for name in config.encryption_old_keys:
        keys.append(load_stream_key(Path(name), key="encryption_old_keys"))
    return Keyring(tuple(keys), hint="keys are set by encryption_key and encryption_old_keys")
