"""Prometheus metrics of the OpenAI endpoint.

Every server owns a private ``CollectorRegistry`` (several apps in one process, e.g. tests, must not
collide) rendered at ``GET /metrics``. Inside Ray Serve the same events are also recorded with
``ray.serve.metrics`` so they reach Ray's Prometheus exporter and carry the deployment/replica tags;
each ingress replica's ``/metrics`` shows that replica's counters.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """Requests by status, time to first token, output tokens, queue depth, running batch, replicas."""

    def __init__(self, registry: CollectorRegistry | None = None, *, ray_metrics: bool = False):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "raydistill_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "raydistill_time_to_first_token_seconds",
            "request start to first output token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "raydistill_request_latency_seconds",
            "request start to last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.output_tokens = Counter(
            "raydistill_output_tokens", "generated tokens (rate() = output tokens/s)", ["model"], registry=r
        )
        self.prompt_tokens = Counter("raydistill_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.queue_depth = Gauge("raydistill_queue_depth", "requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge("raydistill_running_batch_size", "sequences in the running batch", ["model"], registry=r)
        self.in_flight = Gauge("raydistill_in_flight_requests", "requests being served by this server", registry=r)
        self.replicas = Gauge("raydistill_replicas", "running model replicas", ["model"], registry=r)
        self.prompt_log_pending = Gauge(
            "raydistill_prompt_log_pending_rows", "prompt log records not yet written", registry=r
        )
        self.prompt_log_dropped = Gauge(
            "raydistill_prompt_log_dropped_rows",
            "prompt log records dropped since start (buffer full while writes failed)",
            registry=r,
        )
        self.prompt_log_files = Gauge(
            "raydistill_prompt_log_files_written", "prompt log files written since start", registry=r
        )
        self._ray: dict[str, Any] = {}
        if ray_metrics:
            self._ray = _ray_metrics()

    # -- events -----------------------------------------------------------------------------------
    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)
        if self._ray:
            self._ray["requests"].inc(1, tags={"endpoint": endpoint, "status": str(status)})
            self._ray["latency"].observe(seconds, tags={"endpoint": endpoint})

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model=model).observe(seconds)
        if self._ray:
            self._ray["ttft"].observe(seconds, tags={"model": model})

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if completion:
            self.output_tokens.labels(model=model).inc(completion)
        if prompt:
            self.prompt_tokens.labels(model=model).inc(prompt)
        if self._ray and completion:
            self._ray["output_tokens"].inc(completion, tags={"model": model})

    def engine_state(self, model: str, *, running: int, waiting: int, replicas: int | None = None) -> None:
        self.running.labels(model=model).set(running)
        self.queue_depth.labels(model=model).set(waiting)
        if replicas is not None:
            self.replicas.labels(model=model).set(replicas)

    def prompt_log_state(self, *, pending: int, dropped: int, files: int) -> None:
        self.prompt_log_pending.set(pending)
        self.prompt_log_dropped.set(dropped)
        self.prompt_log_files.set(files)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _ray_metrics() -> dict[str, Any]:
    try:
        from ray.serve import metrics as rm
    except Exception:  # noqa: BLE001 - outside Ray the prometheus registry alone is enough
        return {}
    return {
        "requests": rm.Counter(
            "raydistill_requests", "HTTP requests by endpoint and status code", tag_keys=("endpoint", "status")
        ),
        "latency": rm.Histogram(
            "raydistill_request_latency_seconds",
            "request latency",
            boundaries=list(LATENCY_BUCKETS),
            tag_keys=("endpoint",),
        ),
        "ttft": rm.Histogram(
            "raydistill_time_to_first_token_seconds",
            "time to first token",
            boundaries=list(TTFT_BUCKETS),
            tag_keys=("model",),
        ),
        "output_tokens": rm.Counter("raydistill_output_tokens", "generated tokens", tag_keys=("model",)),
    }


class EngineGauges:
    """Queue depth and running batch size of one model replica, for ``ray.serve.metrics`` (model deployment)."""

    def __init__(self) -> None:
        from ray.serve import metrics as rm

        self.queue_depth = rm.Gauge(
            "raydistill_engine_queue_depth", "requests waiting for a batch slot", tag_keys=("model",)
        )
        self.running = rm.Gauge(
            "raydistill_engine_running_batch_size", "sequences in the running batch", tag_keys=("model",)
        )

    def update(self, model: str, stats: dict) -> None:
        self.queue_depth.set(float(stats.get("waiting", 0)), tags={"model": model})
        self.running.set(float(stats.get("running", 0)), tags={"model": model})
