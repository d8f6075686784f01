"""Run shard tasks in this process, one after another: no cluster, same bytes as Ray."""

from __future__ import annotations

from typing import Sequence

from distmerge.executors.base import OnResult
from distmerge.plan import ShardTask
from distmerge.shard import ShardResult, WorkerMemory, merge_shard


class LocalExecutor:
    name = "local"
    parallelism = 1
    in_process = True  # shares the driver's cores: the driver hashes inputs after the merge, not alongside

    def __init__(self) -> None:
        self._memory = WorkerMemory()  # one worker's inputs and scratch, kept from shard to shard

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self._memory = WorkerMemory()  # give the memory back

    def run(self, tasks: Sequence[ShardTask], on_result: OnResult) -> list[ShardResult]:
        results = []
        for task in tasks:
            result = merge_shard(task, self._memory)
            on_result(task, result)
            results.append(result)
        return results
