"""Offline KD vs on-policy vs mixed distillation at the same wall-clock budget (issue 15).

    python bench/on_policy.py --run RUN_DIR [--minutes 10] [--modes offline,on_policy,mixed]

``RUN_DIR`` is a quickstart run (``make demo`` writes one under ``runs/quickstart/``) with its teacher
data and ``train/init``, the quickstart's calibrated student at initialisation. Every mode starts
from a copy of that init, trains one stage of ``minutes`` wall-clock time (``stages[].minutes``:
sampling, labelling and optimizer steps all count) in this process, with the quickstart's settings
otherwise:

    offline    the quickstart's stage: forward KL on the stored teacher completions (top-k + tail)
    on_policy  GKD with lmbda 1: every micro-batch's prompts are completed by the current student and
               scored by the teacher labelling service (Ray actors); reverse KL over the teacher's
               top-k + the sampled token + tail
    mixed      the same with ``fraction: 0.5`` (half the micro-batches are stored teacher rows)

Then each student (and the init) is scored on the same data:

    own-sample KL   the student samples (T = 1, fixed seed) completions of the held-out prompts and the
                    teacher scores them: mean log q(y) - log p(y), the reverse KL on its own text
    held-out KL     forward KL on the held-out teacher completions (stored top-k + tail), top-1 agreement
    bits/byte       on the held-out teacher completions and on human text (the fortunes corpus)
    sample          the pipeline's sample prompt, greedy with the quickstart's repetition penalty

and printed side by side with the steps, completion tokens and time split of each run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from cluster.ray_init import quiet_hf_progress

quiet_hf_progress()  # before transformers is imported: no "Loading weights" bar per model load

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("offline", "on_policy", "mixed")


def stage_for(mode: str, base: dict, minutes: float, max_new_tokens: int) -> dict:
    """The quickstart's stage (routing, warmup, lr) with a wall-clock length and the mode's data/loss."""
    stage = {k: v for k, v in base.items() if k not in ("steps", "tokens", "minutes", "on_policy")}
    stage.update(name=mode, minutes=minutes)
    if mode != "offline":
        stage["loss"] = {"forward_kl": 0.0, "reverse_kl": 1.0}
        stage["on_policy"] = {
            "fraction": 1.0 if mode == "on_policy" else 0.5,
            "max_new_tokens": max_new_tokens,
            "temperature": 1.0,
            "k": 16,
        }
    return stage


def train(mode: str, cfg, source: Path, work: Path, minutes: float, max_new_tokens: int) -> tuple[Path, dict]:
    from distill.training.stage import run_train_stage

    run = work / mode
    shutil.copytree(source / "data", run / "data")
    shutil.copytree(source / "train" / "init", run / "train" / "init")
    base = cfg.train.stages[0].model_dump(mode="json", exclude_none=True)
    train_section = cfg.train.model_validate(
        {
            **cfg.train.model_dump(),
            "workers": 1,
            "export_qwen2_moe": False,
            "stages": [stage_for(mode, base, minutes, max_new_tokens)],
        }
    )
    cfg = cfg.model_copy(update={"train": train_section})
    print(f"\n== {mode}: {minutes} min", flush=True)
    manifest = run_train_stage(cfg, str(run), use_ray=False, show_progress=True)
    lines = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    split = {"sample_s": 0.0, "label_s": 0.0, "train_s": 0.0, "kl_sampled": []}
    for m in lines:
        for key in ("sample_s", "label_s", "train_s"):
            split[key] += m.get("on_policy", {}).get(key, 0.0)
        if "on_policy" in m and m["on_policy"]["labelled_tokens"]:
            split["kl_sampled"].append(m["on_policy"]["kl_sampled"])
    stage = manifest["stages"][0]
    return run / "student", {
        "steps": stage["steps"],
        "tokens": stage["tokens"],
        "seconds": stage.get("seconds"),
        **split,
    }


@torch.no_grad()
def own_sample_kl(student, teacher, prompts: list[list[int]], eos: set[int], max_new: int) -> float:
    """Mean over sampled tokens of log q(y) - log p(y): the student's reverse KL to the teacher on its own text."""
    from distill.training.on_policy import sample

    total, count = 0.0, 0
    for start in range(0, len(prompts), 8):
        batch = prompts[start : start + 8]
        gen = torch.Generator().manual_seed(1234 + start)
        samples = sample(student, batch, max_new_tokens=max_new, temperature=1.0, eos_ids=eos, generator=gen)
        for prompt, completion, q_lp in zip(samples.prompts, samples.completions, samples.student_logprobs):
            if not completion:
                continue
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(teacher(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)  # [T, V]
            p_lp = logp.gather(1, torch.tensor(completion)[:, None])[:, 0]
            total += float((torch.from_numpy(q_lp) - p_lp).sum())
            count += len(completion)
    return total / max(count, 1)


def sample_answer(student_dir: Path, prompt: str, max_tokens: int, repetition_penalty: float) -> str:
    from serve.engine.engine import LLMEngine
    from serve.engine.types import GenerationRequest, SamplingOptions

    engine = LLMEngine.from_pretrained(str(student_dir), max_batch_size=1)
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, repetition_penalty=repetition_penalty)
    outs = engine.generate([GenerationRequest("sample", ids, options)])["sample"]
    return "".join(o.text for o in outs).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a quickstart run dir with data/ and train/init")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per mode")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens the student samples per prompt")
    parser.add_argument("--config", default=str(ROOT / "pipelines/configs/quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from distill.eval import corpora
    from distill.eval.stage import HELDOUT, evaluate_model, heldout_rows, load_model, sample_penalty
    from distill.teacher.sources import eos_token_ids
    from pipelines.config import load_config

    source = Path(args.run).resolve()
    if not (source / "train" / "init" / "config.json").exists():
        raise SystemExit(f"{source}/train/init is missing: give a quickstart run that has trained (make demo)")
    work = Path(tempfile.mkdtemp(prefix="on-policy-"))
    # eval.samples=0: this bench prints its own sample answers (sample_answer below)
    cfg = load_config(args.config, [f"workdir={work}", "eval.speed.enabled=false", "eval.samples=0", *args.overrides])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    students, runs = {"init": source / "train" / "init"}, {}
    for mode in modes:
        students[mode], runs[mode] = train(mode, cfg, source, work, args.minutes, args.max_new_tokens)

    rows, _ = heldout_rows(cfg, str(source))
    human, _ = corpora.load_corpora(cfg.eval.corpora, cfg.eval.builtin_corpus, cfg.eval.max_corpus_bytes)
    texts = {HELDOUT: [r["completion"] for r in rows if r.get("completion")], **human}
    prompts = [[int(t) for t in r["input_ids"][: int(r["prompt_len"])]] for r in rows]
    teacher, teacher_tok, teacher_dir = load_model(cfg.teacher.model, role="teacher")
    eos = set(eos_token_ids(teacher_tok, teacher_dir, json.loads((Path(teacher_dir) / "config.json").read_text())))
    say = lambda message: print(f"  {message}", flush=True)  # noqa: E731
    results = {
        "teacher": evaluate_model(
            "teacher",
            teacher,
            teacher_tok,
            cfg=cfg,
            texts=texts,
            rows=rows,
            fidelity_ok=True,
            timed=False,
            notes=[],
            say=say,
        )
    }
    penalty = sample_penalty(cfg)
    for name, path in students.items():
        model, tokenizer, _ = load_model(str(path), role=name)
        results[name] = evaluate_model(
            name, model, tokenizer, cfg=cfg, texts=texts, rows=rows, fidelity_ok=True, timed=False, notes=[], say=say
        )
        say(f"{name}: own-sample KL on {len(prompts)} held-out prompts")
        results[name]["own_kl"] = own_sample_kl(model, teacher, prompts, eos, args.max_new_tokens)
        del model
        results[name]["sample"] = sample_answer(
            path, cfg.pipeline.sample_prompt, cfg.pipeline.sample_max_tokens, penalty
        )

    human_name = next(iter(human), None)
    bpb = lambda name, corpus: results[name]["bits_per_byte"].get(corpus, {}).get("bits_per_byte", math.nan)  # noqa: E731
    t_held, t_human = bpb("teacher", HELDOUT), bpb("teacher", human_name)
    print(
        f"\n{len(rows)} held-out rows ({len(prompts)} prompts), human text: {human_name}; "
        f"budget {args.minutes} min per mode; teacher bits/byte: held-out {t_held:.3f}, human {t_human:.3f}"
    )
    header = (
        f"{'model':<10} {'steps':>5} {'tokens':>7} {'sample/label/train s':>21} {'own-sample KL':>13} "
        f"{'held-out KL':>11} {'top-1':>6} {'bpb held-out (x)':>17} {'bpb human (x)':>15}"
    )
    print(header)
    for name in students:
        r, run = results[name], runs.get(name, {})
        split = f"{run['sample_s']:.0f}/{run['label_s']:.0f}/{run['train_s']:.0f}" if run.get("kl_sampled") else "-"
        held, hum = bpb(name, HELDOUT), bpb(name, human_name)
        print(
            f"{name:<10} {run.get('steps', 0):>5} {run.get('tokens', 0):>7} {split:>21} {r['own_kl']:>13.3f} "
            f"{r['fidelity']['kl']:>11.3f} {r['fidelity']['top1_agreement']:>6.3f} "
            f"{held:>8.3f} ({held / t_held:.2f}) {hum:>8.3f} ({hum / t_human:.2f})"
        )
    print("\nsample answers to", json.dumps(cfg.pipeline.sample_prompt), f"(greedy, repetition_penalty {penalty}):")
    for name in students:
        print(f"  {name:<10} {results[name]['sample']!r}")
    if args.out:
        keep = {
            name: {
                "run": runs.get(name),
                "own_sample_kl": results[name].get("own_kl"),
                "heldout_kl": results[name].get("fidelity", {}).get("kl"),
                "top1": results[name].get("fidelity", {}).get("top1_agreement"),
                "bpb_heldout": bpb(name, HELDOUT),
                "bpb_human": bpb(name, human_name),
                "sample": results[name].get("sample"),
            }
            for name in ["teacher", *students]
        }
        Path(args.out).write_text(json.dumps({"minutes": args.minutes, "results": keep}, indent=2) + "\n")
    print(f"(runs under {work})")


if __name__ == "__main__":
    main()
