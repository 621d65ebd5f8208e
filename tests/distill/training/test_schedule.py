"""The learning-rate schedule: warmup reaches the peak, then the decay runs over the rest of the stage."""

from __future__ import annotations

import pytest

from distill.training.loop import lr_at
from distill.training.section import TrainSection


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_reaches_the_peak_then_decays_to_the_floor(schedule):
    section = TrainSection.model_validate(
        {"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 4, "stages": [{"steps": 12, "schedule": schedule}]}
    )
    stage = section.stages[0]
    lrs = [lr_at(section, stage, s, s / 12) for s in range(12)]
    assert lrs[4] == pytest.approx(1e-3)  # step == warmup_steps is at the peak
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5]))  # warmup increases
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # then decays
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] > 1e-4
    assert lr_at(section, stage, 12, 1.0) == pytest.approx(1e-4)  # the floor after the last step


def test_token_stage_decays_from_where_warmup_ended():
    section = TrainSection.model_validate(
        {"lr": 1e-3, "min_lr_ratio": 0.0, "warmup_steps": 2, "stages": [{"tokens": 1000}]}
    )
    stage = section.stages[0]
    assert lr_at(section, stage, 2, 0.25, decay_from=0.25) == pytest.approx(1e-3)
    assert lr_at(section, stage, 5, 0.625, decay_from=0.25) == pytest.approx(0.5e-3)  # halfway through the decay
