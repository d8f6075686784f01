"""The output directory appears only when complete: work in a hidden sibling, rename at the end."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from pathlib import Path

from distmerge.errors import OutputError, output_error
from distmerge.output.owner import Lease, debris_name, make_dirs, not_ours, remove_created, sweep_debris


class Staging:
    """Context manager: yields a fresh sibling directory; `commit()` renames it onto the target.

    Leaving the block without commit (an error, Ctrl-C, SIGTERM) deletes it and the parent
    directories this run created, so a failed merge leaves nothing. A run killed outright cannot
    clean up: its directory is named after its process, and the next run beside it removes it.
    Being a sibling keeps the final rename on one filesystem, where it is atomic.
    """

    def __init__(self, target: str, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        self.path = debris_name(self.target, "stage")
        self.parts = self.path / "_parts"
        self._created: list[Path] = []
        self._committed = False
        self._lease = Lease(self.path)  # so that a run on another host can tell this one is alive

    def __enter__(self) -> "Staging":
        try:
            self._created = make_dirs(self.target.parent)
            sweep_debris(self.target.parent)
            self.path.mkdir()
            self.parts.mkdir()
        except OSError as e:
            self.__exit__()
            raise output_error(e, str(self.target.parent), "create the output's staging directory in") from None
        self._lease.start()
        return self

    def commit(self) -> None:
        """Rename the staged output onto the target; a previous distmerge output there is set aside, then removed.

        The previous output is checked after it is set aside, so a file added to it at the last moment is
        never removed with it: it goes back, and the merge is refused. Ctrl-C and SIGTERM wait while the
        two renames run, so the target is never left missing by an interrupt.
        """
        shutil.rmtree(self.parts, ignore_errors=True)
        old = None
        blocked = _block_signals()
        try:
            if os.path.lexists(self.target):
                if not self.overwrite:
                    raise OutputError(f"{self.target} was created by another process during this merge; nothing "
                                      f"was overwritten: choose another output.path or set output.overwrite=true")
                old = debris_name(self.target, "old")
                os.rename(self.target, old)
                why = not_ours(old)  # again, where nobody else can add to it: it may have changed during the merge
                if why:
                    os.rename(old, self.target)
                    raise OutputError(f"{self.target} {why.replace(str(old), str(self.target))} (it changed during "
                                      f"this merge); nothing was overwritten: move it away or choose another "
                                      f"output.path")
            try:
                os.rename(self.path, self.target)
            except OSError:
                if old is not None:
                    os.rename(old, self.target)
                raise
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"another process wrote {self.target} during this merge; nothing was "
                                  f"overwritten: run one merge per output.path at a time") from None
            raise output_error(e, str(self.target), "move the finished output to") from None
        finally:
            _unblock_signals(blocked)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # what is left, if anything, a later run removes

    def __exit__(self, *exc) -> None:
        self._lease.stop()
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
            remove_created(self._created)


def _block_signals() -> set | None:
    """Hold SIGINT and SIGTERM (delivered on unblocking) in the main thread; elsewhere Python gets none."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _unblock_signals(previous: set | None) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
