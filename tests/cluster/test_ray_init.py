"""Ray bring-up: runtime_env for remote runs, and reuse of an already running Ray."""

from __future__ import annotations

import pytest

from cluster.errors import RaydistillError
from cluster.ray_init import PROJECT_ROOT, build_runtime_env, connect


def test_runtime_env_ships_the_project_without_its_venv_and_runs():
    env = build_runtime_env()
    assert env["working_dir"] == str(PROJECT_ROOT)
    assert (PROJECT_ROOT / "cluster" / "ray_init.py").exists()
    assert ".venv/" in env["excludes"] and "runs/" in env["excludes"]
    assert "pip" not in env


def test_runtime_env_resolves_extras_from_pyproject():
    env = build_runtime_env(extras=["gpu", "s3"], pip=["rich"], env_vars={"HF_HOME": "/tmp/hf"})
    assert env["pip"][0] == "rich"
    assert any(p.startswith("vllm") for p in env["pip"]) and any(p.startswith("s3fs") for p in env["pip"])
    assert env["env_vars"] == {"HF_HOME": "/tmp/hf"}
    with pytest.raises(RaydistillError, match="unknown extra 'cuda'; choose from"):
        build_runtime_env(extras=["cuda"])


@pytest.mark.integration
def test_connect_reuses_a_running_ray(ray_session):
    resources = connect(None)
    assert resources["CPU"] == 2
    assert connect("auto") == resources  # already initialised: no second init, no error


def test_the_worker_setup_hook_is_added_without_replacing_a_users_own():
    from cluster.ray_init import with_quiet_workers

    env = with_quiet_workers({"env_vars": {"A": "1"}})
    assert env == {"env_vars": {"A": "1"}, "worker_process_setup_hook": "cluster.ray_init.quiet_ray_logs"}
    assert with_quiet_workers(None) == {"worker_process_setup_hook": "cluster.ray_init.quiet_ray_logs"}
    mine = {"worker_process_setup_hook": "my.hook"}
    assert with_quiet_workers(mine) == mine


@pytest.mark.integration
def test_ray_workers_run_the_hook_so_ray_train_info_lines_stay_off_the_console(ray_session):
    """Worker output is streamed to the driver: Ray Train's per-checkpoint INFO lines and the placement
    group cleaner's repeated State API warning would interleave with our progress bars."""
    import logging

    @ray_session.remote
    def levels() -> dict[str, int]:
        names = ["ray.train", "ray.train.v2._internal.execution.controller.placement_group_cleaner", "ray.serve"]
        import warnings

        from transformers.utils import logging as hf_logging

        levels = {name: logging.getLogger(name).getEffectiveLevel() for name in names}
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        with warnings.catch_warnings(record=True) as caught:  # the worker's filters, as the hook left them
            warnings.warn("`ExecutionOptions.exclude_resources` is deprecated (test)", UserWarning, stacklevel=2)
            warnings.warn("another warning", UserWarning, stacklevel=2)
        return {
            **levels,
            "hf_progress_bars": hf_logging.is_progress_bar_enabled(),
            "auth_filters": len(auth.filters),
            "warnings": [str(w.message) for w in caught],
        }

    got = ray_session.get(levels.remote())
    assert got.pop("hf_progress_bars") is False  # no "Loading weights" bar per model load in a worker
    assert got.pop("auth_filters") == 1
    assert got.pop("warnings") == ["another warning"]
    assert got["ray.train"] == logging.WARNING
    assert got["ray.train.v2._internal.execution.controller.placement_group_cleaner"] == logging.ERROR
    assert got["ray.serve"] == logging.WARNING


def test_quiet_ray_data_turns_off_its_progress_output_and_its_notice():
    import logging

    import ray.data

    from cluster.ray_init import quiet_ray_data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    try:
        quiet_ray_data()
        quiet_ray_data()  # idempotent: one filter, not two
        assert ctx.enable_progress_bars is False
        assert logging.getLogger("ray.data").getEffectiveLevel() >= logging.WARNING
        notice = logging.getLogger("ray.data._internal.progress")
        assert len(notice.filters) == 1
        record = logging.LogRecord(
            "ray.data._internal.progress",
            logging.WARNING,
            __file__,
            1,
            "Progress bars disabled. To enable, set ...",
            None,
            None,
        )
        assert not notice.filters[0].filter(record)
        other = logging.LogRecord("ray.data._internal.progress", logging.WARNING, __file__, 1, "other", None, None)
        assert notice.filters[0].filter(other)
    finally:
        ctx.enable_progress_bars = before


def test_the_default_token_auth_notice_is_dropped_and_the_open_cluster_warning_kept(caplog):
    """A local start logs "Token authentication is enabled ... opt out" every time (the README's default);
    the warning that auth is disabled still reaches the console, as does the same logger's next record."""
    import logging

    from cluster.ray_init import quiet_ray_logs

    quiet_ray_logs()
    quiet_ray_logs()  # idempotent: the filter is added once
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert [r.getMessage().split(".")[0] for r in caplog.records] == [
        "Token authentication is disabled for this Ray cluster"
    ]


def test_rays_deprecation_warning_about_its_own_dataset_manager_is_ignored_and_others_are_not():
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from cluster.ray_init import quiet_ray_logs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_ray_logs()
        quiet_ray_logs()
        warnings.warn(
            "`ExecutionOptions.exclude_resources` is deprecated and will be removed after January 2027.",
            RayDeprecationWarning,
            stacklevel=2,
        )
        warnings.warn("`something_else` is deprecated", RayDeprecationWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]
