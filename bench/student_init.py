"""Data-free versus calibrated student init at one student shape, before any training.

    python bench/student_init.py [--run RUN_DIR] [--config pipelines/configs/quickstart.yaml] [--set K=V ...]

Teacher text comes from a pipeline run (default: the newest run of the config, e.g. after
``make demo``): the calibrated init fits on its training rows; both inits are scored on its
held-out rows (the prompt+completion text, bits per byte of the completions' tokens as in the
eval stage) and on human text (the builtin fortunes corpus). Prints, side by side: the teacher,
the dense pruned teacher for each init's layers, each MoE init, the excess over the teacher and
the ratio of excesses, and an experts-per-token histogram for each init.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "pipelines/configs/quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run", default=None, help="run directory with teacher data (default: newest of the config)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from distill.data.calibration import calibration_sequences
    from distill.data.shards import data_dir_for, read_dir
    from distill.data.split import row_is_heldout
    from distill.eval import corpora
    from distill.eval import metrics as M
    from distill.student.init import build_from_teacher, load_teacher, prune_teacher
    from distill.teacher.sources import resolve_model
    from distill.training.data import heldout_mask

    cfg = load_config(args.config, args.overrides)
    from cluster.runs import run_dir

    run = args.run or run_dir(cfg)  # the newest run of the config (after `make demo`)
    teacher_dir = resolve_model(cfg.teacher.model, revision=cfg.teacher.revision)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = load_teacher(teacher_dir)
    student_config = cfg.student.to_student_config(teacher.config)
    train = cfg.train
    calib = cfg.student.calibration
    fit = calibration_sequences(
        ["run"],
        run_dir=run,
        tokenizer=tokenizer,
        keep=lambda row: not row_is_heldout(row, train.heldout_fraction, train.seed),
    )
    table = read_dir(data_dir_for(run))
    mask = heldout_mask(table, train.heldout_fraction, train.seed)
    held = [
        (ids, plen)
        for ids, plen, out in zip(table["input_ids"].to_pylist(), table["prompt_len"].to_pylist(), mask)
        if out
    ][:64]
    human = corpora.builtin_corpus("fortunes", 32_000) if corpora.builtin_available("fortunes") else []
    print(f"run {run}: {len(fit)} calibration rows, {len(held)} held-out rows, {len(human)} fortunes")

    def completion_bpb(model) -> float:
        nll = nbytes = 0.0
        with torch.no_grad():
            for ids, plen in held:
                x = torch.tensor([ids])
                logp = torch.log_softmax(model(input_ids=x).logits[0, plen - 1 : -1].float(), -1)
                nll -= float(logp.gather(1, x[0, plen:, None]).sum())
                nbytes += len(tokenizer.decode(ids[plen:]).encode())
        return nll / 0.6931471805599453 / max(nbytes, 1)

    def human_bpb(model) -> float:
        return M.bits_per_byte(model, tokenizer, human, window=256, batch_tokens=2048)["bits_per_byte"]

    def experts_hist(model) -> Counter:
        counts: Counter = Counter()
        inputs = []
        hooks = [
            layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0].reshape(-1, a[0].shape[-1]))))
            for layer in model.model.layers
            if hasattr(layer.mlp, "gate")
        ]
        with torch.no_grad():
            for ids, _ in held[:16]:
                model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        for block, x in inputs:
            routing = block.gate(x)
            kept = (
                routing.mask.sum(1) if routing.mask is not None else torch.full((x.shape[0],), routing.experts.shape[1])
            )
            counts.update(kept.tolist())
        return counts

    rows = [("teacher", None, completion_bpb(teacher), human_bpb(teacher), None, None)]
    t_held, t_human = rows[0][2], rows[0][3]
    inits = {}
    for name, data in (("data-free", None), ("calibrated", fit)):
        start = time.time()
        result = build_from_teacher(
            teacher, student_config, cfg.student.teacher_layers, calibration=data, options=calib.options()
        )
        seconds = time.time() - start
        dense = prune_teacher(teacher, result.layers)
        rows.append((f"{name}: dense pruned", result.layers, completion_bpb(dense), human_bpb(dense), None, None))
        rows.append(
            (
                f"{name}: MoE student",
                None,
                completion_bpb(result.model),
                human_bpb(result.model),
                experts_hist(result.model),
                seconds,
            )
        )
        inits[name] = rows[-1]
    print(
        f"\nstudent: {student_config.num_hidden_layers} of {teacher.config.num_hidden_layers} layers, "
        f"{student_config.num_experts} experts of {student_config.moe_intermediate_size}, routing "
        f"{student_config.routing.value}"
        + (
            f" top_p {student_config.top_p} max_k {student_config.max_k}"
            if student_config.routing.value == "topp"
            else f" k {student_config.num_experts_per_tok}"
        )
    )
    print(f"{'model':<28} {'bpb teacher text':>17} {'x teacher':>10} {'bpb fortunes':>13} {'x teacher':>10}  layers")
    for name, layers, held_bpb, human_value, _, _ in rows:
        print(
            f"{name:<28} {held_bpb:>17.3f} {held_bpb / t_held:>10.2f} {human_value:>13.3f} "
            f"{human_value / t_human:>10.2f}  {layers or ''}"
        )
    free, cal = inits["data-free"], inits["calibrated"]
    for label, index, ref in (("teacher text", 2, t_held), ("fortunes", 3, t_human)):
        excess_free, excess_cal = free[index] - ref, cal[index] - ref
        print(
            f"excess over the teacher on {label}: data-free {excess_free:.3f}, calibrated {excess_cal:.3f} "
            f"-> {excess_free / max(excess_cal, 1e-9):.2f}x closer"
        )
    print(f"calibrated init took {cal[5]:.0f} s (data-free {free[5]:.0f} s)")
    for name, row in inits.items():
        hist = row[4]
        total = sum(hist.values()) or 1
        mean = sum(k * v for k, v in hist.items()) / total
        print(
            f"experts per token, {name} (mean {mean:.2f}): "
            + "  ".join(f"{k}: {100 * v / total:.0f}%" for k, v in sorted(hist.items()))
        )


if __name__ == "__main__":
    main()
