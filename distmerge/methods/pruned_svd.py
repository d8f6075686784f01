"""ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: prune the dense deltas, then SVD.

Pruning acts element-wise on each adapter's delta, so these methods need dense deltas, but only
one module's, and only in row blocks: the merged delta is assembled block by block, never holding
N dense deltas at once as PEFT does. Each adapter's magnitude threshold (PEFT's top-k set) is
found without forming its delta whole: entries sampled straight from the factors bracket it, a
pass over the blocks counts what lies below and keeps what lies inside (numpy's scans on the CPU,
3x torch's here), and the selection runs on that band only. Seeds and block sizes depend only on
names and shapes, never on how the work is split, so outputs are byte-identical across executors.
"""

from __future__ import annotations

from typing import Sequence

from distmerge._lazy import torch
from distmerge.methods._primitives import (SELECT_DIRECT, Combine, bracket, count_ones, edge_threshold, keep_count,
                                           random_mask, sample_size, select_rows, split_band, threshold_mask,
                                           ties_merge_)
from distmerge.methods._svd import svd_dense, to_factors
from distmerge.methods.base import RANK_SVD, Factors, Merged, MergeMethod, ModuleContext, factor_work
from distmerge.methods.registry import register

BLOCK_ELEMENTS = 1 << 22  # one row block of all N adapters' deltas: 16 MiB in float32, cache-sized (measured)


def block_rows(m: int, n: int, adapters: int) -> int:
    """Rows per block: all adapters' rows of a block fill BLOCK_ELEMENTS."""
    return max(1, min(m, BLOCK_ELEMENTS // max(1, n * adapters)))


def _rows(f: Factors, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0:r1 of adapter f's delta, exactly as PEFT's get_delta_weight computes it."""
    return torch.matmul(f.b[r0:r1], f.a, out=out).mul_(f.scaling)


def magnitude_threshold(f: Factors, spans: list[tuple[int, int]], density: float, gen: torch.Generator,
                        buf: torch.Tensor | None = None) -> tuple[float, int, int]:
    """(t, ties, equal) of _primitives.magnitude_thresholds for adapter f's |delta| as one row, computed
    over row blocks; `buf` (float32, at least the first span's rows × n) holds one block at a time."""
    m, n = f.b.shape[0], f.a.shape[1]
    total = m * n
    k = keep_count(total, density)
    if (edge := edge_threshold(k, total)) is not None:
        return edge
    j = total - k + 1  # the threshold is the j-th smallest |value|
    if total > SELECT_DIRECT:
        idx = torch.randint(total, (sample_size(total),), generator=gen).to(f.a.device)
        rows, cols = idx // n, idx % n
        sample, _ = ((f.b[rows] * f.a[:, cols].T).sum(1) * f.scaling).abs_().sort()
        lo, hi = (float(v) for v in bracket(sample, j / total))
        below = above = 0
        band = []
        if buf is None:
            buf = torch.empty(spans[0][1] - spans[0][0], n, dtype=f.a.dtype, device=f.a.device)
        for r0, r1 in spans:
            low, inside = split_band(_rows(f, r0, r1, out=buf[:r1 - r0]).abs_(), lo, hi)
            band.append(inside)
            below += low
            above += (r1 - r0) * n - low - inside.numel()
        inside = torch.cat(band)
        if below < j <= below + inside.numel():
            return _threshold_in(inside, j - below, k - above)
    whole = torch.cat([_rows(f, r0, r1) for r0, r1 in spans]).abs_()  # small, or an unlucky sample
    return _threshold_in(whole, j, k)


def _threshold_in(values: torch.Tensor, j: int, k: int) -> tuple[float, int, int]:
    """(t, ties, equal): t the j-th smallest of values, of which k are to be kept."""
    [t], [greater], [equal] = select_rows(values.reshape(1, -1), j)
    return t, k - greater, equal


def merged_delta(inputs: Sequence[Factors], ctx: ModuleContext, recipe: Combine
                 ) -> tuple[torch.Tensor, float, float]:
    """The pruned, merged dense delta of one module, built in row blocks; (delta, kept fraction, ‖delta‖²).
    The delta and the blocks are ctx.scratch's, reused by the next module."""
    m, n = inputs[0].b.shape[0], inputs[0].a.shape[1]
    block = block_rows(m, n, len(inputs))
    spans = [(r0, min(m, r0 + block)) for r0 in range(0, m, block)]
    density = ctx.spec.density if recipe.prune else 1.0
    prune = recipe.prune if density < 1 else None

    device = inputs[0].a.device
    take = ctx.scratch.take
    keep_buf = take("keep", (block, n), device)  # a block of |delta|: first for the thresholds, then the masks
    thresholds: list[tuple[float, int, int]] = []
    if prune == "magnitude":
        thresholds = [magnitude_threshold(f, spans, density, ctx.generator(f"{ctx.module}.select", f.adapter),
                                          keep_buf) for f in inputs]
    gens = [ctx.generator(f"{ctx.module}.delta", f.adapter) for f in inputs] if prune == "random" else []
    ties_left = [t[1] for t in thresholds]
    weights = torch.tensor([f.weight for f in inputs], dtype=torch.float32, device=device)
    out = take("delta", (m, n), device)
    kept = 0
    if prune == "magnitude":  # exactly PEFT's k per adapter, by construction of the thresholds
        kept = len(inputs) * keep_count(m * n, density)
    energy = 0.0
    # In place, with 0/1 float masks: the values of PEFT's bool masks, in a third of the passes.
    stack_buf = take("stack", (len(inputs), block, n), device)
    agree_buf = take("agree", (len(inputs), block, n), device) if recipe.elect_sign else None
    draw_buf = take("draws", (block, n)) if prune == "random" else None  # on the CPU: the generators'
    for r0, r1 in spans:
        rows = r1 - r0
        stack = stack_buf[:, :rows]
        for i, f in enumerate(inputs):
            _rows(f, r0, r1, out=stack[i])
            if prune == "magnitude":
                absx = torch.abs(stack[i], out=keep_buf[:rows])
                t, ties, equal = thresholds[i]
                keep, taken = threshold_mask(absx, t, ties_left[i], out=absx, all_ties=ties == equal)
                ties_left[i] -= taken
                stack[i].mul_(keep)
            elif prune == "random":
                mask = random_mask(stack[i].shape, density, gens[i], device, out=draw_buf[:rows])
                stack[i].mul_(mask).div_(density)
                kept += count_ones(mask)
        if recipe.elect_sign:
            ties_merge_(stack, weights, ctx.spec.majority_sign_method, agree_buf[:, :rows], out[r0:r1])
        else:
            torch.sum(stack.mul_(weights.view(-1, 1, 1)), dim=0, out=out[r0:r1])
        energy += float(torch.linalg.vector_norm(out[r0:r1], dtype=torch.float64)) ** 2
    fraction = kept / (m * n * len(inputs)) if prune else 1.0
    return out, fraction, energy


def pruned_svd(inputs: Sequence[Factors], ctx: ModuleContext, recipe: Combine) -> Merged:
    delta, kept, energy = merged_delta(inputs, ctx, recipe)  # scratch's: nothing below may keep a view of it
    s = ctx.spec
    gen = ctx.generator(f"{ctx.module}.sketch", -1) if s.svd_algorithm == "randomized" else None
    t = svd_dense(delta, ctx.rank, s.svd_algorithm, s.svd_oversample, s.svd_niter, gen, energy=energy)
    del delta
    a, b = to_factors(t, ctx.rank, s.svd_clamp)
    return Merged(a=a, b=b, stats={"kept_fraction": kept, **t.stats()})


def _work(m: int, n: int, ranks: Sequence[int], out_rank: int, spec, recipe: Combine) -> int:
    """What merged_delta and svd_dense hold at their peak (tests/test_memory.py checks it against the
    measured peak): the merged delta; the row blocks (all adapters' rows, the sign mask, one adapter's
    |rows| or draws, the float64 copy vector_norm makes); a magnitude threshold's band of values and
    its concatenation (a few % of a delta: 1/16 allowed); and for the exact SVD the Gram matrix, its
    eigenvectors and LAPACK's syevd workspace of 2 s² (s = min(m, n)), where the randomized SVD's
    sketches are small; and the factor temporaries every method has."""
    block = block_rows(m, n, len(ranks)) * n
    adapters = len(ranks) * (2 if recipe.elect_sign else 1)
    blocks = 4 * block * adapters + 4 * block * (2 if recipe.prune == "random" else 1) + 8 * block
    band = 2 * 4 * m * n // 16 if recipe.prune == "magnitude" else 0
    small, k = min(m, n), out_rank + spec.svd_oversample
    svd = 4 * 4 * small**2 if spec.svd_algorithm == "exact" else 4 * 3 * k * (m + n)
    return 4 * m * n + blocks + band + svd + factor_work(m, n, ranks, out_rank, spec)


def _flops(m: int, n: int, ranks: Sequence[int], out_rank: int, spec) -> float:
    deltas = 4.0 * m * n * sum(ranks) + 12.0 * m * n * len(ranks)
    k = out_rank + spec.svd_oversample
    if spec.svd_algorithm == "randomized":
        return deltas + (4.0 * spec.svd_niter + 6.0) * m * n * k
    small, large = min(m, n), max(m, n)
    return deltas + 2.0 * large * small**2 + 9.0 * small**3 + 6.0 * m * n * k


RECIPES = {
    "ties_svd": (Combine(prune="magnitude", elect_sign=True), "TIES on the dense deltas, then truncated SVD",
                 ("density", "majority_sign_method")),
    "dare_linear_svd": (Combine(prune="random"), "DARE on the dense deltas, weighted sum, then truncated SVD",
                        ("density", "seed")),
    "dare_ties_svd": (Combine(prune="random", elect_sign=True), "DARE then TIES on the dense deltas, then SVD",
                      ("density", "majority_sign_method", "seed")),
    "magnitude_prune_svd": (Combine(prune="magnitude"), "magnitude-prune the dense deltas, weighted sum, then SVD",
                            ("density",)),
}

for _name, (_recipe, _summary, _params) in RECIPES.items():
    register(MergeMethod(
        name=_name, summary=_summary,
        params=("weight",) + _params + ("svd_rank", "svd_clamp", "svd_algorithm", "svd_oversample", "svd_niter"),
        rank_rule=RANK_SVD, fn=lambda inputs, ctx, _r=_recipe: pruned_svd(inputs, ctx, _r), flops=_flops,
        work=lambda m, n, ranks, out_rank, spec, _r=_recipe: _work(m, n, ranks, out_rank, spec, _r)))
