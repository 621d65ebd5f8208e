"""Scheduler with a controllable clock and a fake job submitter."""

from __future__ import annotations

import datetime as dt

import pytest

from cluster import storage
from cluster.errors import ConfigError
from pipelines.config import load_config
from pipelines.scheduler import JobExists, JobNotFound, Scheduler, state_uri

UTC = dt.timezone.utc


def at(hour: int, minute: int = 0, day: int = 5) -> dt.datetime:
    return dt.datetime(2026, 1, day, hour, minute, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: dt.datetime):
        self.t = now

    def now(self) -> dt.datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


class FakeSubmitter:
    """Jobs run for ``duration`` of fake time; records the largest number running at once."""

    def __init__(self, clock: FakeClock, duration: dt.timedelta):
        self.clock, self.duration = clock, duration
        self.jobs: dict[str, dict] = {}
        self.max_running = 0

    def _state(self, job: dict) -> str:
        if job["stopped"]:
            return "STOPPED"
        return "RUNNING" if self.clock.now() < job["start"] + self.duration else "SUCCEEDED"

    def running(self) -> int:
        return sum(self._state(j) == "RUNNING" for j in self.jobs.values())

    def submit(self, run_id: str, submission_id: str | None = None) -> str:
        job_id = submission_id or f"job-{len(self.jobs)}"
        if job_id in self.jobs:
            raise JobExists(f"Job with submission_id {job_id} already exists")
        self.jobs[job_id] = {"run_id": run_id, "start": self.clock.now(), "stopped": False}
        self.max_running = max(self.max_running, self.running())
        return job_id

    def status(self, job_id: str) -> str:
        if job_id not in self.jobs:
            raise JobNotFound(f"Job {job_id} does not exist")
        return self._state(self.jobs[job_id])

    def stop(self, job_id: str) -> None:
        self.jobs[job_id]["stopped"] = True


def _cfg(tmp_path, *extra):
    return load_config(
        None, [f"workdir={tmp_path}", "name=sched", "schedule.cron=0 * * * *", "schedule.poll_s=60", *extra]
    )


def _run_until(sched: Scheduler, clock: FakeClock, end: dt.datetime) -> None:
    while clock.now() < end:
        sched.run(max_iterations=1)


def fired(sched: Scheduler) -> list[str]:
    return [e["tick"][11:16] for e in sched.state["history"] if e.get("job_id")]


def test_fires_at_cron_times_without_overlap(tmp_path):
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=10))
    sched = Scheduler(_cfg(tmp_path), jobs, clock)
    _run_until(sched, clock, at(13, 5))
    assert fired(sched) == ["11:00", "12:00", "13:00"]
    # each fired within a poll interval of its cron time, with a stable run id
    assert [j["start"] for j in jobs.jobs.values()] == [at(11), at(12), at(13)]
    assert [j["run_id"] for j in jobs.jobs.values()] == [
        "20260105-110000-cron",
        "20260105-120000-cron",
        "20260105-130000-cron",
    ]
    assert [e["outcome"] for e in sched.state["history"]] == ["succeeded", "succeeded", "running"]
    assert jobs.max_running == 1
    state = storage.read_json(state_uri(sched.cfg))
    assert (
        state["next_run"].startswith("2026-01-05T14:00")
        and state["active"]["job_id"] == "raydistill-sched-20260105-130000-cron"
    )


def test_forbid_skips_a_tick_while_a_run_is_going(tmp_path):
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=90))
    sched = Scheduler(_cfg(tmp_path, "schedule.concurrency=forbid"), jobs, clock)
    _run_until(sched, clock, at(13, 5))
    history = sched.state["history"]
    assert [(e["tick"][11:16], e["outcome"]) for e in history] == [
        ("11:00", "succeeded"),
        ("12:00", "skipped"),
        ("13:00", "running"),
    ]
    assert "still running" in history[1]["reason"]
    assert jobs.max_running == 1


def test_replace_stops_the_running_job(tmp_path):
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=90))
    sched = Scheduler(_cfg(tmp_path, "schedule.concurrency=replace"), jobs, clock)
    _run_until(sched, clock, at(12, 5))
    assert [(e["tick"][11:16], e["outcome"]) for e in sched.state["history"]] == [
        ("11:00", "replaced"),
        ("12:00", "running"),
    ]
    assert jobs.jobs["raydistill-sched-20260105-110000-cron"]["stopped"] and jobs.max_running == 1


def test_one_catch_up_after_downtime_and_state_survives_restart(tmp_path):
    cfg = _cfg(tmp_path)
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=30))
    first = Scheduler(cfg, jobs, clock)
    _run_until(first, clock, at(11, 10))  # fired 11:00, job still running at the "crash"
    assert fired(first) == ["11:00"] and first.state["active"]
    # the scheduler is down from 11:10 to 15:20; a new process reads the state file
    clock.t = at(15, 20)
    second = Scheduler(cfg, jobs, clock)
    assert second.state["active"]["job_id"] == "raydistill-sched-20260105-110000-cron"
    entry = second.tick()
    history = second.state["history"]
    # the old job's outcome was picked up, 12:00-14:00 are recorded as missed, only 15:00 runs
    assert history[0]["outcome"] == "succeeded"
    assert history[1]["outcome"] == "missed" and history[1]["count"] == 3
    assert history[1]["first"].startswith("2026-01-05T12:00") and history[1]["last"].startswith("2026-01-05T14:00")
    assert entry["tick"].startswith("2026-01-05T15:00") and entry["job_id"] == "raydistill-sched-20260105-150000-cron"
    assert len(jobs.jobs) == 2
    # a further tick in the same hour fires nothing
    clock.t = at(15, 50)
    assert second.tick() is None and len(jobs.jobs) == 2


def test_no_catch_up_when_disabled(tmp_path):
    cfg = _cfg(tmp_path, "schedule.catchup=false", "schedule.misfire_grace_s=120")
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=5))
    Scheduler(cfg, jobs, clock).save()
    clock.t = at(12, 30)
    sched = Scheduler(cfg, jobs, clock)
    entry = sched.tick()
    assert entry["outcome"] == "missed" and "catchup: false" in entry["reason"] and not jobs.jobs
    clock.t = at(13, 1)  # on time (60 s late < 120 s grace)
    assert sched.tick()["job_id"] == "raydistill-sched-20260105-130000-cron"


def test_fresh_scheduler_does_not_fire_for_past_ticks(tmp_path):
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=5))
    sched = Scheduler(_cfg(tmp_path), jobs, clock)
    assert sched.tick() is None and not jobs.jobs


def test_timezone_and_upcoming(tmp_path):
    cfg = _cfg(tmp_path, "schedule.cron=0 3 * * *", "schedule.timezone=Europe/Berlin")
    clock = FakeClock(at(0, 0))  # winter: Berlin is UTC+1
    sched = Scheduler(cfg, FakeSubmitter(clock, dt.timedelta(minutes=5)), clock)
    times = sched.upcoming(3)
    assert [t.astimezone(UTC) for t in times] == [at(2, 0, d) for d in (5, 6, 7)]
    assert sched.next_tick() == at(2, 0)


def test_once_runs_the_next_tick_and_waits_for_it(tmp_path):
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=20))
    sched = Scheduler(_cfg(tmp_path), jobs, clock)
    entry = sched.run(once=True, max_iterations=1000)
    assert entry["tick"].startswith("2026-01-05T11:00") and entry["outcome"] == "succeeded"
    assert at(11, 20) <= clock.now() <= at(11, 21) and len(jobs.jobs) == 1


def test_missing_cron_is_a_config_error(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}"])
    with pytest.raises(ConfigError, match="schedule.cron: not set"):
        Scheduler(cfg, FakeSubmitter(FakeClock(at(1)), dt.timedelta(0)))


# ---------------------------------------------------------------------------------------------------
# issue #16 point 10: concurrency forbid holds across crashes, flaky status calls and two schedulers
# ---------------------------------------------------------------------------------------------------
class CrashAfterSubmit(FakeSubmitter):
    """The scheduler process dies right after the job server accepted the job (before any state save)."""

    crash = True

    def submit(self, run_id, submission_id=None):
        job_id = super().submit(run_id, submission_id)
        if self.crash:
            raise SystemExit("scheduler killed after submit")
        return job_id


def test_a_crash_between_submit_and_state_save_never_runs_the_tick_twice(tmp_path):
    clock = FakeClock(at(10, 59))
    jobs = CrashAfterSubmit(clock, dt.timedelta(minutes=30))
    sched = Scheduler(_cfg(tmp_path), jobs, clock)
    clock.t = at(11, 0)
    with pytest.raises(SystemExit):
        sched.tick()
    assert len(jobs.jobs) == 1
    # A new scheduler process on the same state: the job is found running, the tick is not fired again.
    jobs.crash = False
    clock.t = at(11, 1)
    again = Scheduler(_cfg(tmp_path), jobs, clock)
    assert again.state["active"]["state"] == "submitting"
    again.tick()
    assert len(jobs.jobs) == 1 and jobs.max_running == 1
    assert again.state["active"]["job_id"] == "raydistill-sched-20260105-110000-cron"
    assert "state" not in again.state["active"]
    assert [e["outcome"] for e in again.state["history"]] == ["running"]


def test_a_crash_before_the_submit_reached_the_server_submits_once(tmp_path):
    class DiesBeforeSubmit(FakeSubmitter):
        def submit(self, run_id, submission_id=None):
            raise SystemExit("killed before the request left")

    clock = FakeClock(at(10, 59))
    sched = Scheduler(_cfg(tmp_path), DiesBeforeSubmit(clock, dt.timedelta(minutes=30)), clock)
    clock.t = at(11, 0)
    with pytest.raises(SystemExit):
        sched.tick()
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=30))
    again = Scheduler(_cfg(tmp_path), jobs, clock)
    again.tick()
    assert list(jobs.jobs) == ["raydistill-sched-20260105-110000-cron"]
    assert again.state["history"][-1]["outcome"] == "running"


def test_a_status_error_is_not_a_lost_job(tmp_path):
    class Flaky(FakeSubmitter):
        down = False

        def status(self, job_id):
            if self.down:
                raise RuntimeError("Request failed with status code 503: job server restarting")
            return super().status(job_id)

    clock = FakeClock(at(10, 30))
    jobs = Flaky(clock, dt.timedelta(minutes=90))
    sched = Scheduler(_cfg(tmp_path), jobs, clock)
    _run_until(sched, clock, at(11, 5))
    jobs.down = True
    _run_until(sched, clock, at(12, 5))  # the 12:00 tick comes while the job server cannot answer
    assert sched.state["active"] is not None
    assert fired(sched) == ["11:00"] and jobs.max_running == 1
    assert not any(e.get("outcome") == "lost" for e in sched.state["history"])
    jobs.down = False
    _run_until(sched, clock, at(13, 5))
    assert jobs.max_running == 1  # 11:00 ran until 12:30; 13:00 fired after it ended


def test_a_job_the_server_does_not_know_is_lost(tmp_path):
    clock = FakeClock(at(10, 30))
    jobs = FakeSubmitter(clock, dt.timedelta(minutes=90))
    sched = Scheduler(_cfg(tmp_path), jobs, clock)
    _run_until(sched, clock, at(11, 5))
    jobs.jobs.clear()  # the cluster restarted and forgot its jobs
    sched.tick()
    assert sched.state["active"] is None and sched.state["history"][0]["outcome"] == "lost"


def test_a_second_scheduler_on_the_same_state_refuses_to_run(tmp_path):
    from pipelines.state_lock import LockHeld

    clock = FakeClock(at(10, 30))
    first = Scheduler(_cfg(tmp_path), FakeSubmitter(clock, dt.timedelta(minutes=5)), clock)
    second = Scheduler(_cfg(tmp_path), FakeSubmitter(clock, dt.timedelta(minutes=5)), clock)
    with first.lock:  # first is inside run()
        with pytest.raises(LockHeld, match="another `raydistill schedule` runs"):
            second.run(max_iterations=1)
        with pytest.raises(LockHeld):
            second.tick()
    second.run(max_iterations=1)
