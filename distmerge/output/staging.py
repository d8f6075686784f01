"""The output directory appears only when complete: work in a hidden sibling, rename at the end."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


class Staging:
    """Context manager: yields a fresh sibling directory; `commit()` renames it onto the target.

    Leaving the block without commit (an error, Ctrl-C) deletes it, so a failed merge leaves nothing.
    Being a sibling keeps the final rename on one filesystem, where it is atomic.
    """

    def __init__(self, target: str, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        self.path = self.target.parent / f".{self.target.name}.distmerge-{uuid.uuid4().hex[:8]}"
        self.parts = self.path / "_parts"
        self._committed = False

    def __enter__(self) -> "Staging":
        self.parts.mkdir(parents=True)
        return self

    def commit(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)
        old = None
        if self.target.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.target} appeared during the merge; nothing was overwritten")
            old = self.target.parent / f".{self.target.name}.distmerge-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
