"""Student training throughput: tokens/s on CPU with 1 and 2 Ray Train workers; bf16 tokens/s and MFU on GPU.

    python bench/train_throughput.py [--steps 12] [--seq-len 256] [--micro-batch 2] [--layers 8]

The student is the quickstart's SmolLM2-shaped MoE (random init: throughput does not depend on
the weights) trained on synthetic rows with top-20 soft labels (forward KL + CE). tokens/s counts
every non-padding packed token per optimizer step across workers, averaged over the logged
windows after the first (which includes start-up).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def synthetic_run(workdir: Path, rows: int, length: int, vocab: int, k: int = 20) -> Path:
    from distill.data.schema import prompt_id, to_table
    from distill.data.shards import write_parquet

    rng = np.random.default_rng(0)
    run = workdir / "bench" / "r"
    out = run / "data" / "generate"
    out.mkdir(parents=True)
    table_rows = []
    for i in range(rows):
        prompt_len = 32
        ids = rng.integers(0, vocab, size=length).tolist()
        comp = length - prompt_len
        topk = rng.integers(0, vocab, size=(comp, k))
        lp = np.sort(np.log(rng.dirichlet(np.ones(k + 1), size=comp)[:, :k]), axis=-1)[:, ::-1]
        table_rows.append(
            {
                "prompt_id": prompt_id("bench", str(i), 0),
                "prompt": str(i),
                "completion": "",
                "input_ids": ids,
                "prompt_len": prompt_len,
                "completion_len": comp,
                "topk_ids": topk.tolist(),
                "topk_logprobs": lp.astype(np.float32).tolist(),
                "teacher": "synthetic",
                "sampling": "{}",
                "finish_reason": "length",
                "source": "bench",
            }
        )
    write_parquet(str(out / "part-0.parquet"), to_table(table_rows))
    return run


def measure(cfg, run: Path, workers: int, use_ray: bool, gpus: float = 0) -> dict:
    import shutil

    from distill.training.stage import run_train_stage

    for sub in ("train", "student", "student-qwen2moe"):
        if (run / sub).exists() and sub != "train":
            shutil.rmtree(run / sub)
    if (run / "train").exists():
        for sub in ("ray", "local", "manifest.json", "metrics.jsonl"):
            p = run / "train" / sub
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    started = time.time()
    run_train_stage(cfg, str(run), workers=workers, gpus_per_worker=gpus, use_ray=use_ray, show_progress=False)
    lines = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m][1:]
    return {"tokens_per_s": float(np.mean(rates)) if rates else float("nan"), "wall_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    overrides = [
        f"workdir={work}",
        "name=bench",
        "student.init=random",
        f"student.num_hidden_layers={args.layers}",
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.log_every=3",
        "train.checkpoint_every=1000",
        "train.heldout_fraction=0.05",
        "train.heldout_max_rows=2",
        "train.export_qwen2_moe=false",
        f"train.stages=[{{name: bench, steps: {args.steps}, loss: {{forward_kl: 1.0, ce: 0.5}}}}]",
    ]
    cfg = load_config(ROOT / "pipelines/configs/quickstart.yaml", overrides)
    from distill.teacher.sources import resolve_model

    vocab = json.loads((Path(resolve_model(cfg.teacher.model)) / "config.json").read_text())["vocab_size"]
    run = synthetic_run(work, rows=256, length=args.seq_len // 2, vocab=vocab)
    results = {}
    if torch.cuda.is_available():
        cfg_gpu = load_config(ROOT / "pipelines/configs/quickstart.yaml", overrides + ["train.precision=bf16"])
        results["gpu bf16, 1 worker (no Ray)"] = measure(cfg_gpu, run, 1, use_ray=False, gpus=1)
    from cluster.ray_init import connect

    results["cpu, 1 worker (no Ray)"] = measure(cfg, run, 1, use_ray=False)
    connect(None, num_cpus=2)
    results["cpu, 1 Ray worker"] = measure(cfg, run, 1, use_ray=True)
    results["cpu, 2 Ray workers"] = measure(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads_per_worker": 1})}), run, 2, use_ray=True
    )

    from distill.student.accounting import flops_per_token
    from distill.student.config import StudentConfig

    student = StudentConfig.from_dict(
        json.loads((run / "train" / "init" / "config.json").read_text()), ignore_unknown=True
    )
    train_flops = 3 * flops_per_token(student, args.seq_len)  # forward + backward ~ 3x forward
    print(
        f"\nstudent: {args.layers} layers, seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
        f"~{train_flops / 1e9:.2f} GFLOP per trained token"
    )
    base = results["cpu, 1 worker (no Ray)"]["tokens_per_s"]
    for name, r in results.items():
        line = f"{name:<32} {r['tokens_per_s']:>9.1f} tokens/s   x{r['tokens_per_s'] / base:.2f} vs 1 CPU worker"
        if name.startswith("gpu"):
            peak = 989e12 if "H100" in torch.cuda.get_device_name() else 312e12  # dense bf16
            line += f"   MFU {r['tokens_per_s'] * train_flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
        print(line)


if __name__ == "__main__":
    main()
