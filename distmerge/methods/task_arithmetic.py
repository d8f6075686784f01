"""linear, ties, dare_linear, dare_ties, magnitude_prune: one implementation, five recipes.

PEFT merges A and B separately, each adapter weighted by √|weight·scaling| with the sign on A,
so these methods need equal ranks on a module. The product of merged factors is not the merged
product (that is what svd and cat are for); this is PEFT's definition, kept exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

from distmerge.methods._primitives import Combine, combine
from distmerge.methods.base import RANK_SAME, Factors, Merged, MergeMethod, ModuleContext
from distmerge.methods.registry import register


def merge_factors(inputs: Sequence[Factors], ctx: ModuleContext, recipe: Combine) -> Merged:
    scaled = [f.weight * f.scaling for f in inputs]
    w_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]
    w_b = [math.sqrt(abs(x)) for x in scaled]
    merged, kept = [], []
    for role, tensors, weights in (("A", [f.a for f in inputs], w_a), ("B", [f.b for f in inputs], w_b)):
        gens = ([ctx.generator(f"{ctx.module}.lora_{role}", f.adapter) for f in inputs]
                if recipe.prune == "random" else None)
        t, k = combine(tensors, weights, recipe, density=ctx.spec.density,
                       sign_method=ctx.spec.majority_sign_method, generators=gens, scratch=ctx.scratch)
        merged.append(t)
        kept.append(k)
    stats = {"kept_fraction": sum(kept) / 2} if recipe.prune else {}
    return Merged(a=merged[0], b=merged[1], stats=stats)


def _flops(m: int, n: int, ranks: Sequence[int], out_rank: int, spec) -> float:
    return 8.0 * sum(ranks) * (m + n)


RECIPES = {
    "linear": (Combine(), "weighted sum of the A's and of the B's (PEFT's linear)", ()),
    "ties": (Combine(prune="magnitude", elect_sign=True), "TIES on A and B: trim to density, elect sign, "
             "disjoint mean", ("density", "majority_sign_method")),
    "dare_linear": (Combine(prune="random"), "DARE on A and B: random drop to density, rescale, weighted sum",
                    ("density", "seed")),
    "dare_ties": (Combine(prune="random", elect_sign=True), "DARE drop-and-rescale, then TIES sign election",
                  ("density", "majority_sign_method", "seed")),
    "magnitude_prune": (Combine(prune="magnitude"), "keep the top density of A and of B by magnitude, weighted sum",
                        ("density",)),
}

for _name, (_recipe, _summary, _params) in RECIPES.items():
    register(MergeMethod(
        name=_name, summary=_summary, params=("weight",) + _params, rank_rule=RANK_SAME,
        fn=lambda inputs, ctx, _r=_recipe: merge_factors(inputs, ctx, _r), flops=_flops, rule=_name))
