"""The engine's CPU kernels: oneDNN for large fp32 linears, int8 weight-only linears (``serve.dtype: int8``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serve.engine.kernels import (
    ONEDNN_MIN_WEIGHT,
    Int8Experts,
    Int8WeightLinear,
    OneDNNLinear,
    onednn_linear_works,
    quantize_int8_weights,
    use_onednn_linears,
)
from tests.serve.engine.conftest import encode


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1024, 600)
        self.small = nn.Linear(600, 16)
        self.head = nn.Linear(600, 1024, bias=False)  # 614,400 weights >= ONEDNN_MIN_WEIGHT
        self.head.weight = self.embed.weight  # tied, as SmolLM2's

    def forward(self, x):
        return self.head(x), self.small(x)


def test_onednn_switches_only_the_large_linears_and_computes_what_f_linear_does():
    if not onednn_linear_works():
        pytest.skip("this torch has no oneDNN linear")  # the engine then keeps F.linear (tested below)
    torch.manual_seed(0)
    model = TwoLinears()
    reference = {name: (m.weight.clone(), m.bias) for name, m in (("head", model.head), ("small", model.small))}
    keys = set(model.state_dict())
    assert model.head.weight.numel() >= ONEDNN_MIN_WEIGHT > model.small.weight.numel()

    assert use_onednn_linears(model) == ["head"]
    assert type(model.head) is OneDNNLinear and type(model.small) is nn.Linear
    assert model.head.weight is model.embed.weight and set(model.state_dict()) == keys  # still tied, same names
    for shape in ((5, 600), (2, 3, 600)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            got, _ = model(x)
        want = F.linear(x, *reference["head"])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # summation order differs, nothing else

    # With autograd on, the module is a plain linear again: gradients reach the (tied) weight.
    x = torch.randn(4, 600, requires_grad=True)
    model(x)[0].sum().backward()
    torch.testing.assert_close(x.grad, model.embed.weight.sum(0).expand(4, -1).detach(), rtol=1e-4, atol=1e-4)
    assert model.embed.weight.grad is not None


def test_the_engine_uses_onednn_for_the_head_and_its_logprobs_stay_those_of_the_reference(make_engine, tiny_llama):
    engine = make_engine()
    if not onednn_linear_works():
        assert engine.onednn_linears == []
        return
    assert engine.onednn_linears == ["lm_head"]  # tiny LLaMA: 49152 x 32 head; its 32x64 MLPs stay on F.linear
    assert engine.stats()["onednn_linears"] == 1
    assert make_engine(onednn=False).onednn_linears == []
    ids = list(range(100, 140))
    with torch.no_grad():
        want = torch.log_softmax(tiny_llama(torch.tensor([ids])).logits[0].float(), dim=-1)
    got = torch.log_softmax(engine.forward_logits(ids), dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_fused_attention_and_moe_matmuls_switch_by_their_stacked_size_and_keep_the_models_numbers(tiny_moe_student):
    """The student's fused inference matmuls (q/k/v stacked; every expert's gate/up side by side) go to
    oneDNN when the stacked weight is large enough, and a decode-sized forward keeps its logits."""
    import copy

    from distill.student.attention import Attention
    from distill.student.moe import MoEBlock

    if not onednn_linear_works():
        pytest.skip("this torch has no oneDNN linear")
    model = copy.deepcopy(tiny_moe_student).eval()
    ids = torch.randint(0, 1000, (6, 1))  # 6 one-token rows: 6 x max_k covers every expert, the dense MoE path
    with torch.inference_mode():
        want = model(ids).logits
    assert not any(".layers." in name for name in use_onednn_linears(copy.deepcopy(model)))  # 32 wide: too small
    stacked_qkv = (4 + 2 * 2) * 8 * 32  # (NH + 2 KVH) x D rows of the 32-wide hidden size
    switched = use_onednn_linears(model, min_weight=stacked_qkv)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (Attention, MoEBlock))]
    assert len(blocks) == 8 and all(n in switched and m.matmul is not F.linear for n, m in blocks)
    assert "model.layers.0.self_attn.o_proj" not in switched  # 32 x 32: a plain linear below the threshold
    model_q = copy.deepcopy(model)
    model_q.model.layers[0].self_attn.matmul = lambda x, w, b: F.linear(x, w * 1.01, b)  # a skewed kernel shows
    with torch.inference_mode():
        assert not torch.allclose(model_q(ids).logits, want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_int8_linear_rounds_each_weight_row_to_its_own_scale():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight[3] *= 100  # an outlier row: per-row scales keep the other rows precise
    q = Int8WeightLinear.from_linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (48, 64)
    assert int(q.weight_int8.abs().amax(dim=1).min()) == 127  # every row uses its full range
    dequantized = q.weight_int8.float() * q.scale.float()[:, None]
    weight = linear.weight.detach()
    row_error = (dequantized - weight).abs().amax(dim=1) / weight.abs().amax(dim=1)
    assert float(row_error.max()) < 1 / 127  # half a step, plus the bf16 rounding of the scale

    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        got = q(x)
    exact = F.linear(x.to(torch.bfloat16).float(), dequantized, linear.bias)  # the kernel's own arithmetic
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-2)
    fp32 = linear(x).detach()
    assert float((got - fp32).norm() / fp32.norm()) < 0.02  # int8 weights: ~1% off the fp32 layer


def test_quantize_int8_weights_converts_linears_and_experts_and_keeps_a_tied_embedding(tiny_moe_student):
    import copy

    from distill.student.experts import Experts, SwiGLU

    model = copy.deepcopy(tiny_moe_student)
    embedding = model.model.embed_tokens.weight.detach().clone()
    converted = quantize_int8_weights(model)
    assert "lm_head" in converted and "model.layers.0.self_attn.q_proj" in converted
    blocks = [name for name, m in model.named_modules() if isinstance(m, Experts)]
    assert blocks and all(isinstance(model.get_submodule(b), Int8Experts) for b in blocks)
    assert set(blocks) <= set(converted) and not any(".experts." in name for name in converted)
    assert all(isinstance(model.get_submodule(n), (Int8WeightLinear, Int8Experts)) for n in converted)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding stays fp32
    mlps = [m for m in model.modules() if isinstance(m, SwiGLU)]
    assert mlps and not any(m.fused_gate_up for m in mlps)  # no fp32 gate/up stack of int8 weights


def test_int8_experts_compute_each_routed_expert_on_its_int8_weights(tiny_moe_student):
    """Int8Experts.dispatch = sum over each token's experts of weight * SwiGLU with the dequantized weights
    (bf16 activations inside the matmuls), for a single stream and for a batch (no grouped fp32 path)."""
    import copy

    block = copy.deepcopy(tiny_moe_student.model.layers[0].mlp.experts)
    fp32 = copy.deepcopy(block)
    Int8Experts.convert(block)

    def dequantized(index):
        gate_up, gs, down, ds = block._int8[index]
        return gate_up.float() * gs.float()[:, None], down.float() * ds.float()[:, None]

    torch.manual_seed(0)
    for n in (1, 12):
        x = torch.randn(n, 32)
        experts = torch.stack([torch.randperm(4)[:2] for _ in range(n)])  # [N, 2]
        weights = torch.rand(n, 2)
        with torch.inference_mode():
            got = block.dispatch(x, experts, weights)
            want = torch.zeros_like(x)
            for t in range(n):
                for k in range(2):
                    gate_up, down = dequantized(int(experts[t, k]))
                    h = F.linear(x[t : t + 1].bfloat16().float(), gate_up)
                    act = F.silu(h[:, :16]) * h[:, 16:] * weights[t, k]
                    want[t] += F.linear(act.bfloat16().float(), down)[0]
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            reference = fp32.dispatch(x, experts, weights)
            assert float((got - reference).norm() / reference.norm()) < 0.03  # ~1% off the fp32 experts


def test_an_int8_engine_serves_the_tiny_model_close_to_fp32(make_engine, tokenizer):
    """Greedy equality is no promise of a quantized model; its next-token distributions stay close."""
    from serve.engine.types import GenerationRequest, SamplingOptions

    fp32, int8 = make_engine(), make_engine(dtype="int8")
    assert isinstance(int8.model.lm_head, Int8WeightLinear)
    ids = encode(tokenizer, "The capital of France is Paris, and the capital of Italy is")
    p = torch.log_softmax(fp32.forward_logits(ids), -1)
    q = torch.log_softmax(int8.forward_logits(ids), -1)
    kl = (p.exp() * (p - q)).sum(-1)  # [T]
    assert float(kl.max()) < 1e-2 and float(kl.mean()) < 2e-3
    request = GenerationRequest("a", ids, SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True))
    (last,) = int8.generate([request])["a"][-1:]
    assert last.finished and last.completion_tokens == 8


def test_int8_is_refused_for_vllm_with_the_fix():
    from cluster.errors import ConfigError
    from serve.section import ServeSection

    with pytest.raises((ValueError, ConfigError), match=r"serve.dtype int8.*serve.backend: engine"):
        ServeSection(dtype="int8", backend="vllm")
    with pytest.raises((ValueError, ConfigError), match=r"serve.dtype int8"):
        ServeSection(dtype="int8", num_gpus=1)  # backend auto -> vLLM
    assert ServeSection(dtype="int8").dtype == "int8"


def test_dense_ffn_gate_up_goes_to_onednn_but_routed_experts_keep_f_linear():
    """A dense SwiGLU's stacked gate/up switches by its size; a routed expert's of the same size stays on
    F.linear (its few-token matmuls are as fast there), and the dense FFN's output is unchanged."""
    from distill.student.experts import Experts, SwiGLU

    if not onednn_linear_works():
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    model = nn.ModuleDict({"dense": SwiGLU(64, 2048), "experts": Experts(2, 64, 1024)})  # 2 x 1024 x 64 = 2^17
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = model["dense"](x)
    switched = use_onednn_linears(model)
    assert "dense" in switched and model["dense"].matmul is not F.linear
    assert not any(name.startswith("experts") and name.count(".") == 1 for name in switched)
    assert all(expert.matmul is F.linear for expert in model["experts"])
    with torch.inference_mode():
        torch.testing.assert_close(model["dense"](x), want, rtol=1e-4, atol=1e-4)


def test_onednn_weights_are_packed_once_and_repacked_when_they_change():
    """The oneDNN path reorders each weight once into a packed layout kept on the tensor: the same
    numbers as F.linear, the same packed copy on the next call, a new one after an in-place change
    (a parameter) or for another tensor (a rebuilt stack, an inference tensor)."""
    from serve.engine.kernels import onednn_or_plain_linear, packed_weight

    if not onednn_linear_works():
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        got = onednn_or_plain_linear(x, linear.weight, linear.bias)
        torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=1e-4, atol=1e-4)
        first = packed_weight(linear.weight)
        assert packed_weight(linear.weight) is first and first.layout == torch._mkldnn
    with torch.no_grad():
        linear.weight.mul_(-1.0)  # in place: the version moves, the packed copy is redone
    with torch.inference_mode():
        assert packed_weight(linear.weight) is not first
        torch.testing.assert_close(
            onednn_or_plain_linear(x, linear.weight, None), F.linear(x, linear.weight), rtol=1e-4, atol=1e-4
        )
        stacked = torch.cat([linear.weight, linear.weight])  # an inference tensor: no version counter
        torch.testing.assert_close(onednn_or_plain_linear(x, stacked, None), F.linear(x, stacked), rtol=1e-4, atol=1e-4)
