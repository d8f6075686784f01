"""What a merge method is: a named, pure function of one module's factors."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from distmerge._lazy import torch
from distmerge.config.schema import MergeSpec


@dataclass(frozen=True)
class Factors:
    """One adapter's LoRA on one module, as 2-D float32 factors: Δᵢ = scaling · b @ a."""

    a: torch.Tensor  # (r, n)
    b: torch.Tensor  # (m, r)
    scaling: float
    weight: float
    adapter: int  # the adapter's index in the config: part of every DARE seed


@dataclass
class Merged:
    a: torch.Tensor  # (rank, n)
    b: torch.Tensor  # (m, rank)
    stats: dict[str, float] = field(default_factory=dict)


class Scratch:
    """Named float32 temporaries a worker reuses from module to module.

    A fresh temporary of a few MiB costs a page fault every 4 KiB when first written, about 1 µs each
    here: TIES's sign mask took 1.4 ms fresh against 0.14 ms reused (measured). Each buffer grows to
    the largest module's need and stays, so memory is flat in the number of layers. A method owns
    what it takes until it returns, and nothing it takes may escape into its result.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        n = math.prod(shape)
        key = (name, str(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(tuple(shape))


@dataclass(frozen=True)
class ModuleContext:
    """Everything a method needs besides the tensors."""

    module: str  # the module's saved name: seeds derive from it, never from execution order
    spec: MergeSpec
    rank: int  # the output rank the planner fixed for this module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scratch: Scratch = field(default_factory=Scratch, compare=False)  # the worker's, reused across modules

    def generator(self, tensor: str, adapter: int) -> torch.Generator:
        """A CPU generator seeded by (merge.seed, tensor name, adapter index)."""
        key = f"{self.spec.seed}\x00{tensor}\x00{adapter}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
        return torch.Generator(device="cpu").manual_seed(seed)


def factor_work(m: int, n: int, ranks: Sequence[int], out_rank: int, spec: MergeSpec) -> int:
    """Temporaries of a merge on the factors alone: two float32 copies of its inputs (a pruned copy and
    a sign mask, or scaled copies) and of its outputs."""
    return 4 * 2 * (sum(ranks) + out_rank) * (m + n)


# Output-rank rules (PEFT's _check_add_weighted_adapter), by name so the planner can ask without tensors.
RANK_SAME, RANK_SUM, RANK_SVD = "same", "sum", "svd"


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    params: tuple[str, ...]  # the merge.* keys it reads
    rank_rule: str  # RANK_SAME | RANK_SUM | RANK_SVD
    fn: Callable[[Sequence[Factors], ModuleContext], Merged]
    # flops(m, n, ranks, out_rank, spec): the planner's cost model, to balance shards
    flops: Callable[[int, int, Sequence[int], int, MergeSpec], float]
    # work(m, n, ranks, out_rank, spec): bytes of one module's temporaries, for `distmerge plan`'s peak memory
    work: Callable[[int, int, Sequence[int], int, MergeSpec], int] = factor_work

    def __call__(self, inputs: Sequence[Factors], ctx: ModuleContext) -> Merged:
        return self.fn(inputs, ctx)
