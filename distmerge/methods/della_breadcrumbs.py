"""della, breadcrumbs (on A and B apart, as PEFT's ties) and della_svd, breadcrumbs_svd (on the dense
deltas, then truncated SVD): mergekit's definitions (mergekit/sparsify.py, generalized_task_arithmetic.py).

- DELLA (Deep et al. 2024, arXiv 2406.11617): within each row, values are ranked by magnitude and kept
  with probability density − ε … density + ε, rising with the rank; the kept tensor is rescaled to the
  original's L1 norm (mergekit's `rescale`), the sign is elected on the weighted values (sum) and the
  agreeing weighted values are divided by the sum of their weights (mergekit's `normalize`).
- Model breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): per tensor, drop the largest γ share of
  magnitudes and the smallest so that `density` is kept; weighted sum, no rescale.

The dense variants prune element-wise, so they need the delta; they build it in row blocks as the other
*_svd methods do (pruned_svd.py), never N whole deltas at once. DELLA's L1 rescale needs each adapter's
kept norm before any block is merged: a first pass over the blocks draws the masks (kept as one byte a
value, a quarter of a float32 delta per adapter) and sums the norms; the second merges.
"""

from __future__ import annotations

import math
from typing import Sequence

from distmerge._lazy import torch
from distmerge.methods._primitives import threshold_mask
from distmerge.methods._svd import svd_dense, to_factors
from distmerge.methods.base import RANK_SAME, RANK_SVD, Factors, Merged, MergeMethod, ModuleContext, factor_work
from distmerge.methods.pruned_svd import _rows, block_rows, magnitude_threshold
from distmerge.methods.registry import register

L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: below this norm a tensor is left unscaled
MERGEKIT = "mergekit (arcee-ai/mergekit, sparsify.py)"


def della_mask(x: torch.Tensor, density: float, epsilon: float, gen: torch.Generator) -> torch.Tensor:
    """mergekit's della_magprune mask for the rows of x (rows × n), as 0/1 floats: rank-normalised keep
    probabilities, drawn from `gen` on the CPU (so every device and block split gets the same bits)."""
    rows, n = x.shape
    order = x.abs().argsort(dim=1)
    ranks = torch.empty(rows, n, dtype=torch.float32, device=x.device)  # 0-based: mergekit's rank - 1, exact
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float32, device=x.device).expand(rows, n))
    del order  # the inverse permutation by scatter: a tenth of a second argsort's time (measured)
    norm = (ranks / (n - 1)).clamp(0, 1) if n > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + norm * 2 * epsilon
    draws = torch.rand(tuple(x.shape), generator=gen).to(x.device)
    return (draws < probs).to(x.dtype)


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(k_low, k_high) of mergekit's magnitude_outliers: keep the k_low largest magnitudes, then drop the
    k_high largest of those, leaving int(density·numel)."""
    target = int(density * numel)
    bottom = max(0, numel - target - int(gamma * numel))
    return numel - bottom, numel - bottom - target


def _topk_mask(absx: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 floats on the k largest of absx (ties: lowest flat index first)."""
    flat = absx.reshape(-1)
    mask = torch.zeros_like(flat)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:k]] = 1
    return mask.reshape(absx.shape)


def _consensus_tail(stack: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's sum consensus with normalize, in place on the weighted values `stack` (tasks on dim 0):
    the elected sign is that of their sum; agreeing values are summed and divided by their weights' sum."""
    w = weights.view((-1,) + (1,) * (stack.dim() - 1))
    elected = torch.where(stack.sum(dim=0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (torch.sign(stack) == elected).to(stack.dtype)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return torch.div((stack * agree).sum(dim=0), divisor, out=out)


def sparsify_whole(x: torch.Tensor, kind: str, spec, gen: torch.Generator | None) -> torch.Tensor:
    """One whole tensor (rows × n) sparsified as mergekit does (small tensors: the factors)."""
    if kind == "della":
        masked = x * della_mask(x, spec.density, spec.della_epsilon, gen)
        before, after = float(x.abs().sum(dtype=torch.float64)), float(masked.abs().sum(dtype=torch.float64))
        return masked if before < L1_EPS or after < L1_EPS else masked * (before / after)
    k_low, k_high = breadcrumbs_counts(x.numel(), spec.density, spec.breadcrumbs_gamma)
    absx = x.abs()
    return x * (_topk_mask(absx, k_low) - _topk_mask(absx, k_high))


def merge_factors(inputs: Sequence[Factors], ctx: ModuleContext, kind: str) -> Merged:
    """A and B merged apart (PEFT's convention for its factor-space methods: weights √|w·s|, the sign on A)."""
    scaled = [f.weight * f.scaling for f in inputs]
    w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in scaled])
    w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    out = []
    for role, tensors, w in (("A", [f.a for f in inputs], w_a), ("B", [f.b for f in inputs], w_b)):
        if ctx.spec.density is not None and ctx.spec.density >= 1:
            pruned = list(tensors)
        else:
            pruned = [sparsify_whole(t, kind, ctx.spec, ctx.generator(f"{ctx.module}.lora_{role}", f.adapter))
                      for t, f in zip(tensors, inputs)]
        stack = torch.stack(pruned) * w.view(-1, 1, 1).to(pruned[0].dtype)
        out.append(_consensus_tail(stack, w) if kind == "della" else stack.sum(dim=0))
    return Merged(a=out[0], b=out[1])


def merged_delta(inputs: Sequence[Factors], ctx: ModuleContext, kind: str) -> tuple[torch.Tensor, float]:
    """The sparsified, merged dense delta of one module in row blocks; (delta, ‖delta‖²). The delta is
    ctx.scratch's, reused by the next module."""
    spec = ctx.spec
    m, n = inputs[0].b.shape[0], inputs[0].a.shape[1]
    block = block_rows(m, n, len(inputs))
    spans = [(r0, min(m, r0 + block)) for r0 in range(0, m, block)]
    device = inputs[0].a.device
    take = ctx.scratch.take
    prune = spec.density is not None and spec.density < 1
    weights = torch.tensor([f.weight for f in inputs], dtype=torch.float32, device=device)
    keep_buf = take("keep", (block, n), device)

    scale = [1.0] * len(inputs)
    masks = None
    if kind == "della" and prune:  # pass 1: each adapter's masks and its L1 norm before and after them
        raw = take("della_masks", (len(inputs) * m * n // 4 + 1,), device).view(torch.uint8)
        masks = raw[:len(inputs) * m * n].view(torch.bool).view(len(inputs), m, n)
        for i, f in enumerate(inputs):
            gen = ctx.generator(f"{ctx.module}.della", f.adapter)
            before = after = 0.0
            for r0, r1 in spans:
                rows = _rows(f, r0, r1, out=keep_buf[:r1 - r0])
                mask = della_mask(rows, spec.density, spec.della_epsilon, gen)
                masks[i, r0:r1] = mask.bool()
                before += float(rows.abs().sum(dtype=torch.float64))
                after += float(rows.mul_(mask).abs_().sum(dtype=torch.float64))
            scale[i] = 1.0 if before < L1_EPS or after < L1_EPS else before / after
    thresholds = []
    if kind == "breadcrumbs" and prune:
        k_low, k_high = breadcrumbs_counts(m * n, spec.density, spec.breadcrumbs_gamma)
        thresholds = [tuple(magnitude_threshold(f, spans, spec.density,
                                                ctx.generator(f"{ctx.module}.select{j}", f.adapter), keep_buf, k=k)
                            for j, k in enumerate((k_low, k_high))) for f in inputs]
    ties_left = [[t[0][1], t[1][1]] for t in thresholds]
    out = take("delta", (m, n), device)
    stack_buf = take("stack", (len(inputs), block, n), device)
    energy = 0.0
    for r0, r1 in spans:
        rows = r1 - r0
        stack = stack_buf[:, :rows]
        for i, f in enumerate(inputs):
            _rows(f, r0, r1, out=stack[i])
            if kind == "della" and prune:
                stack[i].mul_(masks[i, r0:r1]).mul_(scale[i])
            elif kind == "breadcrumbs" and prune:
                absx = torch.abs(stack[i], out=keep_buf[:rows])
                keep = []
                for j in (0, 1):
                    t, ties, equal = thresholds[i][j]
                    mask, taken = threshold_mask(absx, t, ties_left[i][j], all_ties=ties == equal)
                    ties_left[i][j] -= taken
                    keep.append(mask)
                stack[i].mul_(keep[0] & ~keep[1])
        stack.mul_(weights.view(-1, 1, 1))
        if kind == "della":
            _consensus_tail(stack, weights, out=out[r0:r1])
        else:
            torch.sum(stack, dim=0, out=out[r0:r1])
        energy += float(torch.linalg.vector_norm(out[r0:r1], dtype=torch.float64)) ** 2
    return out, energy


def dense_svd(inputs: Sequence[Factors], ctx: ModuleContext, kind: str) -> Merged:
    delta, energy = merged_delta(inputs, ctx, kind)  # scratch's: nothing below may keep a view of it
    s = ctx.spec
    gen = ctx.generator(f"{ctx.module}.sketch", -1) if s.svd_algorithm == "randomized" else None
    t = svd_dense(delta, ctx.rank, s.svd_algorithm, s.svd_oversample, s.svd_niter, gen, energy=energy)
    del delta
    a, b = to_factors(t, ctx.rank, s.svd_clamp)
    return Merged(a=a, b=b, stats=t.stats())


def _work_dense(m: int, n: int, ranks: Sequence[int], out_rank: int, spec, kind: str) -> int:
    """pruned_svd's accounting: the merged delta, the row blocks of every adapter, one block's masks,
    DELLA's argsort indices (int64), ranks, probabilities and draws and its byte-a-value masks of every
    adapter, the exact SVD's Gram matrix and workspace."""
    block = block_rows(m, n, len(ranks)) * n
    blocks = 4 * block * len(ranks) * 3 + (4 * 8 * block + len(ranks) * m * n if kind == "della" else 4 * 4 * block)
    small, k = min(m, n), out_rank + spec.svd_oversample
    svd = 4 * 4 * small**2 if spec.svd_algorithm == "exact" else 4 * 3 * k * (m + n)
    return 4 * m * n + blocks + svd + factor_work(m, n, ranks, out_rank, spec)


def _flops_dense(m: int, n: int, ranks: Sequence[int], out_rank: int, spec, kind: str) -> float:
    passes = 2 if kind == "della" else 1
    deltas = passes * (4.0 * m * n * sum(ranks) + (60.0 if kind == "della" else 12.0) * m * n * len(ranks))
    small, large = min(m, n), max(m, n)
    return deltas + 2.0 * large * small**2 + 9.0 * small**3 + 6.0 * m * n * (out_rank + spec.svd_oversample)


PARAMS = {"della": ("density", "della_epsilon", "seed"), "breadcrumbs": ("density", "breadcrumbs_gamma")}
SUMMARY = {"della": "DELLA: rank-scaled keep probabilities density±epsilon per row, L1 rescale, sum-sign consensus",
           "breadcrumbs": "model breadcrumbs: drop the largest gamma and the smallest magnitudes, weighted sum"}
SVD_PARAMS = ("svd_rank", "svd_clamp", "svd_algorithm", "svd_oversample", "svd_niter")

for _kind in ("della", "breadcrumbs"):
    register(MergeMethod(
        name=_kind, summary=SUMMARY[_kind] + " (on A and B apart)", params=("weight",) + PARAMS[_kind],
        rank_rule=RANK_SAME, fn=lambda inputs, ctx, _k=_kind: merge_factors(inputs, ctx, _k),
        flops=lambda m, n, ranks, out_rank, spec: 40.0 * sum(ranks) * (m + n),
        space="factors", rule=_kind, source=MERGEKIT))
    register(MergeMethod(
        name=f"{_kind}_svd", summary=SUMMARY[_kind] + " (dense deltas), then truncated SVD",
        params=("weight",) + PARAMS[_kind] + SVD_PARAMS, rank_rule=RANK_SVD,
        fn=lambda inputs, ctx, _k=_kind: dense_svd(inputs, ctx, _k),
        flops=lambda m, n, ranks, out_rank, spec, _k=_kind: _flops_dense(m, n, ranks, out_rank, spec, _k),
        work=lambda m, n, ranks, out_rank, spec, _k=_kind: _work_dense(m, n, ranks, out_rank, spec, _k),
        space="full", rule=f"{_kind}, then svd", source=MERGEKIT))
