"""The output directory appears only when complete: work in a hidden sibling, rename at the end."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from distmerge.errors import OutputError, output_error
from distmerge.output.owner import debris_name, make_dirs, not_ours, remove_created, sweep_debris


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

    def __enter__(self) -> "Staging":
        try:
            self._created = make_dirs(self.target.parent)
            sweep_debris(self.target.parent)
            self.path.mkdir()
            self.parts.mkdir()
        except OSError as e:
            self.__exit__()
            raise output_error(e, str(self.target.parent), "create the output's staging directory in") from None
        return self

    def commit(self) -> None:
        """Rename the staged output onto the target; a previous distmerge output there is set aside, then removed."""
        shutil.rmtree(self.parts, ignore_errors=True)
        old = None
        try:
            if os.path.lexists(self.target):
                if not self.overwrite:
                    raise OutputError(f"{self.target} was created by another process during this merge; nothing "
                                      f"was overwritten: choose another output.path or set output.overwrite=true")
                why = not_ours(self.target)  # again: it may have changed since the merge began
                if why:
                    raise OutputError(f"{self.target} {why} (it changed during this merge); nothing was "
                                      f"overwritten: move it away or choose another output.path")
                old = debris_name(self.target, "old")
                os.rename(self.target, old)
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
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # what is left, if anything, a later run removes

    def __exit__(self, *exc) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
            remove_created(self._created)
