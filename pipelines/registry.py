"""The serving registry ``{workdir}/{name}/serving.json``: which model is served, and what was before.

    {"name": ..., "current": entry | null, "previous": [entry, ...]  (most recent last),
     "events": [{"action": "promote" | "rollback", "model_dir", "run_id", "at"}, ...]}

An entry is ``{"model_dir", "run_id", "promoted_at", "base_url", "metrics", "report"}``. ``promote``
pushes the current entry onto ``previous``; ``rollback`` pops it back (so rolling back twice goes
two promotions back). Every change is one atomic rewrite of the file, made under a lock
(``serving.json.lock``, :mod:`pipelines.state_lock`), so two pipelines never lose each other's update.

Changing what is served is crash-safe: :meth:`Registry.change` takes the lock for the whole change,
records the intent (``"pending": {"action", "model_dir", ...}``) *before* serving changes, and the
caller commits with :meth:`promote` / :meth:`rollback` (which clear it). A change interrupted between
serving and recording leaves ``pending``; the next change first calls :meth:`recover` with the model
actually served, which completes the interrupted change if serving did switch, else drops it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from cluster import storage
from cluster.errors import RaydistillError
from pipelines.config import PipelineConfig
from pipelines.manifest import utcnow
from pipelines.state_lock import StateLock

log = logging.getLogger(__name__)

REGISTRY_FILE = "serving.json"
MAX_EVENTS = 200


class Registry:
    def __init__(self, root: str, name: str, *, lock_timeout: float = 1800.0):
        self.root = root
        self.name = name
        self.lock = StateLock(self.uri, timeout=lock_timeout, lease_s=3600.0, what=f"the serving registry of {name}")

    @classmethod
    def for_config(cls, cfg: PipelineConfig) -> Registry:
        from cluster.runs import runs_root

        return cls(runs_root(cfg), cfg.name)

    @property
    def uri(self) -> str:
        return storage.join(self.root, REGISTRY_FILE)

    def load(self) -> dict[str, Any]:
        if storage.exists(self.uri):
            return storage.read_json(self.uri)
        return {"name": self.name, "current": None, "previous": [], "events": []}

    def _save(self, data: dict[str, Any]) -> None:
        data["events"] = data["events"][-MAX_EVENTS:]
        storage.atomic_write_json(self.uri, data)

    def pending(self) -> dict[str, Any] | None:
        """The change recorded as begun but not committed (an interrupted promote/rollback), if any."""
        return self.load().get("pending")

    @contextlib.contextmanager
    def change(
        self, action: str, model_dir: str, *, run_id: str | None = None, served: str | None = None
    ) -> Iterator[None]:
        """Hold the registry lock for a whole change of the served model and record the intent first.

        ``served``: the model dir serving now (None = unknown / nothing served), used to resolve an earlier
        interrupted change (:meth:`recover`). Inside the block the caller changes serving, then commits
        with :meth:`promote` or :meth:`rollback`. If the block raises, the intent stays recorded: the next
        change finds out from what is actually served whether it happened.
        """
        with self.lock:
            self.recover(served)
            data = self.load()
            data["pending"] = {"action": action, "model_dir": model_dir, "run_id": run_id, "at": utcnow()}
            self._save(data)
            yield

    def recover(self, served: str | None) -> str | None:
        """Resolve an interrupted change: ``"completed"`` when ``served`` is its model (serving switched
        before the crash: the change is recorded now), ``"abandoned"`` otherwise; None if there was none."""
        with self.lock:
            data = self.load()
            pending = data.get("pending")
            if not pending:
                return None
            if served is not None and served == pending["model_dir"]:
                log.warning(
                    "serving.json: completing the interrupted %s of %s (it is being served)",
                    pending["action"],
                    pending["model_dir"],
                )
                if (
                    pending["action"] == "rollback"
                    and data["previous"]
                    and data["previous"][-1].get("model_dir") == pending["model_dir"]
                ):
                    self.rollback(recovered=True)
                else:
                    self.promote(pending["model_dir"], run_id=pending.get("run_id") or "", recovered=True)
                return "completed"
            log.warning(
                "serving.json: the interrupted %s of %s did not take effect (serving %s); dropping it",
                pending["action"],
                pending["model_dir"],
                served,
            )
            data.pop("pending", None)
            data["events"].append({"action": "abandoned", "intent": pending, "served": served, "at": utcnow()})
            self._save(data)
            return "abandoned"

    def current(self) -> dict[str, Any] | None:
        return self.load()["current"]

    def previous(self) -> list[dict[str, Any]]:
        return self.load()["previous"]

    def baseline_for(self, run_id: str) -> dict[str, Any] | None:
        """The served model a run's student is compared with: the current one, unless that is this run's
        own student (a rerun after promotion), then the one before it."""
        data = self.load()
        for entry in [data["current"], *reversed(data["previous"])]:
            if entry and entry.get("run_id") != run_id:
                return entry
        return None

    def promote(
        self,
        model_dir: str,
        *,
        run_id: str,
        base_url: str | None = None,
        metrics: dict[str, Any] | None = None,
        report: str | None = None,
        recovered: bool = False,
    ) -> dict[str, Any]:
        """Record ``model_dir`` as served; the old current model becomes the rollback target."""
        with self.lock:
            return self._promote(
                model_dir, run_id=run_id, base_url=base_url, metrics=metrics, report=report, recovered=recovered
            )

    def _promote(
        self,
        model_dir: str,
        *,
        run_id: str,
        base_url: str | None,
        metrics: dict[str, Any] | None,
        report: str | None,
        recovered: bool,
    ) -> dict[str, Any]:
        data = self.load()
        data.pop("pending", None)
        entry = {
            "model_dir": model_dir,
            "run_id": run_id,
            "promoted_at": utcnow(),
            "base_url": base_url,
            "metrics": metrics or {},
            "report": report,
        }
        current = data["current"]
        if current and current.get("model_dir") == model_dir:
            # Redeploying the model that is already current (a rerun): refresh, keep the history as is.
            data["current"] = {**current, "base_url": base_url or current.get("base_url")}
            self._save(data)
            return data["current"]
        if current:
            data["previous"].append(current)
        data["current"] = entry
        event = {"action": "promote", "model_dir": model_dir, "run_id": run_id, "at": entry["promoted_at"]}
        if recovered:
            event["recovered"] = True
        data["events"].append(event)
        self._save(data)
        return entry

    def rollback(self, *, recovered: bool = False) -> dict[str, Any]:
        """Make the previously served model current again; returns its entry."""
        with self.lock:
            return self._rollback(recovered)

    def _rollback(self, recovered: bool) -> dict[str, Any]:
        data = self.load()
        if not data["previous"]:
            raise RaydistillError(
                f"nothing to roll back to: {self.uri} has no previous model "
                f"(current: {(data['current'] or {}).get('model_dir')})"
            )
        old = data["current"]
        entry = data["previous"].pop()
        entry = {**entry, "restored_at": utcnow()}
        data["current"] = entry
        data.pop("pending", None)
        event = {
            "action": "rollback",
            "model_dir": entry["model_dir"],
            "run_id": entry.get("run_id"),
            "from_model_dir": (old or {}).get("model_dir"),
            "at": entry["restored_at"],
        }
        if recovered:
            event["recovered"] = True
        data["events"].append(event)
        self._save(data)
        return entry

    def set_base_url(self, base_url: str) -> None:
        with self.lock:
            data = self.load()
            if data["current"]:
                data["current"]["base_url"] = base_url
                self._save(data)
