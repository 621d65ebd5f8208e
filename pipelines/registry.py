"""The serving registry ``{workdir}/{name}/serving.json``: which model is served, and what was before.

    {"name": ..., "current": entry | null, "previous": [entry, ...]  (most recent last),
     "events": [{"action": "promote" | "rollback", "model_dir", "run_id", "at"}, ...]}

An entry is ``{"model_dir", "run_id", "promoted_at", "base_url", "metrics", "report"}``. ``promote``
pushes the current entry onto ``previous``; ``rollback`` pops it back (so rolling back twice goes
two promotions back). Every change is one atomic rewrite of the file.
"""

from __future__ import annotations

from typing import Any, Optional

from cluster import storage
from cluster.errors import RaydistillError
from pipelines.manifest import utcnow

REGISTRY_FILE = "serving.json"
MAX_EVENTS = 200


class Registry:
    def __init__(self, root: str, name: str):
        self.root = root
        self.name = name

    @classmethod
    def for_config(cls, cfg) -> "Registry":
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

    def current(self) -> Optional[dict[str, Any]]:
        return self.load()["current"]

    def previous(self) -> list[dict[str, Any]]:
        return self.load()["previous"]

    def baseline_for(self, run_id: str) -> Optional[dict[str, Any]]:
        """The served model a run's student is compared with: the current one, unless that is this run's
        own student (a rerun after promotion), then the one before it."""
        data = self.load()
        for entry in [data["current"], *reversed(data["previous"])]:
            if entry and entry.get("run_id") != run_id:
                return entry
        return None

    def promote(self, model_dir: str, *, run_id: str, base_url: Optional[str] = None,
                metrics: Optional[dict[str, Any]] = None, report: Optional[str] = None) -> dict[str, Any]:
        """Record ``model_dir`` as served; the old current model becomes the rollback target."""
        data = self.load()
        entry = {"model_dir": model_dir, "run_id": run_id, "promoted_at": utcnow(), "base_url": base_url,
                 "metrics": metrics or {}, "report": report}
        current = data["current"]
        if current and current.get("model_dir") == model_dir:
            # Redeploying the model that is already current (a rerun): refresh, keep the history as is.
            data["current"] = {**current, "base_url": base_url or current.get("base_url")}
            self._save(data)
            return data["current"]
        if current:
            data["previous"].append(current)
        data["current"] = entry
        data["events"].append({"action": "promote", "model_dir": model_dir, "run_id": run_id, "at": entry["promoted_at"]})
        self._save(data)
        return entry

    def rollback(self) -> dict[str, Any]:
        """Make the previously served model current again; returns its entry."""
        data = self.load()
        if not data["previous"]:
            raise RaydistillError(f"nothing to roll back to: {self.uri} has no previous model "
                                  f"(current: {(data['current'] or {}).get('model_dir')})")
        old = data["current"]
        entry = data["previous"].pop()
        entry = {**entry, "restored_at": utcnow()}
        data["current"] = entry
        data["events"].append({"action": "rollback", "model_dir": entry["model_dir"], "run_id": entry.get("run_id"),
                               "from_model_dir": (old or {}).get("model_dir"), "at": entry["restored_at"]})
        self._save(data)
        return entry

    def set_base_url(self, base_url: str) -> None:
        data = self.load()
        if data["current"]:
            data["current"]["base_url"] = base_url
            self._save(data)
