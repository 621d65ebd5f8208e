"""The pipeline config's ``serve:`` section (imports only pydantic and cluster modules)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster.section import Section
from serve.engine.types import MAX_TOP_LOGPROBS


class ServeSection(Section):
    """``serve:`` in the pipeline YAML: the OpenAI-compatible endpoint and its Ray Serve application."""

    # HTTP
    host: str = Field(default="127.0.0.1", description="bind address (0.0.0.0 to listen on every interface)")
    port: int = Field(default=8000, ge=1, le=65535)
    app_name: str = Field(default="raydistill", pattern=r"^[A-Za-z0-9_.-]+$", description="Ray Serve application name")
    route_prefix: str = Field(default="/", description="URL prefix of the app inside Ray Serve")
    model_name: str | None = Field(default=None, description="model id clients send (default: the model dir's name)")

    # engine (per model replica)
    dtype: Literal["float32", "bfloat16", "float16", "int8"] = Field(
        default="float32",
        description="weights of the served model; int8 = int8 weights for every linear and expert on our engine "
        "(CPU): batch-1 decode 2.4x float32 for SmolLM2, 1.7x for the quickstart student, bits/byte within 1% (README)",
    )
    max_batch_size: int = Field(default=16, ge=1, description="running sequences per model replica")
    max_model_len: int | None = Field(default=None, ge=16, description="context cap (default: the model's)")
    prefill_chunk: int = Field(default=256, ge=1, description="prompt tokens per prefill step")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads per model replica (default: serve.num_cpus under Ray, every core with --no-ray)",
    )
    num_cpus: float = Field(default=1, gt=0, description="Ray CPUs reserved per model replica")
    num_gpus: float = Field(
        default=0, ge=0, description="Ray GPUs per model replica (>0 selects vLLM when backend: auto)"
    )
    backend: Literal["auto", "engine", "vllm"] = Field(
        default="auto",
        description="engine = our CPU/GPU engine; vllm = Ray Serve LLM (ray.serve.llm) on vLLM under Ray, vLLM's "
        "AsyncLLM behind our API with --no-ray; auto = vllm when num_gpus > 0",
    )
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra vLLM engine arguments on backend vllm (e.g. enforce_eager, gpu_memory_utilization, "
        "tensor_parallel_size); they override the ones derived from this section",
    )
    vllm_env: dict[str, str] = Field(
        default_factory=dict,
        description="environment of the vLLM replicas on backend vllm (e.g. VLLM_CPU_KVCACHE_SPACE); replicas "
        "on a cluster do not inherit the deploying process's environment",
    )

    # Ray Serve scaling and admission
    min_replicas: int = Field(default=1, ge=0, description="0 lets the model scale to zero when idle")
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=8, gt=0, description="autoscaling target per model replica")
    upscale_delay_s: float = Field(default=10, ge=0)
    downscale_delay_s: float = Field(default=60, ge=0)
    metrics_interval_s: float = Field(default=2, gt=0, description="how often replicas report load to the autoscaler")
    look_back_period_s: float = Field(default=10, gt=0, description="window the autoscaler averages load over")
    max_ongoing_requests: int = Field(default=32, ge=1, description="requests one model replica takes at once")
    max_queued_requests: int = Field(
        default=64,
        ge=-1,
        description="waiting requests per caller beyond which the server answers 429 (-1 = unbounded, not recommended)",
    )
    max_pending_prefills: int | None = Field(
        default=None,
        ge=1,
        description="engine jobs admitted but still waiting for their first token (queued or in prefill) beyond "
        "which new requests get 429: bounds time to first token under bursts, since each pending prefill adds "
        "about one idle TTFT before the next (SmolLM2, 8 slots, bursts of 48 streams on 2 cores: p50 TTFT of "
        "the admitted 6.5x idle without a bound, 1.7-2.2x with 1; bench/serve_overload.py). A request alone "
        "is always admitted. null = no bound",
    )
    capacity_check: Literal["warn", "fit", "off"] = Field(
        default="warn",
        description="at deploy, compare what max_replicas needs (num_cpus / num_gpus per model "
        "replica + the ingress) with the cluster's CPUs/GPUs: warn = log what can never start, fit = also lower "
        "max_replicas to what fits, off = no check. Skipped when nodes_autoscale",
    )
    nodes_autoscale: bool = Field(
        default=False,
        description="the cluster adds nodes on demand (ray_cluster.yaml, "
        "KubeRay autoscaling): replicas beyond today's nodes are expected to fit later",
    )
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_num_cpus: float = Field(default=0.1, ge=0)
    graceful_shutdown_timeout_s: float = Field(default=30, ge=0, description="how long an old replica drains")
    swap_drain_timeout_s: float = Field(
        default=600,
        gt=0,
        description="after a model swap (update_model, "
        "rollback) the old engine finishes its in-flight requests for up to this "
        "long; any still running then end with an error (503), never as finished",
    )
    request_timeout_s: float | None = Field(
        default=600, gt=0, description="deadline of one request, queueing included (504 past it); null = none"
    )
    sampling_defaults: dict[str, float] = Field(
        default_factory=dict,
        description="values for the sampling fields a request leaves out (temperature, top_p, top_k, "
        "presence_penalty, frequency_penalty, repetition_penalty), like vLLM's --override-generation-config; "
        "e.g. {repetition_penalty: 1.1} (Qwen2 models ship 1.05) keeps a small model's greedy answers out of loops",
    )
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING",
        description="level of Ray Serve's own logs (controller, proxy, replicas) streamed to the console; "
        "INFO brings back its deploy/replica lines and per-call access logs. Our per-request log "
        "(`raydistill.serve: request ...`) is separate: see request_log",
    )
    request_log: Literal["file", "console"] = Field(
        default="file",
        description="where a Serve replica writes its one line per request (`raydistill.serve: request ...`): "
        "file = the replica's own Serve log (logs/serve/replica_*.log in the Ray session), so the console keeps "
        "to our progress and summary; console = streamed to the console as well. `--no-ray` servers always "
        "log requests to their console",
    )

    # Auth and limits
    api_key_env: str | None = Field(
        default="RAYDISTILL_API_KEYS", description="env var holding API keys (comma separated)"
    )
    api_key_file: str | None = Field(default=None, description="file (URI) with one API key per line")
    open_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/metrics", "/openapi.json"],
        description="of /health, /metrics, /openapi.json: the ones answered without an "
        "API key (Prometheus often scrapes without one); [] = the key everywhere",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="serve without API keys on a non-loopback "
        "host (refused otherwise). Keys are read where `raydistill serve` / the "
        "deploy stage runs, and replicas get only their hashes",
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="larger request bodies get 413")
    max_tokens_default: int = Field(default=256, ge=1, description="max_tokens when a request names none")
    max_n: int = Field(default=8, ge=1, description="largest `n` (choices per request)")
    max_choices_per_request: int = Field(
        default=64, ge=1, description="prompts x n of one request (each is one engine job; admission counts jobs)"
    )
    max_tokens_limit: int = Field(default=4096, ge=1, description="largest max_tokens / max_completion_tokens")
    max_stop_sequences: int = Field(default=16, ge=0, description="stop strings per request")
    max_stop_length: int = Field(
        default=256,
        ge=1,
        description="characters per stop string (the stop check runs on the engine thread every token)",
    )
    max_top_logprobs: int = Field(
        default=20,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="largest top_logprobs (chat) / logprobs (completions); the engine returns at most MAX_TOP_LOGPROBS",
    )

    # Prompt log (opt-in)
    prompt_log_enabled: bool = Field(default=False, description="append requests + responses as Parquet")
    prompt_log: str | None = Field(default=None, description="URI of the prompt log folder")
    prompt_log_redact: str | None = Field(
        default=None, description="'module:function' taking and returning a record dict"
    )
    prompt_log_flush_rows: int = Field(default=64, ge=1)
    prompt_log_flush_s: float = Field(default=10, gt=0)
    prompt_log_max_buffer_rows: int = Field(
        default=10_000,
        ge=1,
        description="records held while writes fail; beyond it the oldest are dropped (counted on /metrics)",
    )

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {value!r}")
        return value

    @field_validator("prompt_log_redact")
    @classmethod
    def _hook(cls, value: str | None) -> str | None:
        if value is not None and value.count(":") != 1:
            raise ValueError(f"prompt_log_redact must be 'package.module:function', got {value!r}")
        return value

    @field_validator("sampling_defaults")
    @classmethod
    def _sampling_fields(cls, value: dict[str, float]) -> dict[str, float]:
        from serve.protocol import ChatCompletionRequest

        allowed = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"unknown sampling field(s) {unknown}; allowed: {', '.join(allowed)}")
        try:  # the same bounds as a request's
            ChatCompletionRequest(model="x", messages=[{"role": "user", "content": "x"}], **value)
        except ValueError as exc:
            raise ValueError(f"out of range: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServeSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"serve.max_replicas ({self.max_replicas}) must be >= serve.min_replicas ({self.min_replicas})"
            )
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("serve.initial_replicas must lie between min_replicas and max_replicas")
        if self.dtype == "int8" and self.uses_vllm:
            raise ValueError(
                "serve.dtype int8 is our engine's CPU weight-only int8; vLLM takes quantized checkpoints instead: "
                "set serve.backend: engine (and num_gpus: 0), or serve.dtype float32 / bfloat16 for vLLM"
            )
        if self.prompt_log_enabled and not self.prompt_log:
            raise ValueError(
                "serve.prompt_log_enabled is true but serve.prompt_log is empty; set serve.prompt_log "
                "to a folder URI (e.g. ./runs/prompt-log)"
            )
        return self

    @property
    def uses_vllm(self) -> bool:
        """True when the model replicas run vLLM: ``backend: vllm``, or ``auto`` with GPUs."""
        return self.backend == "vllm" or (self.backend == "auto" and self.num_gpus > 0)

    @property
    def prompt_log_uri(self) -> str | None:
        """The log folder when logging is on, else None."""
        return self.prompt_log if self.prompt_log_enabled and self.prompt_log else None
