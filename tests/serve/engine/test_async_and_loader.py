"""AsyncEngine streaming and cancellation (asyncio), and model-dir resolution."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from cluster.errors import RaydistillError
from serve.engine.async_engine import AsyncEngine
from serve.engine.loader import resolve_model_dir
from serve.engine.types import EngineError, GenerationRequest, SamplingOptions
from tests.serve.engine.conftest import encode, text_of, tokens_of


@pytest.fixture
def async_engine(make_engine):
    engine = AsyncEngine.from_engine(make_engine(max_batch_size=2))
    yield engine
    engine.shutdown()


def test_async_streams_equal_sync_and_run_concurrently(async_engine, make_engine, tokenizer):
    prompts = [encode(tokenizer, p) for p in ("Hello there", "The capital of France is", "1 2 3 4")]
    sampling = SamplingOptions(max_tokens=9, temperature=0, ignore_eos=True)
    expected = make_engine().generate([GenerationRequest(f"r{i}", p, sampling) for i, p in enumerate(prompts)])

    async def consume(i, prompt):
        return [out async for out in async_engine.generate(GenerationRequest(f"r{i}", prompt, sampling))]

    async def main():
        return await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for i, outs in enumerate(results):
        assert len(outs) == 9  # one streamed increment per token
        assert tokens_of(outs) == tokens_of(expected[f"r{i}"])
        assert text_of(outs) == text_of(expected[f"r{i}"])
        assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert async_engine.model_name and async_engine.context_length == 512


def test_async_bad_request_raises_before_first_output(async_engine, tokenizer):
    async def main():
        agen = async_engine.generate(GenerationRequest("bad", encode(tokenizer, "hi"), SamplingOptions(max_tokens=600)))
        with pytest.raises(EngineError, match="context 512"):
            await agen.__anext__()

    asyncio.run(main())


def test_async_cancellation_aborts_and_frees_the_slot(async_engine, tokenizer):
    prompt = encode(tokenizer, "Once upon a time")
    long = SamplingOptions(max_tokens=400, temperature=0, ignore_eos=True)
    engine = async_engine.engine
    aborted = {}  # request id -> tokens the engine had generated in total when it aborted that request
    real_abort = engine.abort

    def spy_abort(request_id):  # runs on the engine thread, between steps
        aborted[request_id] = engine.stats()["generated_tokens"]
        real_abort(request_id)

    engine.abort = spy_abort

    async def stop_early():  # the consumer breaks out of the stream
        got = []
        async for out in async_engine.generate(GenerationRequest("brk", prompt, long)):
            got.append(out)
            if len(got) == 2:
                break
        return got

    async def cancelled():  # the consuming task is cancelled (client went away)
        started = asyncio.Event()

        async def consume():
            async for _ in async_engine.generate(GenerationRequest("cnc", prompt, long)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        assert len(await stop_early()) == 2
        await cancelled()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = async_engine.stats()
            if "cnc" in aborted and stats["free_slots"] == 2 and stats["running"] == 0:
                break
            await asyncio.sleep(0.05)
        return async_engine.stats()

    stats = asyncio.run(main())
    assert sorted(aborted) == ["brk", "cnc"]  # both streams were aborted in the engine
    assert stats["free_slots"] == 2 and stats["running"] == 0
    # Not one token after the second abort, and neither stream ran to its 400 tokens.
    assert stats["generated_tokens"] == aborted["cnc"]
    assert aborted["brk"] < 400 and aborted["cnc"] - aborted["brk"] < 400


def test_resolve_model_dir(tmp_path, tiny_teacher_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher_dir, run / "student")
    assert resolve_model_dir(str(run)) == str(run / "student")
    assert resolve_model_dir(tiny_teacher_dir) == tiny_teacher_dir
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_teacher_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(RaydistillError, match="no tokenizer"):
        resolve_model_dir(str(no_tok))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaydistillError, match="no config.json"):
        resolve_model_dir(str(tmp_path / "empty"))
    with pytest.raises(RaydistillError, match="not-a-model"):
        resolve_model_dir(str(tmp_path / "not-a-model"))
