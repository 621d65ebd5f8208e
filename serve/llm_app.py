"""``serve.backend: vllm`` under Ray: Ray Serve LLM's own OpenAI app (``ray.serve.llm``) on vLLM.

::

    HTTP ──► proxy ──► RaydistillIngress (ray.serve.llm's OpenAiIngress + our API keys and prompt log)
                         │  DeploymentHandle
                         ▼
                       LLMServer × autoscaled replicas (vLLM engine: its request validation, structured
                       output, prefix caching, LoRA, metrics)

What raydistill promises on every backend and how it holds here:

* **autoscaling and admission**: the same ``serve.*`` settings, as the LLMServer deployment's
  ``autoscaling_config``, ``max_ongoing_requests`` and ``max_queued_requests``
  (:func:`llm_config`);
* **API keys**: the deploying driver reads them and hands the ingress only their SHA-256 hashes
  (replicas on a cluster never see the driver's environment); every route but ``/v1/models`` answers
  401 in OpenAI's shape without a key (:mod:`serve.llm_ingress`);
* **prompt log**: the ingress appends each finished request to the same Parquet log as our engine's
  server, with the same ``endpoint`` values, so ``prompts.source: served`` reads either;
* **model swap**: a new model dir changes the LLMServer's config, so ``serve.run`` rolls the replicas
  (new ones first), as for vLLM before.

Nothing here imports vLLM or ``ray.serve.llm`` at module level: the main install has neither.
"""

from __future__ import annotations

from typing import Any

from serve.section import ServeSection
from serve.vllm_engine import engine_args

INGRESS_CLASS = "serve.llm_ingress:RaydistillIngress"


def autoscaling_config(section: ServeSection) -> dict[str, Any]:
    """``serve.*`` scaling settings as a Ray Serve ``autoscaling_config`` (both backends)."""
    return {
        "min_replicas": section.min_replicas,
        "max_replicas": section.max_replicas,
        "initial_replicas": section.initial_replicas
        if section.initial_replicas is not None
        else max(1, section.min_replicas),
        "target_ongoing_requests": section.target_ongoing_requests,
        "upscale_delay_s": section.upscale_delay_s,
        "downscale_delay_s": section.downscale_delay_s,
        "metrics_interval_s": section.metrics_interval_s,
        "look_back_period_s": section.look_back_period_s,
    }


def llm_config(model_dir: str, section: ServeSection, model_id: str) -> dict[str, Any]:
    """The ``ray.serve.llm.LLMConfig`` (as a dict) that serves ``model_dir`` as ``model_id``.

    Engine arguments come from the same translation as vLLM behind our own API
    (:func:`serve.vllm_engine.engine_args`), then ``serve.vllm_engine_kwargs`` on top. Without GPUs the
    replica is a CPU one (vLLM-CPU): one placement bundle of ``serve.num_cpus``.
    """
    engine = engine_args(
        model_dir,
        dtype=section.dtype,
        max_batch_size=section.max_batch_size,
        max_model_len=section.max_model_len,
        prefill_chunk=section.prefill_chunk,
    )
    del engine["model"]  # LLMConfig names the model in model_loading_config
    engine.update(section.vllm_engine_kwargs)
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_dir},
        "engine_kwargs": engine,
        "deployment_config": {
            "autoscaling_config": autoscaling_config(section),
            "max_ongoing_requests": section.max_ongoing_requests,
            "max_queued_requests": section.max_queued_requests,
            "graceful_shutdown_timeout_s": section.graceful_shutdown_timeout_s,
            "health_check_period_s": 5,
        },
    }
    if section.num_gpus > 0:
        # One bundle per tensor-parallel worker (Ray Serve LLM's default for GPUs).
        config["placement_group_config"] = {
            "bundles": [{"CPU": 1, "GPU": section.num_gpus}] * int(engine.get("tensor_parallel_size", 1))
        }
    else:
        # vLLM-CPU's engine runs in the replica's own subprocesses: the bundle reserves serve.num_cpus for
        # them, and the replica actor takes none beside it (Ray Serve LLM adds its CPUs to the bundle).
        config["accelerator_config"] = {"kind": "cpu"}
        config["placement_group_config"] = {"bundles": [{"CPU": section.num_cpus}]}
        config["deployment_config"]["ray_actor_options"] = {"num_cpus": 0}
    if section.vllm_env:
        config["runtime_env"] = {"env_vars": dict(section.vllm_env)}
    return config


def build_llm_app(
    model_dir: str, section: ServeSection, *, model_id: str, api_key_hashes: list[str], ingress_name: str
) -> Any:
    """The bound Serve application (our ingress -> LLMServer) for ``model_dir``; run it with ``serve.run``."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as exc:
        from serve.vllm_engine import missing_vllm

        raise missing_vllm(exc, "vLLM and Ray Serve LLM") from exc
    return build_openai_app(
        {
            "llm_configs": [llm_config(model_dir, section, model_id)],
            "ingress_cls_config": {
                "ingress_cls": INGRESS_CLASS,
                "ingress_extra_kwargs": {
                    "api_key_hashes": list(api_key_hashes),
                    "section": section.model_dump(mode="json"),
                    "model_dir": model_dir,
                },
            },
            "ingress_deployment_config": {
                "name": ingress_name,
                "ray_actor_options": {"num_cpus": section.ingress_num_cpus},
            },
        }
    )
