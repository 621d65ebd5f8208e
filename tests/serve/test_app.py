"""The Ray Serve application: autoscaling 1 -> 2 -> 1, overload -> 429 while healthy, zero-downtime model update.

All traffic goes to 127.0.0.1 on a free port; loops are bounded by deadlines.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FAKE = "tests.serve.fake_engine:FakeAsyncEngine.from_pretrained"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_port(ray_session):
    from ray import serve

    port = _free_port()
    yield port
    serve.shutdown()


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _replicas(name: str) -> int:
    from serve.app import status

    st = status(name)
    return st["deployments"]["model"]["replicas"] if st else 0


def test_autoscale_and_overload(serve_port, tiny_teacher_dir):
    from serve.app import deploy, shutdown, status
    from serve.section import ServeSection

    autoscale = dict(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5, downscale_delay_s=2
    )
    timing = dict(metrics_interval_s=0.5, look_back_period_s=1)
    limits = dict(max_ongoing_requests=3, max_queued_requests=2, max_batch_size=3)
    section = ServeSection(
        port=serve_port, route_prefix="/scale", api_key_env=None, num_cpus=0.25, **autoscale, **timing, **limits
    )
    url = deploy(tiny_teacher_dir, section, name="scale", engine_factory=FAKE, engine_options={"token_delay": 0.05})
    assert url.endswith(f":{serve_port}/scale")
    assert status("scale")["status"] == "RUNNING" and _replicas("scale") == 1
    try:
        body = {"model": "scale", "prompt": "load", "max_tokens": 40, "temperature": 0}
        stop = threading.Event()
        codes: list[int] = []

        def worker() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    codes.append(http.post(url + "/v1/completions", json=body).status_code)

        # Two concurrent clients: twice the target load per replica, well inside max_ongoing + max_queued.
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            _wait_for(lambda: _replicas("scale") == 2, 60, "scale up to 2 replicas")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert codes and set(codes) == {200}, codes

        # Overload: far more concurrent requests than 2 replicas x 3 ongoing + 2 queued.
        async def burst() -> tuple[list[int], int]:
            async with httpx.AsyncClient(timeout=60) as http:
                calls = [asyncio.ensure_future(http.post(url + "/v1/completions", json=body)) for _ in range(24)]
                # Health is asked once the overload is real (a request was refused) and while admitted
                # requests still run (each takes 40 tokens x 50 ms), not after a fixed sleep.
                deadline = time.monotonic() + 60
                while not any(c.done() and c.result().status_code == 429 for c in calls):
                    assert time.monotonic() < deadline and not all(c.done() for c in calls), "no request refused"
                    await asyncio.sleep(0.01)
                running = sum(not c.done() for c in calls)
                health = (await http.get(url + "/health")).status_code
                responses = await asyncio.gather(*calls)
                assert running > 0
                for r in responses:
                    if r.status_code != 200:
                        assert r.json()["error"]["code"] == "rate_limit_exceeded"
                return [r.status_code for r in responses], health

        burst_codes, health = asyncio.run(burst())
        assert health == 200
        assert burst_codes.count(429) > 0 and burst_codes.count(200) > 0, burst_codes
        assert set(burst_codes) <= {200, 429}
        assert httpx.get(url + "/health").status_code == 200

        # Idle: back to one replica.
        _wait_for(lambda: _replicas("scale") == 1, 60, "scale down to 1 replica")
        text = httpx.get(url + "/metrics").text
        assert 'raydistill_requests_total{endpoint="completions",status="429"}' in text
    finally:
        shutdown("scale")


def test_model_update_during_traffic_loses_nothing(serve_port, tiny_teacher_dir, tmp_path, builtin_teacher_dir):
    import openai

    from serve.app import deploy, shutdown, status, update_model
    from serve.section import ServeSection
    from tests.conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", builtin_teacher_dir, seed=1)
    section = ServeSection(
        port=serve_port,
        route_prefix="/swap",
        api_key_env=None,
        num_cpus=0.25,
        max_model_len=256,
        max_batch_size=4,
        graceful_shutdown_timeout_s=10,
    )
    url = deploy(tiny_teacher_dir, section, name="swap")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    probe = dict(model="swap", prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=1)
    try:
        before = client.completions.create(**probe).choices[0].logprobs.token_logprobs
        stop = threading.Event()
        results: list[str] = []

        def worker(i: int) -> None:
            while not stop.is_set():
                try:
                    if i % 2:
                        r = client.chat.completions.create(
                            model="swap",
                            messages=[{"role": "user", "content": "hi"}],
                            max_tokens=24,
                            extra_body={"ignore_eos": True},
                        )
                        ok = r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
                    else:
                        chunks = list(
                            client.completions.create(
                                model="swap",
                                prompt="stream",
                                max_tokens=24,
                                stream=True,
                                extra_body={"ignore_eos": True},
                            )
                        )
                        ok = [c.choices[0].finish_reason for c in chunks][-1] == "length"
                    results.append("ok" if ok else "short")
                except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                    results.append(f"error: {exc!r}")

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        # Traffic is flowing (a request finished) when the model is swapped; after the swap returns, each
        # worker finishes what was in flight and then at least one request more (n + 8 > n + 4 in flight).
        _wait_for(lambda: len(results) >= 1, 120, "a request to finish before the swap", interval=0.05)
        in_flight_at_update = len(results)
        update_model(other, section, name="swap")
        _wait_for(
            lambda: len(results) >= in_flight_at_update + 8, 120, "requests to finish after the swap", interval=0.05
        )
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert len(results) > in_flight_at_update > 0
        assert all(r == "ok" for r in results), [r for r in results if r != "ok"][:3]
        after = client.completions.create(**probe).choices[0].logprobs.token_logprobs
        assert after[1:] != pytest.approx(before[1:], abs=1e-3)  # the new weights answer now
        assert status("swap")["deployments"]["model"]["replicas"] == 1
    finally:
        shutdown("swap")


def _auth_codes(url: str, key: str) -> dict[str, int]:
    body = {"model": "auth", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        return {
            "none": http.post(url + "/v1/completions", json=body).status_code,
            "wrong": http.post(
                url + "/v1/completions", json=body, headers={"Authorization": "Bearer not-the-key"}
            ).status_code,
            "key": http.post(
                url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ).status_code,
            "models_none": http.get(url + "/v1/models").status_code,
        }


def test_api_keys_are_enforced_through_serve(serve_port, tiny_teacher_dir, tmp_path, monkeypatch):
    """Keys set in the deploying process (env var; file) reach the Serve replicas: 401 without, 200 with.

    The session's Ray started before the variable was set, as a cluster started elsewhere would."""
    from serve.app import deploy, shutdown
    from serve.section import ServeSection

    monkeypatch.setenv("RD_TEST_SERVE_KEYS", "k-env-1,k-env-2")
    keys = tmp_path / "keys.txt"
    keys.write_text("k-file-1\n")
    section = ServeSection(
        port=serve_port,
        route_prefix="/auth",
        api_key_env="RD_TEST_SERVE_KEYS",
        api_key_file=str(keys),
        num_cpus=0.25,
        max_batch_size=2,
    )
    url = deploy(tiny_teacher_dir, section, name="auth", engine_factory=FAKE)
    try:
        assert _auth_codes(url, "k-env-2") == {"none": 401, "wrong": 401, "key": 200, "models_none": 401}
        assert _auth_codes(url, "k-file-1")["key"] == 200
    finally:
        shutdown("auth")


def test_prompts_through_the_serve_ingress_survive_a_failed_write_and_shutdown_and_feed_served_prompts(
    serve_port, tiny_teacher_dir, tmp_path
):
    """The flywheel through Ray Serve: the ingress replica logs what it serves; a storage write that fails
    (the log folder is replaced by a file for a while) loses nothing once storage works again; what is still buffered
    when the app is shut down is flushed then; the served_prompts source reads it all back."""
    from distill.data.prompts import build_requests
    from serve.app import deploy, shutdown
    from serve.section import ServeSection
    from tests.pipelines.test_served_prompts import _cfg, _run

    log = tmp_path / "log"
    section = ServeSection(
        port=serve_port,
        route_prefix="/fly",
        api_key_env=None,
        num_cpus=0.25,
        max_batch_size=2,
        prompt_log_enabled=True,
        prompt_log=str(log),
        prompt_log_flush_rows=2,  # the first two requests make a (failing) write; the third stays buffered
        prompt_log_flush_s=3600,
    )
    url = deploy(tiny_teacher_dir, section, name="fly", engine_factory=FAKE)
    deleted = False
    try:
        log.rmdir()  # made by the replica at start; now storage breaks: every write fails while it is a file
        log.write_text("not a folder")

        def post(path: str, body: dict) -> None:
            r = httpx.post(url + path, json={"model": "fly", "max_tokens": 2, **body}, timeout=60)
            assert r.status_code == 200, r.text  # a failing prompt log never fails the request

        post("/v1/chat/completions", {"messages": [{"role": "user", "content": "what is ray?"}]})
        post("/v1/completions", {"prompt": "Once upon a time"})

        def metric(name: str) -> float:
            text = httpx.get(url + "/metrics", timeout=30).text
            values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
            return max(values, default=0.0)

        _wait_for(lambda: metric("raydistill_prompt_log_pending_rows") >= 2, 60, "two rows held after a failed write")
        log.unlink()
        log.mkdir()  # storage works again: the retry (after its backoff) writes the held rows
        _wait_for(lambda: len(list(log.glob("*.parquet"))) == 1, 60, "the held rows to be written on retry")
        assert metric("raydistill_prompt_log_dropped_rows") == 0

        # Rows still buffered at shutdown: a flush threshold no request reaches would keep them forever.
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json={"model": "fly", "prompt": "streamed prompt", "max_tokens": 2, "stream": True},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            list(response.iter_lines())
        shutdown("fly")
        deleted = True
    finally:
        if not deleted:
            shutdown("fly")

    # the shutdown flush (the replica may still be stopping when serve.delete returns)
    _wait_for(lambda: len(list(log.glob("*.parquet"))) == 2, 60, "the buffered row to be written at shutdown")
    requests, _ = build_requests(_cfg(tmp_path), _run(tmp_path, "r1"))
    by_text = {r["prompt"]: r for r in requests}
    assert sorted(by_text) == ["Once upon a time", "streamed prompt", "what is ray?"]
    assert by_text["what is ray?"]["messages"] == [{"role": "user", "content": "what is ray?"}]
    assert by_text["Once upon a time"]["messages"] is None and by_text["streamed prompt"]["messages"] is None
