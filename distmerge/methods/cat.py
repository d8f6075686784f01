"""cat: stack the factors. Exact (B_cat·A_cat is the weighted sum of deltas); rank is Σ rᵢ."""

from __future__ import annotations

from typing import Sequence

from distmerge._lazy import torch
from distmerge.methods.base import RANK_SUM, Factors, Merged, MergeMethod, ModuleContext
from distmerge.methods.registry import register


def cat(inputs: Sequence[Factors], ctx: ModuleContext) -> Merged:
    a = torch.cat([f.a for f in inputs], dim=0)
    row = 0
    for f in inputs:
        a[row:row + f.a.shape[0]] *= f.weight * f.scaling
        row += f.a.shape[0]
    b = torch.cat([f.b for f in inputs], dim=1)
    return Merged(a=a, b=b)


register(MergeMethod(
    name="cat", summary="concatenate the weighted factors: exact, output rank is the sum of ranks",
    params=("weight",), rank_rule=RANK_SUM, fn=cat,
    flops=lambda m, n, ranks, out_rank, spec: 2.0 * sum(ranks) * (m + n)))
