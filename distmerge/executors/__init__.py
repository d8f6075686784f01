"""Executors run shard tasks: `local` in this process, `ray` on a pool of actors. `auto` picks ray
when RAY_ADDRESS is set or this process runs inside a Ray job, else local."""

from __future__ import annotations

import os

from distmerge.config.schema import RuntimeSpec


def resolve_executor_name(runtime: RuntimeSpec) -> str:
    if runtime.executor != "auto":
        return runtime.executor
    if runtime.address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        return "ray"
    return "local"


def make_executor(runtime: RuntimeSpec, peak_bytes: int = 0):
    """The pool for a merge or a batch; `peak_bytes` is the plans' largest working set per worker, which a
    Ray worker reserves (with Python's and torch's own) so that Ray never packs more workers than fit."""
    name = resolve_executor_name(runtime)
    if name == "ray":
        from distmerge.executors.ray import RayExecutor  # Ray is imported only when it schedules

        return RayExecutor(runtime, peak_bytes)
    from distmerge.executors.local import LocalExecutor

    return LocalExecutor()
