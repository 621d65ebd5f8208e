"""CPU matmul kernels for the engine: oneDNN for large fp32 linears, and int8 weight-only linears (``serve.dtype: int8``).

**oneDNN.**
``F.linear`` on CPU calls MKL's sgemm. For the LM head of SmolLM2 and our students ([*, 576] x
[576, 49152], 113 MB in fp32, the largest matmul of a decode step) it runs at about half the speed of
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile``'s CPU backend emits for
a frozen linear). Measured on the 2-core AMD EPYC dev machine, 30 distinct weights per shape so none
stays in cache (``bench/engine_kernels.py``, 2 threads, 2026-11-28):

==============================  ========  ========  =====
[M, in] x [in, out]              F.linear  oneDNN    gain
==============================  ========  ========  =====
[1, 576] x [576, 49152] (head)  10.0 ms   5.2 ms    1.91x
[16, 576] x [576, 49152]        20.5 ms   10.1 ms   2.02x
[16, 576] x [576, 3072] (MoE)   1029 us   653 us    1.58x
[1, 576] x [576, 960] (q,k,v)   188 us    97 us     1.95x
[16, 576] x [576, 960]          314 us    211 us    1.48x
[16, 576] x [576, 1536]         486 us    333 us    1.46x
[16, 1536] x [1536, 576]        432 us    284 us    1.52x
[1, 576] x [576, 576] (o)       104 us    86 us     1.22x
[16, 576] x [576, 576]          191 us    123 us    1.55x
[16, 576] x [576, 384]          124 us    94 us     1.33x
[1, 576] x [576, 192]            12 us    26 us     0.45x
[16, 576] x [576, 192]           58 us    53 us     1.10x
==============================  ========  ========  =====

Small weights gain little or lose (oneDNN's fixed cost per call), so only weights of at least
``ONEDNN_MIN_WEIGHT`` elements switch, and so do the fused inference matmuls of the model's
attention (q, k and v stacked: one call instead of three), dense and shared SwiGLU FFNs (gate and up
stacked) and MoE blocks (every expert's gate/up, the router and the shared-expert gate side by side).
Each weight is packed once into oneDNN's layout (:func:`packed_weight`). The results equal
``F.linear``'s up to fp32 summation order (~1e-5 relative); nothing switches where autograd is on,
off CPU, or outside fp32.

**int8 weights** (:func:`quantize_int8_weights`). Batch-1 decode reads every weight once per token, so
its speed is the weight bytes. Each linear's weight is stored as int8 with one absmax scale per output
row, and multiplied by bf16 activations in ``torch._weight_int8pack_mm`` (torch's CPU kernel for int8
weight-only matmuls), and so are the MoE experts' (:class:`Int8Experts`);
embeddings, norms, the router, attention scores and the KV cache stay fp32. Dynamic int8 (int8 activations too,
``torch.ao``'s ``quantize_dynamic``) was about as fast (2.2x fp32 at batch 1) but
cost SmolLM2 +33% bits/byte on fortunes; weight-only costs +0.03% (``bench/int8_serving.py``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from distill import onednn
from distill.student.attention import Attention
from distill.student.experts import Experts, SwiGLU
from distill.student.moe import MoEBlock
from distill.student.stacked import cached_stack

log = logging.getLogger("raydistill.engine")

# elements: 576x384 (a shared expert) and up; not 576x192 (k or v alone) or 576x144 (one expert)
ONEDNN_MIN_WEIGHT = 1 << 17


# The batch size oneDNN lays packed weights out for; measured at M = 1..256 on [576, 3072], a layout
# for 16 or 64 rows serves every M as well as its own (a layout for 1 row is no faster than unpacked).
PACK_ROWS_HINT = 64


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered once into oneDNN's blocked layout (an opaque mkldnn tensor), kept on
    the weight tensor itself and redone when its storage or version changes.

    A packed weight skips the per-call reorder an unpacked fp32 weight costs: [16, 576] x [576, 3072]
    647 -> 385 us, the [16, 576] x [576, 49152] head 10.1 -> 5.4 ms (2 threads, this machine). It is a
    copy: the engine holds each switched weight twice (the model's own tensor stays for everything
    else: embedding lookups, autograd, saving)."""
    return cached_stack(
        weight,
        "_raydistill_packed",
        (weight,),
        lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT),
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return onednn.onednn_linear(x, packed_weight(weight), bias)


@functools.cache
def onednn_linear_works() -> bool:
    """oneDNN's linear works (:func:`distill.onednn.onednn_linear_works`) and so does it on a packed
    weight: it agrees with ``F.linear``."""
    return onednn.onednn_linear_works() and onednn.agrees_with_linear(_onednn_linear)


def onednn_or_plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed by oneDNN for fp32 CPU tensors outside autograd."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return F.linear(x, weight, bias)
    return _onednn_linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` computed by oneDNN in inference; ``F.linear`` wherever gradients or other dtypes
    or devices are involved. Same parameters and state dict as ``nn.Linear`` (tied weights stay tied)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_or_plain_linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module, min_weight: int = ONEDNN_MIN_WEIGHT) -> list[str]:
    """Switch ``model``'s fp32 CPU ``nn.Linear`` modules with at least ``min_weight`` weight elements to
    :class:`OneDNNLinear` in place, and so the fused inference matmuls of its attention layers (q, k, v
    stacked), SwiGLU FFNs (gate and up stacked) and MoE blocks (gate/up of every expert side by side) where
    those are as large; the names switched (none where oneDNN is missing)."""
    if not onednn_linear_works():
        return []
    switched = []
    # A routed expert's fused gate/up ([c, H] x [H, 2I], c a few tokens) is as fast or faster on F.linear.
    routed = {id(mlp) for module in model.modules() if isinstance(module, Experts) for mlp in module}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            if not module.fused_qkv:
                continue  # int8: q, k and v are int8 linears of their own, no fused fp32 matmul
            weight = module.q_proj.weight
            fused_rows = sum(m.out_features for m in (module.q_proj, module.k_proj, module.v_proj))
        elif isinstance(module, MoEBlock):
            if not module.dense_max_tokens:
                continue  # int8 experts: the routed path only, no fused fp32 matmul
            weight = module.experts[0].gate_proj.weight
            fused_rows = 2 * sum(m.gate_proj.out_features for m in module.mlps())  # gate and up, every expert + shared
        elif isinstance(module, SwiGLU):
            if not module.fused_gate_up or id(module) in routed:
                continue  # int8 (gate and up are int8 linears of their own), or a routed expert
            weight = module.gate_proj.weight
            fused_rows = 2 * module.gate_proj.out_features
        elif type(module) is nn.Linear:
            weight, fused_rows = module.weight, module.weight.shape[0]
        else:
            continue
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or fused_rows * weight.shape[1] < min_weight:
            continue
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
        else:
            module.matmul = onednn_or_plain_linear
        switched.append(name)
    return switched


# ------------------------------------------------------------------------------------------- dtype
def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where that cannot be read."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_cpu_dtype() -> str:
    """The engine's fastest dtype on this CPU: ``bfloat16`` where the cores have AMX bf16 tile units (Intel
    Xeon since Sapphire Rapids; oneDNN runs bf16 matmuls on them), else ``float32`` (AVX2 / AVX-512 without
    AMX: no bf16 matmul hardware, bf16 is slower there). SmolLM2 as the generate stage's teacher, 64 shipped
    instructions at 32 streams on a 2-core AMX Xeon: 196-235 tokens/s in bfloat16 against 144-147 in float32,
    for +0.07% bits/byte on fortunes (``bench/int8_serving.py --dtype bfloat16``)."""
    return "bfloat16" if "amx_bf16" in cpu_flags() else "float32"


# ------------------------------------------------------------------------------------------- int8 weights
@functools.cache
def int8_weights_work() -> bool:
    """``torch._weight_int8pack_mm`` exists on CPU and computes x @ (q * scale).T."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, q = torch.randn(3, 64, generator=gen), torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int8)
        scale = torch.rand(32, generator=gen) + 0.5
        got = torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scale.to(torch.bfloat16)).float()
        want = F.linear(x, q.float() * scale[:, None])
        return torch.allclose(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))
    except Exception as exc:  # noqa: BLE001 - a torch without the kernel
        log.info("int8 weight-only matmul unavailable (%s)", exc)
        return False


class Int8WeightLinear(nn.Module):
    """A linear layer with int8 weights, one absmax scale per output row, and bf16 activations inside the
    matmul; input and output keep their dtype. Inference only (no gradients).

    x [..., in] -> [..., out];  weight_int8 [out, in];  scale [out] (bf16);  bias [out] or None (fp32).
    """

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(*_int8_rows(linear.weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _int8_mm(x.reshape(-1, self.in_features), self.weight_int8, self.scale)  # [N, out]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], bf16 scale [out]): one absmax scale per output row."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(torch.bfloat16)


def _int8_mm(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [N, in] (any float dtype) @ (weight_int8 * scale).T -> [N, out] in x's dtype; bf16 inside."""
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), weight_int8, scale).to(x.dtype)


class Int8Experts(Experts):
    """:class:`~distill.student.experts.Experts` whose inference runs each routed expert on int8 weights
    (gate and up fused, one scale per output row); training-time dispatch is unchanged. Its MoE block's
    dense small-batch path (fp32 matmuls over every expert) is off: each step reads only the weights
    of the experts its tokens chose, in int8."""

    _int8: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def convert(cls, experts: Experts) -> Int8Experts:
        packed = []
        for expert in experts:
            gate_up = torch.cat([expert.gate_proj.weight, expert.up_proj.weight])  # [2I, H]
            packed.append((*_int8_rows(gate_up), *_int8_rows(expert.down_proj.weight)))
        experts.__class__ = cls
        experts._int8 = packed
        return experts  # type: ignore[return-value]

    def _expert_into(self, index: int, xe: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        gate_up, gate_up_scale, down, down_scale = self._int8[index]
        size = down.shape[1]  # I
        h = _int8_mm(xe, gate_up, gate_up_scale)  # [c, 2I]
        act = F.silu(h[:, :size]).mul_(h[:, size:]).mul_(scale)  # [c, I]
        out.copy_(_int8_mm(act, down, down_scale))  # [c, H]


def quantize_int8_weights(model: nn.Module) -> list[str]:
    """Give ``model`` int8 weights in place: each ``nn.Linear`` becomes :class:`Int8WeightLinear` and each
    MoE :class:`Experts` block :class:`Int8Experts`; the names converted. A tied LM head gets its own int8
    copy and the embedding stays as it is."""
    from cluster.errors import ConfigError

    if not int8_weights_work():
        raise ConfigError(
            "serve.dtype: int8 needs torch's CPU int8 weight-only kernel (torch._weight_int8pack_mm), which "
            f"this torch {torch.__version__} lacks; use serve.dtype float32 or bfloat16"
        )
    blocks = {name for name, module in model.named_modules() if isinstance(module, Experts)}
    converted = []
    for module in model.modules():
        if isinstance(module, MoEBlock):
            module.dense_max_tokens = 0  # its shared expert and experts are int8 now: the routed path only
        if isinstance(module, Attention):
            module.fused_qkv = False  # q, k and v are int8 linears of their own now
        if isinstance(module, SwiGLU):
            module.fused_gate_up = False  # gate and up likewise (Int8Experts packs its own)
    for name, module in list(model.named_modules()):
        if name in blocks:
            Int8Experts.convert(module)
            converted.append(name)
        elif isinstance(module, nn.Linear) and not any(name.startswith(block + ".") for block in blocks):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Int8WeightLinear.from_linear(module))
            converted.append(name)
    return converted


__all__ = [
    "ONEDNN_MIN_WEIGHT",
    "onednn_or_plain_linear",
    "Int8Experts",
    "Int8WeightLinear",
    "OneDNNLinear",
    "int8_weights_work",
    "onednn_linear_works",
    "quantize_int8_weights",
    "use_onednn_linears",
]
