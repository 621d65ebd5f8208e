"""The Ray Serve application: an ingress deployment (the OpenAI FastAPI app) and a model deployment (the engine).

::

    HTTP ──► proxy ──► Ingress (FastAPI: auth, limits, tokenizer, OpenAI shapes, metrics, prompt log)
                         │  handle.options(stream=True).generate.remote(GenerationRequest)
                         ▼
                       ModelDeployment × autoscaled replicas (AsyncEngine: continuous batching)

The model deployment autoscales on ongoing requests (``serve.min_replicas`` may be 0), refuses work
beyond ``max_ongoing_requests`` + ``max_queued_requests`` (the ingress answers 429), and swaps models
without downtime: :func:`update_model` changes only the deployments' ``user_config``, so Serve calls
``reconfigure`` on the running replicas in place; each loads the new engine beside the old one,
switches, lets the old one drain its in-flight requests and then shuts it down.

With ``serve.backend: vllm`` the app is Ray Serve LLM's instead (:mod:`serve.llm_app`): vLLM's own
OpenAI server in ``LLMServer`` replicas behind ``ray.serve.llm``'s ingress, with our API keys and prompt
log added (:mod:`serve.llm_ingress`). A second vLLM engine does not fit beside the first (vLLM takes
``gpu_memory_utilization`` of the GPU), so there a model swap is a **rolling replacement**: the model dir
is part of the LLMServer's config, so a new one makes Serve replace the replicas. That needs room for
one more replica per replica replaced (a spare GPU, or a node type the cluster autoscaler can add).

Public API (used by the pipeline's deploy stage): :func:`build_app`, :func:`deploy`,
:func:`update_model`, :func:`status`, :func:`shutdown`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from cluster.errors import RaydistillError
from serve.api import create_app
from serve.engine.factory import load_engine
from serve.engine.types import EngineError, EngineFailure, EngineUnavailable, GenerationOutput, GenerationRequest
from serve.errors import Overloaded
from serve.llm_app import autoscaling_config, build_llm_app
from serve.section import ServeSection

logger = logging.getLogger("raydistill.serve")


# A fixed code version: redeploying the same code with a new user_config (a new model dir) is then a
# light in-place reconfigure of the running replicas instead of a restart. (Serve keeps `version` for
# internal use; without it every serve.run is a code change and replicas restart - still without
# downtime thanks to max_surge_percent, but slower.)
CODE_VERSION = "raydistill-serve-1"
MODEL_DEPLOYMENT = "model"
INGRESS_DEPLOYMENT = "ingress"


def served_name(section: ServeSection, name: str | None = None) -> str:
    """The model id clients send: ``serve.model_name``, else the app name (stable across model updates)."""
    return section.model_name or name or section.app_name


def _tokenizer_for(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    import distill.student.hf  # noqa: F401 - registers raydistill_moe: AutoTokenizer reads a student's config.json
    from serve.engine.loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(model_dir))


# ---------------------------------------------------------------------------------------------------
# model deployment
# ---------------------------------------------------------------------------------------------------
class _Counted:
    """An engine plus the number of requests it is serving (so a swapped-out engine drains before shutdown)."""

    def __init__(self, engine: Any, model_dir: str):
        self.engine = engine
        self.model_dir = model_dir
        self.active = 0
        self.closed = False  # shut down after a swap: requests still on it did not finish


@serve.deployment
class ModelDeployment:
    """One engine per replica; ``reconfigure({"model_dir": ...})`` swaps the model without dropping requests."""

    def __init__(
        self, model_dir: str, section: dict, engine_factory: str | None = None, engine_options: dict | None = None
    ):
        self.section = ServeSection(**section)
        if self.section.threads is None:  # replicas share the node: torch threads = the CPUs Ray reserved
            self.section = self.section.model_copy(update={"threads": max(1, int(self.section.num_cpus))})
        self.engine_factory = engine_factory
        self.engine_options = engine_options
        t0 = time.perf_counter()
        self.current = _Counted(load_engine(model_dir, self.section, engine_factory, engine_options), model_dir)
        self._draining: list[_Counted] = []
        self._swap_lock = asyncio.Lock()
        self._gauges = None
        try:
            from serve.metrics import EngineGauges

            self._gauges = EngineGauges()
        except Exception:  # noqa: BLE001 - metrics are optional outside a Serve replica
            pass
        logger.info("model replica loaded %s in %.1fs", model_dir, time.perf_counter() - t0)

    async def reconfigure(self, user_config: dict) -> None:
        """Swap to ``user_config["model_dir"]``: load the new engine beside the old one, switch, drain the old.
        (vLLM apps are Ray Serve LLM's, where a new model is a rolling replacement: :mod:`serve.llm_app`.)"""
        model_dir = (user_config or {}).get("model_dir")
        if not model_dir or model_dir == self.current.model_dir:
            return
        async with self._swap_lock:
            t0 = time.perf_counter()
            # Load beside the old engine (in a thread: requests keep streaming meanwhile).
            new = await asyncio.to_thread(
                load_engine, model_dir, self.section, self.engine_factory, self.engine_options
            )
            old, self.current = self.current, _Counted(new, model_dir)
            logger.info(
                "model replica swapped %s -> %s (load %.1fs); draining %d in-flight requests",
                old.model_dir,
                model_dir,
                time.perf_counter() - t0,
                old.active,
            )
            self._draining.append(old)
            asyncio.get_running_loop().create_task(self._drain(old))

    async def _drain(self, old: _Counted) -> None:
        """Shut the swapped-out engine down once its in-flight requests have finished, or after
        ``serve.swap_drain_timeout_s``; requests cut off then end with EngineUnavailable (a 503)."""
        deadline = time.monotonic() + self.section.swap_drain_timeout_s
        while old.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if old.active:
            logger.warning(
                "old engine %s: %d requests still running after swap_drain_timeout_s=%gs; they end with an error",
                old.model_dir,
                old.active,
                self.section.swap_drain_timeout_s,
            )
        old.closed = True
        await asyncio.to_thread(old.engine.shutdown)
        self._draining.remove(old)
        logger.info("old engine %s shut down", old.model_dir)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """The engine's outputs for ``request``. A request that does not end with ``stop`` / ``length``
        (aborted by a shutdown, or a stream that just stops) raises EngineUnavailable: it is never
        reported as finished."""
        slot = self.current  # a request finishes on the engine it started on, even across a swap
        slot.active += 1
        finished = False
        try:
            async for out in slot.engine.generate(request):
                if out.finished and out.finish_reason not in ("stop", "length"):
                    raise EngineUnavailable(
                        f"request {request.request_id} was aborted by the engine "
                        f"({'shut down after a model swap' if slot.closed else out.finish_reason})"
                    )
                finished = finished or out.finished
                yield out  # iterated to the engine's natural end: the request is finished, not aborted
            if not finished:
                raise EngineUnavailable(
                    f"request {request.request_id} ended without finishing"
                    + (" (its engine was shut down after a model swap)" if slot.closed else "")
                )
        finally:
            slot.active -= 1
            if self._gauges is not None:
                self._gauges.update(getattr(slot.engine, "model_name", "model"), slot.engine.stats())

    def info(self) -> dict:
        engine = self.current.engine
        return {
            "model_dir": self.current.model_dir,
            "model_name": engine.model_name,
            "context_length": int(engine.context_length),
            "draining": len(self._draining),
        }

    def stats(self) -> dict:
        return {**self.current.engine.stats(), "model_dir": self.current.model_dir, "draining": len(self._draining)}

    def check_health(self) -> None:
        engine = self.current.engine
        check = getattr(engine, "check_health", None)
        if check is not None:
            check()  # EngineUnavailable when the loop thread died: Ray Serve replaces the replica
            return
        thread = getattr(engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the engine thread died")

    def __del__(self) -> None:
        for slot in [self.current, *self._draining]:
            try:
                slot.engine.shutdown()
            except Exception:  # noqa: BLE001 - best effort at replica teardown
                pass


# ---------------------------------------------------------------------------------------------------
# ingress
# ---------------------------------------------------------------------------------------------------
def _cause(exc: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (RayTaskError.cause)."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
        seen += 1
    return exc


class HandleBackend:
    """The API backend inside the ingress: tokenizer here, generation on the model deployment."""

    def __init__(self, handle: Any, model_dir: str, name: str):
        self.handle = handle
        self.name = name
        self.model_dir = model_dir
        self.tokenizer = _tokenizer_for(model_dir)
        self.context_length = 0  # filled by refresh() from the model replicas (they own max_model_len)
        self._stale = True
        self._refresh_lock: asyncio.Lock | None = None

    async def set_model_dir(self, model_dir: str) -> None:
        if model_dir != self.model_dir:
            # Load off the event loop; requests keep using the old tokenizer until the switch.
            self.tokenizer = await asyncio.to_thread(_tokenizer_for, model_dir)
            self.model_dir = model_dir
            self._stale = True

    async def refresh(self) -> None:
        if not self._stale:
            return
        from ray.serve.exceptions import BackPressureError

        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:  # one info call, however many requests arrive at once
            if self._stale:
                try:
                    info = await self.handle.info.remote()
                except BackPressureError as exc:
                    raise Overloaded(str(exc)) from None
                self.context_length = int(info["context_length"])
                self._stale = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from ray.serve.exceptions import BackPressureError

        gen = self.handle.options(stream=True).generate.remote(request)
        finished = False
        try:
            async for out in gen:
                yield out
                finished = finished or out.finished
        except BackPressureError as exc:
            raise Overloaded(str(exc)) from None
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - unwrap RayTaskError(EngineError) into a 400
            cause = _cause(exc)
            if isinstance(cause, EngineError) or isinstance(exc, EngineError):
                raise EngineError(str(cause)) from None
            if isinstance(cause, EngineFailure):  # 5xx, same kind as in-process (503 when the engine is gone)
                raise type(cause)(str(cause)) from None
            if isinstance(cause, BackPressureError):
                raise Overloaded(str(cause)) from None
            raise
        finally:
            if not finished:
                try:  # the replica's generator is cancelled -> the engine aborts the request
                    gen.cancel()
                except Exception:  # noqa: BLE001 - never assigned (e.g. back-pressure): nothing to cancel
                    pass

    async def stats(self) -> dict:
        return await self.handle.stats.remote()


def _request_logging(where: str) -> None:
    """One INFO line per request (``raydistill.serve``), whatever the root level, through the replica's own
    Serve log handlers: always into its log file, onto the console (Ray forwards the replica's stderr to
    the driver) only with ``where == "console"``, by Serve's documented ``log_to_stderr`` record flag.
    Warnings and errors (an engine failure, a refused request) reach the console either way."""
    log = logging.getLogger("raydistill.serve")
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    for handler in logging.getLogger("ray.serve").handlers:  # Serve sets these up in every replica
        if handler not in log.handlers:
            log.addHandler(handler)
    for earlier in [f for f in log.filters if isinstance(f, _LogToStderr)]:
        log.removeFilter(earlier)  # the latest replica's setting holds
    log.addFilter(_LogToStderr(where == "console"))
    log.propagate = False


class _LogToStderr(logging.Filter):
    """Marks each record for Serve's stderr handler (``extra={"log_to_stderr": ...}``): INFO and below
    only with ``to_console``, warnings always. Its file handler takes every record."""

    def __init__(self, to_console: bool):
        super().__init__()
        self.to_console = to_console

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "log_to_stderr", None) is None:
            record.log_to_stderr = self.to_console or record.levelno >= logging.WARNING
        return True


def _count_replicas(app_name: str) -> int | None:
    try:
        app = serve.status().applications.get(app_name)
        dep = app.deployments.get(MODEL_DEPLOYMENT) if app else None
        return int(dep.replica_states.get("RUNNING", 0)) if dep else None
    except Exception:  # noqa: BLE001 - metrics only
        return None


@serve.deployment
@serve.ingress()
class Ingress:
    """The OpenAI FastAPI app in a Serve replica. ``api_key_hashes``: SHA-256 digests of the keys the
    deploying driver read (the replica's own environment is never consulted: on a cluster it lacks them)."""

    def __init__(
        self,
        model_handle: Any,
        model_dir: str,
        section: dict,
        name: str,
        app_name: str,
        api_key_hashes: list[str] | None = None,
    ):
        self.section = ServeSection(**section)
        _request_logging(self.section.request_log)
        self.app_name = app_name
        self.api_key_hashes = list(api_key_hashes or [])
        self.backend = HandleBackend(model_handle, model_dir, name)

    def __serve_build_asgi_app__(self) -> Any:
        from serve.auth import APIKeyAuth
        from serve.metrics import ServerMetrics

        app = create_app(
            self.backend,
            self.section,
            auth=APIKeyAuth.from_hashes(self.api_key_hashes),
            admission_limit=None,
            metrics=ServerMetrics(ray_metrics=True),
            replicas_fn=lambda: _count_replicas(self.app_name),
        )
        self.server = app.state.server
        return app

    async def reconfigure(self, user_config: dict) -> None:
        model_dir = (user_config or {}).get("model_dir")
        if model_dir:
            await self.backend.set_model_dir(model_dir)


# ---------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------
def _abs_model(model_dir: str) -> str:
    # Replicas run in other working directories: local paths must be absolute; aliases stay as they are.
    expanded = os.path.expanduser(model_dir)
    return os.path.abspath(expanded) if os.path.exists(expanded) else model_dir


def _options(deployment: Any, version: str = CODE_VERSION, **options: Any) -> Any:
    try:
        return deployment.options(version=version, _internal=True, **options)
    except (TypeError, ValueError):  # a Ray without internal versions: updates become surge restarts
        return deployment.options(**options)


def driver_key_hashes(section: ServeSection) -> list[str]:
    """SHA-256 digests of the API keys in *this* process's environment / key file (``serve.api_key_env``,
    ``serve.api_key_file``): what the ingress replicas check against."""
    from serve.auth import hash_key, load_api_keys

    return [hash_key(k) for k in load_api_keys(section.api_key_env, section.api_key_file)]


def build_app(
    model_dir: str,
    section: ServeSection | None = None,
    *,
    name: str | None = None,
    engine_factory: str | None = None,
    engine_options: dict | None = None,
    api_key_hashes: list[str] | None = None,
) -> Any:
    """The bound Serve application (ingress -> model) for ``model_dir``; run it with ``serve.run``.
    On vLLM (``section.uses_vllm``) it is Ray Serve LLM's app (:func:`serve.llm_app.build_llm_app`).

    The API keys are read here, in the driver (``api_key_hashes`` overrides), and handed to the ingress
    as hashes."""
    section = section or ServeSection()
    if api_key_hashes is None:
        api_key_hashes = driver_key_hashes(section)
    model_dir = _abs_model(model_dir)
    if section.uses_vllm:
        return build_llm_app(
            model_dir,
            section,
            model_id=served_name(section, name),
            api_key_hashes=api_key_hashes,
            ingress_name=INGRESS_DEPLOYMENT,
        )
    app_name = name or section.app_name
    user_config = {"model_dir": model_dir}
    autoscaling = autoscaling_config(section)
    actor_options: dict[str, Any] = {"num_cpus": section.num_cpus}
    if section.num_gpus:
        actor_options["num_gpus"] = section.num_gpus
    if section.threads:
        actor_options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(section.threads)}}
    # Our engine swaps in place: model_dir in user_config -> reconfigure.
    model = _options(
        ModelDeployment,
        name=MODEL_DEPLOYMENT,
        max_surge_percent=100,
        autoscaling_config=autoscaling,
        ray_actor_options=actor_options,
        max_ongoing_requests=section.max_ongoing_requests,
        max_queued_requests=section.max_queued_requests,
        graceful_shutdown_timeout_s=section.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5,
        user_config=user_config,
    ).bind(model_dir, section.model_dump(mode="json"), engine_factory, engine_options)
    # The ingress never queues work itself: its limit is far above what the model replicas accept.
    ingress_limit = max(
        100, 4 * section.max_replicas * (section.max_ongoing_requests + max(section.max_queued_requests, 0))
    )
    return _options(
        Ingress,
        name=INGRESS_DEPLOYMENT,
        num_replicas=section.ingress_replicas,
        ray_actor_options={"num_cpus": section.ingress_num_cpus},
        max_ongoing_requests=ingress_limit,
        user_config=user_config,
    ).bind(model, model_dir, section.model_dump(mode="json"), served_name(section, name), app_name, api_key_hashes)


def capacity_report(section: ServeSection, resources: dict[str, float]) -> tuple[int, str | None]:
    """How many model replicas the cluster's ``resources`` (``ray.cluster_resources()``) can ever hold beside
    the ingress, and a warning when that is below ``serve.max_replicas`` (None when it fits).

    Ray Serve would otherwise decide to upscale and the new replica would wait forever, the only sign
    being Serve's "has taken more than 30s to be scheduled" log line.
    """
    cpus = float(resources.get("CPU", 0.0))
    gpus = float(resources.get("GPU", 0.0))
    ingress = section.ingress_replicas * section.ingress_num_cpus
    limits = [int((cpus - ingress + 1e-9) // section.num_cpus)] if section.num_cpus > 0 else []
    if section.num_gpus > 0:
        limits.append(int((gpus + 1e-9) // section.num_gpus))
    fits = max(0, min(limits)) if limits else section.max_replicas
    if fits >= section.max_replicas:
        return fits, None
    need = (
        f"{section.max_replicas} x {section.num_cpus:g} CPU"
        + (f" + {section.max_replicas} x {section.num_gpus:g} GPU" if section.num_gpus else "")
        + f" + {ingress:g} CPU for the ingress"
    )
    have = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if section.num_gpus else "")
    return fits, (
        f"serve.max_replicas={section.max_replicas} needs {need}, but the cluster has {have}: at most "
        f"{fits} model replica{'s' if fits != 1 else ''} can ever run, and Ray Serve would wait forever "
        'for the others ("taken more than 30s to be scheduled"). Lower serve.max_replicas or '
        "serve.num_cpus / num_gpus, add nodes, set serve.capacity_check: fit to size max_replicas to "
        "the cluster, or serve.nodes_autoscale: true if the cluster adds nodes on demand"
    )


def fit_to_cluster(section: ServeSection) -> ServeSection:
    """Apply ``serve.capacity_check`` against the connected cluster: log the :func:`capacity_report`
    warning, and with ``fit`` return the section with ``max_replicas`` (and min/initial) lowered to fit."""
    import ray

    if section.capacity_check == "off" or section.nodes_autoscale or not ray.is_initialized():
        return section
    fits, warning = capacity_report(section, ray.cluster_resources())
    if warning is None:
        return section
    if section.capacity_check == "fit" and fits >= 1:
        logger.warning("%s; serve.capacity_check=fit: serving with max_replicas=%d", warning, fits)
        initial = section.initial_replicas
        return section.model_copy(
            update={
                "max_replicas": fits,
                "min_replicas": min(section.min_replicas, fits),
                "initial_replicas": None if initial is None else min(initial, fits),
            }
        )
    logger.warning(warning)
    return section


def _ray_logging(section: ServeSection) -> dict[str, Any]:
    """Serve's LoggingConfig: its own lines at ``serve.ray_log_level``; access logs only at INFO or below
    (each request is logged by ``raydistill.serve`` already)."""
    level = section.ray_log_level
    return {"log_level": level, "enable_access_log": level in ("DEBUG", "INFO")}


def _start_serve(section: ServeSection) -> None:
    from cluster.ray_init import connect

    connect()
    # `import ray.serve` set the driver's Serve logger to INFO ("Started Serve", "Application ... is ready").
    logging.getLogger("ray.serve").setLevel(section.ray_log_level)
    http = {"host": section.host, "port": section.port}
    if section.request_timeout_s:
        http["request_timeout_s"] = section.request_timeout_s
    serve.start(http_options=http, logging_config=_ray_logging(section))


def _http_host(section: ServeSection) -> str:
    """The address Serve's HTTP proxies listen on: the running Serve's (it may have been started earlier
    with other options), else ``serve.host``."""
    try:
        from ray.serve.context import _get_global_client

        return str(_get_global_client().get_serve_details().get("http_options", {}).get("host") or section.host)
    except Exception:  # noqa: BLE001 - Serve not started here
        return section.host


def _check_exposure(section: ServeSection, hashes: list[str]) -> None:
    from serve.auth import check_exposure

    check_exposure(_http_host(section), bool(hashes), section.allow_unauthenticated)


def base_url(section: ServeSection) -> str:
    host = "127.0.0.1" if section.host in ("0.0.0.0", "::") else section.host
    port = section.port
    try:  # Serve may already run on another port (started earlier in this cluster)
        from ray.serve.context import _get_global_client

        cfg = _get_global_client().get_serve_details().get("http_options", {})
        port = int(cfg.get("port", port))
    except Exception:  # noqa: BLE001 - fall back to the configured port
        pass
    prefix = section.route_prefix.rstrip("/")
    return f"http://{host}:{port}{prefix}"


def deploy(
    model_dir: str,
    section: ServeSection | None = None,
    *,
    name: str | None = None,
    blocking: bool = False,
    engine_factory: str | None = None,
    engine_options: dict | None = None,
) -> str:
    """Deploy (or redeploy) the app on Ray Serve and wait until it is ready; returns its base URL.

    ``blocking=True`` then serves until Ctrl-C. Starts an embedded local Ray when none is connected.
    API keys come from this process (see :func:`build_app`); without any, a non-loopback Serve address
    is refused (ConfigError) unless ``serve.allow_unauthenticated``.
    """
    section = section or ServeSection()
    app_name = name or section.app_name
    hashes = driver_key_hashes(section)
    _start_serve(section)
    _check_exposure(section, hashes)
    section = fit_to_cluster(section)
    app = build_app(
        model_dir,
        section,
        name=name,
        engine_factory=engine_factory,
        engine_options=engine_options,
        api_key_hashes=hashes,
    )
    try:
        serve.run(
            app, name=app_name, route_prefix=section.route_prefix, blocking=False, logging_config=_ray_logging(section)
        )
    except Exception as exc:  # noqa: BLE001 - replica constructors failing surface here
        raise RaydistillError(f"serving {model_dir} failed: {exc}") from exc
    url = base_url(section)
    logger.warning("serving %s as model %r at %s/v1 (app %s)", model_dir, served_name(section, name), url, app_name)
    if blocking:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            shutdown(app_name)
    return url


def update_model(
    model_dir: str, section: ServeSection | None = None, *, name: str | None = None, timeout_s: float = 600
) -> None:
    """Swap the running app to ``model_dir`` with no downtime (in-place ``reconfigure`` of every replica).

    Returns once every replica serves the new model. The rest of ``section`` must equal the deployed
    one (changed scaling/engine options are applied too, but a changed engine option restarts replicas
    with a rolling update).
    """
    section = section or ServeSection()
    app_name = name or section.app_name
    if status(app_name) is None:
        raise RaydistillError(
            f"no serving app named {app_name!r} is running; deploy it first (serve.app.deploy or `raydistill serve`)"
        )
    hashes = driver_key_hashes(section)
    _check_exposure(section, hashes)
    section = fit_to_cluster(section)
    app = build_app(model_dir, section, name=name, api_key_hashes=hashes)
    serve.run(
        app, name=app_name, route_prefix=section.route_prefix, blocking=False, logging_config=_ray_logging(section)
    )
    handle = _info_handle(app_name)
    target = _abs_model(model_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = status(app_name) or {}
        if st.get("status") == "RUNNING":
            # Ask a few times: requests spread over replicas, each must report the new model.
            seen = {handle.info.remote().result()["model_dir"] for _ in range(8)}
            if seen == {target}:
                return
        time.sleep(0.25)
    raise RaydistillError(f"model update of app {app_name!r} to {model_dir} did not finish in {timeout_s:.0f}s")


def _info_handle(app_name: str) -> Any:
    """The deployment that answers ``info()`` (the model dir served): the model replicas of our engine's
    app; the ingress of a Ray Serve LLM app (it was built for one model dir)."""
    deployments = (status(app_name) or {}).get("deployments", {})
    name = MODEL_DEPLOYMENT if MODEL_DEPLOYMENT in deployments else INGRESS_DEPLOYMENT
    return serve.get_deployment_handle(name, app_name=app_name)


def served_model_dir(name: str | None = None) -> str | None:
    """The model dir the app's model replicas serve now (asked from a replica), or None when the app
    is not running or does not answer."""
    app_name = name or ServeSection().app_name
    if status(app_name) is None:
        return None
    try:
        return str(_info_handle(app_name).info.remote().result(timeout_s=60)["model_dir"])
    except Exception as exc:  # noqa: BLE001 - unknown: the caller treats it as "not served"
        logger.warning("cannot ask app %s which model it serves: %r", app_name, exc)
        return None


def status(name: str | None = None) -> dict | None:
    """``{"status", "message", "deployments": {name: {"status", "replicas", "replica_states"}}}`` or None."""
    import ray

    if not ray.is_initialized():
        return None
    app_name = name or ServeSection().app_name
    try:
        apps = serve.status().applications
    except Exception:  # noqa: BLE001 - Serve not started
        return None
    app = apps.get(app_name)
    if app is None:
        return None
    deployments = {}
    for dep_name, dep in app.deployments.items():
        states = {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
        deployments[dep_name] = {
            "status": str(getattr(dep.status, "value", dep.status)),
            "replica_states": states,
            "replicas": states.get("RUNNING", 0),
            "message": dep.message,
        }
    return {"status": str(getattr(app.status, "value", app.status)), "message": app.message, "deployments": deployments}


def shutdown(name: str | None = None) -> None:
    """Delete the app (its replicas drain first); Serve itself keeps running for other apps."""
    import ray

    if not ray.is_initialized():
        return
    app_name = name or ServeSection().app_name
    try:
        serve.delete(app_name)
    except Exception as exc:  # noqa: BLE001 - already gone
        logger.debug("serve.delete(%s): %s", app_name, exc)
