"""Student training throughput: tokens/s on CPU with 1 and 2 Ray Train workers; bf16 tokens/s and MFU on GPU.

    python bench/train_throughput.py [--steps 12] [--seq-len 256] [--micro-batch 2] [--layers 8] [--run RUN_DIR]

The student is the quickstart's SmolLM2-shaped MoE (random init: throughput does not depend on
the weights) trained on synthetic rows with top-20 soft labels (forward KL + CE). tokens/s counts
every non-padding packed token per optimizer step across workers, averaged over the logged
windows after the first (which includes start-up).

Then, in this process (no Ray, the threads torch has), the **GEMM ceiling** of a training step: every
``mm``/``addmm`` of one step (forward, backward, optimizer) is recorded and replayed back to back with
``bench/engine_ceiling.py``'s ``RecordGemms`` and ``replay_s`` (each GEMM with the faster of BLAS and
oneDNN); the step's median wall time over ``--steps`` runs of the same packed micro-batch is set
against that replay. "GEMM share" is replay / step: the part of a step
that is matrix multiplication at the speed BLAS gives those shapes alone. The rest is attention
(SDPA is not a GEMM here), the MoE dispatch, softmax, elementwise work, autograd and the optimizer:
100% is not reachable, and it says how much a step spends outside its matmuls. Also printed: model
FLOP/s (3 x forward FLOPs per trained position x positions/s) and the GEMMs' own FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import load_config  # noqa: E402

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


def gemm_ceiling(cfg, run: Path, steps: int) -> dict:
    """Median training step vs the same step's GEMMs replayed alone (see the module docstring)."""
    import statistics

    import torch

    from bench.engine_ceiling import RecordGemms, replay_s
    from distill.training.data import MixtureStream, TableSource, collate, next_batch, read_table
    from distill.training.loop import (
        DistillModule,
        _load_student,
        apply_routing,
        build_optimizer,
        clip_and_step,
        freeze_parameters,
        train_step,
    )

    section = cfg.train
    stage = section.stages[0]
    model = _load_student(str(run / "train" / "init"))
    freeze_parameters(model, section.freeze)
    module = DistillModule(model, section.loss_chunk_size)
    optimizer = build_optimizer(module, section)
    apply_routing(model, stage, 0.0)
    table = read_table(sorted(str(p) for p in (run / "data" / "generate").glob("*.parquet")))
    stream = MixtureStream([TableSource(table, seed=0)], [1.0], seed=0)
    batch = collate(next_batch(stream.take, stream.peek, section.micro_batch_size, section.seq_len), section.seq_len)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        train_step(module, [batch], stage.loss, 1, torch.device("cpu"))
        clip_and_step(module, optimizer, [], section.grad_clip)

    step()  # warm-up
    times = []
    for _ in range(steps):  # the same micro-batch each time: the step the GEMMs are recorded from
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    recorder = RecordGemms()
    with recorder:
        step()
    gemm_s, gemm_flops = replay_s(recorder.calls, rounds=3)
    return {
        "step_s": statistics.median(times),
        "positions": int(batch.attention_mask.sum()),
        "slots": batch.attention_mask.numel(),
        "gemm_s": gemm_s,
        "gemms": len(recorder.calls),
        "gemm_flops": gemm_flops,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--run", help="also measure the GEMM ceiling on a pipeline run's init and teacher rows (quickstart config)"
    )
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

    ceilings = {f"synthetic rows, random {args.layers}-layer init": (gemm_ceiling(cfg, run, args.steps), train_flops)}
    if args.run:
        real = Path(args.run)
        qs = load_config(ROOT / "pipelines/configs/quickstart.yaml")
        init = StudentConfig.from_dict(
            json.loads((real / "train" / "init" / "config.json").read_text()), ignore_unknown=True
        )
        ceilings[f"{real.name}'s init and rows"] = (gemm_ceiling(qs, real, args.steps), 3 * flops_per_token(init, 256))
    for name, (g, flops) in ceilings.items():
        print(
            f"\none training step (forward, backward, AdamW) on {name}, 1 process, {g['threads']} threads, "
            f"one micro-batch of {g['positions']} positions ({g['slots']} slots), median of {args.steps}:\n"
            f"  step {g['step_s']:.3f} s   its {g['gemms']} GEMMs replayed alone {g['gemm_s']:.3f} s   "
            f"GEMM share {g['gemm_s'] / g['step_s']:.0%}\n"
            f"  GEMMs at {g['gemm_flops'] / g['gemm_s'] / 1e9:.1f} GFLOP/s alone, "
            f"{g['gemm_flops'] / g['step_s'] / 1e9:.1f} GFLOP/s over the whole step; model FLOP/s "
            f"(3 x forward FLOPs x positions/s) {flops * g['positions'] / g['step_s'] / 1e9:.1f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
