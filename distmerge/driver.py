"""`distmerge merge`: one Job on a pool of its own. It never loads a tensor."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
from collections import deque
from typing import Iterable

from distmerge.config import ConfigSource, format_size, load_config
from distmerge.executors import make_executor
from distmerge.job import Job, MergeResult
from distmerge.planner import Plan, ShardTask, build_plan
from distmerge.progress import Progress
from distmerge.shard import ShardResult
from distmerge.sources import open_inputs

log = logging.getLogger("distmerge")
__all__ = ["MergeResult", "merge", "plan"]


def plan(config: ConfigSource, overrides: Iterable[str] = ()) -> Plan:
    """Read configs and headers and plan the merge; nothing is merged or written."""
    cfg = load_config(config, overrides)
    return build_plan(cfg, open_inputs(cfg))


class _OneJob:
    """The feed of `distmerge merge`: one job's tasks, and a data error stops the merge."""

    def __init__(self, job: Job, tasks: list[ShardTask], progress: Progress):
        self.job, self.progress = job, progress
        self._queue = deque(tasks)
        self._left = len(tasks)

    def next_task(self) -> ShardTask | None:
        return self._queue.popleft() if self._queue else None

    def finished(self) -> bool:
        return self._left == 0

    def done(self, task: ShardTask, result: ShardResult) -> None:
        self._left -= 1
        self.job.add(task, result)
        self.progress.update(task, result)

    def failed(self, task: ShardTask, error: Exception) -> None:
        raise error


def merge(config: ConfigSource, overrides: Iterable[str] = ()) -> MergeResult:
    """Merge the adapters a config names; the output directory appears only when complete.

    With output.push_to_hub it is then uploaded; a failed upload raises PushError, the output staying complete.
    """
    cfg = load_config(config, overrides)
    job = Job(cfg)
    the_plan = job.prepare()
    # The job (its staging) is entered first so that it is removed last: workers stop before their directory goes.
    with job, make_executor(cfg.runtime, the_plan.peak_bytes) as executor, \
            cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hasher:
        tasks = job.shard(executor.parallelism)
        # Inputs are hashed for the manifest while remote workers merge; an in-process executor merges on
        # these cores, and hashing alongside only slowed it (measured: 2x on linear), so it waits.
        if not executor.in_process:
            job.hash_inputs(hasher)
        log.info("merging %d adapters with %s into %s: %d modules in %d shards on %s (%d at a time)",
                 len(job.adapters), the_plan.method, cfg.output.path, len(the_plan.jobs), len(tasks), executor.name,
                 executor.parallelism)
        with Progress(tasks, enabled=cfg.runtime.progress) as progress:
            executor.run(_OneJob(job, tasks, progress))
        result = job.finish(executor.name)
    log.info("wrote %s (%s, rank %d) in %.1fs", cfg.output.path, format_size(the_plan.out_bytes), the_plan.rank,
             result.seconds)
    if cfg.output.push_to_hub:  # the output is complete and the workers are gone; a failed upload leaves it so
        from distmerge.publish.hub import push_output

        result = dataclasses.replace(result, hub=push_output(cfg.output, result.path))
    return result
