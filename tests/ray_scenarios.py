"""Ray scenarios that need a cluster of their own, run as `python -m tests.ray_scenarios NAME CONFIG`
in a subprocess (one Ray per process): prints the merge's manifest (or the scenario's report) as JSON
on its last line."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import ray

import distmerge


def multinode(cfg: dict) -> dict:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        return distmerge.merge(cfg, ["runtime.executor=ray", "runtime.num_workers=2"]).manifest
    finally:
        ray.shutdown()
        cluster.shutdown()


def fake_gpus(cfg: dict) -> dict:
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    try:
        return distmerge.merge(cfg, ["runtime.executor=ray"]).manifest
    finally:
        ray.shutdown()


class Terminated(BaseException):
    """What a CLI's SIGTERM handler raises in the driver."""


def sigterm(cfg: dict) -> dict:
    """SIGTERM the driver while it waits on a hung worker, with the merge starting its own local Ray."""

    def handler(signum, frame):
        raise Terminated()

    flag = cfg.pop("hang_flag")
    os.environ["DISTMERGE_TEST_HANG_ONCE"] = flag
    signal.signal(signal.SIGTERM, handler)

    def terminate_when_hung() -> None:
        while not (os.path.exists(flag) and open(flag).read()):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_hung, daemon=True).start()
    raised = None
    try:
        distmerge.merge(cfg)
    except Terminated:
        raised = "Terminated"
    stopped = time.time()
    pid = int(open(flag).read())
    deadline = time.monotonic() + 10  # a killed worker can take a moment to go
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"raised": raised, "handler_kept": signal.getsignal(signal.SIGTERM) is handler,
            "hung_worker_alive": _alive(pid), "ray_initialized": ray.is_initialized(),
            "seconds_to_stop": stopped - os.path.getmtime(flag)}


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    name, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        manifest = globals()[name](json.load(f))
    print(json.dumps(manifest))
