"""Ray scenarios that need a cluster of their own, run as `python -m tests.ray_scenarios NAME CONFIG`
in a subprocess (one Ray per process): prints the merge's manifest as JSON on its last line."""

from __future__ import annotations

import json
import sys

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


if __name__ == "__main__":
    name, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        manifest = globals()[name](json.load(f))
    print(json.dumps(manifest))
