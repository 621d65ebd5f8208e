"""The served_prompts prompt source: reads the serving prompt log since the last successful run, dedups."""

from __future__ import annotations

import datetime as dt
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import storage
from cluster.errors import ConfigError, RaydistillError
from distill.data.prompts import build_requests
from distill.data.schema import prompt_id, to_table
from pipelines.config import load_config

UTC = dt.timezone.utc
LOG_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("model", pa.string()),
        ("endpoint", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("completion", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
    ]
)


def chat(text, ts):
    return {
        "request_id": uuid.uuid4().hex,
        "ts": ts,
        "model": "demo",
        "endpoint": "/v1/chat/completions",
        "prompt": None,
        "messages": [{"role": "user", "content": text}],
        "completion": "ok",
        "prompt_tokens": 3,
        "completion_tokens": 1,
    }


def completion(text, ts):
    return {**chat("", ts), "endpoint": "/v1/completions", "prompt": text, "messages": None}


def write_log(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LOG_SCHEMA), folder / name)


def finish_run(run_dir, requests, status="done"):
    """What a completed pipeline run leaves: a manifest and generate shards with its prompt ids."""
    rows = [
        {
            "prompt_id": prompt_id(r["source"], r["messages"] or r["prompt"], 0),
            "prompt": r["prompt"],
            "completion": "x",
            "input_ids": [1],
            "prompt_len": 1,
            "completion_len": 0,
            "topk_ids": [],
            "topk_logprobs": [],
            "teacher": "t",
            "sampling": "{}",
            "finish_reason": "stop",
            "source": r["source"],
        }
        for r in requests
    ]
    pq.write_table(to_table(rows), storage.join(run_dir, "data", "generate", "part-a.parquet")) if rows else None
    storage.atomic_write_json(
        storage.join(run_dir, "manifest.json"), {"status": status, "created_at": "2000-01-01T00:00:00+00:00"}
    )


def _cfg(tmp_path, *extra):
    return load_config(
        None,
        [
            f"workdir={tmp_path / 'runs'}",
            "name=fly",
            "prompts.source=served_prompts",
            f"prompts.path={tmp_path / 'log'}",
            "prompts.count=null",
            *extra,
        ],
    )


def _run(tmp_path, run_id):
    uri = tmp_path / "runs" / "fly" / run_id
    (uri / "data" / "generate").mkdir(parents=True, exist_ok=True)
    return str(uri)


def texts(requests):
    return [r["prompt"] for r in requests]


def test_reads_since_last_successful_run_and_dedups(tmp_path):
    now = dt.datetime.now(UTC)
    log = tmp_path / "log"
    write_log(
        log,
        "part-1.parquet",
        [
            chat("what is ray?", now - dt.timedelta(hours=2)),
            chat("what is ray?", now - dt.timedelta(hours=2)),  # duplicate in the log
            chat("", now - dt.timedelta(hours=2)),
        ],
    )
    write_log(log / "replica-2", "part-2.parquet", [completion("Once upon a time", now - dt.timedelta(hours=1))])
    storage.atomic_write_bytes(str(log / ".tmp-x-part-3.parquet"), b"torn")  # never read
    cfg = _cfg(tmp_path)

    r1 = _run(tmp_path, "r1")
    first, dropped = build_requests(cfg, r1)
    assert texts(first) == ["what is ray?", "Once upon a time"]
    assert (
        first[0]["messages"] == [{"role": "user", "content": "what is ray?"}] and first[0]["source"] == "served_prompts"
    )
    assert first[1]["messages"] is None  # a /v1/completions prompt is fed verbatim
    window = storage.read_json(storage.join(r1, "data", "prompts", "served_prompts.json"))
    assert window["rows"] == 4 and window["duplicate"] == 1 and window["empty"] == 1 and window["since"] is None
    finish_run(r1, first)

    # new traffic: one prompt already distilled in r1, one new
    later = dt.datetime.now(UTC) + dt.timedelta(seconds=5)
    write_log(log, "part-4.parquet", [chat("what is ray?", later), chat("how do MoE routers work?", later)])
    r2 = _run(tmp_path, "r2")
    second, _ = build_requests(cfg, r2)
    assert texts(second) == ["how do MoE routers work?"]
    window = storage.read_json(storage.join(r2, "data", "prompts", "served_prompts.json"))
    # the log is consumed by file: r1 read part-1 and part-2 whole, r2 reads only what came after
    assert window["since"] is None and len(window["consumed"]) == 3
    assert window["already_used"] == 1 and window["rows"] == 2

    # a rerun of r2 sees the same prompts however the log grows
    write_log(log, "part-5.parquet", [chat("another one", later)])
    assert texts(build_requests(cfg, r2)[0]) == ["how do MoE routers work?"]

    # r2 failed: the next run reads from r1's window again (and picks up the newer row too)
    finish_run(r2, [], status="failed")
    r3 = _run(tmp_path, "r3")
    assert texts(build_requests(cfg, r3)[0]) == ["how do MoE routers work?", "another one"]


def test_count_caps_and_the_rest_comes_next_round(tmp_path):
    base = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    write_log(tmp_path / "log", "p.parquet", [chat(f"q{i}", base + dt.timedelta(minutes=i)) for i in range(5)])
    cfg = _cfg(tmp_path, "prompts.count=2")
    r1 = _run(tmp_path, "r1")
    first, _ = build_requests(cfg, r1)
    assert texts(first) == ["q0", "q1"]
    assert storage.read_json(storage.join(r1, "data", "prompts", "served_prompts.json"))["until"].startswith(
        (base + dt.timedelta(minutes=1)).isoformat()[:19]
    )
    finish_run(r1, first)
    assert texts(build_requests(cfg, _run(tmp_path, "r2"))[0]) == ["q2", "q3"]


def test_errors_name_the_fix(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "prompts.source=served_prompts"])
    with pytest.raises(ConfigError, match="set prompts.path \\(or serve.prompt_log\\)"):
        build_requests(cfg, _run(tmp_path, "r1"))
    # serve.prompt_log is used when prompts.path is empty; an empty log has no new prompts
    cfg = load_config(
        None, [f"workdir={tmp_path}", "prompts.source=served_prompts", f"serve.prompt_log={tmp_path / 'nolog'}"]
    )
    with pytest.raises(RaydistillError, match="no new prompts in .*nolog since the start"):
        build_requests(cfg, _run(tmp_path, "r1"))


def test_prompts_logged_by_the_real_server_are_read_back_by_the_source(tmp_path, tiny_teacher_dir):
    """Both flywheel halves: the API server writes its prompt log, served_prompts reads it (no hand-written log)."""
    import httpx
    from transformers import AutoTokenizer

    from tests.serve.conftest import start_fake_server

    log = tmp_path / "log"
    server, _ = start_fake_server(
        AutoTokenizer.from_pretrained(tiny_teacher_dir),
        prompt_log_enabled=True,
        prompt_log=str(log),
        prompt_log_flush_rows=1,
    )
    try:
        url = server.base_url
        assert (
            httpx.post(
                url + "/v1/chat/completions",
                timeout=60,
                json={
                    "model": "tiny",
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "what is ray?"},
                    ],
                    "max_tokens": 2,
                },
            ).status_code
            == 200
        )
        assert (
            httpx.post(
                url + "/v1/completions",
                timeout=60,
                json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2},
            ).status_code
            == 200
        )
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            timeout=60,
            json={"model": "tiny", "prompt": "streamed prompt", "max_tokens": 2, "stream": True},
        ) as response:
            assert response.status_code == 200
            list(response.iter_lines())
        assert (
            httpx.post(
                url + "/v1/completions",
                timeout=60,
                json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2},
            ).status_code
            == 200
        )  # a repeat
    finally:
        server.stop()  # flushes what is buffered

    requests, _ = build_requests(_cfg(tmp_path), _run(tmp_path, "r1"))
    by_text = {r["prompt"]: r for r in requests}
    assert sorted(by_text) == ["Once upon a time", "streamed prompt", "what is ray?"]
    assert by_text["Once upon a time"]["messages"] is None  # /v1/completions: fed to the teacher verbatim
    assert by_text["streamed prompt"]["messages"] is None
    assert by_text["what is ray?"]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is ray?"},
    ]
    assert all(r["source"] == "served_prompts" for r in requests)
    window = storage.read_json(storage.join(_run(tmp_path, "r1"), "data", "prompts", "served_prompts.json"))
    assert window["rows"] == 4 and window["duplicate"] == 1


def test_a_prompt_logged_during_a_read_is_used_by_the_next_run(tmp_path):
    """A row still in an ingress buffer while run 1 read the log (its ts is before the read) is flushed to a
    new file afterwards: run 2 must use it (issue #16 point 11)."""
    log = tmp_path / "log"
    before = dt.datetime.now(UTC) - dt.timedelta(minutes=5)
    write_log(log, "part-a.parquet", [chat("first prompt", before)])
    cfg = _cfg(tmp_path)
    r1 = _run(tmp_path, "r1")
    buffered_at = dt.datetime.now(UTC)  # logged (timestamped) while r1 reads...
    first, _ = build_requests(cfg, r1)
    assert texts(first) == ["first prompt"]
    finish_run(r1, first)
    write_log(log / "replica-2", "part-b.parquet", [chat("buffered prompt", buffered_at)])  # ...flushed after
    second, _ = build_requests(cfg, _run(tmp_path, "r2"))
    assert texts(second) == ["buffered prompt"]


def test_runs_from_before_file_tracking_still_mark_where_to_start(tmp_path):
    now = dt.datetime.now(UTC)
    write_log(tmp_path / "log", "old.parquet", [chat("old", now - dt.timedelta(hours=2))])
    write_log(tmp_path / "log", "new.parquet", [chat("new", now)])
    cfg = _cfg(tmp_path)
    legacy = _run(tmp_path, "r0")
    finish_run(legacy, [])
    storage.atomic_write_json(
        storage.join(legacy, "data", "prompts", "served_prompts.json"),
        {"until": (now - dt.timedelta(hours=1)).isoformat()},
    )  # no "consumed"
    assert texts(build_requests(cfg, _run(tmp_path, "r1"))[0]) == ["new"]
