"""Inference weights built from one or more tensors (fused q/k/v, the MoE block's dense path, the
engine's packed oneDNN weights), cached.

The cache lives on its owner (a module, or the tensor itself) and is rebuilt when any source tensor
changes: new storage (a model swap, ``load_state_dict(assign=True)``), an in-place update (its
``_version``), another dtype or device. Built weights are detached: these paths run without autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def _version_key(tensor: torch.Tensor) -> tuple[int, int]:
    # Inference tensors (stacks built under inference_mode) have no version counter; nothing changes
    # them in place (a changed source parameter gives a new stack).
    return tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version


def cached_stack(owner: Any, attr: str, params: Sequence[torch.Tensor], build: Callable[[], Any]) -> Any:
    """``build()``, kept in ``owner.<attr>`` as ``(key, value)`` until one of ``params`` changes."""
    # A new dtype or device means new storage, so its data_ptr changes too.
    key = tuple(map(_version_key, params))
    cached = getattr(owner, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, build())
        setattr(owner, attr, cached)
    return cached[1]
