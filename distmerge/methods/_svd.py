"""Truncated SVDs that never build more than they must.

- `svd_of_product`: the SVD of Δ = B·A from the factors (QR of each side, SVD of an R×R core), exact
  and without forming the d_out×d_in delta. PEFT builds the dense delta and runs a full SVD.
- `svd_dense`: for the pruned methods, whose delta is dense by construction. "exact" eigendecomposes
  the Gram matrix of the smaller side, then one Rayleigh–Ritz step on the delta itself restores
  full-SVD accuracy for the leading triplets; "randomized" is Halko's range finder with a seeded
  sketch, so it is reproducible.
Both return the leading `rank` triplets and ‖Δ‖²_F, so the truncation error is exact:
‖Δ − Δᵣ‖² = ‖Δ‖² − Σᵢ≤ᵣ σᵢ².
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge._lazy import torch
from distmerge.methods._primitives import kth_smallest


@dataclass
class Truncated:
    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, n)
    energy: float  # ‖Δ‖²_F of the untruncated delta

    def stats(self) -> dict[str, float]:
        kept = float((self.s.double() ** 2).sum())
        total = max(self.energy, kept)
        if total <= 0:
            return {"svd_truncation_error": 0.0, "svd_energy_kept": 1.0}
        return {"svd_truncation_error": ((total - kept) / total) ** 0.5, "svd_energy_kept": kept / total}


def _canonical(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Truncated:
    """Keep `rank` triplets with a deterministic sign: each u column's largest entry is positive."""
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    idx = u.abs().argmax(dim=0, keepdim=True)
    flip = torch.where(torch.gather(u, 0, idx) < 0, -1.0, 1.0).to(u.dtype)
    return Truncated(u * flip, s, vh * flip.reshape(-1, 1), 0.0)


def svd_of_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> Truncated:
    """Truncated SVD of b @ a (b: m×R, a: R×n) in O((m+n)R²), never forming the m×n product."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    core = (rb.double() @ ra.double().T)
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    out = _canonical(qb @ uc.to(b.dtype), s.to(b.dtype), vch.to(b.dtype) @ qa.T, rank)
    out.energy = float((core ** 2).sum())
    return out


def _rayleigh_ritz(m: torch.Tensor, q: torch.Tensor, rank: int, energy: float | None) -> Truncated:
    """Best rank-`rank` approximation of m within the column space of orthonormal q."""
    uz, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    out = _canonical(q @ uz, s, vh, rank)
    out.energy = energy if energy is not None else float(torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2
    return out


def svd_dense(m: torch.Tensor, rank: int, algorithm: str = "exact", oversample: int = 8, niter: int = 4,
              generator: torch.Generator | None = None, energy: float | None = None) -> Truncated:
    """Leading `rank` triplets of m; `energy` is ‖m‖²_F when the caller already summed it blockwise."""
    rows, cols = m.shape
    k = min(rank + oversample, rows, cols)
    if algorithm == "exact":
        if rows >= cols:
            _, v = torch.linalg.eigh(m.T @ m)  # ascending eigenvalues
            q, _ = torch.linalg.qr(m @ v[:, -k:].flip(1))
        else:
            _, u = torch.linalg.eigh(m @ m.T)
            q = u[:, -k:].flip(1)
        return _rayleigh_ritz(m, q, rank, energy)
    if algorithm == "randomized":
        omega = torch.randn(cols, k, generator=generator).to(device=m.device, dtype=m.dtype)
        q, _ = torch.linalg.qr(m @ omega)
        for _ in range(niter):
            z, _ = torch.linalg.qr(m.T @ q)
            q, _ = torch.linalg.qr(m @ z)
        return _rayleigh_ritz(m, q, rank, energy)
    raise ValueError(f"unknown svd_algorithm {algorithm!r}")


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation by selection, which has no 16M-element limit."""
    flat = x.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = kth_smallest(flat, lo + 1)
    v_hi = kth_smallest(flat, hi + 1) if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def to_factors(t: Truncated, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (Vh, U·S), zero-padded to `rank` rows, clamped at a quantile as PEFT's svd_clamp does."""
    b, a = t.u * t.s, t.vh
    if clamp is not None:
        hi = quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    pad = rank - a.shape[0]
    if pad > 0:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a, b
