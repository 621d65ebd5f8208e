"""API keys: ``Authorization: Bearer <key>`` checked in constant time against SHA-256 hashes of the keys.

Keys come from an env var or a key file, read by the process that deploys (the driver): on a Ray
cluster the ingress replicas run in worker processes that do not see the driver's environment, so
:func:`serve.app.build_app` reads the keys there and hands the replicas only their hashes.
:func:`check_exposure` refuses an open (keyless) server on a non-loopback address unless the
operator says so (``serve.allow_unauthenticated``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable

from cluster import storage
from cluster.errors import ConfigError

logger = logging.getLogger(__name__)

OPEN_WARNING = (
    "raydistill serve: no API key configured (serve.api_key_env / serve.api_key_file) - the endpoint "
    "is OPEN, anyone who can reach it can use it"
)


def _split(text: str) -> list[str]:
    # One key per line in files; commas or whitespace in env vars. '#' starts a comment line.
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keys.extend(k for k in line.replace(",", " ").split() if k)
    return keys


def load_api_keys(env_var: str | None = None, key_file: str | None = None) -> list[str]:
    """Keys from ``$env_var`` (comma/space separated) and ``key_file`` (one per line); ``[]`` = open server."""
    keys: list[str] = []
    if env_var and os.environ.get(env_var):
        keys.extend(_split(os.environ[env_var]))
    if key_file:
        if not storage.exists(key_file):
            raise ConfigError(
                f"serve.api_key_file: {key_file} does not exist; create it with one API key per line "
                "or unset serve.api_key_file"
            )
        file_keys = _split(storage.read_text(key_file))
        if not file_keys:
            raise ConfigError(f"serve.api_key_file: {key_file} holds no key; add one key per line")
        keys.extend(file_keys)
    return list(dict.fromkeys(keys))


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``: what replicas hold instead of the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, has_keys: bool, allow_unauthenticated: bool) -> None:
    """Raise ConfigError for a server without API keys bound to a non-loopback ``host``, unless
    ``allow_unauthenticated`` (``serve.allow_unauthenticated: true``) says that is intended."""
    if has_keys or allow_unauthenticated or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve on {host} without an API key: anyone who can reach it could use it. Set "
        "keys (serve.api_key_env, default $RAYDISTILL_API_KEYS, or serve.api_key_file / --api-key-file) "
        "in the environment of the process that deploys, bind to 127.0.0.1, or set "
        "serve.allow_unauthenticated: true to serve openly on purpose"
    )


class APIKeyAuth:
    """Checks bearer tokens against key hashes. With no keys every request passes (and
    :meth:`warn_if_open` says so once)."""

    def __init__(self, keys: Iterable[str] = (), *, hashes: Iterable[str] = ()):
        digests = [hash_key(k) for k in keys] + [h.lower() for h in hashes]
        self._hashes = [bytes.fromhex(h) for h in dict.fromkeys(digests)]

    @classmethod
    def from_hashes(cls, hashes: Iterable[str]) -> APIKeyAuth:
        """An auth object from SHA-256 hex digests (:func:`hash_key`) of the keys."""
        return cls(hashes=hashes)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def warn_if_open(self) -> None:
        if not self._hashes:
            logger.warning(OPEN_WARNING)

    def check(self, authorization: str | None) -> bool:
        """True when the header carries a configured key (or no key is configured)."""
        if not self._hashes:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = hashlib.sha256(token.strip().encode("utf-8")).digest()
        ok = False
        for digest in self._hashes:  # compare against every key: timing does not reveal which one matched
            ok |= hmac.compare_digest(given, digest)
        return ok
