"""Issue #16 point 17: autoscaling that cannot happen says so at deploy (and can size itself to fit)."""

from __future__ import annotations

import logging

import pytest

from serve.app import capacity_report
from serve.section import ServeSection


def test_two_replicas_of_one_cpu_never_fit_two_cpus():
    section = ServeSection(max_replicas=2, num_cpus=1)  # + 0.1 CPU for the ingress
    fits, warning = capacity_report(section, {"CPU": 2.0})
    assert fits == 1
    assert "serve.max_replicas=2 needs 2 x 1 CPU + 0.1 CPU for the ingress" in warning
    assert "at most 1 model replica can ever run" in warning and "capacity_check: fit" in warning
    assert capacity_report(ServeSection(max_replicas=1, num_cpus=1), {"CPU": 2.0}) == (1, None)
    assert capacity_report(ServeSection(max_replicas=3, num_cpus=0.5), {"CPU": 2.0})[1] is None
    fits, warning = capacity_report(ServeSection(max_replicas=4, num_cpus=1, num_gpus=1), {"CPU": 16, "GPU": 2})
    assert fits == 2 and "4 x 1 GPU" in warning and "2 GPUs" in warning


@pytest.mark.parametrize("mode, expected", [("warn", 2), ("fit", 1), ("off", 2)])
def test_deploy_warns_or_sizes_to_the_cluster(monkeypatch, caplog, mode, expected):
    import ray

    import serve.app as app

    built = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(app, "_start_serve", lambda section: None)
    monkeypatch.setattr(app, "_http_host", lambda section: section.host)
    monkeypatch.setattr(app, "build_app", lambda model_dir, section, **kw: built.setdefault("section", section))
    monkeypatch.setattr(app.serve, "run", lambda *a, **kw: None)
    section = ServeSection(max_replicas=2, num_cpus=1, api_key_env=None, capacity_check=mode)
    with caplog.at_level(logging.WARNING, logger="raydistill.serve"):
        app.deploy("some-model", section)
    assert built["section"].max_replicas == expected
    warned = "at most 1 model replica can ever run" in caplog.text
    assert warned == (mode != "off")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raydistill.serve"):  # an autoscaling cluster: no warning
        app.deploy("some-model", section.model_copy(update={"nodes_autoscale": True}))
    assert "can ever run" not in caplog.text
