"""ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: prune the dense deltas, then SVD.

Pruning acts element-wise on each adapter's delta, so these methods need dense deltas, but only
one module's, and built in row blocks: each adapter's delta is formed whole once (to find its
magnitude threshold), then the merged delta is assembled block by block, never holding N dense
deltas at once as PEFT does. Seeds and block sizes depend only on names and shapes, never on
how the work is split, so outputs are byte-identical across executors.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distmerge.methods._primitives import (Combine, disjoint_merge, elect_sign, magnitude_threshold,
                                           random_mask, threshold_mask, weigh)
from distmerge.methods._svd import svd_dense, to_factors
from distmerge.methods.base import RANK_SVD, Factors, Merged, MergeMethod, ModuleContext
from distmerge.methods.registry import register

BLOCK_ELEMENTS = 1 << 24  # one row block of all N adapters' deltas: 64 MiB in float32


def _rows(f: Factors, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of adapter f's delta, exactly as PEFT's get_delta_weight computes it."""
    return (f.b[r0:r1] @ f.a) * f.scaling


def merged_delta(inputs: Sequence[Factors], ctx: ModuleContext, recipe: Combine) -> tuple[torch.Tensor, float]:
    """The pruned, merged dense delta of one module, built in row blocks; (delta, kept fraction)."""
    m, n = inputs[0].b.shape[0], inputs[0].a.shape[1]
    block = max(1, min(m, BLOCK_ELEMENTS // max(1, n * len(inputs))))
    spans = [(r0, min(m, r0 + block)) for r0 in range(0, m, block)]
    density = ctx.spec.density if recipe.prune else 1.0
    prune = recipe.prune if density < 1 else None

    thresholds: list[tuple[float, int]] = []
    if prune == "magnitude":  # the global top-k threshold needs each whole delta once, one at a time
        for f in inputs:
            whole = torch.cat([_rows(f, r0, r1) for r0, r1 in spans]).abs_()
            thresholds.append(magnitude_threshold(whole, density))
            del whole
    gens = [ctx.generator(f"{ctx.module}.delta", f.adapter) for f in inputs] if prune == "random" else []
    ties_left = [t[1] for t in thresholds]
    weights = torch.tensor([f.weight for f in inputs], dtype=torch.float32, device=inputs[0].a.device)
    out = torch.empty(m, n, dtype=torch.float32, device=inputs[0].a.device)
    kept = 0
    for r0, r1 in spans:
        stack = torch.stack([_rows(f, r0, r1) for f in inputs])
        for i in range(len(inputs)):
            if prune == "magnitude":
                absx = stack[i].abs()
                t, _ = thresholds[i]
                mask = threshold_mask(absx, t, ties_left[i])
                ties_left[i] -= min(ties_left[i], int((absx == t).sum())) if ties_left[i] else 0
                stack[i] *= mask
            elif prune == "random":
                mask = random_mask(stack[i].shape, density, gens[i], stack.device)
                stack[i] *= mask
                stack[i] /= density
            else:
                continue
            kept += int(mask.sum())
        if recipe.elect_sign:
            out[r0:r1] = disjoint_merge(weigh(stack, weights), elect_sign(stack, ctx.spec.majority_sign_method))
        else:
            out[r0:r1] = weigh(stack, weights).sum(dim=0)
    fraction = kept / (m * n * len(inputs)) if prune else 1.0
    return out, fraction


def pruned_svd(inputs: Sequence[Factors], ctx: ModuleContext, recipe: Combine) -> Merged:
    delta, kept = merged_delta(inputs, ctx, recipe)
    s = ctx.spec
    gen = ctx.generator(f"{ctx.module}.sketch", -1) if s.svd_algorithm == "randomized" else None
    t = svd_dense(delta, ctx.rank, s.svd_algorithm, s.svd_oversample, s.svd_niter, gen)
    del delta
    a, b = to_factors(t, ctx.rank, s.svd_clamp)
    return Merged(a=a, b=b, stats={"kept_fraction": kept, **t.stats()})


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
        dense=True))
