"""Bad training input fails before any worker starts, naming the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.errors import ConfigError, RaydistillError
from distill.training.data import MixtureStream, TableSource, collate, next_batch, read_table
from distill.training.stage import run_train_stage
from pipelines.config import load_config
from tests.distill.training.conftest import TINY_STUDENT, TINY_TRAIN


def with_stages(cfg, stages):
    return cfg.model_copy(update={"train": cfg.train.model_validate({**cfg.train.model_dump(), "stages": stages})})


def strip_soft_labels(run: str) -> None:
    for path in (Path(run) / "data" / "generate").glob("*.parquet"):
        table = pq.read_table(path)
        i = table.schema.get_field_index("topk_ids")
        table = table.set_column(i, "topk_ids", __import__("pyarrow").nulls(table.num_rows, table.schema.field(i).type))
        pq.write_table(table, path)


def test_logit_loss_without_soft_labels_is_refused(tiny_run):
    cfg, run = tiny_run
    strip_soft_labels(run)
    with pytest.raises(ConfigError, match=r"train.stages\[0\].*no soft labels.*ce only"):
        run_train_stage(cfg, run, show_progress=False)
    assert not (Path(run) / "train" / "ray").exists()  # nothing started


def test_ce_only_stage_trains_without_soft_labels(tiny_run):
    cfg, run = tiny_run
    strip_soft_labels(run)
    cfg = with_stages(cfg, [{"name": "ce", "steps": 2, "loss": {"ce": 1.0, "forward_kl": 0.0}}])
    assert run_train_stage(cfg, run, use_ray=False, show_progress=False)["steps"] == 2


def test_vocab_mismatch_is_refused(tiny_run, sharp_teacher_dir, tmp_path):
    cfg, run = tiny_run
    cfg = load_config(
        None,
        [
            f"workdir={tmp_path / 'runs'}",
            f"teacher.model={sharp_teacher_dir}",
            "name=tiny",
            *TINY_STUDENT,
            *TINY_TRAIN,
            "student.vocab_size=100",
        ],
    )
    with pytest.raises(ConfigError, match="tokenizer/vocab mismatch.*vocab_size is 100"):
        run_train_stage(cfg, run, show_progress=False)


def test_mixture_selecting_nothing_is_refused(tiny_run):
    cfg, run = tiny_run
    cfg = with_stages(cfg, [{"name": "x", "steps": 2, "mixture": [{"source": "nope"}]}])
    with pytest.raises(
        ConfigError, match=r"train.stages\[0\] \('x'\) mixture\[0\] selects no training rows.*\['a', 'b'\]"
    ):
        run_train_stage(cfg, run, show_progress=False)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"name": "z", "steps": 0}, "zero length"),
        ({"name": "e", "steps": 3, "mixture": []}, "empty mixture"),
        ({"name": "w", "steps": 3, "loss": {"ce": 0, "forward_kl": 0}}, "all loss weights are 0"),
    ],
)
def test_bad_stages_fail_at_config_load(stage, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"train.stages=[{json.dumps(stage)}]"])


def test_no_data_is_a_clear_error(tmp_path, sharp_teacher_dir):
    cfg = load_config(None, [f"workdir={tmp_path}", f"teacher.model={sharp_teacher_dir}"])
    (tmp_path / "run").mkdir()
    with pytest.raises(RaydistillError, match="run `raydistill generate`"):
        run_train_stage(cfg, str(tmp_path / "run"), show_progress=False)


def test_packing_masks_prompts_and_resumes_the_stream_exactly(tiny_data_template):
    files = sorted(str(p) for p in (tiny_data_template / "data" / "generate").glob("*.parquet"))
    table = read_table(files)
    sources = [TableSource(table, seed=1)]
    stream = MixtureStream(sources, [1.0], seed=3)
    first = collate(next_batch(stream.take, stream.peek, 2, 64), 64)
    # Targets are exactly the completion tokens; every prompt token is masked out of the loss.
    assert first.tokens == sum(n - p for n, p in zip(*_rows(table, first.prompt_ids)))
    assert bool((first.position_ids[first.attention_mask] >= 0).all())
    saved = stream.state()
    after = [collate(next_batch(stream.take, stream.peek, 2, 64), 64).prompt_ids for _ in range(3)]
    resumed = MixtureStream(sources, [1.0], seed=3, state=json.loads(json.dumps(saved)))
    again = [collate(next_batch(resumed.take, resumed.peek, 2, 64), 64).prompt_ids for _ in range(3)]
    assert after == again


def test_packing_fills_earlier_sequences_first_fit_in_stream_order():
    rows = [
        {"input_ids": [1] * n, "id": i, "prompt_id": str(i), "prompt_len": 1, "topk_ids": None}
        for i, n in enumerate([100, 80, 200, 70, 250, 300, 10, 256])
    ]
    pending = list(rows)
    take, peek = (lambda: pending.pop(0)), (lambda: pending[0])
    first = next_batch(take, peek, 2, 256)
    # 70 tokens fit the first sequence's gap (180 used); 250 fits neither and waits for the next batch
    assert [[r["id"] for r in seq] for seq in first] == [[0, 1, 3], [2]]
    assert pending[0]["id"] == 4
    second = next_batch(take, peek, 2, 256)
    # a row longer than seq_len fills a sequence alone (collate truncates it); 10 fits nowhere after it
    assert [[r["id"] for r in seq] for seq in second] == [[4], [5]]
    assert collate(second, 256, needs_soft_labels=False).attention_mask.sum(dim=1).tolist() == [250, 256]
    assert [[r["id"] for r in seq] for seq in next_batch(take, peek, 1, 256)] == [[6]]


def _rows(table, prompt_ids):
    by_id = {
        p: (ids, pl)
        for p, ids, pl in zip(
            table["prompt_id"].to_pylist(), table["input_ids"].to_pylist(), table["prompt_len"].to_pylist()
        )
    }
    picked = [by_id[p] for p in prompt_ids]
    return [min(len(ids), 64) for ids, _ in picked], [pl for _, pl in picked]
