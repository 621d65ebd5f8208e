"""A fake AsyncEngine for the API tests: real tokenizer, deterministic tokens, controllable speed.

It implements the AsyncEngine interface of ``serve.engine`` (``from_pretrained``, ``tokenizer``,
``model_name``, ``context_length``, ``generate``, ``abort``, ``stats``, ``shutdown``) without a model:

* greedy (temperature 0): a fixed word sequence, starting at an offset given by the prompt ids;
* sampling: words drawn by ``random.Random(seed)`` (a fresh RNG per request without a seed);
* every token sleeps ``token_delay`` seconds, and at most ``max_batch_size`` requests run at once
  (the rest wait), so concurrency, cancellation and overload are observable from the outside;
* ``shutdown()`` aborts the running requests (``finish_reason="abort"``), as the real engine does;
* ``hold`` (a ``threading.Event``, set by the test's thread): while it is clear, every request stops after
  its first token, so a test can see how many requests run at once without timing anything.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import AsyncIterator

from serve.engine.types import EngineError, GenerationOutput, GenerationRequest, TokenLogprob

WORDS = " the quick brown fox jumps over the lazy dog and then it runs away into a dark green forest"


class FakeAsyncEngine:
    def __init__(
        self,
        tokenizer,
        *,
        name: str = "fake",
        context_length: int = 256,
        max_batch_size: int = 16,
        token_delay: float = 0.0,
    ):
        self.tokenizer = tokenizer
        self.model_name = name
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.token_delay = token_delay
        self.eos_token_ids = [tokenizer.eos_token_id]
        self._vocab_words = tokenizer(WORDS, add_special_tokens=False).input_ids  # [W]
        self._slots = asyncio.Semaphore(max_batch_size)
        self._running: set[str] = set()
        self._waiting: set[str] = set()
        self._aborted: set[str] = set()
        self.finished_ids: list[str] = []  # finished or aborted, in order (tests check cancellation)
        self.aborted_ids: list[str] = []
        self.is_shut_down = False
        self.hold: threading.Event | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        token_delay: float = 0.0,
        **_: object,
    ) -> FakeAsyncEngine:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        delay = float(os.environ.get("FAKE_ENGINE_TOKEN_DELAY", token_delay))
        return cls(
            tokenizer,
            name=os.path.basename(os.path.normpath(model)),
            max_batch_size=max_batch_size,
            context_length=max_model_len or 256,
            token_delay=delay,
        )

    def _validate(self, request: GenerationRequest) -> None:
        s = request.sampling
        if not request.prompt_ids:
            raise EngineError("empty prompt")
        if len(request.prompt_ids) + s.max_tokens > self.context_length:
            raise EngineError(
                f"prompt has {len(request.prompt_ids)} tokens, max_tokens {s.max_tokens}, context {self.context_length}"
            )
        if s.temperature < 0 or not 0 < s.top_p <= 1 or s.max_tokens < 1:
            raise EngineError("bad sampling values")

    def _logprob(self, token: int, k: int, step: int) -> TokenLogprob:
        top = [(token, -0.25)] + [
            (self._vocab_words[(step + j) % len(self._vocab_words)], -1.0 - j) for j in range(1, k)
        ]
        return TokenLogprob(token_id=token, logprob=-0.25, top=top[:k])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        self._validate(request)
        s = request.sampling
        rid = request.request_id
        self._waiting.add(rid)
        try:
            async with self._slots:
                self._waiting.discard(rid)
                self._running.add(rid)
                rng = random.Random(s.seed) if s.seed is not None else random.Random()
                offset = sum(request.prompt_ids) % len(self._vocab_words)
                generated: list[int] = []
                text_so_far = ""
                prompt_lp = None
                if s.prompt_logprobs:
                    prompt_lp = [None] + [
                        self._logprob(t, s.top_logprobs, i) for i, t in enumerate(request.prompt_ids[1:])
                    ]
                for step in range(s.max_tokens):
                    if rid in self._aborted or self.is_shut_down:  # shutdown aborts what runs, like the engine
                        break
                    while step == 1 and self.hold is not None and not self.hold.is_set():
                        if rid in self._aborted or self.is_shut_down:
                            break
                        await asyncio.sleep(0.005)  # held after the first token (the test releases it)
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                    else:
                        await asyncio.sleep(0)
                    if s.temperature == 0:
                        token = self._vocab_words[(offset + step) % len(self._vocab_words)]
                    else:
                        token = rng.choice(self._vocab_words)
                    generated.append(token)
                    full = self.tokenizer.decode(generated, skip_special_tokens=True)
                    new_text = full[len(text_so_far) :]
                    finished, reason = False, None
                    hit = next((st for st in s.stop if st in full), None)
                    if hit is not None:
                        cut = full.index(hit)
                        new_text = full[len(text_so_far) : cut] if cut > len(text_so_far) else ""
                        finished, reason = True, "stop"
                    elif step + 1 == s.max_tokens:
                        finished, reason = True, "length"
                    text_so_far = full
                    out = GenerationOutput(
                        request_id=rid,
                        token_ids=[token],
                        text=new_text,
                        finished=finished,
                        finish_reason=reason,
                        logprobs=[self._logprob(token, s.top_logprobs, step)] if s.logprobs else None,
                        prompt_logprobs=prompt_lp if step == 0 else None,
                        prompt_tokens=len(request.prompt_ids),
                        completion_tokens=len(generated),
                    )
                    yield out
                    if finished:
                        self.finished_ids.append(rid)
                        return
                yield GenerationOutput(
                    request_id=rid,
                    token_ids=[],
                    text="",
                    finished=True,
                    finish_reason="abort",
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=len(generated),
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted_ids.append(rid)
            raise
        finally:
            self._waiting.discard(rid)
            self._running.discard(rid)
            self._aborted.discard(rid)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting), "max_batch_size": self.max_batch_size}

    def shutdown(self) -> None:
        self.is_shut_down = True
