"""safetensors files written as streams: the header first (every shape is known from the plan),
then each tensor's bytes as it is produced, so a writer holds one tensor at a time.

`copy_tensors` builds a file from byte ranges of other files without decoding a tensor: it is how
worker parts become output shards and how shards are consolidated into one file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from distmerge._lazy import torch
from distmerge.adapters.header import DTYPE_SIZES, TensorInfo, st_dtype
from distmerge.adapters.pin import sha256_stream
from distmerge.errors import output_error

COPY_CHUNK = 4 * 2**20  # one reused buffer: the peak must not depend on file sizes


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def _header(specs: Sequence[Spec], metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[int, int]]]:
    offsets, pos, head = [], 0, {}
    if metadata:
        head["__metadata__"] = metadata
    for s in specs:
        offsets.append((pos, pos + s.nbytes))
        head[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return len(raw).to_bytes(8, "little") + raw, offsets


class StreamWriter:
    """Write tensors in the order of `specs`; the file appears under `path` only on a clean close."""

    def __init__(self, path: str, specs: Sequence[Spec], metadata: dict[str, str] | None = None,
                 digest: bool = True):
        self.path, self.specs = path, list(specs)
        self._tmp = f"{path}.tmp-{os.getpid()}"
        try:
            self._file = open(self._tmp, "wb")
        except OSError as e:
            raise output_error(e, path) from None
        self._hash = hashlib.sha256() if digest else None  # worker parts skip it: only outputs are recorded
        head, self._offsets = _header(self.specs, metadata or {"format": "pt"})
        self._data_start = len(head)
        self._emit(head)
        self._next = 0

    def _emit(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as e:  # disk full, quota: one line naming the file, and the caller's cleanup runs
            raise output_error(e, self.path) from None
        if self._hash is not None:
            self._hash.update(data)

    def _expect(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        spec = self.specs[self._next]
        if (name, tuple(shape), dtype) != (spec.name, spec.shape, spec.dtype):
            raise AssertionError(f"writer expected {spec}, got {name} {tuple(shape)} {dtype}")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._expect(name, tuple(tensor.shape), st_dtype(tensor.dtype))
        self._emit(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def copy(self, t: TensorInfo, src) -> None:
        """Append tensor t's bytes from the open file `src`, in chunks, without decoding."""
        self._expect(t.name, t.shape, t.dtype)
        src.seek(t.begin)
        left = t.nbytes
        buf = memoryview(bytearray(min(COPY_CHUNK, max(left, 1))))
        while left:
            n = src.readinto(buf[:min(len(buf), left)])
            if not n:
                raise OSError(f"{t.file} ended early while copying {t.name}")
            self._emit(buf[:n])
            left -= n

    def tensors(self) -> list[TensorInfo]:
        """Where each tensor will lie in the finished file."""
        start = self._data_start
        return [TensorInfo(s.name, self.path, s.dtype, s.shape, start + b, start + e)
                for s, (b, e) in zip(self.specs, self._offsets)]

    def close(self) -> str:
        """Finish the file (atomically, so a retried shard rewrites it whole); its sha256 if digested."""
        if self._next != len(self.specs):
            raise AssertionError(f"{self.path}: wrote {self._next} of {len(self.specs)} tensors")
        try:
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            raise output_error(e, self.path) from None
        return self._hash.hexdigest() if self._hash is not None else ""

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # a full disk fails the flush too; the file goes anyway
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self.abort()


def copy_tensors(path: str, tensors: Iterable[TensorInfo], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file from byte ranges of existing files, without decoding; its sha256."""
    tensors = list(tensors)
    specs = [Spec(t.name, t.dtype, t.shape) for t in tensors]
    with StreamWriter(path, specs, metadata) as w:
        handles: dict[str, object] = {}
        try:
            for t in tensors:
                if t.file not in handles:
                    handles[t.file] = open(t.file, "rb")
                w.copy(t, handles[t.file])
        finally:
            for h in handles.values():
                h.close()
        return w.close()


def sha256_file(path: str) -> str:
    with open(path, "rb", buffering=0) as f:
        return sha256_stream(f)


def write_renamed(path: str, items: Sequence[tuple[str, "TensorInfo | torch.Tensor"]],
                  metadata: dict[str, str] | None = None) -> str:
    """A safetensors file of (name, tensor) items: a TensorInfo's bytes are copied undecoded under the new
    name, a small in-memory tensor (a kohya alpha) is written; its sha256."""
    specs = [Spec(n, t.dtype, t.shape) if isinstance(t, TensorInfo) else Spec(n, st_dtype(t.dtype), tuple(t.shape))
             for n, t in items]
    with StreamWriter(path, specs, metadata) as w:
        handles: dict[str, object] = {}
        try:
            for n, t in items:
                if isinstance(t, TensorInfo):
                    if t.file not in handles:
                        handles[t.file] = open(t.file, "rb")
                    w.copy(dataclasses.replace(t, name=n), handles[t.file])
                else:
                    w.write(n, t)
        finally:
            for h in handles.values():
                h.close()
        return w.close()
