"""API keys: env var + file, constant-time check, clear errors for a bad key file."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from serve.auth import APIKeyAuth, load_api_keys


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# comment\nk-file-1\n\nk-file-2\n")
    monkeypatch.setenv("MY_KEYS", "k-env-1, k-env-2 k-file-1")
    keys = load_api_keys("MY_KEYS", str(f))
    assert keys == ["k-env-1", "k-env-2", "k-file-1", "k-file-2"]
    auth = APIKeyAuth(keys)
    assert auth.enabled and auth.check("Bearer k-file-2") and auth.check("bearer k-env-1")
    assert not auth.check("Bearer k-file-") and not auth.check("k-env-1") and not auth.check(None)
    assert not auth.check("Basic k-env-1") and not auth.check("Bearer ")


def test_open_when_no_keys_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.delenv("UNSET_KEYS", raising=False)
    assert load_api_keys("UNSET_KEYS", None) == []
    assert APIKeyAuth([]).check(None)  # open server
    with pytest.raises(ConfigError, match="api_key_file.*does not exist"):
        load_api_keys(None, str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_api_keys(None, str(empty))
