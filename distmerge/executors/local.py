"""Run shard tasks in this process, one after another: no cluster, same bytes as Ray."""

from __future__ import annotations

from distmerge.executors.base import Feed, stalled
from distmerge.shard import WorkerMemory, merge_shard


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

    def run(self, feed: Feed) -> None:
        while True:
            task = feed.next_task()  # may settle jobs that need no task (a batch's up-to-date recipes)
            if task is None:
                if feed.finished():
                    return
                raise stalled()
            try:
                result = merge_shard(task, self._memory)
            except Exception as e:  # a data error, or a bug or resource failure in this shard: the feed decides
                feed.failed(task, e)
                continue
            feed.done(task, result)
