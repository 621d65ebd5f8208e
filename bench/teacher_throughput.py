"""Teacher throughput: `raydistill generate` (Ray Data + actor pool) vs the same backend in one process.

Both sides get the same prompts, sampling and batch size, and both are timed end to end including
model load (the Ray side also pays for its actor process). Ray itself is started before timing,
as on a running cluster. Target: ratio >= 0.85 with one replica.

    .venv/bin/python bench/teacher_throughput.py [--prompts 64] [--new-tokens 64] [--replicas 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.ray_init import connect  # noqa: E402
from distill.data.generate import run_generate_stage, sampling_from_config  # noqa: E402
from distill.data.prompts import expand_samples, read_prompt_files  # noqa: E402
from distill.teacher import load_backend  # noqa: E402
from pipelines.config import load_config  # noqa: E402

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bicycles", "music", "rain"]


def write_prompts(path: Path, n: int) -> None:
    import json

    with open(path, "w") as handle:
        for i in range(n):
            handle.write(
                json.dumps({"prompt": f"Tell me something interesting about {TOPICS[i % len(TOPICS)]} (fact #{i})."})
                + "\n"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--batches-in-flight", type=int, default=None, help="teacher.batches_in_flight (default: the config's)"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backend", default="engine", help="teacher backend (engine: the demo's; hf)")
    parser.add_argument(
        "--prompt-file",
        default=None,
        help="JSONL prompts instead of the generated ones, e.g. pipelines/configs/prompts/quickstart.jsonl "
        "(answers of natural, varied length; the first --prompts of them)",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    prompts = tmp / "prompts.jsonl"
    if args.prompt_file:
        prompts = Path(args.prompt_file).resolve()
    else:
        write_prompts(prompts, args.prompts)
    cfg = load_config(
        None,
        [
            f"workdir={tmp}",
            f"teacher.model={args.model}",
            f"teacher.backend={args.backend}",
            "prompts.source=file",
            f"prompts.path={prompts}",
            f"prompts.count={args.prompts}",
            f"teacher.replicas={args.replicas}",
            f"teacher.batch_size={args.batch_size}",
            *([f"teacher.batches_in_flight={args.batches_in_flight}"] if args.batches_in_flight else []),
            f"generate.max_new_tokens={args.new_tokens}",
            "generate.temperature=0",
            "generate.logprobs=20",
        ],
    )
    load_backend(cfg.teacher).close()  # warm the converted-weights cache so neither side pays the one-off conversion

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    backend = load_backend(cfg.teacher)
    loaded = time.perf_counter()
    requests, _ = expand_samples(read_prompt_files(cfg), 1, args.prompts)  # the rows the stage will run
    completions = backend.generate([r["messages"] for r in requests], sampling_from_config(cfg))
    direct_s = time.perf_counter() - start
    direct_gen_s = time.perf_counter() - loaded
    direct_tokens = sum(c.num_tokens for c in completions)
    backend.close()

    connect(None)
    start = time.perf_counter()
    manifest = run_generate_stage(cfg, str(tmp / "run"), show_progress=False)
    ray_s = time.perf_counter() - start
    ray_tokens = manifest["completion_tokens"]

    direct_tps, ray_tps = direct_tokens / direct_s, ray_tokens / ray_s
    print(
        f"\nteacher={args.model} backend={args.backend} prompts={args.prompts} new_tokens={args.new_tokens} top-k=20 "
        f"batch={args.batch_size} in_flight={cfg.teacher.batches_in_flight} replicas={args.replicas} "
        f"cores={os.cpu_count()}"
    )
    print(f"{'':34}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'direct, one process (incl. load)':34}{direct_tokens:>8}{direct_s:>10.1f}{direct_tps:>10.1f}")
    print(f"{'direct, generation only':34}{direct_tokens:>8}{direct_gen_s:>10.1f}{direct_tokens / direct_gen_s:>10.1f}")
    print(f"{'raydistill generate (Ray Data)':34}{ray_tokens:>8}{ray_s:>10.1f}{ray_tps:>10.1f}")
    print(f"ratio ray/direct (end to end): {ray_tps / direct_tps:.2f}   (target >= 0.85)")
    print(
        f"{args.prompts} prompts x {args.new_tokens} new tokens with top-20 log-probs: {ray_s:.1f} s (target < 120 s)"
    )


if __name__ == "__main__":
    main()
