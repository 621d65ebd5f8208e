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


def test_models_are_timed_in_turn_abba_and_each_figure_is_the_median_of_its_rounds(monkeypatch):
    """Two models, two rounds: teacher, student, student, teacher at each batch size, then the extra
    prefill-only TTFT runs in turn; each figure is the median of the model's runs, all of them kept."""
    clock = _fake_clock(monkeypatch)
    calls: list[tuple[str, int, int]] = []
    step_s = {"teacher": 0.1, "student": 0.05}
    slow = {2}  # the third full run overall (the student's second at batch 1) loses 4x time per step

    def engine_for(name):
        engine = _ClockedEngine(clock, prefill_s=0.2, step_s=step_s[name], stall=set())
        real_add = engine.add_request

        def add_request(request):
            if not engine.requests:  # a new run: record it, and slow it down if scripted
                calls.append((name, request.sampling.max_tokens, len(calls)))
                engine.step_s = step_s[name] * (4 if len(calls) - 1 in slow else 1)
            real_add(request)

        engine.add_request = add_request
        return engine

    monkeypatch.setattr(
        speed_mod, "_engine_class", lambda: types.SimpleNamespace(from_model=lambda m, t, **k: engine_for(k["name"]))
    )
    tok = [0] * 1000
    models = {"teacher": (types.SimpleNamespace(), tok), "student": (types.SimpleNamespace(), tok)}
    got = speed_mod.measure_speeds(
        models, batch_sizes=[1, 2], prompt_tokens=8, new_tokens=6, warmup=False, repeats=3, rounds=2
    )
    order = [name for name, _, _ in calls]
    # batch 1: T S S T; batch 2: T S S T; then one prefill-only run each (repeats 3 - rounds 2), in turn
    assert order == ["teacher", "student", "student", "teacher"] * 2 + ["teacher", "student"]
    assert [n for _, n, _ in calls][-2:] == [2, 2]
    student_1 = got["student"]["by_batch"]["1"]
    assert student_1["decode_tokens_per_s_runs"] == pytest.approx([1 / 0.05, 1 / 0.2])
    assert student_1["decode_tokens_per_s"] == pytest.approx((20 + 5) / 2)  # the median of two is their mean
    assert got["teacher"]["by_batch"]["2"]["decode_tokens_per_s"] == pytest.approx(2 / 0.1)
    assert len(student_1["ttft_s_runs"]) == 3 and got["student"]["rounds"] == 2


def test_the_warm_up_runs_every_timed_shape_once_and_is_not_timed(monkeypatch):
    """A model's first prefill of a shape is slow (oneDNN primitives, first-touch allocation): the
    warm-up runs each batch size at the timed prompt length, per model, before any timed run."""
    calls = []

    def runner(model, tokenizer, name, batch_sizes, prompt_tokens, new_tokens):
        def run(b, p, n):
            calls.append((name, b, p, n))
            ttft = 9.0 if len(calls) <= 4 else 0.1  # the warm-up runs are the slow ones
            return {
                "batch": b,
                "ttft_s": ttft,
                "decode_tokens_per_s": 10.0,
                "decode_tokens_per_s_wall": 10.0,
                "wall_s": 1.0,
                "decode_steps": n - 1,
                "total_tokens": b * n,
            }

        return "LLMEngine", run

    monkeypatch.setattr(speed_mod, "_runner", runner)
    models = {"teacher": (None, None), "student": (None, None)}
    got = speed_mod.measure_speeds(models, batch_sizes=[1, 4], prompt_tokens=16, new_tokens=6, repeats=5, rounds=2)
    assert calls[:4] == [("teacher", 1, 16, 2), ("student", 1, 16, 2), ("teacher", 4, 16, 2), ("student", 4, 16, 2)]
    assert len(calls) == 4 + 2 * 2 * 2 + 2 * 3  # warm-up, rounds at both sizes, 3 more prefills at batch 1
    for name in models:
        assert got[name]["by_batch"]["1"]["ttft_s_runs"] == [0.1] * 5
