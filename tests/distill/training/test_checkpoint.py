"""Which Ray Train checkpoint folder a restart or the publish step may use."""

from __future__ import annotations

import json

from distill.training.checkpoint import COMPLETE_FILE
from distill.training.ray_train import checkpoint_step, latest_checkpoint_path


def test_latest_checkpoint_is_the_newest_one_rank_0_marked_whole(tmp_path):
    root = tmp_path / "ray"
    assert latest_checkpoint_path(str(tmp_path)) is None  # no storage folder yet
    for step, whole in [(3, True), (6, True), (9, False)]:  # 9: the upload was cut short
        folder = root / f"checkpoint_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        if whole:
            (folder / COMPLETE_FILE).write_text(json.dumps({"step": step}))
    (root / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own files are not checkpoints
    newest = latest_checkpoint_path(str(tmp_path))
    assert newest == str(root / "checkpoint_0000006")
    assert checkpoint_step(newest) == 6
    assert latest_checkpoint_path(str(root), name="") == newest
