"""Speed figures: the median decode step and the median TTFT, so one burst of lost CPU time (a shared
VM's steal) cannot swing a student/teacher ratio."""

from __future__ import annotations

import dataclasses
import types

import pytest

from distill.eval import speed as speed_mod


@dataclasses.dataclass
class _Out:
    request_id: str
    token_ids: list[int]


class _ClockedEngine:
    """Every step takes a scripted time on a fake clock: a prefill that gives each request its first
    token, then one token per request per step; ``stall`` = the step numbers that lose 10x time."""

    def __init__(self, clock: list[float], prefill_s: float, step_s: float, stall: set[int]):
        self.clock, self.prefill_s, self.step_s, self.stall = clock, prefill_s, step_s, stall
        self.requests: dict[str, int] = {}
        self.steps = 0
        self.prefills = 0

    def add_request(self, request) -> None:
        self.requests[request.request_id] = request.sampling.max_tokens

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[_Out]:
        if self.steps == 0:
            self.prefills += 1
        self.clock[0] += (self.prefill_s if self.steps == 0 else self.step_s) * (10 if self.steps in self.stall else 1)
        self.steps += 1
        out = [_Out(rid, [7]) for rid in self.requests]
        self.requests = {rid: left - 1 for rid, left in self.requests.items() if left > 1}
        if not self.requests:
            self.steps = 0
        return out


def _fake_clock(monkeypatch) -> list[float]:
    clock = [100.0]
    monkeypatch.setattr(speed_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return clock


def test_decode_rate_is_the_median_step_and_a_stalled_step_only_moves_the_wall_rate(monkeypatch):
    clock = _fake_clock(monkeypatch)
    engine = _ClockedEngine(clock, prefill_s=0.5, step_s=0.1, stall={3})
    got = speed_mod.measure_engine(engine, batch=4, prompt_tokens=8, new_tokens=11, vocab=1000)
    assert got["ttft_s"] == pytest.approx(0.5)
    assert got["decode_steps"] == 10
    assert abs(got["decode_tokens_per_s"] - 4 / 0.1) < 1e-6  # 4 tokens per 0.1 s step
    # 40 tokens over 9 steps of 0.1 s and one of 1.0 s
    assert abs(got["decode_tokens_per_s_wall"] - 40 / 1.9) < 1e-6
    assert got["total_tokens"] == 44


def test_ttft_is_the_median_of_repeated_prefills(monkeypatch):
    clock = _fake_clock(monkeypatch)
    engine = _ClockedEngine(clock, prefill_s=0.2, step_s=0.05, stall=set())
    prefills = iter([0.2, 2.0, 0.3])  # the second prefill loses CPU time

    def step():
        engine.prefill_s = next(prefills) if engine.steps == 0 else engine.prefill_s
        return _ClockedEngine.step(engine)

    engine.step = step
    monkeypatch.setattr(speed_mod, "_engine_class", lambda: types.SimpleNamespace(from_model=lambda *a, **k: engine))
    model = types.SimpleNamespace()
    tokenizer = [0] * 1000
    got = speed_mod.measure_speed(
        model, tokenizer, name="m", batch_sizes=[1], prompt_tokens=8, new_tokens=4, warmup=False, repeats=3
    )
    one = got["by_batch"]["1"]
    assert got["engine"] == "LLMEngine" and got["repeats"] == 3
    assert one["ttft_s_runs"] == pytest.approx([0.2, 2.0, 0.3]) and one["ttft_s"] == pytest.approx(0.3)
    assert engine.prefills == 3
