"""Two ranks (gloo, CPU, ``torch.multiprocessing``) through the loop's own wrapping and step code.

Top-1 routing and one short row per rank and step: some experts get no token on a rank, and the
routers are frozen from the second step on. Each rank writes what it saw; the test compares it with
one process training on both ranks' rows.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from distill.losses import LossWeights
from distill.training.loop import DistillModule
from tests.distill.training.tiny import batch, row, tiny_model

SETUP = dict(num_experts_per_tok=1, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)  # top-1; KD terms only
WEIGHTS = LossWeights(forward_kl=1.0, ce=0.2)
STEPS = 3
# rank 0: 3 valid tokens per step (so at most 3 of 4 experts per layer get any); rank 1: 14
ROWS = {
    0: lambda step: row(100 + step, prompt_len=1, completion_len=2),
    1: lambda step: row(200 + step, prompt_len=2, completion_len=12),
}


def _student_name(name: str) -> str:
    return name[name.index("student.") + len("student.") :]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _worker(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    import torch.distributed as dist

    from distill.training import checkpoint as ckpt
    from distill.training.loop import (
        apply_routing,
        build_optimizer,
        clip_and_step,
        frozen_parameters,
        train_step,
        wrap_model,
    )
    from distill.training.section import Strategy, TrainSection

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        section = TrainSection.model_validate(
            {
                "strategy": strategy,
                "stages": [
                    {"name": "free", "steps": 1},
                    {"name": "frozen", "steps": STEPS - 1, "routing": {"freeze_router": True}},
                ],
            }
        )
        device = torch.device("cpu")
        model = tiny_model(seed=0, **SETUP)
        module = wrap_model(DistillModule(model, chunk_size=16), Strategy(strategy), device)
        assert type(module).__name__ == ("DistributedDataParallel" if strategy == "ddp" else "FSDPDistillModule")
        optimizer = build_optimizer(module, section)
        # Fused AdamW for DDP's plain tensors; FSDP's CPU DTensor shards keep the per-parameter loop.
        assert all(bool(g["fused"]) == (strategy == "ddp") for g in optimizer.param_groups)
        record: dict = {"norms": [], "routers": []}
        for step in range(STEPS):
            stage = section.stages[0 if step == 0 else 1]
            apply_routing(model, stage, 0.0)
            optimizer.zero_grad(set_to_none=True)
            train_step(module, [batch([[ROWS[rank](step)]])], WEIGHTS, world, device)
            if step == 0:
                record["grads"] = {
                    _student_name(n): _full(p.grad) for n, p in module.named_parameters() if p.grad is not None
                }
            frozen = frozen_parameters(model, stage)
            record["norms"].append(clip_and_step(module, optimizer, frozen, grad_clip=1e6))
            record["routers"].append([_full(r.weight) for r in (m.mlp.gate for m in model.model.layers)])
        record["params"] = {_student_name(n): _full(p) for n, p in module.named_parameters()}
        # The checkpoint: full weights and optimizer state on rank 0 however the model is wrapped.
        sharded = ckpt.gather_sharded(module, optimizer)
        assert (sharded is not None) == (strategy == "fsdp")
        if rank == 0:
            ckpt.save(Path(out) / "ckpt", model=model, optimizer=optimizer, state={"step": STEPS}, sharded=sharded)
        dist.barrier()
        # ... and back into a fresh wrapped model + optimizer built after wrapping.
        again = tiny_model(seed=5, **SETUP)
        ckpt.load(Path(out) / "ckpt", model=again, optimizer=None)
        module2 = wrap_model(DistillModule(again, chunk_size=16), Strategy(strategy), device)
        optimizer2 = build_optimizer(module2, section)
        ckpt.load_optimizer(Path(out) / "ckpt", model=again, module=module2, optimizer=optimizer2)
        record["reloaded"] = {_student_name(n): _full(p) for n, p in module2.named_parameters()}
        record["exp_avg"] = {
            _student_name(n): _full(optimizer.state[p]["exp_avg"])
            for n, p in module.named_parameters()
            if p in optimizer.state
        }
        record["exp_avg2"] = {
            _student_name(n): _full(optimizer2.state[p]["exp_avg"])
            for n, p in module2.named_parameters()
            if p in optimizer2.state
        }
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(fn, *args) -> None:
    """``fn(rank, 2, port, *args)`` in two fresh processes, forked from a ``forkserver`` that imported torch
    and this module once for the whole session (``spawn`` re-imports them in every rank of every test:
    seconds each on 2 cores). The server only imports: no torch threads exist in it to break a fork."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", __name__])  # no effect once the server runs
    mp.start_processes(fn, args=(2, _free_port(), *args), nprocs=2, join=True, start_method="forkserver")


def _reference_step0() -> dict[str, torch.Tensor]:
    """One process, both ranks' step-0 rows in one batch: the gradient of the mean over all their tokens."""
    model = tiny_model(seed=0, **SETUP)
    module = DistillModule(model, chunk_size=16)
    both = batch([[ROWS[0](0)], [ROWS[1](0)]])
    losses, _ = module(
        both.input_ids,
        both.attention_mask,
        both.position_ids,
        both.pred_index,
        both.targets,
        both.topk_ids,
        both.topk_logprobs,
        weights=WEIGHTS,
    )
    losses.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_idle_experts_and_a_frozen_router(strategy, tmp_path):
    _two_ranks(_worker, strategy, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    ref = _reference_step0()
    got = ranks[0]["grads"]
    # every parameter has a gradient on every rank, idle experts included (zero where no rank used them)
    assert set(got) == set(ref) | {n for n in got if ".experts." in n}
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the clipped norm is the norm of the whole gradient (all shards under FSDP), the same on both ranks
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref.values()])).item()
    assert ranks[0]["norms"][0] == pytest.approx(ref_norm, rel=1e-4)
    assert ranks[1]["norms"][0] == pytest.approx(ref_norm, rel=1e-4)
    # the routers moved in the free step and not in the frozen ones; everything else kept training
    for rec in ranks:
        free, *frozen = rec["routers"]
        for later in frozen:
            assert all(torch.equal(a, b) for a, b in zip(free, later))
    init = tiny_model(seed=0, **SETUP)
    assert not torch.equal(init.model.layers[0].mlp.gate.weight, ranks[0]["routers"][0][0])
    for name in ranks[0]["params"]:
        torch.testing.assert_close(ranks[0]["params"][name], ranks[1]["params"][name], msg=name)  # ranks agree
    # the checkpoint round trip: the same weights and optimizer state in a freshly wrapped model
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[0]["reloaded"][name], p, rtol=0, atol=0, msg=name)
    assert ranks[0]["exp_avg"].keys() == ranks[0]["exp_avg2"].keys() and ranks[0]["exp_avg"]
    for name, m in ranks[0]["exp_avg"].items():
        torch.testing.assert_close(ranks[0]["exp_avg2"][name], m, rtol=0, atol=0, msg=name)


def _loop_worker(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    """``train_loop`` itself on two ranks: one stage, then a resume into a second, router-frozen stage."""
    import json

    import torch.distributed as dist

    from distill.data.schema import to_table
    from distill.training import checkpoint as ckpt
    from distill.training.data import TableSource
    from distill.training.loop import LocalRuntime, TrainJob, train_loop

    class SpawnRuntime(LocalRuntime):
        """LocalRuntime's checkpoints and reporting; this rank's share of one table, no held-out rows."""

        def __init__(self, table):
            self.rank, self.world_size, self.device = rank, world, torch.device("cpu")
            self.table, self.checkpoints = table, ckpt.LocalCheckpoints(Path(out) / "checkpoints")

        def sources(self, stage_index, stage, seed):
            return [TableSource(self.table, seed, self.rank, self.world_size)]

        def heldout(self, seed):
            return None

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        rows = []
        for i in range(16):
            r = row(300 + i, prompt_len=2, completion_len=4)
            rows.append(
                {
                    "prompt_id": r["prompt_id"],
                    "input_ids": r["input_ids"].tolist(),
                    "prompt_len": 2,
                    "completion_len": 4,
                    "topk_ids": r["topk_ids"].tolist(),
                    "topk_logprobs": r["topk_logprobs"].tolist(),
                    "source": "s",
                }
            )
        runtime = SpawnRuntime(to_table(rows))
        base = {
            "strategy": strategy,
            "threads_per_worker": 1,
            "seq_len": 16,
            "loss_chunk_size": 16,
            "micro_batch_size": 1,
            "grad_accum": 2,
            "warmup_steps": 0,
            "lr": 1e-2,
            "checkpoint_every": 2,
            "log_every": 1,
        }
        first = [{"name": "free", "steps": 2}]
        frozen = {"name": "frozen", "steps": 2, "routing": {"freeze_router": True}}
        job = TrainJob(
            section={**base, "stages": first},
            init_dir=str(Path(out) / "init"),
            metrics_uri=str(Path(out) / f"metrics{rank}.jsonl"),
        )
        state = train_loop(job, runtime)
        dist.barrier()
        job.section = {**base, "stages": first + [frozen]}
        state2 = train_loop(job, runtime)
        if rank == 0:  # the two stages' checkpoints, before the third stage's replace them
            shutil.copytree(Path(out) / "checkpoints", Path(out) / "checkpoints-4")
        dist.barrier()
        # A 0.5-minute stage on a fake clock where rank 0's steps take 10 s and rank 1's 20 s: both ranks
        # count the slower rank's time, so both end after 2 steps (a rank counting its own would go on
        # alone and the collectives would hang).
        import distill.training.loop as loop
        from tests.distill.training import callbacks as cb

        loop.time = cb.CLOCK
        timed = {"name": "timed", "minutes": 0.5}
        job.section = {**base, "stages": first + [frozen, timed]}
        job.callbacks = [{"target": f"{cb.__name__}:AdvanceClock", "kwargs": {"seconds": 10.0 * (rank + 1)}}]
        state3 = train_loop(job, runtime)
        if rank == 0:
            lines = [json.loads(x) for x in Path(job.metrics_uri).read_text().splitlines()]
            (Path(out) / "result.json").write_text(
                json.dumps(
                    {
                        "steps": [state["step"], state2["step"], state3["step"]],
                        "timed": state3["history"][-1],
                        "events": [x.get("event") for x in lines],
                        "grad_norms": [x.get("grad_norm") for x in lines],
                    }
                )
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_train_loop_on_two_ranks_checkpoints_resumes_and_freezes_the_router(strategy, tmp_path):
    import json

    from safetensors.torch import load_file

    tiny_model(seed=0, **SETUP).save_pretrained(str(tmp_path / "init"))
    _two_ranks(_loop_worker, strategy, str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == [2, 4, 6] and "resumed" in result["events"]
    assert (result["timed"]["steps"], result["timed"]["seconds"]) == (2, 40.0)
    assert all(n is not None and n > 0 for n in result["grad_norms"] if n is not None)
    found = sorted(p.name for p in (tmp_path / "checkpoints-4").iterdir())
    assert found == ["checkpoint_0000002", "checkpoint_0000004"]
    at2, at4 = (load_file(str(tmp_path / "checkpoints-4" / f / "model.safetensors")) for f in found)
    init = {k: v for k, v in tiny_model(seed=0, **SETUP).state_dict().items()}
    assert at2.keys() == init.keys()  # full, unsharded tensors under the student's own names
    assert all(at2[k].shape == init[k].shape for k in init)
    gates = [k for k in init if k.endswith("mlp.gate.weight")]
    assert gates and all(not torch.equal(at2[k], init[k]) for k in gates)  # trained in the first stage
    assert all(torch.equal(at4[k], at2[k]) for k in gates)  # frozen in the second
    assert not torch.equal(at4["model.embed_tokens.weight"], at2["model.embed_tokens.weight"])
    optim = load_file(str(tmp_path / "checkpoints-4" / found[-1] / "optimizer.safetensors"))
    assert optim["model.embed_tokens.weight::exp_avg"].shape == init["model.embed_tokens.weight"].shape
