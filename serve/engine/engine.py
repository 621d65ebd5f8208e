"""The synchronous serving core: continuous batching over a fixed pool of KV-cache rows.

Legend: ``R`` = ``max_batch_size`` cache rows (slots), ``n`` running rows, ``P`` rows prefilled this
step, ``C`` prefill chunk columns, ``V`` vocabulary.

One :meth:`LLMEngine.step`:

1. admit waiting requests into free rows (FCFS);
2. chunked prefill: up to ``prefill_chunk`` prompt tokens in total, taken FCFS from the requests
   being prefilled, appended to their rows in one batched call; a request whose prompt is
   complete samples its first token and joins the running rows;
3. one batched ``decode_step`` over all running rows (each at its own position);
4. sample every row that produced logits in one vectorised call; stream each request's new token
   and text delta; finished or aborted requests leave at once, freeing their row.

Running rows are kept compacted at cache rows ``0 .. n-1``: decode then reads the cache as a view
instead of gathering rows (a copy of every row's keys and values per layer per step). A request that
leaves moves the last running row into its slot; a request that finishes prefill moves into row n.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from distill.teacher.sources import eos_token_ids as eos_token_ids_of
from serve.engine.kernels import quantize_int8_weights, use_onednn_linears
from serve.engine.loader import load_model, resolve_model_dir
from serve.engine.sampling import (
    IncrementalDetokenizer,
    apply_penalties,
    find_stop,
    greedy_tokens,
    sample_tokens,
    stop_holdback,
)
from serve.engine.types import (
    MAX_TOP_LOGPROBS,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    state: str = "waiting"  # waiting | prefill | running
    row: int = -1
    prefilled: int = 0  # prompt tokens already in the cache row
    output: list[int] = dataclasses.field(default_factory=list)
    last_token: int | None = None  # sampled but not yet fed to the model
    sent: int = 0  # characters of detok.text already streamed
    first_output: bool = True
    resume: list[int] | None = None  # after a failed step: prefill prompt + output instead of the prompt
    failures: int = 0  # failed steps this request was part of
    matcher: Any | None = None  # llguidance matcher of a response_format request (serve.structured)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def prefill_ids(self) -> list[int]:
        return self.resume if self.resume is not None else self.request.prompt_ids

    def snapshot(self) -> tuple:
        """What one step may change (restored by :meth:`LLMEngine.recover` when the step fails)."""
        d = self.detok
        rng = self.generator.get_state() if self.generator is not None else None
        return (
            self.state,
            len(self.output),
            self.last_token,
            self.sent,
            self.first_output,
            len(d.ids),
            d.prefix_offset,
            d.read_offset,
            len(d.text),
            rng,
        )

    def restore(self, snap: tuple) -> None:
        (_state, n_out, self.last_token, self.sent, self.first_output, n_ids, prefix, read, n_text, rng) = snap
        if self.matcher is not None and len(self.output) > n_out:
            self.matcher.rollback(len(self.output) - n_out)
        del self.output[n_out:]
        d = self.detok
        del d.ids[n_ids:]
        d.prefix_offset, d.read_offset, d.text = prefix, read, d.text[:n_text]
        if rng is not None:
            self.generator.set_state(rng)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def options(self) -> SamplingOptions:
        return self.request.sampling


class LLMEngine:
    """Continuous-batching generation over one model; synchronous, no threads, no Ray.

    Build with :meth:`from_pretrained` (a model dir, student run dir or alias) or :meth:`from_model`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        prefill_chunk: int = 256,
        name: str = "model",
        eos_token_ids: list[int] | None = None,
        onednn: bool = True,
    ):
        """``onednn``: compute the large fp32 linears (LM head, wide FFN projections) with oneDNN on CPU, about
        2x faster than torch's default BLAS for those shapes (:mod:`serve.engine.kernels`); switches the
        model's ``nn.Linear`` modules in place."""
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = to_engine_model(model)
        self.onednn_linears = use_onednn_linears(self.model) if onednn else []
        self.tokenizer = tokenizer
        self.model_name = name
        config = self.model.model.config
        model_len = int(config.max_position_embeddings)
        self.context_length = min(max_model_len, model_len) if max_model_len else model_len
        self.vocab_size = int(config.vocab_size)
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.eos_token_ids = sorted(
            set(
                eos_token_ids
                if eos_token_ids is not None
                else eos_token_ids_of(
                    tokenizer, None, getattr(model, "generation_config", None), getattr(model, "config", None)
                )
            )
        )
        self._eos = set(self.eos_token_ids)
        with torch.inference_mode():
            self.cache = self.model.new_cache(max_batch_size, max_seq_len=min(self.context_length, 128))
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        self._running: list[_Sequence] = []  # index == cache row
        self._prefilling: list[_Sequence] = []
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._requests: dict[str, _Sequence] = {}
        self._pending: list[GenerationOutput] = []  # outputs made outside step() (aborts)
        self._snapshots: dict[str, tuple[_Sequence, tuple]] = {}  # before the current step (recover())
        self._isolating = 0  # after a failed step: suspects still to re-admit one at a time
        self._probation: _Sequence | None = None  # the suspect admitted last, until it makes a token
        self._probation_mark = 0  # its output length when admitted
        self._failed_outputs: list[GenerationOutput] = []
        self._rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._grammars: Any | None = None  # serve.structured.GrammarFactory, built on first use
        self._steps = 0
        self._decode_steps = 0
        self._generated = 0
        self._prompt_tokens = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        dtype: str = "float32",
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        prefill_chunk: int = 256,
        threads: int | None = None,
        onednn: bool = True,
    ) -> LLMEngine:
        """Load a student run dir (``{run}/student``), an HF dir (student or dense LLaMA/Qwen2/Mistral) or an alias.

        ``dtype``: float32, bfloat16, float16, or int8 (fp32 model, linears with int8 weights:
        :func:`serve.engine.kernels.quantize_int8_weights`)."""
        from transformers import AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        model_dir = resolve_model_dir(model)
        module, raw = load_model(model_dir, "float32" if dtype == "int8" else dtype)
        if dtype == "int8":  # weight-only int8 linears and experts
            quantize_int8_weights(module)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eos = eos_token_ids_of(tokenizer, model_dir, raw)
        name = model if not os.path.isdir(os.path.expanduser(model)) else os.path.basename(os.path.normpath(model))
        return cls(
            module,
            tokenizer,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            prefill_chunk=prefill_chunk,
            name=name,
            eos_token_ids=eos,
            onednn=onednn,
        )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        prefill_chunk: int = 256,
        name: str = "model",
    ) -> LLMEngine:
        """An in-memory model: a student (StudentLM / HF class) or a dense transformers LLaMA/Qwen2/Mistral."""
        return cls(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            prefill_chunk=prefill_chunk,
            name=name,
        )

    # ------------------------------------------------------------------ requests
    def check_request(self, request: GenerationRequest) -> None:
        """Raise :class:`EngineError` for a request the engine cannot take (no state is changed)."""
        rid = request.request_id
        if not isinstance(rid, str) or not rid:
            raise EngineError("request_id must be a non-empty string")
        prompt = request.prompt_ids
        if not prompt:
            raise EngineError(f"request {rid}: the prompt is empty; give at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise EngineError(f"request {rid}: prompt token ids must be integers in [0, {self.vocab_size})")
        s = request.sampling
        if isinstance(s.max_tokens, bool) or not isinstance(s.max_tokens, int) or s.max_tokens < 0:
            raise EngineError(f"request {rid}: max_tokens must be an integer >= 0, got {s.max_tokens!r}")
        if len(prompt) + s.max_tokens > self.context_length:
            raise EngineError(
                f"prompt has {len(prompt)} tokens, max_tokens {s.max_tokens}, context "
                f"{self.context_length}: prompt + max_tokens must fit in the context; shorten "
                f"the prompt or lower max_tokens"
            )
        if not isinstance(s.temperature, (int, float)) or not math.isfinite(s.temperature) or s.temperature < 0:
            raise EngineError(f"request {rid}: temperature must be a finite number >= 0, got {s.temperature!r}")
        if not isinstance(s.top_p, (int, float)) or not 0 < s.top_p <= 1:
            raise EngineError(f"request {rid}: top_p must be in (0, 1], got {s.top_p!r}")
        if isinstance(s.top_k, bool) or not isinstance(s.top_k, int) or s.top_k < 0:
            raise EngineError(f"request {rid}: top_k must be an integer >= 0 (0 = off), got {s.top_k!r}")
        if (
            isinstance(s.top_logprobs, bool)
            or not isinstance(s.top_logprobs, int)
            or not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise EngineError(
                f"request {rid}: top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {s.top_logprobs!r}"
            )
        if s.seed is not None and (isinstance(s.seed, bool) or not isinstance(s.seed, int)):
            raise EngineError(f"request {rid}: seed must be an integer, got {s.seed!r}")
        if any(not isinstance(x, str) or not x for x in s.stop):
            raise EngineError(f"request {rid}: stop strings must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in s.stop_token_ids):
            raise EngineError(f"request {rid}: stop_token_ids must be integers")
        if s.json_schema is not None:
            from serve.structured import StructuredOutputUnavailable, grammar_for

            if not isinstance(s.json_schema, dict):
                raise EngineError(f"request {rid}: json_schema must be a JSON object")
            try:
                grammar_for(s.json_schema)
            except (ValueError, StructuredOutputUnavailable) as exc:
                raise EngineError(f"request {rid}: response_format: {exc}") from None

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; :class:`EngineError` (a ValueError) for a bad one."""
        self.check_request(request)
        if request.request_id in self._requests:
            raise EngineError(f"request_id {request.request_id!r} is already in the engine; use a unique id")
        s = request.sampling
        generator = None
        if s.seed is not None and s.temperature > 0:
            generator = torch.Generator().manual_seed(int(s.seed) & 0x7FFF_FFFF_FFFF_FFFF)
        seq = _Sequence(
            request=request, detok=IncrementalDetokenizer(self.tokenizer, request.prompt_ids), generator=generator
        )
        if s.json_schema is not None:
            if self._grammars is None:
                from serve.structured import GrammarFactory

                self._grammars = GrammarFactory(self.tokenizer, self.vocab_size)
            try:
                seq.matcher = self._grammars.matcher(s.json_schema)
            except ValueError as exc:
                raise EngineError(f"request {request.request_id}: response_format: {exc}") from None
        self._requests[request.request_id] = seq
        self._waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a request: its row is freed now; the next :meth:`step` reports it finished with ``abort``."""
        seq = self._requests.get(request_id)
        if seq is None:
            return
        with torch.inference_mode():
            self._release(seq)
        self._pending.append(
            GenerationOutput(
                request_id,
                [],
                "",
                finished=True,
                finish_reason="abort",
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.output),
            )
        )

    def reset(self) -> list[str]:
        """Drop every request (after a failed :meth:`step` left the state unknown); returns their ids.

        No outputs are made for them: the caller tells their streams. The cache rows are all free again.
        """
        ids = list(self._requests)
        self._isolating, self._probation, self._snapshots = 0, None, {}
        self._requests.clear()
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        self._pending.clear()
        self._slots = [None] * self.max_batch_size
        with torch.inference_mode():
            self.cache.lengths.zero_()
        return ids

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[GenerationOutput]:
        """One scheduler iteration: admit, one prefill chunk, one decode step; returns this step's outputs."""
        outputs, self._pending = self._pending, []
        # Everything the step can change, so a failed step can be rolled back (recover()); cheap next to
        # the forward pass: a few ints per sequence, plus the RNG state of seeded ones.
        self._snapshots = {seq.id: (seq, seq.snapshot()) for seq in [*self._running, *self._prefilling]}
        self._failed_outputs = outputs  # finished before the failure (aborts, scoring): still delivered
        with torch.inference_mode():
            self._steps += 1
            self._admit(outputs)
            decoding = list(self._running)  # rows 0..n-1, before this step's promotions
            rows_seqs: list[_Sequence] = []
            logits_parts: list[torch.Tensor] = []
            done_prefill, prefill_logits = self._prefill_chunk()
            if decoding:
                tokens = torch.tensor([s.last_token for s in decoding], dtype=torch.long)
                logits_parts.append(self.model.decode_step(tokens, self.cache))  # [n, V]
                rows_seqs.extend(decoding)
                self._decode_steps += 1
            if done_prefill:
                logits_parts.append(prefill_logits)
                rows_seqs.extend(done_prefill)
            if rows_seqs:
                logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
                outputs.extend(self._sample_and_emit(rows_seqs, logits.float()))
        self._snapshots, self._failed_outputs = {}, []
        probation = self._probation
        if probation is not None and (len(probation.output) > self._probation_mark or probation.state == "done"):
            self._probation = None  # the suspect made a token: cleared
        return outputs

    def recover(self) -> list[str]:
        """After :meth:`step` raised: roll every request back to its state before that step, free every cache
        row and queue them all again (running ones resume by prefilling prompt + output so far), then
        re-admit them one at a time. A step that fails while a re-admitted request is on probation (it has
        not made a token since) blames that request. Returns the ids of the requests given up on (blamed, or
        part of 3 failed steps); the caller fails their streams, every other request goes on unchanged.
        """
        culprit = self._probation
        self._probation = None
        seqs: dict[str, _Sequence] = {}
        involved: set[str] = set()
        for rid, (seq, snap) in self._snapshots.items():  # includes requests the failed step finished
            seq.restore(snap)
            seqs[rid] = seq
            involved.add(rid)
        for rid, seq in self._requests.items():
            seqs.setdefault(rid, seq)
            if seq.state != "waiting":  # admitted by the failed step
                involved.add(rid)
        given_up = []
        keep: list[_Sequence] = []
        for seq in seqs.values():
            if seq.id in involved:
                seq.failures += 1
            if seq is culprit or seq.failures >= 3 or (seq.id in involved and len(involved) == 1):
                given_up.append(seq.id)
            else:
                keep.append(seq)
        # Oldest first: the order they had (running rows, then prefilling, then waiting).
        self._requests = {seq.id: seq for seq in keep}
        for seq in keep:
            seq.state, seq.row, seq.prefilled = "waiting", -1, 0
            seq.resume = list(seq.prompt) + list(seq.output) if seq.output else None
        self._waiting = collections.deque(keep)
        self._prefilling.clear()
        self._running.clear()
        self._slots = [None] * self.max_batch_size
        with torch.inference_mode():
            self.cache.lengths.zero_()
        self._pending = [o for o in self._failed_outputs if o.request_id not in given_up] + self._pending
        self._snapshots = {}
        self._isolating = len(keep)
        return given_up

    def generate(self, requests: list[GenerationRequest]) -> dict[str, list[GenerationOutput]]:
        """Run requests to completion (alongside anything already queued); outputs per request id."""
        ids = []
        for request in requests:
            self.add_request(request)
            ids.append(request.request_id)
        results: dict[str, list[GenerationOutput]] = {rid: [] for rid in ids}
        left = set(ids)
        while left:
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].append(out)
                    if out.finished:
                        left.discard(out.request_id)
        return results

    def stats(self) -> dict:
        config = self.model.model.config
        itemsize = self.cache.layers[0].k.element_size()
        per_layer_token = 2 * config.num_key_value_heads * config.head_dim * itemsize
        full = sum(1 for i in range(config.num_hidden_layers) if config.window_of(i) is None)
        return {
            "model": self.model_name,
            "running": len(self._running),
            "prefilling": len(self._prefilling),
            "waiting": len(self._waiting),
            "max_batch_size": self.max_batch_size,
            "free_slots": self._slots.count(None),
            "context_length": self.context_length,
            "kv_cache_bytes": self.cache.nbytes(),
            "kv_bytes_per_token": per_layer_token * full,  # full layers; sliding rings are fixed per row
            "kv_bytes_per_sequence_sliding": per_layer_token
            * (config.num_hidden_layers - full)
            * config.sliding_window,
            "steps": self._steps,
            "decode_steps": self._decode_steps,
            "generated_tokens": self._generated,
            "prompt_tokens": self._prompt_tokens,
            "onednn_linears": len(self.onednn_linears),
        }

    # ------------------------------------------------------------------ scheduling internals
    def _admit(self, outputs: list[GenerationOutput]) -> None:
        while self._waiting:
            if self._isolating and self._probation is not None:
                return  # after a failure: the next suspect waits until the last one made a token
            seq = self._waiting[0]
            if seq.options.max_tokens == 0:  # scoring only (echo + logprobs): no cache row needed
                self._waiting.popleft()
                del self._requests[seq.id]
                self._prompt_tokens += len(seq.prompt)
                outputs.append(
                    GenerationOutput(
                        seq.id,
                        [],
                        "",
                        finished=True,
                        finish_reason="length",
                        prompt_tokens=len(seq.prompt),
                        prompt_logprobs=self.prompt_logprobs(seq.prompt, seq.options.top_logprobs)
                        if seq.options.prompt_logprobs
                        else None,
                    )
                )
                continue
            try:
                row = self._slots.index(None)
            except ValueError:
                return
            self._waiting.popleft()
            self._slots[row] = seq
            seq.row, seq.state = row, "prefill"
            self.cache.lengths[row] = 0
            self._prefilling.append(seq)
            if self._isolating:
                self._isolating -= 1
                self._probation, self._probation_mark = seq, len(seq.output)

    def _prefill_chunk(self) -> tuple[list[_Sequence], torch.Tensor | None]:
        """Append up to ``prefill_chunk`` prompt tokens (FCFS); returns the sequences whose prompt is now
        complete and their last-token logits [P_done, V]."""
        budget = self.prefill_chunk
        pieces: list[tuple[_Sequence, list[int]]] = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            take = seq.prefill_ids[seq.prefilled : seq.prefilled + budget]
            pieces.append((seq, take))
            budget -= len(take)
        if not pieces:
            return [], None
        width = max(len(t) for _, t in pieces)
        ids = torch.zeros(len(pieces), width, dtype=torch.long)
        mask = torch.zeros(len(pieces), width, dtype=torch.long)
        for i, (_, take) in enumerate(pieces):
            ids[i, : len(take)] = torch.tensor(take)
            mask[i, : len(take)] = 1
        rows = torch.tensor([seq.row for seq, _ in pieces])
        logits = self.model.append(ids, mask, self.cache, rows=rows)  # [P, V]
        done, keep = [], []
        for i, (seq, take) in enumerate(pieces):
            seq.prefilled += len(take)
            self._prompt_tokens += len(take)
            if seq.prefilled == len(seq.prefill_ids):
                done.append(seq)
                keep.append(i)
        if not done:
            return [], None
        return done, logits[torch.tensor(keep)]

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[GenerationOutput]:
        m = len(seqs)
        opts = [s.options for s in seqs]
        temperature = torch.tensor([o.temperature for o in opts], dtype=torch.float)
        uniforms = torch.zeros(m)
        sampled = [i for i, o in enumerate(opts) if o.temperature > 0]
        if sampled:
            unseeded = [i for i in sampled if seqs[i].generator is None]
            if unseeded:
                uniforms[unseeded] = torch.rand(len(unseeded), generator=self._rng)
            for i in sampled:
                if seqs[i].generator is not None:
                    uniforms[i] = torch.rand((), generator=seqs[i].generator)
            top_k = torch.tensor([o.top_k for o in opts], dtype=torch.long)
            top_p = torch.tensor([float(o.top_p) for o in opts], dtype=torch.float)
            tokens = sample_tokens(self._adjusted(seqs, logits), temperature, top_k, top_p, uniforms)
        else:
            tokens = greedy_tokens(self._adjusted(seqs, logits))
        token_list = tokens.tolist()

        want_lp = [i for i, o in enumerate(opts) if o.logprobs]
        lp_info: dict[int, TokenLogprob] = {}
        if want_lp:
            index = torch.tensor(want_lp)
            logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)  # [w, V] raw, temperature 1
            chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0].tolist()
            k = max(opts[i].top_logprobs for i in want_lp)
            top_v, top_i = torch.topk(logprobs, k, dim=-1) if k else (None, None)
            for j, i in enumerate(want_lp):
                n = opts[i].top_logprobs
                top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())) if n else []
                lp_info[i] = TokenLogprob(token_list[i], chosen[j], top)

        outputs = []
        promote = []
        for i, seq in enumerate(seqs):
            out = self._advance(seq, token_list[i], lp_info.get(i))
            outputs.append(out)
            if out.finished:
                self._release(seq)
            elif seq.state == "prefill":
                promote.append(seq)
        for seq in promote:
            self._promote(seq)
        return outputs

    @classmethod
    def _adjusted(cls, seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The logits tokens are picked from: penalties, then the structured-output mask (logprobs stay raw)."""
        rows = [i for i, seq in enumerate(seqs) if seq.options.penalized]
        if rows:
            logits = apply_penalties(
                logits,
                rows,
                [seqs[i].request.prompt_ids for i in rows],
                [seqs[i].output for i in rows],
                [seqs[i].options for i in rows],
            )
        return cls._constrained(seqs, logits)

    @staticmethod
    def _constrained(seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with each structured-output row masked to the tokens its grammar allows (a copy, so
        logprobs stay the raw distribution); the other rows of the batch are untouched."""
        rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
        if not rows:
            return logits
        from serve.structured import mask_logits

        return mask_logits(logits, rows, [seqs[i].matcher for i in rows])

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> GenerationOutput:
        """Append a sampled token to ``seq``; the stream increment (text delta, finish) it produces."""
        opts = seq.options
        seq.output.append(token)
        seq.last_token = token
        self._generated += 1
        finish = None
        stop_at = None
        grammar_done = False
        if seq.matcher is not None:
            if not seq.matcher.consume_token(token) or seq.matcher.is_error():
                log.error("request %s: the grammar rejected token %d: %s", seq.id, token, seq.matcher.get_error())
                finish = "abort"  # never reported as finished: the API answers 5xx
            grammar_done = seq.matcher.is_stopped()
        if finish is not None:
            pass
        elif token in opts.stop_token_ids or (not opts.ignore_eos and token in self._eos):
            finish = "stop"  # the stop token is in token_ids, not in the text
        elif grammar_done:
            seq.detok.add(token)
            finish = "stop"  # the JSON is complete and the grammar allows nothing more
        else:
            seq.detok.add(token)
            if opts.stop:
                longest = max(len(s) for s in opts.stop)
                stop_at = find_stop(seq.detok.text, opts.stop, max(0, seq.sent - longest + 1))
                if stop_at is not None:
                    finish = "stop"
        if finish is None and (
            len(seq.output) >= opts.max_tokens or len(seq.prompt) + len(seq.output) >= self.context_length
        ):
            finish = "length"
        text = seq.detok.text
        if stop_at is not None:
            end = max(stop_at, seq.sent)
        elif finish is None and opts.stop:
            end = len(text) - stop_holdback(text, opts.stop)
        else:
            end = len(text)
        delta = text[seq.sent : end] if end > seq.sent else ""
        seq.sent = max(seq.sent, end)
        out = GenerationOutput(
            seq.id,
            [token],
            delta,
            finished=finish is not None,
            finish_reason=finish,
            logprobs=[logprob] if logprob is not None else None,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
        )
        if seq.first_output:
            seq.first_output = False
            if opts.prompt_logprobs:
                out.prompt_logprobs = self.prompt_logprobs(seq.prompt, opts.top_logprobs)
        return out

    def _promote(self, seq: _Sequence) -> None:
        """A request finished prefill: move it to row n (compacted running rows) and mark it running."""
        target = len(self._running)
        if seq.row != target:
            other = self._slots[target]
            if other is None:
                self.cache.move_row(seq.row, target)
            else:
                self.cache.swap_rows(seq.row, target)
                other.row = seq.row
            self._slots[seq.row], self._slots[target] = other, seq
            seq.row = target
        self._prefilling.remove(seq)
        seq.state = "running"
        self._running.append(seq)

    def _release(self, seq: _Sequence) -> None:
        """Forget a finished/aborted request now; a running row's place is filled by the last running row."""
        self._requests.pop(seq.id, None)
        if seq.state == "waiting":
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        elif seq.state == "prefill":
            self._prefilling.remove(seq)
            self._slots[seq.row] = None
            self.cache.lengths[seq.row] = 0
        elif seq.state == "running":
            last = len(self._running) - 1
            row = seq.row
            if row != last:
                moved = self._running[last]
                self.cache.move_row(last, row)
                moved.row = row
                self._running[row] = moved
                self._slots[row] = moved
            else:
                self.cache.lengths[row] = 0
            self._running.pop()
            self._slots[last] = None
        seq.state = "done"
        seq.row = -1

    # ------------------------------------------------------------------ scoring
    def forward_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [L, V] (fp32) of a full forward pass over ``token_ids`` (no cache; scoring)."""
        with torch.inference_mode():
            return self.model.lm_head(self.forward_hidden([token_ids])[0]).float()

    def forward_hidden(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final-normed hidden states [B, L, H] of one full forward pass over ``sequences`` right-padded to
        the longest, L (no cache; scoring). Row b's first ``len(sequences[b])`` positions are what the
        sequence gives alone, up to rounding: attention is causal and the mask drops the padding."""
        for seq in sequences:
            if len(seq) > self.context_length:
                raise EngineError(f"sequence has {len(seq)} tokens, context {self.context_length}")
        width = max(len(seq) for seq in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            mask_arg = None if bool(mask.all()) else mask
            return self.model.model(ids, mask_arg, compute_aux=False).last_hidden_state  # [B, L, H]

    def prompt_logprobs(self, prompt: list[int], top: int = 0, chunk: int = 256) -> list[TokenLogprob | None]:
        """Score a prompt with one full forward pass: None for the first token, then each token's log-prob
        under the raw distribution given the tokens before it, plus the ``top`` best alternatives."""
        out: list[TokenLogprob | None] = [None]
        with torch.inference_mode():
            ids = torch.tensor([prompt], dtype=torch.long)
            hidden = self.model.model(ids, compute_aux=False).last_hidden_state[0]  # [L, H]
            targets = torch.tensor(prompt[1:], dtype=torch.long)
            for start in range(0, len(prompt) - 1, chunk):  # lm_head in slices: [chunk, V] at a time
                end = min(start + chunk, len(prompt) - 1)
                lp = torch.log_softmax(self.model.lm_head(hidden[start:end]).float(), dim=-1)
                chosen = lp.gather(1, targets[start:end, None])[:, 0].tolist()
                if top:
                    tv, ti = torch.topk(lp, top, dim=-1)
                    tv, ti = tv.tolist(), ti.tolist()
                for j in range(end - start):
                    alts = list(zip(ti[j], tv[j])) if top else []
                    out.append(TokenLogprob(prompt[start + j + 1], chosen[j], alts))
        return out


def to_engine_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself if it has the student's serving API, else a dense transformers model converted to it."""
    from distill.student.model import CausalLMMixin

    if isinstance(model, CausalLMMixin):
        return model.eval()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    from serve.engine.loader import DENSE_MODEL_TYPES, dense_student_config

    if model_type not in DENSE_MODEL_TYPES:
        raise EngineError(
            f"the engine serves raydistill students and dense {', '.join(DENSE_MODEL_TYPES)} "
            f"models, got {type(model).__name__} (model_type {model_type!r})"
        )
    from distill.student.model import StudentLM

    config = dense_student_config(model.config)
    dtype = next(model.parameters()).dtype
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    with torch.device("meta"):
        engine_model = StudentLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    engine_model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        engine_model.lm_head.weight = engine_model.model.embed_tokens.weight
    return engine_model.to(dtype).eval()


__all__ = ["LLMEngine", "to_engine_model"]
