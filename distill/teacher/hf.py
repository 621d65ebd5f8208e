"""The ``hf`` teacher: transformers on CPU or GPU, batched with left padding and a KV cache.

Legend: ``B`` batch, ``P`` padded prompt width, ``T`` generated steps, ``V`` vocab, ``k`` top-k.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cluster.errors import ConfigError
from distill.teacher import sources
from distill.teacher.base import (
    Completion,
    PromptInput,
    SamplingParams,
    ScoredSequence,
    TeacherBackend,
    check_score_inputs,
    score_row,
    topk_from_logits,
)
from distill.teacher.section import TeacherSection
from distill.teacher.sources import encode_prompt, model_revision, resolve_model


class HFTeacher(TeacherBackend):
    def __init__(
        self,
        model_dir: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
        max_model_len: int | None = None,
        name: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            # bf16 halves memory traffic on GPU; on CPU fp32 matmuls are faster and exact.
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = sources.torch_dtype(dtype, "teacher.dtype")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        self.batch_size = batch_size
        model_len = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self._context_length = min(max_model_len or model_len, model_len)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.name = name or f"{os.path.basename(os.path.normpath(model_dir))}@{model_revision(model_dir)}"

    @classmethod
    def from_config(cls, teacher_cfg: TeacherSection) -> HFTeacher:
        if teacher_cfg.threads:
            torch.set_num_threads(teacher_cfg.threads)
        device = "cuda" if teacher_cfg.num_gpus and torch.cuda.is_available() else "cpu"
        model_dir = resolve_model(teacher_cfg.model, teacher_cfg.revision)
        name = f"{teacher_cfg.model}@{teacher_cfg.revision or model_revision(model_dir)}"
        return cls(
            model_dir,
            device=device,
            dtype=teacher_cfg.dtype,
            batch_size=teacher_cfg.batch_size,
            max_model_len=teacher_cfg.max_model_len,
            name=name,
        )

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode_prompt(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[PromptInput], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        encoded = [self.encode_prompt(p) for p in prompts]
        out: list[Completion] = []
        for start in range(0, len(encoded), self.batch_size):
            stop = start + self.batch_size
            batch_seeds = None if seeds is None else list(seeds[start:stop])
            out.extend(self._generate_batch(encoded[start:stop], sampling, batch_seeds))
        return out

    def _generate_batch(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int] | None = None
    ) -> list[Completion]:
        width = max(len(p) for p in prompt_ids)
        max_new = min(sampling.max_new_tokens, self.context_length - width)
        if max_new < 1:
            raise ConfigError(
                f"prompt of {width} tokens leaves no room in the teacher's context of "
                f"{self.context_length}; shorten it or lower generate.max_new_tokens"
            )
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=self.device)  # [B, P]
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        greedy = sampling.temperature <= 0
        kwargs: dict[str, Any] = dict(
            do_sample=not greedy,
            max_new_tokens=max_new,
            min_new_tokens=0,
            pad_token_id=pad,
            eos_token_id=sorted(self.eos_ids),
            output_logits=True,
            return_dict_in_generate=True,
        )
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        # `generate` samples a padded batch from one generator: seeded by the batch's own row seeds when
        # given (rows differ from each other and from other batches; a row's stream still depends on
        # its batch, unlike the engine's and vLLM's per-request seeds), else by sampling.seed.
        if seeds is not None:
            torch.manual_seed(zlib.crc32(",".join(map(str, seeds)).encode()) & 0x7FFFFFFF)
        elif sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        result = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        generated = result.sequences[:, width:].cpu()  # [B, T]
        # `logits` are the raw model outputs before temperature/top-p: exactly the soft labels we want.
        step_ids, step_logprobs = zip(*(topk_from_logits(step, sampling.logprobs) for step in result.logits))
        topk_ids = np.stack(step_ids, axis=1)  # [B, T, k]
        topk_logprobs = np.stack(step_logprobs, axis=1)  # [B, T, k]
        completions = []
        for row, prompt in enumerate(prompt_ids):
            tokens = generated[row].tolist()
            length, finish = len(tokens), "length"
            for pos, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    length, finish = pos + 1, "stop"
                    break
            tokens = tokens[:length]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if finish == "length" and sampling.stop and any(s in text for s in sampling.stop):
                finish = "stop"
            completions.append(
                Completion(
                    prompt_ids=list(prompt),
                    completion_ids=tokens,
                    text=text,
                    finish_reason=finish,
                    topk_ids=topk_ids[row, :length],
                    topk_logprobs=topk_logprobs[row, :length],
                )
            )
        return completions

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[ScoredSequence]:
        seqs = check_score_inputs(sequences, starts, self.context_length)
        out: list[ScoredSequence] = []
        for begin in range(0, len(seqs), self.batch_size):
            batch = seqs[begin : begin + self.batch_size]
            batch_starts = list(starts[begin : begin + self.batch_size])
            width = max(len(s) for s in batch)
            pad = self.tokenizer.pad_token_id
            # Right padding: positions stay 0..L-1 without position_ids bookkeeping.
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=self.device)  # [B, L]
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
            for row, (seq, start) in enumerate(zip(batch, batch_starts)):
                predicting = logits[row, start - 1 : len(seq) - 1]  # [L - start, V] predicts tokens start..L-1
                out.append(score_row(torch.log_softmax(predicting.float(), dim=-1), seq[start:], k))
        return out
