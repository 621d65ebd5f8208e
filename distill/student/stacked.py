"""Inference weights built from several parameters (fused q/k/v, the MoE block's dense path), cached.

The cache lives on the module and is rebuilt when any source parameter changes: new storage (a
model swap, ``load_state_dict(assign=True)``), an in-place update (its ``_version``), another dtype
or device. Built weights are detached: these paths run without autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def cached_stack(module: nn.Module, attr: str, params: Sequence[torch.Tensor], build: Callable[[], Any]) -> Any:
    """``build()``, kept in ``module.<attr>`` as ``(key, value)`` until one of ``params`` changes."""
    # A new dtype or device means new storage, so its data_ptr changes too.
    key = tuple((p.data_ptr(), p._version) for p in params)
    cached = getattr(module, attr)
    if cached is None or cached[0] != key:
        cached = (key, build())
        setattr(module, attr, cached)
    return cached[1]
