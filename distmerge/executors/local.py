"""Run shard tasks in this process, one after another: no cluster, same bytes as Ray."""

from __future__ import annotations

from typing import Sequence

from distmerge.executors.base import OnResult
from distmerge.plan import ShardTask
from distmerge.shard import ShardResult, merge_shard


class LocalExecutor:
    name = "local"
    parallelism = 1

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, tasks: Sequence[ShardTask], on_result: OnResult) -> list[ShardResult]:
        results = []
        for task in tasks:
            result = merge_shard(task)
            on_result(task, result)
            results.append(result)
        return results
