"""Secrets (broker passwords, HTTP tokens, TLS keys) read from files, never inline.

A relative name is looked up first in systemd's credentials folder
(``$CREDENTIALS_DIRECTORY``, filled by ``LoadCredential=name:/path`` in the unit, so
the file can stay root-only), then beside the config file.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.errors import ConfigError


def secret_path(path: Path, config_dir: str = "") -> Path:
    if path.is_absolute():
        return path
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / path).exists():
        return Path(creds) / path
    return Path(config_dir or ".") / path


def read_secret(path: Path, config_dir: str = "", *, what: str = "secret") -> str:
    """The file's text without its trailing newline; a clear error if unreadable."""
    full = secret_path(path, config_dir)
    try:
        return full.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as err:
        raise ConfigError([f"cannot read the {what} file {full}: {err.strerror}"]) from err
