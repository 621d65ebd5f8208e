"""``raydistill serve MODEL_DIR``: the OpenAI-compatible endpoint, through Ray Serve (default) or plain uvicorn.

    raydistill serve runs/quickstart/<run>            # a student run (serves {run}/student)
    raydistill serve smollm2-135m-instruct --port 8001 --no-ray
    raydistill serve DIR --config pipeline.yaml --set serve.max_replicas=4 --api-key-file keys.txt

Blocks until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from serve.section import ServeSection


def register(subparsers: Any) -> None:
    from pipelines.cli.common import add_config_args

    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible API (Ray Serve or --no-ray)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="a student run dir, any Hugging Face model dir, or an alias like smollm2-135m-instruct",
    )
    add_config_args(p, run=False)
    p.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (serve.port, default 8000)")
    p.add_argument("--min-replicas", type=int, help="serve.min_replicas (0 = scale to zero when idle)")
    p.add_argument("--max-replicas", type=int, help="serve.max_replicas")
    p.add_argument("--api-key-file", help="file with one API key per line (serve.api_key_file)")
    p.add_argument("--prompt-log", metavar="URI", help="log prompts + completions as Parquet under URI")
    p.add_argument("--model-name", help="model id clients send (default: MODEL_DIR's name)")
    p.add_argument("--no-ray", action="store_true", help="run the FastAPI app in uvicorn in this process")
    p.set_defaults(func=cmd_serve)


def section_from_args(base: ServeSection, args: argparse.Namespace) -> ServeSection:
    """The config's ``serve:`` section with the command-line flags applied (validated again)."""
    updates: dict[str, Any] = {}
    for flag, field in (
        ("host", "host"),
        ("port", "port"),
        ("min_replicas", "min_replicas"),
        ("max_replicas", "max_replicas"),
        ("api_key_file", "api_key_file"),
        ("model_name", "model_name"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            updates[field] = value
    if getattr(args, "prompt_log", None):
        updates["prompt_log"] = args.prompt_log
        updates["prompt_log_enabled"] = True
    data = {**base.model_dump(), **updates}
    if "min_replicas" in updates and "max_replicas" not in updates and data["max_replicas"] < data["min_replicas"]:
        data["max_replicas"] = data["min_replicas"]
    if not data.get("model_name"):
        data["model_name"] = os.path.basename(os.path.normpath(args.model_dir))
    try:
        return ServeSection(**data)
    except Exception as exc:  # pydantic ValidationError -> the project's error type
        from cluster.errors import ConfigError

        raise ConfigError(f"serve: {exc}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.cli.common import load

    cfg = load(args)
    section = section_from_args(cfg.serve, args)
    log = logging.getLogger("raydistill.serve")
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    if args.no_ray:
        return _serve_uvicorn(args.model_dir, section)
    from pipelines.cli.common import connect_ray
    from serve.app import deploy

    connect_ray(cfg)
    print(
        f"serving {args.model_dir} as model {section.model_name!r} through Ray Serve "
        f"(replicas {section.min_replicas}..{section.max_replicas}); Ctrl-C stops",
        flush=True,
    )
    url = deploy(args.model_dir, section, blocking=False)
    print(f"OpenAI base URL: {url}/v1", flush=True)
    import time

    from serve.app import shutdown

    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        shutdown(section.app_name)
    return 0


def _serve_uvicorn(model_dir: str, section: ServeSection) -> int:
    import uvicorn

    from serve.api import create_app
    from serve.auth import APIKeyAuth, check_exposure, load_api_keys
    from serve.backends import EngineBackend
    from serve.engine.factory import load_engine

    keys = load_api_keys(section.api_key_env, section.api_key_file)
    check_exposure(section.host, bool(keys), section.allow_unauthenticated)
    engine = load_engine(model_dir, section)
    app = create_app(
        EngineBackend(engine, name=section.model_name), section, auth=APIKeyAuth(keys), close_backends=True
    )
    print(
        f"OpenAI base URL: http://{section.host}:{section.port}/v1 (model {section.model_name!r}); Ctrl-C stops",
        flush=True,
    )
    uvicorn.run(app, host=section.host, port=section.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0
