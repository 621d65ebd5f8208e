"""API keys: ``Authorization: Bearer <key>`` checked in constant time against keys from an env var or a file."""

from __future__ import annotations

import hmac
import logging
import os
from typing import Iterable, Optional

from cluster import storage
from cluster.errors import ConfigError

logger = logging.getLogger(__name__)

OPEN_WARNING = ("raydistill serve: no API key configured (serve.api_key_env / serve.api_key_file) - the endpoint "
                "is OPEN, anyone who can reach it can use it")


def _split(text: str) -> list[str]:
    # One key per line in files; commas or whitespace in env vars. '#' starts a comment line.
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keys.extend(k for k in line.replace(",", " ").split() if k)
    return keys


def load_api_keys(env_var: Optional[str] = None, key_file: Optional[str] = None) -> list[str]:
    """Keys from ``$env_var`` (comma/space separated) and ``key_file`` (one per line); ``[]`` = open server."""
    keys: list[str] = []
    if env_var and os.environ.get(env_var):
        keys.extend(_split(os.environ[env_var]))
    if key_file:
        if not storage.exists(key_file):
            raise ConfigError(f"serve.api_key_file: {key_file} does not exist; create it with one API key per line "
                              "or unset serve.api_key_file")
        file_keys = _split(storage.read_text(key_file))
        if not file_keys:
            raise ConfigError(f"serve.api_key_file: {key_file} holds no key; add one key per line")
        keys.extend(file_keys)
    return list(dict.fromkeys(keys))


class APIKeyAuth:
    """Checks bearer tokens. With no keys every request passes (and :meth:`warn_if_open` says so once)."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def warn_if_open(self) -> None:
        if not self._keys:
            logger.warning(OPEN_WARNING)

    def check(self, authorization: Optional[str]) -> bool:
        """True when the header carries a configured key (or no key is configured)."""
        if not self._keys:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode("utf-8")
        ok = False
        for key in self._keys:  # compare against every key: timing does not reveal which one matched
            ok |= hmac.compare_digest(given, key)
        return ok
