"""What an executor is: something that runs shard tasks and hands back their results."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from distmerge.plan import ShardTask
from distmerge.shard import ShardResult

OnResult = Callable[[ShardTask, ShardResult], None]


class Executor(Protocol):
    name: str
    in_process: bool  # runs shards on the driver's own cores

    @property
    def parallelism(self) -> int:
        """How many shards run at once; the planner splits work into a few times this many tasks."""

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc) -> None: ...

    def run(self, tasks: Sequence[ShardTask], on_result: OnResult) -> list[ShardResult]:
        """Run every task; results in task order. Raises DistmergeError when a task fails for a data reason."""
