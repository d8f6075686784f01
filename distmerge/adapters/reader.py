"""Lazy tensor reads: a worker opens only the files of its shard and reads only its tensors."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from safetensors import safe_open

from distmerge.adapters.header import TensorInfo
from distmerge.errors import MergeError


class TensorReader:
    """Keeps one safe_open handle per file for the life of a shard; use as a context manager."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def load_raw(self, info: TensorInfo, owner: str) -> torch.Tensor:
        """The tensor in its stored dtype (pass-through tensors are copied, not merged)."""
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._stack.enter_context(safe_open(info.file, framework="pt", device="cpu"))
                self._handles[info.file] = handle
            t = handle.get_tensor(info.name)
        except Exception as e:  # safetensors raises several types for I/O and format faults
            raise MergeError(f"adapter {owner!r}: cannot read tensor {info.name!r} from {info.file}: "
                             f"{type(e).__name__}: {e}; check that the file is complete") from None
        if tuple(t.shape) != info.shape:
            raise MergeError(f"adapter {owner!r}: tensor {info.name!r} in {info.file} changed shape "
                             f"since planning ({list(info.shape)} → {list(t.shape)}); was the file rewritten?")
        return t

    def load(self, info: TensorInfo, owner: str) -> torch.Tensor:
        """The tensor as float32 on CPU; MergeError naming adapter and tensor if not finite."""
        t = self.load_raw(info, owner).float()
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise MergeError(f"adapter {owner!r}: tensor {info.name!r} in {info.file} has {bad} NaN/Inf "
                             f"value(s) of {t.numel()}; repair or retrain the adapter, or drop it from adapters")
        return t
