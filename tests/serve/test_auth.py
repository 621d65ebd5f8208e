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


def test_replicas_get_hashes_not_keys_and_open_servers_stay_on_loopback(monkeypatch):
    from serve.app import driver_key_hashes
    from serve.auth import check_exposure, hash_key
    from serve.section import ServeSection

    monkeypatch.setenv("DRIVER_KEYS", "alpha,beta")
    hashes = driver_key_hashes(ServeSection(api_key_env="DRIVER_KEYS"))
    assert hashes == [hash_key("alpha"), hash_key("beta")] and "alpha" not in "".join(hashes)
    auth = APIKeyAuth.from_hashes(hashes)
    assert auth.check("Bearer beta") and not auth.check("Bearer " + hashes[0]) and not auth.check("Bearer gamma")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, has_keys=False, allow_unauthenticated=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host"):
        with pytest.raises(ConfigError, match="allow_unauthenticated"):
            check_exposure(host, has_keys=False, allow_unauthenticated=False)
        check_exposure(host, has_keys=True, allow_unauthenticated=False)
        check_exposure(host, has_keys=False, allow_unauthenticated=True)


def test_no_ray_server_refuses_to_listen_openly_on_every_interface(monkeypatch, tmp_path, capsys):
    from pipelines.cli import main

    monkeypatch.delenv("RAYDISTILL_API_KEYS", raising=False)
    # Refused before any model is loaded (the model dir does not even exist).
    assert main(["serve", str(tmp_path / "no-model-needed"), "--no-ray", "--host", "0.0.0.0"]) != 0
    assert "refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err


def test_health_metrics_and_openapi_need_the_key_unless_open(serve_tokenizer, monkeypatch):
    import httpx

    from tests.serve.conftest import start_fake_server

    monkeypatch.setenv("OPEN_PATH_KEYS", "k1")
    paths = ("/health", "/metrics", "/openapi.json")
    for open_paths, expect_without in (([], 401), (["/health", "/metrics", "/openapi.json"], 200)):
        server, _ = start_fake_server(serve_tokenizer, api_key_env="OPEN_PATH_KEYS", open_paths=open_paths)
        try:
            for path in paths:
                r = httpx.get(server.base_url + path, timeout=30)
                assert r.status_code == expect_without, (path, r.text)
                if expect_without == 401:
                    assert r.json()["error"]["code"] == "invalid_api_key"
                ok = httpx.get(server.base_url + path, headers={"Authorization": "Bearer k1"}, timeout=30)
                assert ok.status_code == 200, (path, ok.text)
            assert (
                "/v1/chat/completions"
                in httpx.get(server.base_url + "/openapi.json", headers={"Authorization": "Bearer k1"}).json()["paths"]
            )
        finally:
            server.stop()
