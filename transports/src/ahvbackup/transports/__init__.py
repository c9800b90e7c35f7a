"""Data paths (rest, iscsi) and DR channels (psk, mtls)."""
