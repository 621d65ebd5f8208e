"""Training checkpoints as plain files: safetensors for tensors, JSON for the rest (no pickle).

A checkpoint directory holds ``model.safetensors`` (the unwrapped student's state dict),
``optimizer.safetensors`` + the JSON param groups, ``rng.safetensors`` (torch RNG), and
``state.json`` (stage index, steps, tokens, every rank's data position, NumPy RNG states).
Where it is stored (Ray Train's storage or a local folder) is the reporter's business.

Under FSDP2 the parameters and optimizer state are DTensor shards: :func:`gather_sharded` (a
collective, every rank calls it) assembles the full state on rank 0's CPU with the
``torch.distributed.checkpoint.state_dict`` API, and the files are the same as without FSDP.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cluster import storage

STATE_FILE = "state.json"
# Written by rank 0 into a Ray Train checkpoint once its upload has returned: the checkpoint is whole
# even if Ray's controller never registered it (a worker that dies within a health-check interval of
# reporting loses that report; see ``ray_train.RayRuntime``).
COMPLETE_FILE = "complete.json"
STUDENT_PREFIX = "student."  # the training wrapper's name for the student (DistillModule.student)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _strip(name: str) -> str:
    return name[len(STUDENT_PREFIX) :] if name.startswith(STUDENT_PREFIX) else name


def gather_sharded(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]] | None:
    """Collective under FSDP2: (full weights, optimizer state by parameter name) on rank 0's CPU.

    Other ranks get empty dicts; None when ``module`` is not sharded (``save`` reads the model then).
    """
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    optim = get_optimizer_state_dict(module, optimizer, options=options)
    return ({_strip(k): v for k, v in weights.items()}, {_strip(k): v for k, v in optim.get("state", {}).items()})


def _named_optimizer_state(
    optimizer: torch.optim.Optimizer, names: dict[int, str], by_name: dict[str, dict[str, Any]] | None = None
) -> tuple[dict, list]:
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    states = by_name if by_name is not None else {names[id(p)]: s for p, s in optimizer.state.items()}
    for name, state in states.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous()
            else:
                steps[f"{name}::{key}"] = float(value)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, [groups, steps]


def save(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    sharded: tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]] | None = None,
) -> Path:
    """Write a checkpoint folder (callers pass a fresh temp dir); ``sharded`` is :func:`gather_sharded`'s."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    weights = sharded[0] if sharded is not None else model_state if model_state is not None else model.state_dict()
    # Tied embeddings share storage; safetensors refuses shared tensors, so clone them apart.
    save_file(
        {k: v.detach().to("cpu").clone().contiguous() for k, v in weights.items()}, str(out / "model.safetensors")
    )
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, (groups, scalars) = _named_optimizer_state(optimizer, names, sharded[1] if sharded else None)
    save_file(tensors, str(out / "optimizer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state()}, str(out / "rng.safetensors"))
    payload = dict(state, optimizer_groups=groups, optimizer_scalars=scalars)
    (out / STATE_FILE).write_text(json.dumps(payload, indent=1, default=_json_default))
    return out


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model (and optimizer) in place; returns ``state.json``."""
    src = Path(path)
    state = json.loads((src / STATE_FILE).read_text())
    weights = load_file(str(src / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Only tied weights may be absent (they load through their twin).
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise RuntimeError(f"checkpoint {src} does not match the model: missing {missing}, unexpected {unexpected}")
    if optimizer is not None:
        load_optimizer(src, model=model, module=model, optimizer=optimizer, state=state)
    rng = src / "rng.safetensors"
    if rng.exists():
        torch.set_rng_state(load_file(str(rng))["torch_rng"])
    return state


def load_optimizer(
    path: str | Path,
    *,
    model: torch.nn.Module,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any] | None = None,
) -> None:
    """Restore the optimizer built over ``module`` (``model`` wrapped, maybe FSDP2-sharded) in place."""
    src = Path(path)
    state = state if state is not None else json.loads((src / STATE_FILE).read_text())
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in load_file(str(src / "optimizer.safetensors")).items():
        name, field = key.split("::", 1)
        per_param.setdefault(name, {})[field] = value
    for key, value in state.get("optimizer_scalars", {}).items():
        name, field = key.split("::", 1)
        per_param.setdefault(name, {})[field] = torch.tensor(value)
    saved_groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state.get("optimizer_groups", [])
    ]
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fqn = {id(p): n for n, p in module.named_parameters()}
        groups = [
            {**saved, "params": [fqn[id(p)] for p in group["params"]]}
            for group, saved in zip(optimizer.param_groups, saved_groups)
        ]
        set_optimizer_state_dict(
            module,
            optimizer,
            {"state": {STUDENT_PREFIX + n: s for n, s in per_param.items()}, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True),
        )
        return
    by_name = dict(model.named_parameters())
    for name, fields in per_param.items():
        for field, value in fields.items():
            optimizer.state[by_name[name]][field] = value.to(by_name[name].device) if value.dim() else value
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update(saved)


class LocalCheckpoints:
    """Checkpoints in a local folder (the no-Ray path): ``checkpoint_{step:07d}``, written temp + rename."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Path | None:
        if not self.root.exists():
            return None
        found = sorted(p for p in self.root.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
        return found[-1] if found else None

    def commit(self, staged: Path, step: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = storage.publish_dir(staged, self.root / f"checkpoint_{step:07d}")
        found = sorted(p for p in self.root.iterdir() if p.name.startswith("checkpoint_"))
        for old in found[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def stage_dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=self.root))
