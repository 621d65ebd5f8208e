"""A short-lived local Ray with the job server (dashboard) for the Ray Jobs API test.

Run as ``python ray_head.py DASHBOARD_PORT AGENT_PORT TEMP_DIR [NUM_CPUS]`` (default 1 CPU); prints
``READY <gcs address>`` when the job server is up
and shuts Ray down on SIGTERM. Its own temp dir keeps ``ray_current_cluster`` out of /tmp/ray, so other
processes' ``ray.init()`` never join this cluster by accident; it is written into the head's own temp dir
instead, where this cluster's job supervisor looks when it resolves ``"auto"`` for a job driver (without
it, the supervisor takes any Ray it finds on the machine, another user's included). ``ray.init`` has no option for the
dashboard agent's port (default 52365, taken when another Ray with a dashboard runs on the machine),
so the default of ``RayParams`` is replaced here.
"""

import signal
import sys
import time

import ray


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    port, agent_port, temp_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    num_cpus = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    from ray._private import parameter

    original = parameter.RayParams.__init__

    def params(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", agent_port)
        # A GCS port of its own: on a shared machine a default one can be one that another user's Ray binds
        # with SO_REUSEPORT too, and the job drivers then reach that (token-auth) GCS (InvalidAuthToken).
        kwargs.setdefault("gcs_server_port", _free_port())
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = params
    context = ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        object_store_memory=200 * 1024**2,
        _temp_dir=temp_dir,
        logging_level="WARNING",
    )

    # What `ray start` does and ray.init does not: the job supervisor resolves "auto" with this temp dir,
    # and with the file it picks this cluster even when other Rays (GCS processes) run on the machine.
    from ray._private.utils import write_ray_address

    write_ray_address(context.address_info["gcs_address"], temp_dir)

    def stop(*_):
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"ADDRESS={ray.get_runtime_context().gcs_address}", flush=True)
    print("READY", context.address_info["gcs_address"], flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
