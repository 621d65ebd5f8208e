"""Logit KD versus CE-only on the builtin teacher's data: same student, same step budget.

    python bench/kd_vs_ce.py [--run RUN_DIR] [--prompts 96] [--steps 40]

Without ``--run`` it first generates data with the quickstart teacher (SmolLM2-135M) into a temp
workdir. Both students start from the same initialisation (``student.init`` of the config) and
train with the plain loop (no Ray) for the same steps on the same rows; then both are scored on
the same held-out rows: KL(teacher || student) over the stored top-k + tail bucket, top-1
agreement, and bits per byte of the held-out teacher completions. Prints the two side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from distill.losses import forward_kl
from distill.training.data import data_dir_for, heldout_mask, read_table, rows_from_table
from distill.training.stage import run_train_stage
from pipelines.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def make_data(workdir: Path, prompts: int) -> str:
    from cluster.ray_init import connect
    from cluster.runs import run_dir
    from distill.data.generate import run_generate_stage

    cfg = load_config(ROOT / "pipelines/configs/quickstart.yaml", [f"workdir={workdir}", f"prompts.count={prompts}"])
    run = run_dir(cfg, "bench", create=True)
    connect(None, num_cpus=2)
    run_generate_stage(cfg, run, show_progress=True)
    return run


@torch.no_grad()
def score(student_dir: Path, rows: list[dict], tokenizer) -> dict[str, float]:
    from distill.student.export import load_student

    model = load_student(student_dir)
    kl_sum = ce_sum = agree = tokens = 0.0
    nbytes = 0
    for row in rows:
        ids = torch.as_tensor(row["input_ids"])[None]
        start = row["prompt_len"]
        logits, _ = model.model(ids), None
        hidden = logits.last_hidden_state[0, start - 1 : -1]  # positions predicting the completion
        logprobs = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)  # [C, V]
        targets = ids[0, start:]
        topk_ids = torch.as_tensor(row["topk_ids"])
        topk_lp = torch.as_tensor(row["topk_logprobs"])
        kl_sum += float(forward_kl(logprobs, topk_ids, topk_lp).sum())
        ce_sum += float(-logprobs.gather(-1, targets[:, None]).sum())
        agree += float((logprobs.argmax(-1) == topk_ids[:, 0]).sum())
        tokens += targets.numel()
        nbytes += len(tokenizer.decode(targets.tolist()).encode("utf-8"))
    return {
        "kl": kl_sum / tokens,
        "top1": agree / tokens,
        "bits_per_byte": ce_sum / math.log(2) / nbytes,
        "tokens": int(tokens),
        "bytes": nbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="an existing run dir with data/generate (default: generate new data)")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--config", default=str(ROOT / "pipelines/configs/quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(2)

    work = Path(tempfile.mkdtemp(prefix="kd-vs-ce-"))
    source_run = args.run or make_data(work / "data", args.prompts)
    results = {}
    for name, loss in (("logit-kd", {"forward_kl": 1.0}), ("ce-only", {"ce": 1.0, "forward_kl": 0.0})):
        run = work / name
        shutil.copytree(Path(source_run) / "data", run / "data")
        cfg = load_config(args.config, [f"workdir={work}", *args.overrides])
        stages = [{"name": name, "steps": args.steps, "loss": loss, "routing": {}}]
        cfg = cfg.model_copy(
            update={
                "train": cfg.train.model_validate(
                    {**cfg.train.model_dump(), "workers": 1, "stages": stages, "export_qwen2_moe": False}
                )
            }
        )
        started = time.time()
        manifest = run_train_stage(cfg, str(run), use_ray=False, show_progress=True)
        results[name] = {"run": run, "seconds": time.time() - started, "tokens": manifest["tokens"], "cfg": cfg}

    cfg = results["logit-kd"]["cfg"]
    from distill.data.shards import shard_uris

    table = read_table(shard_uris(data_dir_for(source_run)))
    held = heldout_mask(table, cfg.train.heldout_fraction, cfg.train.seed)
    rows = [
        r
        for r in rows_from_table(table.filter(held))
        if r["topk_ids"] is not None and len(r["input_ids"]) > r["prompt_len"]
    ]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(results["logit-kd"]["run"] / "student"))
    scores = {"init": score(results["logit-kd"]["run"] / "train" / "init", rows, tokenizer)}
    for name in ("logit-kd", "ce-only"):
        scores[name] = score(results[name]["run"] / "student", rows, tokenizer)

    print(
        f"\nheld-out rows: {len(rows)} ({scores['init']['tokens']} completion tokens, {scores['init']['bytes']} bytes); "
        f"{args.steps} steps each, {results['logit-kd']['tokens']} training completion tokens"
    )
    print(f"{'model':<10} {'KL(teacher||student)':>22} {'top-1 agree':>12} {'bits/byte':>10} {'train s':>8}")
    for name in ("init", "logit-kd", "ce-only"):
        s = scores[name]
        secs = results.get(name, {}).get("seconds", float("nan"))
        print(f"{name:<10} {s['kl']:>22.4f} {s['top1']:>12.3f} {s['bits_per_byte']:>10.4f} {secs:>8.1f}")
    kd, ce = scores["logit-kd"], scores["ce-only"]
    print(
        f"\nKD/CE ratios (lower is better): KL {kd['kl'] / ce['kl']:.3f}, bits/byte {kd['bits_per_byte'] / ce['bits_per_byte']:.3f}"
    )
    print(f"logit KD better on both: {kd['kl'] < ce['kl'] and kd['bits_per_byte'] < ce['bits_per_byte']}")
    print(json.dumps({k: {m: round(v, 5) for m, v in s.items()} for k, s in scores.items()}))


if __name__ == "__main__":
    main()
