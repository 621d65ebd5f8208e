"""Hugging Face save/load, generate(), and the stock Qwen2-MoE export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cluster.errors import ConfigError
from distill.student.export import export_qwen2_moe
from distill.student.hf import RaydistillMoeForCausalLM

from .conftest import tiny_student


def test_save_load_round_trip_is_exact(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_student(
        seed=1, shared_expert_intermediate_size=16, mlp_only_layers=[0], routing="topp", top_p=0.5, max_k=3
    )
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "raydistill_moe" and config["architectures"] == ["RaydistillMoeForCausalLM"]
    assert config["routing"] == "topp" and config["layer_types"][3] == "full_attention"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.experts.3.gate_proj.weight",
        "model.layers.1.mlp.experts.0.down_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.shared_expert.up_proj.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert name in names, name
    assert isinstance(AutoConfig.from_pretrained(str(tmp_path)), type(model.config))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert isinstance(loaded, RaydistillMoeForCausalLM)
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)
    assert loaded.generation_config.top_p in (None, 1.0)  # the router's top_p is not a sampling setting


def test_tied_embeddings_are_saved_once_and_stay_tied(tmp_path):
    model = tiny_student(seed=2, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = RaydistillMoeForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def _greedy_full_forward(model, prompt: list[int], steps: int) -> list[int]:
    """The reference: re-run the whole sequence every step, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor(seq)[None]).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("left_padding", [False, True])
def test_generate_uses_its_cache_and_matches_a_full_forward_greedy_loop(left_padding):
    # initializer_range 0.1: logits are large enough that the argmax depends on the context (checked
    # below), so a generate() that drops its cache between steps cannot pass.
    model = tiny_student(seed=4, initializer_range=0.1)
    prompts = (
        [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]
        if left_padding
        else [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    )
    width, steps = 11, 20
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    assert bool((mask == 0).any()) == left_padding
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert out.shape == (2, width + steps)
    for b, p in enumerate(prompts):
        expected = _greedy_full_forward(model, p, steps)
        assert out[b, width:].tolist() == expected, b
        # The context matters: the last token alone predicts something else at some step.
        with torch.no_grad():
            alone = [int(model(torch.tensor([[t]])).logits[0, -1].argmax()) for t in [p[-1], *expected[:-1]]]
        assert alone != expected, "initializer_range too small: the argmax ignores the context"
    no_cache = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(out, no_cache)


def test_cached_decode_logits_equal_a_full_forward():
    model = tiny_student(seed=5, initializer_range=0.1)
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        full = model(ids).logits  # [2, 9, V]
        prefill = model(ids[:, :6], use_cache=True)
        cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
        for t in range(6, 9):
            step = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(step.logits[:, -1], full[:, t], rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="not both"):
        model(ids[:, :1], cache=cache, past_key_values=cache)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"shared_expert_intermediate_size": 24, "mlp_only_layers": [0], "tie_word_embeddings": True},
        {
            "norm_topk_prob": False,
            "attention_bias": True,
            "num_experts_per_tok": 1,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        },
    ],
)
def test_export_to_qwen2_moe_matches_our_logits(tmp_path, overrides):
    from transformers import Qwen2MoeForCausalLM

    model = tiny_student(seed=6, initializer_range=0.1, **overrides)
    if overrides.get("attention_bias"):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.1)
    src, out = tmp_path / "student", tmp_path / "qwen"
    model.save_pretrained(str(src))
    export_qwen2_moe(str(src), str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and "auto_map" not in config
    assert config["layer_types"] == model.student_config.layer_types and config["use_sliding_window"] is True
    qwen = Qwen2MoeForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert qwen.config.sliding_window == 8 and qwen.config.layer_types == model.student_config.layer_types
    window = model.student_config.sliding_window
    ids = torch.randint(0, 96, (2, 5 * window))  # well past the sliding window
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # and a left-padded row
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = qwen(ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max().item() < 1e-4
    # Sanity: the window matters here, so a wrong sliding setup could not pass.
    full = model.student_config.replace(layer_types=["full_attention"] * 4)
    all_full = RaydistillMoeForCausalLM.from_student_config(full)
    all_full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (all_full.eval()(ids).logits - model(ids).logits).abs().max().item() > 1e-3


def test_export_refuses_top_p_students(tmp_path):
    model = tiny_student(routing="topp", top_p=0.5)
    with pytest.raises(ConfigError, match="cannot export a routing: topp student to qwen2_moe"):
        export_qwen2_moe(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6:FutureWarning")  # transformers 5.x renames
@pytest.mark.parametrize(
    "overrides", [dict(), dict(routing="topp", top_p=0.6, max_k=3, shared_expert_intermediate_size=16)]
)
def test_gradient_checkpointing_gives_the_same_gradients(overrides):
    """``gradient_checkpointing_enable()`` (TRL / HF Trainer) works and recomputes each layer in backward."""
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))

    def grads(model):
        calls = []
        hook = model.model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        hook.remove()
        return (
            out.loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            len(calls),
        )

    model = tiny_student(seed=3, **overrides).train()
    loss, ref, calls = grads(model)
    assert calls == 1
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt, got, calls = grads(model)
    assert calls == 2  # forward + the recompute in backward
    torch.testing.assert_close(loss_ckpt, loss)
    assert got.keys() == ref.keys() and any("mlp.gate.weight" in n for n in got)  # router grads via the aux loss
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    model.eval()
    with torch.no_grad():  # inference and generate() are unaffected
        assert model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    model.gradient_checkpointing_disable()
    assert grads(model.train())[2] == 1
