"""``serve.request_log``: a replica's per-request line goes to its Serve log file, and to the console
(the replica's stderr, which Ray forwards to the driver) only when asked.

The replica's ``ray.serve`` logger is set up here by Serve's own function, as a replica starts."""

from __future__ import annotations

import io
import logging
import logging.handlers

import pytest
from ray.serve._private.common import ServeComponentType
from ray.serve._private.logging_utils import configure_component_logger
from ray.serve.schema import LoggingConfig

from serve.app import _request_logging
from serve.section import ServeSection


@pytest.fixture
def replica_logger(tmp_path):
    """Serve's replica logger at ``serve.ray_log_level`` WARNING, writing into ``tmp_path``; its stderr
    handler writes into a buffer instead (returned with the folder). Every logger touched is put back."""
    saved = {}
    for name in ("ray.serve", "raydistill.serve"):
        log = logging.getLogger(name)
        saved[name] = (log.level, list(log.handlers), list(log.filters), log.propagate)
    configure_component_logger(
        component_name="ingress",
        component_id="test",
        component_type=ServeComponentType.REPLICA,
        logging_config=LoggingConfig(log_level="WARNING", logs_dir=str(tmp_path), enable_access_log=False),
        max_bytes=1 << 20,
        backup_count=1,
    )
    stderr = [h for h in logging.getLogger("ray.serve").handlers if type(h) is logging.StreamHandler]
    assert len(stderr) == 1, "Serve's replica logger has one stderr handler (RAY_SERVE_LOG_TO_STDERR)"
    console = io.StringIO()
    stderr[0].setStream(console)
    yield tmp_path, console
    for name, (level, handlers, filters, propagate) in saved.items():
        log = logging.getLogger(name)
        log.setLevel(level)
        log.handlers[:] = handlers
        log.filters[:] = filters
        log.propagate = propagate


def _file_text(logs_dir) -> str:
    for handler in logging.getLogger("ray.serve").handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.flush()
    return "".join(p.read_text() for p in logs_dir.glob("*.log"))


def test_request_lines_go_to_the_replica_log_file_and_warnings_also_to_the_console_by_default(replica_logger):
    logs_dir, console = replica_logger
    assert ServeSection().request_log == "file"
    _request_logging(ServeSection().request_log)
    logging.getLogger("raydistill.serve").info("request chatcmpl-1 chat model=m status=200")
    logging.getLogger("raydistill.serve").warning("request chatcmpl-2: engine unavailable")

    text = _file_text(logs_dir)
    assert "request chatcmpl-1 chat model=m status=200" in text  # INFO although Serve's own level is WARNING
    assert "request chatcmpl-2: engine unavailable" in text
    assert "chatcmpl-1" not in console.getvalue()
    assert "request chatcmpl-2: engine unavailable" in console.getvalue(), "warnings still reach the console"


def test_console_request_log_also_streams_to_stderr(replica_logger):
    logs_dir, console = replica_logger
    _request_logging(ServeSection(request_log="console").request_log)
    logging.getLogger("raydistill.serve").info("request chatcmpl-3 chat model=m status=200")

    assert "request chatcmpl-3" in console.getvalue()
    assert "request chatcmpl-3" in _file_text(logs_dir)


def test_a_second_replica_init_in_the_same_process_adds_no_duplicate_lines(replica_logger):
    _request_logging("file")
    _request_logging("file")
    logging.getLogger("raydistill.serve").info("request chatcmpl-4 once")
    assert _file_text(replica_logger[0]).count("request chatcmpl-4 once") == 1


def test_request_log_rejects_other_values():
    with pytest.raises(ValueError, match="request_log"):
        ServeSection(request_log="stdout")
