"""Progress bars: over shards (done/total, bytes, ETA) with one log line per finished shard, and `bar()`,
which every bar of distmerge goes through."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from distmerge.config.units import format_size

log = logging.getLogger("distmerge")


class _Off:
    """A bar that is not shown (stderr is not a terminal, or progress is off): tqdm's interface, doing nothing."""

    disable = True

    def update(self, n: float = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def write(self, s: str, file=None) -> None: ...
    def close(self) -> None: ...


def bar(enabled: bool, **kwargs):
    """A tqdm bar on stderr when it is a terminal and `enabled`; else one that does nothing. tqdm (0.05 s with
    the asyncio it imports) is imported only when a bar is shown: a nightly batch under cron shows none."""
    if not enabled or not sys.stderr.isatty():
        return _Off()
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


class Progress:
    def __init__(self, tasks: Sequence, enabled: bool = True):
        self.total = len(tasks)
        self.done = 0
        self._bar = bar(enabled, total=sum(t.in_bytes for t in tasks), unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"shards 0/{self.total}")

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
