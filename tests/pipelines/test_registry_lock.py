"""Issue #16 point 12: serving.json changes are serialised (no lost update between two pipelines) and a
promote / rollback records its intent before serving changes, so a crash in between is recovered."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from cluster import storage
from pipelines.registry import Registry
from pipelines.runner import run_pipeline
from pipelines.state_lock import LockHeld, StateLock
from tests.pipelines.test_stages import _cfg, _passed_run, fake_serve  # noqa: F401 - fixture


def _promote_many(root: str, tag: str, count: int, start) -> None:
    start.wait()
    reg = Registry(root, "race")
    for i in range(count):
        reg.promote(f"/runs/{tag}{i}/student", run_id=f"{tag}{i}")


def test_two_processes_promoting_at_once_lose_nothing(tmp_path):
    root = str(tmp_path / "race")
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_promote_many, args=(root, tag, 25, start)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    data = Registry(root, "race").load()
    promotes = [e for e in data["events"] if e["action"] == "promote"]
    assert len(promotes) == 50, len(promotes)  # every read-modify-write kept
    assert len(data["previous"]) == 49
    assert {e["model_dir"] for e in data["previous"]} | {data["current"]["model_dir"]} == {
        f"/runs/{t}{i}/student" for t in "ab" for i in range(25)
    }


def test_a_held_lock_makes_the_second_writer_wait_then_fail_clearly(tmp_path):
    uri = str(tmp_path / "reg" / "serving.json")
    holder = StateLock(uri)
    with holder:
        with pytest.raises(LockHeld, match="locked by another process"):
            StateLock(uri, timeout=0.2).acquire()
    with StateLock(uri, timeout=0.2):  # released: free again
        pass


def test_remote_lease_lock_excludes_a_second_holder_and_expires():
    uri = "memory://leases/serving.json"
    a = StateLock(uri, timeout=0.3, lease_s=60)
    b = StateLock(uri, timeout=0.3, lease_s=60)
    with a:
        with pytest.raises(LockHeld):
            b.acquire()
    with b:
        pass
    stale = StateLock(uri, lease_s=-1)  # a holder that died: its lease is already expired
    stale.acquire()
    with StateLock(uri, timeout=1.0):
        pass


def test_deploy_records_its_intent_before_serving_changes(tmp_path, fake_serve):  # noqa: F811
    cfg = _cfg(tmp_path, "pipeline.stages=[gate, deploy]")
    registry = Registry.for_config(cfg)
    run1 = _passed_run(cfg, "r1")
    assert run_pipeline(cfg, run_id="r1", live=False).status == "done"
    seen = {}
    real_update = fake_serve.update_model

    def crashing_update(model_dir, section, *, name=None):
        seen["pending"] = Registry.for_config(cfg).pending()  # what another process sees meanwhile
        real_update(model_dir, section, name=name)
        raise KeyboardInterrupt("the deploying process dies after serving switched")

    fake_serve.update_model = crashing_update
    run2 = _passed_run(cfg, "r2")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, run_id="r2", live=False)
    m1, m2 = storage.join(run1, "student"), storage.join(run2, "student")
    assert seen["pending"]["action"] == "promote" and seen["pending"]["model_dir"] == m2
    assert registry.current()["model_dir"] == m1 and registry.pending()["model_dir"] == m2
    # The next change finds m2 actually served: the interrupted promote is completed first.
    assert registry.recover(served=fake_serve.running) == "completed"
    assert registry.current()["model_dir"] == m2 and registry.previous()[-1]["model_dir"] == m1
    assert registry.pending() is None and registry.load()["events"][-1].get("recovered") is True


def test_an_interrupted_change_that_never_served_is_dropped(tmp_path):
    reg = Registry(str(tmp_path / "x"), "x")
    reg.promote("/m1", run_id="r1")
    with pytest.raises(RuntimeError):
        with reg.change("promote", "/m2", run_id="r2", served="/m1"):
            raise RuntimeError("deploy failed before serving changed")
    assert reg.pending()["model_dir"] == "/m2" and reg.current()["model_dir"] == "/m1"
    with reg.change("promote", "/m3", run_id="r3", served="/m1"):
        assert reg.load()["events"][-1]["action"] == "abandoned"
        reg.promote("/m3", run_id="r3")
    assert reg.current()["model_dir"] == "/m3" and reg.pending() is None
    assert [e["model_dir"] for e in reg.previous()] == ["/m1"]
