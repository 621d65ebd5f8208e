"""Kubernetes manifests for teams that schedule on Kubernetes (``raydistill schedule FILE --emit-k8s DIR``).

* ``rayjob.yaml``: a KubeRay ``RayJob`` (``ray.io/v1``) running ``python -m pipelines.run CONFIG``
  with the project (baked into ``schedule.k8s.image`` at ``project_dir``) as working_dir, either on a
  RayJob-owned cluster or, with ``schedule.k8s.cluster_name``, on an existing long-lived RayCluster
  (needed when the pipeline deploys: a RayJob's own cluster is deleted when the job ends).
* ``cronjob.yaml``: a ``batch/v1`` ``CronJob`` on ``schedule.cron`` / ``timezone`` whose pod (a small
  kubectl container) creates one RayJob per tick from the embedded manifest. Overlap is decided on the
  RayJobs, not on the (seconds-long) kubectl pod: with ``concurrency: forbid`` a tick exits while a
  RayJob of this pipeline is still running; with ``replace`` it deletes the running ones first.
  ``catchup: false`` maps to ``startingDeadlineSeconds = misfire_grace_s`` (Kubernetes then starts
  at most the latest missed tick, like the built-in scheduler).
* ``rbac.yaml``: the ServiceAccount, Role and RoleBinding the kubectl pod needs.

Cluster access: the Ray head listens on ``dashboard-host: 0.0.0.0`` (KubeRay reaches it through a
ClusterIP service), so token auth stays on: head, workers and the job submitter get
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from the Secret ``schedule.k8s.auth_token_secret``.
Secrets are only ever ``secretKeyRef`` (``schedule.k8s.secret_env``); a secret-looking name in
``schedule.env_vars`` (which would land inline in the manifest) is refused.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import ConfigError
from pipelines.config import PipelineConfig

LABEL = "raydistill.io/pipeline"
TERMINAL_RAYJOB_STATES = ("Complete", "Failed", "ValidationFailed")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def _secret_env(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Container env from Secrets: the Ray auth token (always) and ``schedule.k8s.secret_env``."""
    k8s = cfg.schedule.k8s
    env: list[dict[str, Any]] = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": k8s.auth_token_secret, "key": "auth_token"}}},
    ]
    for name, ref in sorted(k8s.secret_env.items()):
        secret, _, key = ref.partition("/")
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _check_no_inline_secrets(cfg: PipelineConfig) -> None:
    inline = [n for n in cfg.schedule.env_vars if any(w in n.upper() for w in SECRET_WORDS)]
    if inline:
        raise ConfigError(
            f"schedule.env_vars {inline} look like secrets and would be written inline into the "
            "Kubernetes manifests; move them to schedule.k8s.secret_env as NAME: 'secret-name/key' "
            "(a secretKeyRef)"
        )


def _ray_version(k8s: Any) -> str:
    if k8s.ray_version:
        return k8s.ray_version
    import ray

    return ray.__version__


def _config_in_image(config_path: str, project_dir: str) -> str:
    from cluster.ray_init import PROJECT_ROOT

    if "://" in config_path:
        return config_path
    try:
        return str(Path(config_path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        raise ConfigError(
            f"config {config_path} is outside the project {PROJECT_ROOT}, so it is not in the image at "
            f"{project_dir}; move it into the project or use a shared URI"
        ) from None


def rayjob(cfg: PipelineConfig, config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    k8s = cfg.schedule.k8s
    _check_no_inline_secrets(cfg)
    env = _secret_env(cfg)
    config_arg = _config_in_image(config_path, k8s.project_dir)
    args = ["python", "-m", "pipelines.run", config_arg]
    for item in overrides or []:
        args += ["--set", item]
    extras = list(dict.fromkeys([*cfg.ray.extras, *cfg.schedule.extras]))
    runtime_env: dict[str, Any] = {"working_dir": k8s.project_dir}
    if cfg.schedule.pip or extras:
        from cluster.ray_init import _extra_requirements

        runtime_env["pip"] = list(cfg.schedule.pip) + (_extra_requirements(extras) if extras else [])
    if cfg.schedule.env_vars:
        runtime_env["env_vars"] = dict(cfg.schedule.env_vars)
    spec: dict[str, Any] = {
        "entrypoint": " ".join(shlex.quote(a) for a in args),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
        "submissionMode": "K8sJobMode",
        "ttlSecondsAfterFinished": k8s.ttl_seconds_after_finished,
    }
    if k8s.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k8s.active_deadline_seconds
    if cfg.schedule.entrypoint_num_cpus is not None:
        spec["entrypointNumCpus"] = cfg.schedule.entrypoint_num_cpus
    # The submitter pod runs `ray job submit` against the token-auth head: it needs the token too. (KubeRay
    # fills in the submit command of the first container when it has none.)
    spec["submitterPodTemplate"] = {
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "ray-job-submitter", "image": k8s.image, "env": env}],
        }
    }
    if k8s.cluster_name:
        # An existing RayCluster: its own manifest must enable token auth with the same Secret.
        spec["clusterSelector"] = {"ray.io/cluster": k8s.cluster_name}
    else:
        spec["shutdownAfterJobFinishes"] = True
        worker_limits: dict[str, Any] = {"cpu": k8s.worker_cpus, "memory": k8s.worker_memory}
        if k8s.worker_gpus:
            worker_limits["nvidia.com/gpu"] = k8s.worker_gpus
        spec["rayClusterSpec"] = {
            "rayVersion": _ray_version(k8s),
            "headGroupSpec": {
                # 0.0.0.0: KubeRay and the submitter reach the dashboard through a ClusterIP service;
                # the token (env) is what protects it.
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "ray-head",
                                "image": k8s.image,
                                "env": env,
                                "ports": [
                                    {"containerPort": 6379, "name": "gcs-server"},
                                    {"containerPort": 8265, "name": "dashboard"},
                                    {"containerPort": 10001, "name": "client"},
                                    {"containerPort": 8000, "name": "serve"},
                                ],
                                "resources": {
                                    "requests": {"cpu": k8s.head_cpus, "memory": k8s.head_memory},
                                    "limits": {"cpu": k8s.head_cpus, "memory": k8s.head_memory},
                                },
                            }
                        ]
                    }
                },
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": k8s.worker_replicas,
                    "minReplicas": 0,
                    "maxReplicas": max(k8s.worker_max_replicas or k8s.worker_replicas, k8s.worker_replicas),
                    "rayStartParams": {},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-worker",
                                    "image": k8s.image,
                                    "env": env,
                                    "resources": {"requests": dict(worker_limits), "limits": worker_limits},
                                }
                            ]
                        }
                    },
                }
            ],
        }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        # generateName: every tick creates a new RayJob (`kubectl create`, not apply).
        "metadata": {
            "generateName": f"{cfg.name.lower().replace('_', '-').replace('.', '-')}-",
            "namespace": k8s.namespace,
            "labels": {LABEL: cfg.name},
        },
        "spec": spec,
    }


def _create_script(cfg: PipelineConfig) -> str:
    ns, selector = cfg.schedule.k8s.namespace, f"{LABEL}={cfg.name}"
    # Every RayJob that is not finished counts as running: New (no status yet), Initializing, Waiting,
    # Running, Retrying, Suspending... Only Complete, Failed and ValidationFailed ones have ended.
    listing = (
        f"kubectl get rayjobs -n {shlex.quote(ns)} -l {shlex.quote(selector)} -o jsonpath="
        "'{range .items[*]}{.metadata.name}={.status.jobDeploymentStatus}{\"\\n\"}{end}'"
    )
    terminal = "|".join(TERMINAL_RAYJOB_STATES)
    lines = [
        "set -eu",
        f"jobs=$({listing})",
        f"running=$(printf '%s\\n' \"$jobs\" | grep -v -E '=({terminal})$' | grep -v '^$' "
        "| sed 's/=.*//' | tr '\\n' ' ' || true)",
        'running="${running% }"',
    ]
    if cfg.schedule.concurrency == "forbid":
        lines.append(
            'if [ -n "$running" ]; then echo "skipping this tick: RayJob(s) $running still running '
            '(concurrency: forbid)"; exit 0; fi'
        )
    else:
        lines.append(f'if [ -n "$running" ]; then kubectl delete rayjob -n {shlex.quote(ns)} $running; fi')
    lines.append('printf "%s" "$RAYJOB_MANIFEST" | kubectl create -f -')
    return "\n".join(lines)


def cronjob(cfg: PipelineConfig, job: dict[str, Any]) -> dict[str, Any]:
    s, k8s = cfg.schedule, cfg.schedule.k8s
    if not s.cron:
        raise ConfigError("schedule.cron: not set; --emit-k8s needs a cron expression, e.g. '0 3 * * *'")
    spec: dict[str, Any] = {
        "schedule": s.cron,
        "timeZone": s.timezone,
        # The kubectl pod ends in seconds; real overlap control is in the script (on RayJobs).
        "concurrencyPolicy": "Forbid" if s.concurrency == "forbid" else "Replace",
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "metadata": {"labels": {LABEL: cfg.name}},
                    "spec": {
                        "serviceAccountName": k8s.service_account,
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "create-rayjob",
                                "image": k8s.kubectl_image,
                                "command": ["/bin/sh", "-c"],
                                "args": [_create_script(cfg)],
                                "env": [{"name": "RAYJOB_MANIFEST", "value": yaml.safe_dump(job, sort_keys=False)}],
                            }
                        ],
                    },
                },
            }
        },
    }
    if not s.catchup:
        spec["startingDeadlineSeconds"] = int(s.misfire_grace_s)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": f"{job['metadata']['generateName'].rstrip('-')}-pipeline",
            "namespace": k8s.namespace,
            "labels": {LABEL: cfg.name},
        },
        "spec": spec,
    }


def rbac(cfg: PipelineConfig) -> list[dict[str, Any]]:
    k8s = cfg.schedule.k8s
    meta = {"namespace": k8s.namespace, "labels": {LABEL: cfg.name}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": k8s.service_account, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": k8s.service_account, **meta},
            "rules": [
                {
                    "apiGroups": ["ray.io"],
                    "resources": ["rayjobs"],
                    "verbs": ["create", "get", "list", "watch", "delete"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": k8s.service_account, **meta},
            "subjects": [{"kind": "ServiceAccount", "name": k8s.service_account, "namespace": k8s.namespace}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": k8s.service_account},
        },
    ]


def emit(cfg: PipelineConfig, config_path: str, out_dir: str, overrides: list[str] | None = None) -> list[str]:
    """Write rayjob.yaml, cronjob.yaml and rbac.yaml under ``out_dir``; returns their paths."""
    from cluster import storage

    job = rayjob(cfg, config_path, overrides)
    docs = {"rayjob.yaml": [job], "cronjob.yaml": [cronjob(cfg, job)], "rbac.yaml": rbac(cfg)}
    paths = []
    for name, items in docs.items():
        uri = storage.join(out_dir, name)
        storage.atomic_write_text(uri, yaml.safe_dump_all(items, sort_keys=False))
        paths.append(uri)
    return paths
