"""LoRA-native merges in a shared low-rank space: Core Space, KnOTS, TSV-M, Iso-C and Iso-CTS.

A method here is a rule (sum, ties, dare_ties, tsv, iso, ...) run in a space (core, knots, span), both
data; one implementation serves every pair, as PEFT's and mergekit's generalized task arithmetic do.
Everything is computed from the factors: the adapters' deltas live in the span of their stacked
factors, of dimension p = Σ rᵢ, so QR of the stacked factors and SVDs of p-sized matrices replace the
reference codes' dense d_out×d_in SVDs. No d_out×d_in matrix is formed; KnOTS's per-task matrices are
p×d_in, the size of the A factors.

Each adapter is first brought to a canonical form that depends on its ΔW alone: its thin SVD
scaling·B·A = U S Vᵀ, B' = U S^½, A' = S^½ Vᵀ (largest entry of each u positive). So B·R, R⁻¹·A give the
same output as B, A for every method here. For Core Space with TIES or DARE this is a deliberate change
from the reference code, whose bases come from SVDs of the raw stacked factors.

Spaces (left basis L m×a and right basis Rᵀ b×n, orthonormal; per-task Xₜ with Δₜ = L Xₜ Rᵀ):
- span: L, R from QR of the stacked canonical B' and A'ᵀ. Spectral rules (tsv, iso) do not depend on
  the orthonormal basis, so they run here, where it costs least.
- core: Core Space (Panariello et al., NeurIPS 2025): L = U_B, R = V_A, the singular vectors of the
  stacked B' and A'ᵀ; Xₜ = U_Bᵀ Δₜ V_A (a×b).
- knots: KnOTS (Stoica et al., ICLR 2025): the SVD of [Δ₁ … Δ_T] = U Σ [V₁ … V_T]; L = U, Xₜ = Σ Vₜᵀ
  (k×n, in the input coordinates, as the reference merges them), R = identity.
Element-wise rules (ties, dare_*, magnitude_prune) act on the Xₜ with PEFT's semantics (per-task top-k,
sign elected on the unweighted values, weighted disjoint mean); spectral rules act on the weighted Xₜ.
The merged ΔW = L X Rᵀ is returned as its truncated SVD, rank ≤ p, cut to svd_rank where one is set,
with the truncation error recorded as svd records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from distmerge._lazy import torch
from distmerge.methods._primitives import Combine, combine
from distmerge.methods._svd import _canonical, to_factors
from distmerge.methods.base import RANK_SPAN, Factors, Merged, MergeMethod, ModuleContext
from distmerge.methods.registry import register

RANK_TOL = 1e-6  # singular values below this fraction of the largest are numerical zeros (float32 inputs)


@dataclass
class Canonical:
    """One adapter's scaling·B·A as its thin SVD: u (m×r) and v (n×r) orthonormal, s (r,) float64."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def _sign_fix(u: torch.Tensor) -> torch.Tensor:
    """±1 per column making each column's largest-magnitude entry positive (the fixed sign rule)."""
    idx = u.abs().argmax(dim=0, keepdim=True)
    return torch.where(torch.gather(u, 0, idx) < 0, -1.0, 1.0).to(u.dtype)


def canonical(f: Factors) -> Canonical:
    """The thin SVD of scaling·B·A from the factors: QR of each side and an r×r SVD, O((m+n)r²)."""
    qb, rb = torch.linalg.qr(f.b)
    qa, ra = torch.linalg.qr(f.a.T)
    uc, s, vch = torch.linalg.svd((rb.double() @ ra.double().T) * f.scaling)
    u, v = qb @ uc.to(qb.dtype), qa @ vch.T.to(qa.dtype)
    flip = _sign_fix(u)
    return Canonical(u * flip, s, v * flip)


def numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > s[0] * RANK_TOL).sum())


@dataclass
class Projected:
    """Δₜ = left · xs[t] · right_t for every task; right_t None is the identity (xs[t] is then k×n)."""

    left: torch.Tensor  # (m, a) orthonormal columns, float32
    xs: list[torch.Tensor]  # per task (a, b) float64, or (k, n) float32 for knots
    right_t: Optional[torch.Tensor]  # (b, n) orthonormal rows, float32
    parts: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None  # xs[t] = l @ r.T with l, r (a|b × rₜ)
    left_rot: Optional[torch.Tensor] = None  # the left basis is left @ left_rot (a×a, float64), applied late
    right_rot: Optional[torch.Tensor] = None  # the right basis is (right_rot.T @ right_t), likewise


def _stacked(canons: Sequence[Canonical], right: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], list]:
    """QR of the stacked canonical factors: (Q_B, R_B, Q_A, R_A, column slices per task); the A side
    (None, None) when `right` is False (KnOTS needs only the B side: its right factor is per task)."""
    b = torch.cat([c.u * c.s.sqrt().to(c.u.dtype) for c in canons], dim=1)  # [B'₁ … B'_T]  m×p
    qb, rb = torch.linalg.qr(b)
    qa = ra = None
    if right:
        at = torch.cat([c.v * c.s.sqrt().to(c.v.dtype) for c in canons], dim=1)  # [A'₁ … A'_T]ᵀ n×p
        qa, ra = torch.linalg.qr(at)
        ra = ra.double()
    cols, start = [], 0
    for c in canons:
        cols.append(slice(start, start + c.s.numel()))
        start += c.s.numel()
    return qb, rb.double(), qa, ra, cols


def span_space(canons: Sequence[Canonical], ctx: ModuleContext) -> Projected:
    qb, rb, qa, ra, cols = _stacked(canons)
    parts = [(rb[:, c], ra[:, c]) for c in cols]
    return Projected(qb, [lt @ rt.T for lt, rt in parts], qa.T, parts)


def core_space(canons: Sequence[Canonical], ctx: ModuleContext) -> Projected:
    """Core Space: the bases are the left singular vectors of the stacked B' and the right ones of the
    stacked A'; each task's core is U_Bᵀ B'ₜ A'ₜ V_A, computed as Pᵀ R_B,ₜ R_A,ₜᵀ P_A from the QR factors."""
    qb, rb, qa, ra, cols = _stacked(canons)
    pb = torch.linalg.svd(rb, full_matrices=False)[0]
    pa = torch.linalg.svd(ra, full_matrices=False)[0]
    pb, pa = pb * _sign_fix(pb), pa * _sign_fix(pa)
    parts = [(pb.T @ rb[:, c], pa.T @ ra[:, c]) for c in cols]
    # U_B = Q_B·P_B and V_A = Q_A·P_A are never formed: finish maps the merged core's singular vectors
    # through P first (p×p), then Q (m×p), one m×p×p product a side instead of two
    return Projected(qb, [lt @ rt.T for lt, rt in parts], qa.T, parts, left_rot=pb, right_rot=pa)


def knots_space(canons: Sequence[Canonical], ctx: ModuleContext) -> Projected:
    """KnOTS: [Δ₁ … Δ_T] = Q_B · K · blockdiag(Vₜᵀ) with K = Q_Bᵀ[U₁S₁ … U_TS_T] (a×p); the SVD of K gives
    U = Q_B Uₖ and each task's ΣVₜ = Σ Wₖ,ₜᵀ Vₜᵀ, kept to the numerical rank as the reference keeps σ > 0."""
    qb, rb, _, _, cols = _stacked(canons, right=False)
    k_mat = torch.cat([rb[:, c] * c_.s.sqrt() for c, c_ in zip(cols, canons)], dim=1)
    uk, sk, wkh = torch.linalg.svd(k_mat, full_matrices=False)
    k = max(1, numerical_rank(sk))
    flip = _sign_fix(uk[:, :k])
    uk, sk, wkh = uk[:, :k] * flip, sk[:k], wkh[:k] * flip.T
    n = canons[0].v.shape[0]
    stacked = torch.empty(len(canons), k, n, dtype=canons[0].v.dtype, device=canons[0].v.device)
    for t, (c, can) in enumerate(zip(cols, canons)):  # back to back: the rules stack them without a copy
        torch.matmul((sk[:, None] * wkh[:, c]).to(can.v.dtype), can.v.T, out=stacked[t])
    return Projected(qb @ uk.to(qb.dtype), list(stacked), None)


# --- rules ----------------------------------------------------------------------------------------------


def elementwise(recipe: Combine) -> Callable:
    """A PEFT task-arithmetic recipe on the per-task matrices (float32, the primitives' dtype)."""

    def run(proj: Projected, inputs: Sequence[Factors], ctx: ModuleContext, space: str):
        xs = proj.xs
        gens = ([ctx.generator(f"{ctx.module}.{space}", f.adapter) for f in inputs]
                if recipe.prune == "random" else None)
        merged, kept = combine([x.float().contiguous() for x in xs], [f.weight for f in inputs], recipe,
                               density=ctx.spec.density, sign_method=ctx.spec.majority_sign_method,
                               generators=gens, scratch=ctx.scratch)
        merged = merged.clone()  # combine may hand back scratch memory; the next module reuses it
        return merged, ({"kept_fraction": kept} if recipe.prune else {})

    return run


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of x (nearest matrix with orthonormal columns): U Vᵀ of its SVD."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _svd_keep(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def _task_svd(proj: Projected, t: int, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of weight·xs[t]; from its rank-rₜ factors when the space keeps them (two QRs and an rₜ×rₜ SVD
    instead of an SVD of the whole p×p matrix)."""
    if proj.parts is None:
        return torch.linalg.svd(weight * proj.xs[t], full_matrices=False)
    lt, rt = proj.parts[t]
    ql, rl = torch.linalg.qr(weight * lt)
    qr_, rr = torch.linalg.qr(rt)
    u, s, vh = torch.linalg.svd(rl @ rr.T)
    return ql @ u, s, vh @ qr_.T


def tsv_rule(proj: Projected, inputs: Sequence[Factors], ctx: ModuleContext, space: str):
    """TSV-M (Gargiulo et al., CVPR 2025): each weighted task's own singular triplets (at most its rank rₜ,
    the reference's 1/T share of a core of size Σ r), the concatenated left and right singular vectors
    each replaced by their polar factor, then U⊥ diag(S) V⊥ᵀ. Triplets with a numerically zero singular
    value are left out: their vectors are arbitrary, and in the polar factor they would move the others."""
    xs = proj.xs
    parts = [_task_svd(proj, t, f.weight) for t, f in enumerate(inputs)]
    top = max((float(p[1][0]) for p in parts if p[1].numel()), default=0.0)
    keep = [min(f.a.shape[0], int((p[1] > top * RANK_TOL).sum())) if top > 0 else 0 for p, f in zip(parts, inputs)]
    if not any(keep):
        return torch.zeros_like(xs[0], dtype=torch.float64), {}
    u = torch.cat([p[0][:, :k] for p, k in zip(parts, keep)], dim=1)
    s = torch.cat([p[1][:k] for p, k in zip(parts, keep)])
    vh = torch.cat([p[2][:k] for p, k in zip(parts, keep)], dim=0)
    return polar(u) @ (s[:, None] * polar(vh.T).T), {}


def iso_rule(proj: Projected, inputs: Sequence[Factors], ctx: ModuleContext, space: str):
    """Iso-C (Marczak et al., ICML 2025): the weighted sum with its singular values replaced by their mean,
    over the sum's own rank-k spectrum (not min(m, n), which would inflate directions no adapter touched)."""
    total = sum(f.weight * x for x, f in zip(proj.xs, inputs))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    k = numerical_rank(s)
    if k == 0:
        return torch.zeros_like(total), {"iso_rank": 0.0}
    return s[:k].mean() * (u[:, :k] @ vh[:k]), {"iso_rank": float(k)}


def iso_cts_dims(k: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common, per task) for a merged rank k: the reference's allocation (common = ⌊k·fraction⌋, the rest
    split evenly, rounded), capped so the common part stays ≥ 0."""
    per_task = min(k // tasks, round((k - int(k * fraction)) / tasks))
    return k - tasks * per_task, per_task


def iso_cts_rule(proj: Projected, inputs: Sequence[Factors], ctx: ModuleContext, space: str):
    """Iso-CTS: the sum's top common directions, each task's top directions orthogonal to them in the slots
    left, both sides orthogonalised (polar), and every singular value set to their mean."""
    xs = proj.xs
    weighted = [f.weight * x for x, f in zip(xs, inputs)]
    total = sum(weighted)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    k = numerical_rank(s)
    if k == 0:
        return torch.zeros_like(total), {"iso_rank": 0.0}
    common, per_task = iso_cts_dims(k, len(xs), ctx.spec.iso_common_fraction)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    uc = u[:, :common]
    if per_task:
        for w in weighted:
            tu, ts, tvh = _svd_keep(w - uc @ (uc.T @ w), per_task)
            n = int((ts > s[0] * RANK_TOL).sum())  # a slot this task cannot fill stays empty
            us.append(tu[:, :n])
            ss.append(ts[:n])
            vhs.append(tvh[:n])
    s_all = torch.cat(ss)
    merged = s_all.mean() * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vhs, dim=0).T).T)
    return merged, {"iso_rank": float(k), "iso_common_rank": float(common)}


# --- the generalised method ----------------------------------------------------------------------------


SPACES = {"span": span_space, "core": core_space, "knots": knots_space}


def finish(proj: Projected, merged: torch.Tensor, ctx: ModuleContext) -> Merged:
    """ΔW = left · merged · right_t as its truncated SVD: an SVD of the small merged matrix (after a QR of
    its rows when right_t is the identity), mapped through the orthonormal bases."""
    left, right_t = proj.left, proj.right_t
    if right_t is None:
        q, r = torch.linalg.qr(merged.float().T)
        merged, right_t = r.T, q.T
    uc, s, vch = torch.linalg.svd(merged.double(), full_matrices=False)
    if proj.left_rot is not None:
        uc = proj.left_rot @ uc
    if proj.right_rot is not None:
        vch = vch @ proj.right_rot.T
    dtype = left.dtype
    t = _canonical(left @ uc.to(dtype), s.to(dtype), vch.to(dtype) @ right_t, ctx.rank)
    t.energy = float((s ** 2).sum())
    a, b = to_factors(t, ctx.rank, ctx.spec.svd_clamp)
    return Merged(a=a.contiguous(), b=b.contiguous(), stats=t.stats())


def merge_in_space(inputs: Sequence[Factors], ctx: ModuleContext, space: str, rule: Callable) -> Merged:
    canons = [canonical(f) for f in inputs]
    proj = SPACES[space](canons, ctx)
    merged, stats = rule(proj, inputs, ctx, space)
    out = finish(proj, merged, ctx)
    out.stats.update(stats)
    return out


def _flops(m: int, n: int, ranks: Sequence[int], out_rank: int, spec, space: str) -> float:
    """QRs of each adapter's factors and of the stacks, the output's products; knots adds its p×n tasks."""
    p = sum(ranks)
    base = 4.0 * (m + n) * (sum(r * r for r in ranks) + 2 * p * p) + 30.0 * p**3 * max(1, len(ranks))
    if space == "knots":
        base += 10.0 * len(ranks) * p * n + 2.0 * n * p * p
    return base


def _work(m: int, n: int, ranks: Sequence[int], out_rank: int, spec, space: str) -> int:
    """Float32 temporaries: each adapter's QR and canonical factors, the two stacks and their Q's, the
    output's u and vh (~8 copies of the inputs' size); knots holds T p×n task matrices, their pruned copy,
    the sign mask and their sum (5 more)."""
    p = sum(ranks)
    work = 4 * 8 * p * (m + n) + 4 * 2 * out_rank * (m + n)
    if space == "knots":
        work += 4 * (3 * len(ranks) + 2) * p * n
    return work


ELEMENTWISE = {
    "sum": Combine(),
    "ties": Combine(prune="magnitude", elect_sign=True),
    "dare_ties": Combine(prune="random", elect_sign=True),
    "dare_linear": Combine(prune="random"),
    "magnitude_prune": Combine(prune="magnitude"),
}
RULES: dict[str, Callable] = {**{name: elementwise(r) for name, r in ELEMENTWISE.items()},
                              "tsv": tsv_rule, "iso": iso_rule, "iso_cts": iso_cts_rule}
RULE_PARAMS = {"sum": (), "ties": ("density", "majority_sign_method"),
               "dare_ties": ("density", "majority_sign_method", "seed"), "dare_linear": ("density", "seed"),
               "magnitude_prune": ("density",), "tsv": (), "iso": (), "iso_cts": ("iso_common_fraction",)}

CORE = "Core Space, Panariello et al. NeurIPS 2025 (apanariello4/core-space-merging)"
KNOTS = "KnOTS, Stoica et al. ICLR 2025 (gstoica27/KnOTS)"
TSV = "TSV-M, Gargiulo et al. CVPR 2025 (AntoAndGar/task_singular_vectors)"
ISO = "Iso-C/Iso-CTS, Marczak et al. ICML 2025 (danielm1405/iso-merging)"

# name: (space, rule, summary, source)
METHODS = {
    "core_ties": ("core", "ties", "TIES on the Core Space cores U_Bᵀ ΔWₜ V_A, mapped back", CORE),
    "core_dare_ties": ("core", "dare_ties", "DARE then TIES on the Core Space cores", CORE),
    "core_dare_linear": ("core", "dare_linear", "DARE drop-and-rescale on the Core Space cores, weighted sum", CORE),
    "core_tsv": ("core", "tsv", "TSV-M on the Core Space cores (equals tsv: the basis is orthonormal)", CORE),
    "core_iso": ("core", "iso", "Iso-C on the merged Core Space core (equals iso_c)", CORE),
    "knots_ties": ("knots", "ties", "TIES on the KnOTS task matrices ΣVₜ of the joint SVD, then U·merged", KNOTS),
    "knots_dare_ties": ("knots", "dare_ties", "DARE then TIES on the KnOTS task matrices ΣVₜ", KNOTS),
    "tsv": ("span", "tsv", "Task Singular Vectors: per-task SVDs, orthogonalised (polar) U and V", TSV),
    "iso_c": ("span", "iso", "isotropic merge: the sum's singular values flattened to their mean (rank-k)", ISO),
    "iso_cts": ("span", "iso_cts", "Iso-C over common plus task-specific directions (iso_common_fraction)", ISO),
}

for _name, (_space, _rule, _summary, _source) in METHODS.items():
    register(MergeMethod(
        name=_name, summary=_summary, params=("weight",) + RULE_PARAMS[_rule] + ("svd_rank", "svd_clamp"),
        rank_rule=RANK_SPAN, fn=lambda inputs, ctx, _s=_space, _r=RULES[_rule]: merge_in_space(inputs, ctx, _s, _r),
        flops=lambda m, n, ranks, out_rank, spec, _s=_space: _flops(m, n, ranks, out_rank, spec, _s),
        work=lambda m, n, ranks, out_rank, spec, _s=_space: _work(m, n, ranks, out_rank, spec, _s),
        space=_space, rule=_rule, source=_source))
