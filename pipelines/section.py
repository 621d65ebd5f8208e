"""The pipeline config's ``pipeline:`` and ``schedule:`` sections (imports only pydantic and cluster modules)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cluster.section import Section

StageName = Literal["generate", "filter", "train", "eval", "gate", "export", "deploy"]
# The order stages run in; `pipeline.stages` picks a subsequence of it.
STAGE_ORDER: tuple[str, ...] = ("generate", "filter", "train", "eval", "gate", "export", "deploy")


class TargetsSection(Section):
    """``pipeline.targets``: what the run summary holds each student/teacher ratio against (shown, not enforced).

    Defaults are the quickstart's product bar: a student worth serving is close to the teacher in
    bits per byte, clearly faster, and routes fewer experts to easy tokens than to hard ones.
    """

    bpb_human_ratio: float | None = Field(
        default=1.25, gt=0, description="student/teacher bits/byte on human text, at most"
    )
    bpb_heldout_ratio: float | None = Field(
        default=1.6, gt=0, description="student/teacher bits/byte on held-out teacher text, at most"
    )
    bpb_heldout_in_context_ratio: float | None = Field(
        default=None,
        gt=0,
        description="the same held-out completions scored after their prompts, at most (none: shown, no target)",
    )
    init_bpb_human_ratio: float | None = Field(
        default=1.5, gt=0, description="the student at init / teacher on human text, at most"
    )
    decode_speedup: float | None = Field(
        default=1.8, gt=0, description="student/teacher decode tokens/s at the largest batch, at least"
    )
    ttft_ratio: float | None = Field(default=0.6, gt=0, description="student/teacher time to first token, at most")
    experts_fraction: float | None = Field(
        default=0.7, gt=0, description="mean experts per token / max_k (top-p students), at most"
    )
    hard_minus_easy: float | None = Field(default=0.0, description="difficulty curve rise (experts), above")


class PipelineSection(Section):
    """``pipeline:`` in the pipeline YAML: which stages run, in order, and what the run summary prices."""

    stages: list[StageName] = Field(
        default_factory=lambda: list(STAGE_ORDER),
        description="stages to run, a subsequence of " + " -> ".join(STAGE_ORDER),
    )
    cost_per_hour: float | None = Field(
        default=None,
        ge=0,
        description="price of the cluster per hour while stages run (null = "
        "eval.hardware_cost_per_hour, or no cost numbers)",
    )
    deploy_model: Literal["student", "qwen2_moe"] = Field(
        default="student",
        description="what deploy serves: the native student dir, or its Qwen2-MoE export "
        "(top-k students only; for stock vLLM)",
    )
    sample_prompt: str = Field(
        default="In one sentence, what is knowledge distillation?",
        description="chat message sent to the served model after deploy",
    )
    sample_max_tokens: int = Field(default=48, ge=1)
    live: bool = Field(default=True, description="live stage table on the driver when stderr is a terminal")
    targets: TargetsSection = Field(default_factory=TargetsSection)

    @field_validator("stages")
    @classmethod
    def _ordered_unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"pipeline.stages is empty; list some of {list(STAGE_ORDER)}")
        if len(set(value)) != len(value):
            raise ValueError(f"pipeline.stages lists a stage twice: {value}")
        positions = [STAGE_ORDER.index(v) for v in value]
        if positions != sorted(positions):
            raise ValueError(f"pipeline.stages must keep the order {' -> '.join(STAGE_ORDER)} (got {value})")
        return value


class K8sSection(Section):
    """``schedule.k8s``: what ``raydistill schedule FILE --emit-k8s DIR`` writes (KubeRay RayJob + CronJob)."""

    namespace: str = "default"
    image: str = Field(
        default="raydistill:latest", description="container image with Ray and this project installed at project_dir"
    )
    project_dir: str = Field(default="/app", description="the project inside the image (the job's working_dir)")
    ray_version: str | None = Field(default=None, description="KubeRay rayVersion (default: the installed Ray's)")
    cluster_name: str | None = Field(
        default=None,
        description="run on this existing RayCluster (clusterSelector) - needed for deploy, since a "
        "RayJob's own cluster is deleted when the job ends; null = a RayJob-owned cluster",
    )
    head_cpus: str = "2"
    head_memory: str = "8Gi"
    worker_replicas: int = Field(default=1, ge=0)
    worker_max_replicas: int | None = Field(default=None, ge=0)
    worker_cpus: str = "8"
    worker_memory: str = "32Gi"
    worker_gpus: int = Field(default=0, ge=0)
    service_account: str = "raydistill-scheduler"
    kubectl_image: str = "bitnami/kubectl:latest"
    ttl_seconds_after_finished: int = Field(default=3600, ge=0)
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    auth_token_secret: str = Field(
        default="raydistill-ray-auth",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Secret (key `auth_token`) with the Ray cluster token: head, workers and the job submitter get "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from it (secretKeyRef). Make it with `kubectl create "
        "secret generic raydistill-ray-auth --from-literal=auth_token=$(ray get-auth-token --generate)`; "
        "token auth cannot be turned off here",
    )
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="ENV_NAME: 'secret-name/key' - environment set from Secrets (secretKeyRef) "
        "in the head, worker and submitter containers; secrets never go inline",
    )

    @field_validator("secret_env")
    @classmethod
    def _secret_refs(cls, value: dict[str, str]) -> dict[str, str]:
        for env, ref in value.items():
            name, _, key = ref.partition("/")
            if not name or not key or "/" in key:
                raise ValueError(f"schedule.k8s.secret_env.{env}: {ref!r} must be 'secret-name/key'")
        return value


class ScheduleSection(Section):
    """``schedule:`` in the pipeline YAML: cron runs of the pipeline as Ray jobs (``raydistill schedule FILE``)."""

    cron: str | None = Field(default=None, description="five-field cron expression, e.g. '0 3 * * *'")
    timezone: str = Field(default="UTC", description="IANA zone the cron times are read in, e.g. Europe/Berlin")
    concurrency: Literal["forbid", "replace"] = Field(
        default="forbid",
        description="a tick while a run is still going: forbid = skip the tick, replace = stop the "
        "running job and start the new one",
    )
    catchup: bool = Field(
        default=True,
        description="after downtime, run the most recent missed tick once (older missed ticks are recorded, never run)",
    )
    misfire_grace_s: float = Field(
        default=300, ge=0, description="with catchup: false, a tick later than this is recorded as missed"
    )
    address: str | None = Field(
        default=None,
        description="Ray job server, e.g. http://HEAD:8265 (default: RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    extras: list[str] = Field(
        default_factory=list, description="pip extras of this project installed for the job (added to ray.extras)"
    )
    pip: list[str] = Field(default_factory=list, description="extra pip requirements of the job's runtime_env")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of the job's runtime_env")
    entrypoint_num_cpus: float | None = Field(default=None, ge=0, description="CPUs reserved for the job driver")
    poll_s: float = Field(default=30, gt=0, description="how often the scheduler checks job status and the clock")
    history: int = Field(default=100, ge=1, description="outcomes kept in the scheduler state")
    k8s: K8sSection = Field(default_factory=K8sSection)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"invalid cron expression {value!r}; use five fields, e.g. '0 3 * * *' (03:00 daily)")
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}; use an IANA name such as UTC or Europe/Berlin") from None
        return value
