"""Ray bring-up (embedded local cluster or an address), runtime_env, and fsspec storage."""

from cluster.errors import ConfigError, RaydistillError
from cluster.ray_init import build_runtime_env, connect

__all__ = ["ConfigError", "RaydistillError", "build_runtime_env", "connect"]
