"""Cron scheduling of pipeline runs as Ray jobs, with state in ``{workdir}/{name}/schedule/state.json``.

The scheduler is a loop around :meth:`Scheduler.tick`: poll the running job, work out which cron
times (``schedule.cron`` read in ``schedule.timezone``) passed since the last handled one, and fire
the most recent of them. Rules:

* never two runs at once: a tick while a job runs is skipped (``concurrency: forbid``) or stops the
  running job first (``replace``);
* after downtime at most one missed tick runs (the latest); older ones are recorded as missed.
  With ``catchup: false`` a tick later than ``misfire_grace_s`` is recorded as missed too;
* a fresh state starts at "now" (no firing for cron times before the scheduler first ran);
* every decision rewrites ``state.json`` atomically, so a restarted scheduler continues: it polls
  the job it had submitted and resumes from the last handled tick;
* a run's job id is deterministic (:func:`submission_id_for`) and saved, with the tick, *before* the
  submit: a crash between submit and save never fires the tick twice; the restarted scheduler asks
  the job server for that id and submits only if the server does not know it;
* only "no such job" (:class:`JobNotFound`) counts as a lost job; any other status error (job server
  restarting, network) leaves the job running and is asked again at the next poll;
* one scheduler per state: it holds a lock beside ``state.json`` (:mod:`pipelines.state_lock`)
  while it runs, so a second scheduler process of the same pipeline refuses to start.

Time and jobs are injected: ``clock`` (``now()`` aware datetime, ``sleep(seconds)``) and
``submitter`` (``submit(run_id, submission_id) -> job_id``, ``status(job_id) -> str``,
``stop(job_id)``), so tests drive it with a fake clock and a fake submitter; production uses
:class:`RayJobSubmitter`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from croniter import croniter

from cluster import storage
from cluster.errors import ConfigError, RaydistillError
from pipelines.config import PipelineConfig

log = logging.getLogger(__name__)
TERMINAL = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "stopped"}
MAX_MISSED_COUNT = 10_000  # cap on counting missed ticks after a very long downtime


class Clock(Protocol):
    def now(self) -> dt.datetime: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class JobNotFound(RaydistillError):
    """The job server does not know the job (``status`` of an unknown id)."""


class JobExists(RaydistillError):
    """A job with this submission id was submitted already."""


class JobSubmitter(Protocol):
    def submit(self, run_id: str, submission_id: str | None = None) -> str: ...

    # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED; JobNotFound for an unknown id
    def status(self, job_id: str) -> str: ...

    def stop(self, job_id: str) -> None: ...


def submission_id_for(name: str, run_id: str) -> str:
    """The Ray job id of a scheduled run: the same for the same pipeline and tick, so re-firing a tick
    after a crash finds (or is refused with) the job already submitted."""
    return f"raydistill-{name}-{run_id}"


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.timezone.utc).isoformat() if value else None


def _parse(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def state_uri(cfg: PipelineConfig) -> str:
    from cluster.runs import runs_root

    return storage.join(runs_root(cfg), "schedule", "state.json")


def run_id_for(tick: dt.datetime) -> str:
    """Run ids of scheduled runs sort with ``cluster.runs.new_run_id`` ones and are stable per tick."""
    return tick.astimezone(dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-cron"


class Scheduler:
    def __init__(
        self, cfg: PipelineConfig, submitter: JobSubmitter, clock: Clock | None = None, uri: str | None = None
    ):
        if not cfg.schedule.cron:
            raise ConfigError("schedule.cron: not set; add e.g. `schedule: {cron: '0 3 * * *', timezone: UTC}`")
        self.cfg = cfg
        self.section = cfg.schedule
        self.tz = ZoneInfo(self.section.timezone)
        self.submitter = submitter
        self.clock = clock or SystemClock()
        self.uri = uri or state_uri(cfg)
        from pipelines.state_lock import StateLock

        self.lock = StateLock(
            self.uri,
            timeout=0.0,
            lease_s=max(300.0, 3 * self.section.poll_s),
            what=f"the scheduler state of {cfg.name} (another `raydistill schedule` runs)",
        )
        self.state = self._load()

    # ---------------------------------------------------------------------------------- state
    def _load(self) -> dict[str, Any]:
        if storage.exists(self.uri):
            state = storage.read_json(self.uri)
            if state.get("cron") != self.section.cron or state.get("timezone") != self.section.timezone:
                # A new schedule continues the history but counts ticks from now, not from the old cron.
                state.update(
                    cron=self.section.cron,
                    timezone=self.section.timezone,
                    last_tick=None,
                    anchor=_iso(self.clock.now()),
                )
            return state
        return {
            "name": self.cfg.name,
            "cron": self.section.cron,
            "timezone": self.section.timezone,
            "anchor": _iso(self.clock.now()),
            "last_tick": None,
            "next_run": None,
            "active": None,
            "history": [],
            "started_at": _iso(self.clock.now()),
        }

    def save(self) -> None:
        self.state["history"] = self.state["history"][-self.section.history :]
        self.state["next_run"] = _iso(self.next_tick())
        self.state["updated_at"] = _iso(self.clock.now())
        storage.atomic_write_json(self.uri, self.state)

    def _record(self, **entry: Any) -> dict[str, Any]:
        self.state["history"].append(entry)
        return entry

    # ----------------------------------------------------------------------------------- cron
    def _after(self) -> dt.datetime:
        return _parse(self.state.get("last_tick")) or _parse(self.state["anchor"])

    def next_tick(self, after: dt.datetime | None = None) -> dt.datetime:
        base = (after or self._after()).astimezone(self.tz)
        return croniter(self.section.cron, base).get_next(dt.datetime).astimezone(dt.timezone.utc)

    def upcoming(self, count: int = 5) -> list[dt.datetime]:
        it = croniter(self.section.cron, max(self._after(), self.clock.now()).astimezone(self.tz))
        return [it.get_next(dt.datetime) for _ in range(count)]

    def due_ticks(self, now: dt.datetime) -> list[dt.datetime]:
        """Cron times after the last handled one and not after ``now`` (oldest first, capped)."""
        it = croniter(self.section.cron, self._after().astimezone(self.tz))
        out = []
        while len(out) < MAX_MISSED_COUNT:
            tick = it.get_next(dt.datetime).astimezone(dt.timezone.utc)
            if tick > now:
                break
            out.append(tick)
        return out

    # ----------------------------------------------------------------------------------- jobs
    def poll(self) -> str | None:
        """Update the active job; returns its outcome when it just ended."""
        active = self.state.get("active")
        if not active:
            return None
        try:
            raw = self.submitter.status(active["job_id"])
            status = str(getattr(raw, "value", raw))
        except JobNotFound as exc:
            if active.get("state") == "submitting":  # saved, then the process died before the submit
                return self._submit(active)
            log.warning("job %s is unknown to the job server (cluster restarted?): %s", active["job_id"], exc)
            status = "LOST"
        except Exception as exc:  # noqa: BLE001 - job server unreachable, restarting...: ask again later
            log.warning("cannot get status of job %s (asking again at the next poll): %s", active["job_id"], exc)
            return None
        if active.get("state") == "submitting":  # the submit went through before the crash
            self._mark_submitted(active)
        outcome = TERMINAL.get(status) or ("lost" if status == "LOST" else None)
        if outcome is None:
            return None
        self._finish(active["job_id"], outcome)
        return outcome

    def _finish(self, job_id: str, outcome: str) -> None:
        for entry in reversed(self.state["history"]):
            if entry.get("job_id") == job_id:
                entry.update(outcome=outcome, ended_at=_iso(self.clock.now()))
                break
        if (self.state.get("active") or {}).get("job_id") == job_id:
            self.state["active"] = None
        self.save()

    def _fire(self, tick: dt.datetime) -> dict[str, Any]:
        now = self.clock.now()
        active = self.state.get("active")
        if active:
            if self.section.concurrency == "forbid":
                self.state["last_tick"] = _iso(tick)
                entry = self._record(
                    tick=_iso(tick),
                    outcome="skipped",
                    at=_iso(now),
                    reason=f"run {active['run_id']} (job {active['job_id']}) still running",
                )
                self.save()
                return entry
            try:
                self.submitter.stop(active["job_id"])
            except Exception as exc:  # noqa: BLE001 - it may have just ended
                log.warning("stopping job %s: %s", active["job_id"], exc)
            self._finish(active["job_id"], "replaced")
        run_id = run_id_for(tick)
        job_id = submission_id_for(self.cfg.name, run_id)
        # Saved before the submit: a crash after it never re-fires this tick (see poll()).
        self.state["last_tick"] = _iso(tick)
        active = {"job_id": job_id, "run_id": run_id, "tick": _iso(tick), "submitted_at": None, "state": "submitting"}
        self.state["active"] = active
        self._record(tick=_iso(tick), run_id=run_id, job_id=job_id, outcome="submitting", at=_iso(now))
        self.save()
        self._submit(active)
        return next(e for e in reversed(self.state["history"]) if e.get("job_id") == job_id)

    def _submit(self, active: dict[str, Any]) -> str | None:
        """Submit the saved ``active`` job; returns its outcome when the submit failed."""
        try:
            self.submitter.submit(active["run_id"], active["job_id"])
        except JobExists:
            pass  # submitted before a crash: it runs already
        except Exception as exc:  # noqa: BLE001 - recorded; the next tick tries again
            for entry in reversed(self.state["history"]):
                if entry.get("job_id") == active["job_id"]:
                    entry.update(outcome="submit_failed", reason=str(exc))
                    break
            self.state["active"] = None
            self.save()
            return "submit_failed"
        self._mark_submitted(active)
        return None

    def _mark_submitted(self, active: dict[str, Any]) -> None:
        now = _iso(self.clock.now())
        active.pop("state", None)
        active["submitted_at"] = active.get("submitted_at") or now
        for entry in reversed(self.state["history"]):
            if entry.get("job_id") == active["job_id"]:
                if entry.get("outcome") == "submitting":
                    entry.update(outcome="running", submitted_at=active["submitted_at"])
                break
        self.save()

    def tick(self) -> dict[str, Any] | None:
        """One scheduling decision at ``clock.now()``; returns the history entry of a fired tick, if any.
        Holds the scheduler lock (LockHeld when another scheduler of this state runs)."""
        with self.lock:
            self.lock.renew()
            return self._tick()

    def _tick(self) -> dict[str, Any] | None:
        self.poll()
        now = self.clock.now()
        due = self.due_ticks(now)
        if not due:
            self.save()
            return None
        latest, missed = due[-1], due[:-1]
        if missed:
            self._record(
                outcome="missed",
                count=len(missed),
                first=_iso(missed[0]),
                last=_iso(missed[-1]),
                at=_iso(now),
                reason="scheduler was down; only the latest missed tick runs",
            )
        late = (now - latest).total_seconds()
        if not self.section.catchup and late > self.section.misfire_grace_s:
            self.state["last_tick"] = _iso(latest)
            entry = self._record(
                tick=_iso(latest),
                outcome="missed",
                at=_iso(now),
                reason=f"{late:.0f}s late > misfire_grace_s={self.section.misfire_grace_s:g} (catchup: false)",
            )
            self.save()
            return entry
        return self._fire(latest)

    def run(
        self,
        *,
        once: bool = False,
        max_iterations: int | None = None,
        notify: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any] | None:
        """Loop: tick, then sleep until the next cron time or ``poll_s``. ``once``: return after one fired
        run has ended (its history entry); ``max_iterations`` bounds the loop (tests); ``notify`` gets
        each new history entry."""
        with self.lock:  # for the scheduler's whole life: a second scheduler of this state refuses to start
            return self._run(once=once, max_iterations=max_iterations, notify=notify)

    def _run(
        self, *, once: bool, max_iterations: int | None, notify: Callable[[dict[str, Any]], None] | None
    ) -> dict[str, Any] | None:
        fired: dict[str, Any] | None = None
        iterations = 0
        while max_iterations is None or iterations < max_iterations:
            iterations += 1
            before = [json.dumps(e, sort_keys=True) for e in self.state["history"]]
            entry = self.tick()
            if notify:
                for item in self.state["history"]:
                    if json.dumps(item, sort_keys=True) not in before:
                        notify(item)
            if once and fired is None and entry is not None and entry.get("job_id"):
                fired = entry
            if once and fired is not None:
                if fired.get("outcome") != "running":
                    return fired
            elif once and entry is not None and entry.get("outcome") == "submit_failed":
                return entry
            wait = (self.next_tick() - self.clock.now()).total_seconds()
            self.clock.sleep(max(0.05, min(wait, self.section.poll_s)))
        return fired


# --------------------------------------------------------------------------------- Ray job submit
def job_server_address(cfg: PipelineConfig, address: str | None = None) -> str:
    import os

    address = address or cfg.schedule.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if "://" not in address:
        host = address.split(":")[0]
        address = f"http://{host}:8265"  # a GCS address (host:6379): the job server is the dashboard port
    return address


def ray_auth_token() -> str | None:
    """This machine's Ray cluster token, found where ``ray get-auth-token`` finds it: ``$RAY_AUTH_TOKEN``,
    the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. None when there is none."""
    import os

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def job_server_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` for the Ray job server when this machine has a cluster token.

    Ray's own client sends the token only when ``RAY_AUTH_MODE=token`` is set in the client's
    environment; a laptop that copied the head's token (README: "Cluster access") should not need that.
    ``RAY_AUTH_MODE=disabled`` sends nothing."""
    import os

    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return {}
    token = ray_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _is_local_address(address: str) -> bool:
    return any(h in address for h in ("127.0.0.1", "localhost", "[::1]"))


def job_entrypoint(
    cfg: PipelineConfig, config_path: str, overrides: list[str], extra_args: list[str], address: str
) -> str:
    """``python -m pipelines.run CONFIG --set ... EXTRA``, with CONFIG relative to the shipped working_dir."""
    from cluster.ray_init import PROJECT_ROOT

    if "://" in config_path:
        config_arg = config_path
    else:
        path = Path(config_path).resolve()
        try:
            config_arg = str(path.relative_to(PROJECT_ROOT))
        except ValueError:
            raise ConfigError(
                f"config {config_path} is outside {PROJECT_ROOT}, the folder shipped to the cluster as "
                "working_dir; move it into the project or use a shared URI (s3://..., gs://...)"
            ) from None
    sets = list(overrides)
    if storage.is_local(cfg.workdir) and not any(s.startswith("workdir=") for s in sets):
        if _is_local_address(address):
            # Same machine: keep runs where the user expects them, not in Ray's temp working_dir copy.
            sets.append(f"workdir={storage.absolute(cfg.workdir)}")
        else:
            log.warning(
                "workdir %r is local: on a remote cluster the runs land on the head node's disk; use a "
                "shared URI (s3://bucket/runs) to read them from here",
                cfg.workdir,
            )
    parts = ["python", "-m", "pipelines.run", config_arg]
    for item in sets:
        parts += ["--set", item]
    return " ".join(shlex.quote(p) for p in parts + list(extra_args))


def job_runtime_env(cfg: PipelineConfig) -> dict[str, Any]:
    from cluster.ray_init import build_runtime_env

    extras = list(dict.fromkeys([*cfg.ray.extras, *cfg.schedule.extras]))
    return build_runtime_env(
        pip=cfg.schedule.pip or None, extras=extras or None, env_vars=cfg.schedule.env_vars or None
    )


class RayJobSubmitter:
    """Submits ``python -m pipelines.run`` through Ray's ``JobSubmissionClient``."""

    def __init__(
        self,
        cfg: PipelineConfig,
        config_path: str,
        overrides: list[str] | None = None,
        address: str | None = None,
        client: Any = None,
    ):
        self.cfg = cfg
        self.address = job_server_address(cfg, address)
        self.config_path = config_path
        self.overrides = list(overrides or [])
        self._client = client
        self.agent_wait_s = 60.0

    @property
    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address, headers=job_server_headers() or None)
            except Exception as exc:  # noqa: BLE001 - connection / auth problems, with the fix
                raise RaydistillError(
                    f"cannot reach the Ray job server at {self.address} ({exc}); pass "
                    "--address http://HEAD:8265 or set schedule.address. A cluster with token auth "
                    "(the default of `ray start` since Ray 2.60) needs its token here: copy the "
                    "head's ~/.ray/auth_token (`ray get-auth-token` on the head) to this machine's "
                    "~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH"
                ) from exc
        return self._client

    def submit(
        self, run_id: str | None = None, submission_id: str | None = None, extra_args: list[str] | None = None
    ) -> str:
        """Submit ``python -m pipelines.run`` as a Ray job; ``submission_id`` (default: a fresh random one)
        is the job id. JobExists when the job server has a job of that id already."""
        import secrets

        args = list(extra_args or [])
        if run_id:
            args = ["--run", run_id, *args]
        entrypoint = job_entrypoint(self.cfg, self.config_path, self.overrides, args, self.address)
        submission_id = submission_id or f"raydistill-{self.cfg.name}-{run_id or 'run'}-{secrets.token_hex(3)}"
        kwargs: dict[str, Any] = {}
        if self.cfg.schedule.entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = self.cfg.schedule.entrypoint_num_cpus
        runtime_env = job_runtime_env(self.cfg)
        deadline = time.monotonic() + self.agent_wait_s
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=entrypoint,
                    runtime_env=runtime_env,
                    submission_id=submission_id,
                    metadata={"raydistill_pipeline": self.cfg.name, "run_id": run_id or ""},
                    **kwargs,
                )
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    raise JobExists(str(exc)) from None
                # A cluster that just started answers 500 until its job agent has registered.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def status(self, job_id: str) -> str:
        """The job's status; JobNotFound when the job server answers 404 (it does not know the id)."""
        try:
            status = self.client.get_job_status(job_id)
        except RuntimeError as exc:
            if "status code 404" in str(exc) or "does not exist" in str(exc):
                raise JobNotFound(str(exc)) from None
            raise
        return str(getattr(status, "value", status))

    def stop(self, job_id: str) -> None:
        self.client.stop_job(job_id)
