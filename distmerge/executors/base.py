"""What an executor is: a pool of workers that runs the shard tasks a Feed hands it.

A feed is whatever owns the tasks: one job for `distmerge merge`, a whole batch of jobs for
`distmerge batch`. The pool asks it for the next task whenever a worker is free and hands each
result back; the feed may release new tasks in return (a finished recipe unblocks the recipes that
merge its output). The pool knows nothing of jobs; a job knows nothing of the pool.
"""

from __future__ import annotations

from typing import Protocol

from distmerge.planner import ShardTask
from distmerge.shard import ShardResult


class Feed(Protocol):
    def next_task(self) -> ShardTask | None:
        """A task to run now, or None when none is ready (more may come after a result)."""

    def finished(self) -> bool:
        """True when no task will come any more."""

    def done(self, task: ShardTask, result: ShardResult) -> None:
        """A task's result."""

    def failed(self, task: ShardTask, error: Exception) -> None:
        """A task failed: a DistmergeError for a data reason, anything else a bug or a resource failure
        (out of memory). Raise to stop the pool, or record it and go on."""


class Executor(Protocol):
    name: str
    in_process: bool  # runs shards on the driver's own cores

    @property
    def parallelism(self) -> int:
        """How many shards run at once; the planner splits work into a few times this many tasks."""

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc) -> None: ...

    def run(self, feed: Feed) -> None:
        """Run tasks until the feed is finished."""


def stalled() -> AssertionError:
    return AssertionError("the feed has no task ready, none running, and is not finished: a job waits on nothing")
