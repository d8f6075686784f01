"""Inputs are pinned: the bytes merged are the bytes planned and the bytes hashed for the manifest.

The planner records each input file's size, mtime and inode from the same open file it read the
header from. Workers compare them when they open a file and again when they are done with it, and
the manifest's sha256 is computed from an open file checked the same way. An adapter rewritten
while a merge runs (a training job saving a checkpoint, an rsync) fails the merge instead of
mixing old and new modules under a hash of neither.

Inode and device numbers are compared only on the host that planned: on shared storage another
node may number the same file differently (FUSE mounts do), while size and mtime agree everywhere.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from typing import BinaryIO

from distmerge.errors import MergeError

HASH_CHUNK = 2**20


@dataclass(frozen=True)
class Stamp:
    size: int
    mtime_ns: int
    ino: int
    dev: int
    host: str
    ctime_ns: int = 0  # not compared (a chmod changes it), but a cached hash is keyed on it: nobody can set it

    @classmethod
    def of(cls, fd: int) -> "Stamp":
        st = os.fstat(fd)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, socket.gethostname(), st.st_ctime_ns)

    def differs(self, now: "Stamp") -> str | None:
        """What changed between the planned file and the file open now, or None."""
        if self.host == now.host and (self.ino, self.dev) != (now.ino, now.dev):
            return "replaced by another file"
        if self.size != now.size:
            return f"resized from {self.size} to {now.size} bytes"
        if self.mtime_ns != now.mtime_ns:
            return "modified"
        return None


def check(fd: int, path: str, planned: Stamp | None, owner: str) -> None:
    """MergeError when the open file is not the one the merge was planned from."""
    if planned is None:  # a file distmerge wrote itself (a worker's part)
        return
    what = planned.differs(Stamp.of(fd))
    if what:
        raise MergeError(f"adapter {owner!r}: {path} was {what} after the merge was planned; merging it would mix "
                         f"old and new bytes. Nothing was written: rerun once the adapter is no longer being written")


def sha256_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(HASH_CHUNK))
    while n := f.readinto(buf):
        h.update(buf[:n])
    return h.hexdigest()


def sha256_pinned(path: str, planned: Stamp | None, owner: str) -> str:
    """The sha256 of the planned bytes: checked before and after hashing, from one open file."""
    with open(path, "rb", buffering=0) as f:
        check(f.fileno(), path, planned, owner)
        digest = sha256_stream(f)
        check(f.fileno(), path, planned, owner)
    return digest
