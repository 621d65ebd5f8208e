"""A fake run directory with tiny models (byte-level tokenizer, vocab 259): teacher, student, init.

Nothing here depends on the training code: the files are laid out as the run-dir contract says
(``data/generate``, ``train/{manifest.json,metrics.jsonl,init/}``, ``student/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def byte_tokenizer():
    """Byte-level BPE without merges: one token per UTF-8 byte, plus <pad> <s> </s> (vocab 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init: a peaked, varied distribution, not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model


def student_config(vocab: int, **overrides):
    from distill.student.config import StudentConfig
    from tests.distill.student.conftest import TINY_FIELDS

    shape = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, head_dim=8, sliding_window=16)
    shape.update(moe_intermediate_size=16, max_position_embeddings=512, tie_word_embeddings=True)
    routing = dict(routing="topp", top_p=0.7, min_k=1, max_k=3, num_experts_per_tok=None)
    norms = dict(rope_theta=10000.0, rms_norm_eps=1e-6, layer_types=["sliding_attention", "full_attention"])
    base = {**TINY_FIELDS, **shape, **routing, **norms}
    base.update(overrides)
    return StudentConfig(**{k: v for k, v in base.items() if v is not None})  # None drops a key (top-k: no top_p)


def save(model, tokenizer, out: Path, with_tokenizer: bool = True) -> str:
    model.save_pretrained(str(out))
    if with_tokenizer:
        tokenizer.save_pretrained(str(out))
    return str(out)


def teacher_rows(teacher, tokenizer, prompt_ids: list[str], k: int = 5, seed: int = 0) -> list[dict]:
    """Rows in the Parquet schema whose soft labels are the teacher's real top-k over its own text."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in prompt_ids:
        prompt = prompt_text(pid)
        completion = " ".join(rng.choice(WORDS, int(rng.integers(4, 9)))) + "."
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = [1] + p_ids + c_ids
        with torch.no_grad():
            lp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0].float(), -1)  # [L, V]
        plen = 1 + len(p_ids)
        top = lp[plen - 1 : len(ids) - 1].topk(k, dim=-1)
        rows.append(
            {
                "prompt_id": pid,
                "prompt": prompt,
                "messages": None,
                "completion": completion,
                "input_ids": ids,
                "prompt_len": plen,
                "completion_len": len(c_ids),
                "topk_ids": top.indices.tolist(),
                "topk_logprobs": top.values.tolist(),
                "teacher": "tiny@0",
                "sampling": "{}",
                "finish_reason": "stop",
                "quality": None,
                "source": "test",
            }
        )
    return rows


WORDS = ["the", "cat", "sat", "on", "a", "warm", "mat", "and", "slept", "well", "today"]


def prompt_text(pid: str) -> str:
    """The prompt of a fake row: a function of its id (the held-out split hashes the prompt)."""
    rng = np.random.default_rng(int(pid.rsplit("-", 1)[-1]))
    return "Tell me: " + " ".join(rng.choice(WORDS, 3))


def heldout_ids(n_held: int, n_train: int, fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    from distill.data.split import row_is_heldout

    held, train = [], []
    i = 0
    while len(held) < n_held or len(train) < n_train:
        pid = f"prompt-{i}"
        row = {"prompt_id": pid, "source": "test", "prompt": prompt_text(pid), "messages": None}
        (held if row_is_heldout(row, fraction, seed) else train).append(pid)
        i += 1
    return held[:n_held], train[:n_train]


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory, tokenizer) -> dict:
    """``{"config": yaml path, "run": run dir, "teacher": dir, "student": dir, "init": dir, "root": tmp}``."""
    from distill.data.schema import to_table
    from distill.data.shards import write_parquet
    from distill.student.init import init_from_teacher

    root = tmp_path_factory.mktemp("evalrun")
    teacher = tiny_llama(tokenizer)
    teacher_dir = save(teacher, tokenizer, root / "teacher")
    run = root / "runs" / "t" / "run1"
    held, train = heldout_ids(6, 10)
    rows = teacher_rows(teacher, tokenizer, held + train)
    write_parquet(str(run / "data" / "generate" / "part-0.parquet"), to_table(rows))
    (run / "data" / "generate" / "manifest.json").write_text(json.dumps({"rows": len(rows), "wall_seconds": 120.0}))

    init = init_from_teacher(teacher_dir, student_config(len(tokenizer)))
    init_dir = save(init, tokenizer, run / "train" / "init")
    # "Trained" student: the init nudged towards the teacher is not needed; a second seed differs.
    student = init_from_teacher(teacher_dir, student_config(len(tokenizer)), seed=1)
    student_dir = save(student, tokenizer, run / "student")
    (run / "train" / "manifest.json").write_text(json.dumps({"status": "done", "steps": 20, "wall_seconds": 240.0}))
    lines = [
        {
            "step": s,
            "stage": 0 if s < 10 else 1,
            "stage_name": "ce" if s < 10 else "kd",
            "loss": 5.0 / (1 + s),
            "lr": 1e-3,
        }
        for s in range(20)
    ]
    lines += [{"event": "heldout", "stage": 1, "step": 19, "kl": 0.3, "top1": 0.5, "ce": 2.0}]
    (run / "train" / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    corpus = root / "human.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 8 + "\n\nA second paragraph, with café.\n")
    config = root / "eval.yaml"
    config.write_text(f"""name: t
workdir: {root / "runs"}
teacher: {{model: {teacher_dir}}}
eval:
  corpora: [{corpus}]
  builtin_corpus: null
  hardware_cost_per_hour: 2.0
  window: 64
  speed: {{batch_sizes: [1, 2], prompt_tokens: 8, new_tokens: 4}}
""")
    return {
        "config": str(config),
        "run": str(run),
        "teacher": teacher_dir,
        "student": student_dir,
        "init": init_dir,
        "root": root,
        "heldout": held,
    }


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: one thread for this package's tests only (set at
    import, it would change every later test of the session)."""
    from tests.conftest import torch_threads

    with torch_threads(1):
        yield
