"""The steps every PEFT merge is built from, as small pure functions (PEFT's merge_utils.py).

prune (magnitude or random) → elect sign → weighted sum or disjoint merge. Each takes and returns
float32 tensors and is tested alone. Differences from PEFT, on purpose:
- magnitude pruning selects with kthvalue, not a full topk sort; PEFT's kept set is the same
  except among values tied at the threshold, where topk's choice is arbitrary and we keep the
  lowest flat indices, so the result is deterministic;
- random pruning draws from a seeded CPU generator, so DARE is reproducible on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Combine:
    """A generalized task-arithmetic recipe: the data that tells ties from dare_linear."""

    prune: Optional[str] = None  # None | "magnitude" | "random"
    elect_sign: bool = False  # TIES: keep only values agreeing with the elected sign, then average

    @property
    def uses_density(self) -> bool:
        return self.prune is not None


def magnitude_threshold(absx: torch.Tensor, density: float) -> tuple[float, int]:
    """(t, ties): keeping |x| > t plus the first `ties` values equal to t keeps PEFT's top-k set,
    with k = int(density · numel)."""
    n = absx.numel()
    k = int(density * n)
    if k <= 0:
        return float("inf"), 0
    if k >= n:
        return float("-inf"), 0
    t = torch.kthvalue(absx.reshape(-1), n - k + 1).values
    return float(t), k - int((absx > t).sum())


def threshold_mask(absx: torch.Tensor, t: float, ties: int) -> torch.Tensor:
    """Values above t, plus the first `ties` values equal to t in flat (row-major) order."""
    mask = absx > t
    if ties > 0:
        eq = (absx == t).reshape(-1)
        mask |= (eq & (eq.cumsum(0) <= ties)).reshape(absx.shape)
    return mask


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    absx = x.abs()
    return threshold_mask(absx, *magnitude_threshold(absx, density))


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
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


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
