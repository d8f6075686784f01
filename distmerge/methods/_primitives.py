"""The steps every PEFT merge is built from, as small pure functions (PEFT's merge_utils.py).

prune (magnitude or random) → elect sign → weighted sum or disjoint merge. Each takes and returns
float32 tensors and is tested alone. Differences from PEFT, on purpose:
- magnitude pruning finds its threshold by selection (`kth_smallest`), not a full topk sort;
  PEFT's kept set is the same except among values tied at the threshold, where topk's choice is
  arbitrary and we keep the lowest flat indices, so the result is deterministic;
- random pruning draws from a seeded CPU generator, so DARE is reproducible on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SELECT_DIRECT = 1 << 14  # below this many values kthvalue alone is as fast as bracketing (measured)


def sample_size(n: int) -> int:
    """Sample for bracketing n values: small enough to sort in microseconds, large enough that the
    band (about 4/√size of the values) stays a few percent."""
    return min(1 << 14, max(1 << 10, n // 32))


@dataclass(frozen=True)
class Combine:
    """A generalized task-arithmetic recipe: the data that tells ties from dare_linear."""

    prune: Optional[str] = None  # None | "magnitude" | "random"
    elect_sign: bool = False  # TIES: keep only values agreeing with the elected sign, then average

    @property
    def uses_density(self) -> bool:
        return self.prune is not None


def bracket(sample: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) around the q-quantile of the population a sorted random sample was drawn from, wide
    enough (4σ of the sample quantile) that the population's q-quantile almost always lies inside."""
    size = sample.numel()
    margin = 4 * math.sqrt(q * (1 - q) / size) + 2 / size
    return (sample[max(0, math.floor((q - margin) * size))],
            sample[min(size - 1, math.ceil((q + margin) * size))])


def kth_smallest(x: torch.Tensor, j: int) -> torch.Tensor:
    """Exactly torch.kthvalue(x.flatten(), j).values (1-based), in a few vectorized passes.

    kthvalue is a serial selection over all n values (0.6 s for one 11008×4096 delta here, 2.4 ms
    for one 11008×16 factor). A seeded sample brackets the answer, one count places the bracket,
    and kthvalue runs on the bracket's few percent only; an unlucky sample falls back to kthvalue,
    so the result never depends on the sample.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= SELECT_DIRECT:
        return torch.kthvalue(flat, j).values
    gen = torch.Generator().manual_seed(n)
    sample, _ = flat[torch.randint(n, (sample_size(n),), generator=gen).to(flat.device)].sort()
    lo, hi = bracket(sample, j / n)
    below = int(torch.count_nonzero(flat < lo))
    band = flat[(flat >= lo) & (flat <= hi)]
    if below < j <= below + band.numel():
        return torch.kthvalue(band, j - below).values
    return torch.kthvalue(flat, j).values


def keep_count(n: int, density: float) -> int:
    """PEFT's k for magnitude pruning of n values: int(density · n), within [0, n]."""
    return min(max(int(density * n), 0), n)


def magnitude_threshold(absx: torch.Tensor, density: float) -> tuple[float, int]:
    """(t, ties): keeping |x| > t plus the first `ties` values equal to t keeps PEFT's top-k set,
    with k = keep_count(numel, density)."""
    n = absx.numel()
    k = keep_count(n, density)
    if k == 0:
        return float("inf"), 0
    if k == n:
        return float("-inf"), 0
    t = kth_smallest(absx, n - k + 1)
    return float(t), k - int(torch.count_nonzero(absx > t))


def threshold_mask(absx: torch.Tensor, t: float, ties: int, out: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, int]:
    """(mask, taken): values above t, plus the first `ties` values equal to t in flat (row-major)
    order; `taken` is how many ties it used, for the next block of the same tensor. With `out`
    (which may be absx itself) the mask is written there in out's dtype, e.g. as 0/1 floats."""
    at = torch.nonzero(absx.reshape(-1) == t).reshape(-1)[:ties] if ties > 0 else None  # few: t is a value
    mask = torch.gt(absx, t, out=out) if out is not None else absx > t
    if at is None:
        return mask, 0
    mask.reshape(-1)[at] = True
    return mask, at.numel()


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    absx = x.abs()
    return threshold_mask(absx, *magnitude_threshold(absx, density))[0]


def random_mask(shape: Sequence[int], density: float, generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Bernoulli(density) keep-mask drawn on the CPU generator, so every device gets the same bits."""
    return (torch.rand(tuple(shape), generator=generator) < density).to(device)


def prune(x: torch.Tensor, density: float, how: Optional[str], generator: Optional[torch.Generator] = None
          ) -> tuple[torch.Tensor, float]:
    """(pruned x, kept fraction). Random pruning rescales by 1/density (DARE); density >= 1 keeps all."""
    if how is None or density >= 1:
        return x, 1.0
    if how == "magnitude":
        mask = magnitude_mask(x, density)
        return x * mask, float(mask.float().mean())
    if how == "random":
        mask = random_mask(x.shape, density, generator, x.device)
        return x * mask / density, float(mask.float().mean())
    raise ValueError(f"unknown pruning {how!r}")


def elect_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected one (stacked on dim 0, before weighting)."""
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown majority_sign_method {method!r}")
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks that agree with the elected sign (zero where none does)."""
    m = mask.to(weighted.dtype)  # as PEFT's bool arithmetic promotes, converted once
    return (weighted * m).sum(dim=0) / m.sum(dim=0).clamp_(min=1.0)


def weigh(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def combine(tensors: list[torch.Tensor], weights: Sequence[float], recipe: Combine, *, density: float | None,
            sign_method: str, generators: Sequence[Optional[torch.Generator]] | None = None
            ) -> tuple[torch.Tensor, float]:
    """One generalized task-arithmetic merge of same-shaped tensors; (merged, mean kept fraction)."""
    gens = generators or [None] * len(tensors)
    pruned, kept = zip(*(prune(t, density or 1.0, recipe.prune, g) for t, g in zip(tensors, gens)))
    stacked = torch.stack(pruned, dim=0)
    w = torch.tensor(list(weights), dtype=stacked.dtype).to(stacked.device)
    if recipe.elect_sign:
        merged = disjoint_merge(weigh(stacked, w), elect_sign(stacked, sign_method))
    else:
        merged = weigh(stacked, w).sum(dim=0)
    return merged, sum(kept) / len(kept)
