"""A progress bar over shards (done/total, bytes, ETA) and one log line per finished shard."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from tqdm.auto import tqdm

from distmerge.config.units import format_size

log = logging.getLogger("distmerge")


class Progress:
    def __init__(self, tasks: Sequence, enabled: bool = True):
        self.total = len(tasks)
        self.done = 0
        self._bar = tqdm(total=sum(t.in_bytes for t in tasks), unit="B", unit_scale=True, unit_divisor=1024,
                         desc=f"shards 0/{self.total}", disable=not enabled or not sys.stderr.isatty(),
                         dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def update(self, task, result) -> None:
        self.done += 1
        self._bar.update(task.in_bytes)
        self._bar.set_description(f"shards {self.done}/{self.total}")
        w = dict(result.worker)
        msg = (f"shard {task.index + 1}/{self.total}: {len(task.modules)} modules, {format_size(task.in_bytes)} in, "
               f"{result.seconds:.2f}s on {w.get('host')} pid {w.get('pid')} ({w.get('device')})")
        if self._bar.disable:
            log.info(msg)
        else:
            self._bar.write(msg, file=sys.stderr)
