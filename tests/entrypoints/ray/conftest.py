"""One local Ray instance for the Ray tests (starting one takes ~10 s): 2 CPUs, no dashboard, a small object
store, on loopback. At the end Ray is shut down and every process it started must be gone."""
from __future__ import annotations

import os
import time

import psutil
import pytest

OBJECT_STORE_BYTES = 200 * 1024**2
# Ray's processes on loopback only (Ray's switch for single-machine clusters), and no usage report to Ray's servers
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.update(LOOPBACK_RAY_ENV)
    before = set(psutil.Process().children())
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False)
    ray_roots = [p for p in psutil.Process().children() if p not in before]  # gcs_server, raylet, ...
    assert ray_roots
    yield ray
    started = [q for p in ray_roots if p.is_running() for q in [p, *p.children(recursive=True)]]  # + workers
    ray.shutdown()
    assert_gone(started)


def assert_gone(processes: list[psutil.Process], timeout_s: float = 30.0) -> None:
    """Every process in `processes` (Ray's gcs, raylet, workers...) has exited within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, f"left running after ray.shutdown(): {[(p.pid, p.name()) for p in alive]}"
