"""The steps every PEFT merge is built from, as small pure functions (PEFT's merge_utils.py).

prune (magnitude or random) → elect sign → weighted sum or disjoint merge. Each takes and returns
float32 tensors and is tested alone. Differences from PEFT, on purpose:
- magnitude pruning finds its threshold by selection (`select_rows`), not a full topk sort;
  PEFT's kept set is the same except among values tied at the threshold, where topk's choice is
  arbitrary and we keep the lowest flat indices, so the result is deterministic;
- random pruning draws from a seeded CPU generator, so DARE is reproducible on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from distmerge._lazy import numpy as np
from distmerge._lazy import torch
from distmerge.methods.base import Scratch

EXACT_F32_SUM = 1 << 24  # float32 counts every integer up to here
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
    enough that the population's q-quantile almost always lies inside."""
    lo_i, hi_i = _bracket_positions(sample.numel(), q)
    return sample[lo_i], sample[hi_i]


def select_rows(x: torch.Tensor, j: int) -> tuple[list[float], list[int], list[int]]:
    """Per row of x (rows × n): the j-th smallest value t (1-based, torch.kthvalue(x, j, dim=1)), how many
    values exceed t, and how many equal it.

    A full selection is serial and slow (kthvalue: 1.3 ms for one row of 11008×16 factors here,
    0.6 s for an 11008×4096 delta). A seeded sample of columns brackets each row's answer, one pass
    counts what lies below the bracket and gathers what lies inside, and the selection runs on that
    band of a few percent only; a row the sample misses falls back to the whole row, so the result
    never depends on the sample.
    """
    rows, n = x.shape
    if n <= SELECT_DIRECT:
        return _select_direct(x, j)
    gen = torch.Generator().manual_seed(n)
    idx = torch.randint(n, (sample_size(n),), generator=gen)
    data, ops = _backend(x)
    return _select_each_row(data, j, idx.numpy() if isinstance(data, np.ndarray) else idx.to(x.device), ops)


@dataclass(frozen=True)
class ScanOps:
    """The three operations bracketing needs, for one array library."""

    kth: Callable  # kth(a, i): a's i-th smallest value (1-based)
    count: Callable  # count(mask): its True values
    pick: Callable  # pick(mask, a): a's values where mask is True, in order
    where: Callable  # where(mask): the flat indices of mask's True values, in order


# Lambdas, not np.count_nonzero itself: naming a function here would import numpy and torch (distmerge._lazy).
NUMPY_OPS = ScanOps(lambda a, i: np.partition(a, i - 1)[i - 1], lambda mask: np.count_nonzero(mask),
                    lambda mask, a: np.compress(mask, a), lambda mask: np.flatnonzero(mask))  # compress: 1.4x a[mask]
TORCH_OPS = ScanOps(lambda a, i: torch.kthvalue(a, i).values, lambda mask: torch.count_nonzero(mask),
                    lambda mask, a: a[mask], lambda mask: torch.nonzero(mask.reshape(-1)).reshape(-1))


def _backend(x: torch.Tensor):
    """(x as the backend holds it, its ScanOps): numpy on the CPU, whose boolean scans are 5-20× torch's
    here (measured); torch on a GPU."""
    if x.device.type == "cpu":
        return x.numpy(), NUMPY_OPS
    return x, TORCH_OPS


def _select_direct(x: torch.Tensor, j: int) -> tuple[list[float], list[int], list[int]]:
    t = torch.kthvalue(x, j, dim=1).values[:, None]
    return (t[:, 0].tolist(), torch.count_nonzero(x > t, dim=1).tolist(),
            torch.count_nonzero(x == t, dim=1).tolist())


def _bracket_positions(size: int, q: float) -> tuple[int, int]:
    """Sorted-sample positions (lo, hi) around the q-quantile: 4σ of the sample quantile either side."""
    margin = 4 * math.sqrt(q * (1 - q) / size) + 2 / size
    return max(0, math.floor((q - margin) * size)), min(size - 1, math.ceil((q + margin) * size))


def _split(a, lo, hi, ops: ScanOps) -> tuple[int, object]:
    """(how many values of a lie below lo, a's values within [lo, hi]): the one pass over the data that
    bracketing needs, for numpy arrays and torch tensors alike. a < lo implies a <= hi, so the band is
    (a <= hi) xor (a < lo): one comparison fewer than (a >= lo) & (a <= hi), and NaN in neither, as there."""
    below = a < lo
    return int(ops.count(below)), ops.pick((a <= hi) ^ below, a)


def split_band(x: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """_split on a tensor of any shape, flat, on the backend its device runs fastest (see _backend)."""
    data, ops = _backend(x)
    below, band = _split(data.reshape(-1), lo, hi, ops)
    return below, torch.from_numpy(band) if isinstance(band, np.ndarray) else band


def _select_each_row(x, j: int, idx, ops: ScanOps) -> tuple[list[float], list[int], list[int]]:
    """select_rows' bracketing, written once for numpy arrays and torch tensors (see _backend)."""
    n = x.shape[1]
    lo_i, hi_i = _bracket_positions(len(idx), j / n)
    values, greater, equal = [], [], []
    kth, count = ops.kth, ops.count
    for row in x:
        sample = row[idx]
        lo, hi = kth(sample, lo_i + 1), kth(sample, hi_i + 1)
        below, band = _split(row, lo, hi, ops)
        if not below < j <= below + len(band):  # the sample missed: select on the whole row
            below, band = 0, row
        t = kth(band, j - below)
        values.append(float(t))
        greater.append(n - below - len(band) + int(count(band > t)))
        equal.append(int(count(band == t)))
    return values, greater, equal


def kth_smallest(x: torch.Tensor, j: int) -> torch.Tensor:
    """Exactly torch.kthvalue(x.flatten(), j).values (1-based), by select_rows' bracketing."""
    values, _, _ = select_rows(x.reshape(1, -1), j)
    return torch.tensor(values[0], dtype=x.dtype, device=x.device)


def keep_count(n: int, density: float) -> int:
    """PEFT's k for magnitude pruning of n values: int(density · n), within [0, n]."""
    return min(max(int(density * n), 0), n)


def edge_threshold(k: int, n: int) -> tuple[float, int, int] | None:
    """(t, ties, equal) when none or all of n values are kept, which needs no selection; else None."""
    if k == 0:
        return float("inf"), 0, 0
    if k == n:
        return float("-inf"), 0, 0
    return None


def magnitude_thresholds(absx: torch.Tensor, density: float) -> list[tuple[float, int, int]]:
    """Per row of absx (rows × n), (t, ties, equal): keeping |x| > t plus the first `ties` of the
    `equal` values equal to t keeps PEFT's top-k set of the row, with k = keep_count(n, density)."""
    rows, n = absx.shape
    k = keep_count(n, density)
    if (edge := edge_threshold(k, n)) is not None:
        return [edge] * rows
    values, greater, equal = select_rows(absx, n - k + 1)
    return [(t, k - g, e) for t, g, e in zip(values, greater, equal)]


def threshold_mask(absx: torch.Tensor, t: float, ties: int, out: torch.Tensor | None = None,
                   all_ties: bool = False) -> tuple[torch.Tensor, int]:
    """(mask, taken): values above t, plus the first `ties` values equal to t in flat (row-major)
    order; `taken` is how many ties it used, for the next block of the same tensor. With `out`
    (which may be absx itself) the mask is written there in out's dtype, e.g. as 0/1 floats.
    `all_ties`: the whole tensor keeps every value equal to t (its ties are their count, as when t
    is unique), so there is no budget to carry and no scan for them: the mask is absx >= t."""
    if all_ties:
        return (torch.ge(absx, t, out=out) if out is not None else absx >= t), 0
    at = _first_equal(absx, t, ties) if ties > 0 else None
    mask = torch.gt(absx, t, out=out) if out is not None else absx > t
    if at is None:
        return mask, 0
    mask.reshape(-1)[at] = True
    return mask, at.numel()


def _first_equal(x: torch.Tensor, t: float, limit: int) -> torch.Tensor:
    """Flat indices of the first `limit` values of x equal to t (few: t is one of x's values)."""
    data, ops = _backend(x)  # numpy's scan is 5x torch's here (measured)
    at = ops.where(data.reshape(-1) == t)[:limit]
    return torch.from_numpy(at) if isinstance(at, np.ndarray) else at


def random_mask(shape: Sequence[int], density: float, generator: torch.Generator,
                device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Bernoulli(density) keep-mask as 0/1 floats (the values of PEFT's bool mask, which multiplies
    7x slower here), drawn on the CPU generator, so every device gets the same bits. `out` is a CPU
    float32 buffer of `shape` to draw into."""
    draws = torch.rand(tuple(shape), generator=generator, out=out)
    return torch.lt(draws, density, out=draws).to(device)


def count_ones(mask: torch.Tensor) -> int:
    """The 1s of a 0/1 float32 mask, by float32 sums of at most 2^24 values, which are exact: every
    partial sum is an integer float32 holds. torch.count_nonzero branches on floats and took 18x as
    long here, a float64 sum copies the mask first (measured)."""
    flat = mask.reshape(-1)
    return sum(int(flat[i:i + EXACT_F32_SUM].sum()) for i in range(0, flat.numel(), EXACT_F32_SUM))


def _elected(stacked: torch.Tensor, sign: torch.Tensor, method: str) -> torch.Tensor:
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown majority_sign_method {method!r}")
    # PEFT's torch.where(votes >= 0, 1.0, -1.0), in place: the same ±1.0 at a twentieth of the cost (measured)
    return torch.ge(votes, 0, out=votes).mul_(2).sub_(1)


def ties_merge_(pruned: torch.Tensor, weights: torch.Tensor, method: str, agree: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's TIES tail, in place: elect the majority sign of the pruned values (stacked on dim 0), then
    average the weighted values that agree with it (disjoint merge). `pruned` is overwritten, `agree`
    is scratch of its shape. PEFT's values (a 0/1 float mask multiplies as its bool mask promotes),
    in a third of the passes."""
    agree = torch.sign(pruned, out=agree)
    torch.eq(agree, _elected(pruned, agree, method), out=agree)  # voted on the unweighted values, as PEFT
    out = torch.sum(pruned.mul_(weights.view((-1,) + (1,) * (pruned.dim() - 1))).mul_(agree), dim=0, out=out)
    return out.div_(agree.sum(dim=0).clamp_(min=1.0))


def weighted_sum(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·xᵢ over dim 0, bit-identical to PEFT's (stacked · w).sum(0), without its stacked temporary."""
    out = torch.zeros_like(stacked[0])  # a sum starts from +0.0, which turns a -0.0 term into +0.0
    for x, w in zip(stacked, weights):
        out += x * w
    return out


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack(tensors), or a view when they already lie back to back in one buffer, as
    shard.InputBuffer lays out a module's factors. The result may share memory with the inputs:
    read it, never write into it."""
    first = tensors[0]
    step = first.numel()
    base = first.untyped_storage().data_ptr()
    if first.is_contiguous() and all(
            t.shape == first.shape and t.dtype == first.dtype and t.is_contiguous()
            and t.untyped_storage().data_ptr() == base and t.storage_offset() == first.storage_offset() + i * step
            for i, t in enumerate(tensors)):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(tensors)


def prune_rows(x: torch.Tensor, density: float, how: str, generators: Sequence[torch.Generator] | None = None,
               scratch: Scratch | None = None) -> tuple[torch.Tensor, float]:
    """(pruned copy of x, kept fraction), each row of x (rows × n) pruned on its own, as PEFT prunes
    each task tensor: by magnitude to exactly its top keep_count(n, density), or at random (DARE,
    rescaled by 1/density) from the row's seeded CPU generator. The copy is scratch's "pruned"."""
    scratch = scratch or Scratch()
    if how == "magnitude":
        work = torch.abs(x, out=scratch.take("pruned", x.shape, x.device))
        for row, (t, ties, equal) in zip(work, magnitude_thresholds(work, density)):
            threshold_mask(row, t, ties, out=row, all_ties=ties == equal)  # the row becomes its 0/1 mask
        return work.mul_(x), keep_count(x.shape[1], density) / x.shape[1]
    if how == "random":
        masks = scratch.take("pruned", x.shape)  # on the CPU: every device gets the same bits
        for row, gen in zip(masks, generators):
            random_mask(row.shape, density, gen, out=row)
        work = masks.to(x.device)
        kept = count_ones(work) / work.numel()
        return work.mul_(x).div_(density), kept
    raise ValueError(f"unknown pruning {how!r}")


def combine(tensors: Sequence[torch.Tensor], weights: Sequence[float], recipe: Combine, *, density: float | None,
            sign_method: str, generators: Sequence[Optional[torch.Generator]] | None = None,
            scratch: Scratch | None = None) -> tuple[torch.Tensor, float]:
    """One generalized task-arithmetic merge of same-shaped tensors; (merged, mean kept fraction).
    Its temporaries come from `scratch`; the result is a tensor of its own."""
    scratch = scratch or Scratch()
    x = stack(tensors)
    shape = x.shape[1:]
    rows = x.reshape(len(tensors), -1)
    d = density or 1.0
    if recipe.prune is not None and d < 1:
        work, kept = prune_rows(rows, d, recipe.prune, generators, scratch)
    elif recipe.elect_sign:
        work, kept = scratch.take("pruned", rows.shape, rows.device).copy_(rows), 1.0
    else:
        return weighted_sum(rows, weights).reshape(shape), 1.0
    if recipe.elect_sign:
        w = torch.tensor(list(weights), dtype=work.dtype, device=work.device)
        agree = scratch.take("agree", work.shape, work.device)
        return ties_merge_(work, w, sign_method, agree).reshape(shape), kept
    return weighted_sum(work, weights).reshape(shape), kept
