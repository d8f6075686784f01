"""Lazy tensor reads: a worker opens only the files of its shard and reads only its tensors.

Tensors are read with pread into fresh buffers, at the byte offsets the driver's header pass found,
not through safetensors' memory map: faulting mmapped pages in one 4 KiB page at a time cost 10×
a bulk read, and touched pages of a map stay resident while it is open, so a worker's RSS followed
the files it had read rather than the module in hand.
"""

from __future__ import annotations

import os

from distmerge._lazy import torch
from distmerge.adapters import pin
from distmerge.adapters.header import TensorInfo, torch_dtype
from distmerge.errors import MergeError

READ_CHUNK = 1 << 30  # pread may return short beyond ~2 GiB


def all_finite(t: torch.Tensor) -> bool:
    """One reduction in the common case: NaN/Inf poison the sum; only an overflowing sum is re-checked."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class TensorReader:
    """One file descriptor per file for the life of a shard; use as a context manager.

    Each input file is checked against its planned stamp when opened and again when the shard is done
    with it (adapters/pin.py), so a file rewritten during the merge fails the merge instead of mixing in.
    """

    def __init__(self) -> None:
        self._fds: dict[str, tuple[int, TensorInfo]] = {}
        self._owners: dict[str, str] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                for fd, info in self._fds.values():
                    pin.check(fd, info.file, info.stamp, self._owners.get(info.file, "?"))
        finally:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, info: TensorInfo, owner: str) -> int:
        entry = self._fds.get(info.file)
        if entry is None:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                pin.check(fd, info.file, info.stamp, owner)
            except BaseException:
                os.close(fd)
                raise
            entry = self._fds[info.file] = (fd, info)
            self._owners[info.file] = owner
        return entry[0]

    def read_into(self, info: TensorInfo, owner: str, out: torch.Tensor) -> None:
        """Tensor info's stored bytes into `out` (uint8, info.nbytes long), e.g. a slot of a reused buffer."""
        view = memoryview(out.numpy()) if info.nbytes else memoryview(b"")
        done = 0
        try:
            fd = self._fd(info, owner)
            while done < info.nbytes:
                n = os.preadv(fd, [view[done:done + READ_CHUNK]], info.begin + done)
                if n == 0:
                    raise MergeError(f"adapter {owner!r}: {info.file} ends inside tensor {info.name!r} "
                                     f"({done} of {info.nbytes} bytes); was the file rewritten or truncated "
                                     f"after planning? Re-run once it is complete")
                done += n
        except OSError as e:
            raise MergeError(f"adapter {owner!r}: cannot read tensor {info.name!r} from {info.file}: "
                             f"{e.strerror or e}; check that the file exists and is readable") from None

    def load_raw(self, info: TensorInfo, owner: str) -> torch.Tensor:
        """The tensor in its stored dtype, in a buffer of its own (pass-through tensors are copied, not merged)."""
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(info, owner, buf)
        return buf.view(torch_dtype(info.dtype)).reshape(info.shape)


def non_finite_error(t: torch.Tensor, info: TensorInfo, owner: str) -> MergeError:
    bad = int((~torch.isfinite(t)).sum())
    return MergeError(f"adapter {owner!r}: tensor {info.name!r} in {info.file} has {bad} NaN/Inf "
                      f"value(s) of {t.numel()}; repair or retrain the adapter, or drop it from adapters")
