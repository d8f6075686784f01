"""The merge steps alone, in milliseconds, against PEFT's merge_utils where PEFT defines them."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as peft_mu

from distmerge.methods._primitives import (SELECT_DIRECT, Combine, combine, disjoint_merge, elect_sign, magnitude_mask,
                                           kth_smallest, magnitude_threshold, random_mask, threshold_mask)
from distmerge.methods._svd import quantile, svd_dense, svd_of_product
from distmerge.methods.base import Factors


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.99, 1.0])
def test_magnitude_mask_is_peft_topk_set(density):
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(1))
    ours = x * magnitude_mask(x, density)
    theirs = peft_mu.prune(x, density, "magnitude")
    assert torch.equal(ours, theirs)


def test_ties_at_threshold_keep_lowest_indices():
    x = torch.tensor([3.0, 1.0, -2.0, 2.0, 2.0, -2.0, 0.5])
    mask = magnitude_mask(x, 3 / 7)  # k = 3: the 3 and the first two of the four 2s
    assert mask.tolist() == [True, False, True, True, False, False, False]
    t, ties = magnitude_threshold(x.abs(), 3 / 7)
    assert (t, ties) == (2.0, 2)
    # split into blocks, the tie budget carries over in flat order
    first, taken = threshold_mask(x[:3].abs(), t, ties)
    second, _ = threshold_mask(x[3:].abs(), t, ties - taken)
    assert taken == 1
    assert torch.cat([first, second]).tolist() == mask.tolist()


@pytest.mark.parametrize("data", ["randn", "few_values", "constant", "ascending"])
def test_kth_smallest_is_kthvalue(data):
    """The bracketing selection is exact, also where the sample cannot bracket (duplicates, sorted data)."""
    n = SELECT_DIRECT * 3 + 7
    g = torch.Generator().manual_seed(5)
    x = {"randn": torch.randn(n, generator=g), "few_values": torch.randint(0, 5, (n,), generator=g).float(),
         "constant": torch.full((n,), 0.25), "ascending": torch.arange(n, dtype=torch.float32)}[data]
    for j in (1, 2, n // 3, n // 2, n - 1, n):
        assert kth_smallest(x.reshape(-1, 7 if n % 7 == 0 else 1), j) == torch.kthvalue(x, j).values, j


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_elect_sign_and_disjoint_merge_match_peft(method):
    g = torch.Generator().manual_seed(2)
    stacked = torch.randn(4, 9, 7, generator=g)
    mask = elect_sign(stacked, method)
    assert torch.equal(mask, peft_mu.calculate_majority_sign_mask(stacked, method))
    assert torch.equal(disjoint_merge(stacked, mask), peft_mu.disjoint_merge(stacked, mask))


@pytest.mark.parametrize("recipe,peft_fn", [
    (Combine(), lambda t, w: peft_mu.task_arithmetic(t, w)),
    (Combine(prune="magnitude", elect_sign=True), lambda t, w: peft_mu.ties(t, w, 0.3, "total")),
    (Combine(prune="magnitude"), lambda t, w: peft_mu.magnitude_prune(t, w, 0.3)),
])
def test_combine_matches_peft(recipe, peft_fn):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(6, 11, generator=g) for _ in range(3)]
    weights = [0.5, -0.25, 1.5]
    ours, _ = combine(tensors, weights, recipe, density=0.3, sign_method="total")
    assert torch.equal(ours, peft_fn(tensors, torch.tensor(weights)))


def test_random_mask_is_seeded_and_device_independent():
    a = random_mask((64, 64), 0.3, torch.Generator().manual_seed(5))
    b = random_mask((64, 64), 0.3, torch.Generator().manual_seed(5))
    c = random_mask((64, 64), 0.3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_drops_and_rescales_in_expectation():
    """Statistical: the kept fraction is Binomial(n, d)/n and E[pruned] = x, within 5 sigma."""
    n, d = 200_000, 0.3
    x = torch.full((n,), 2.0)
    pruned, kept = combine([x], [1.0], Combine(prune="random"), density=d, sign_method="total",
                           generators=[torch.Generator().manual_seed(0)])
    sigma_kept = (d * (1 - d) / n) ** 0.5
    assert abs(kept - d) < 5 * sigma_kept
    assert abs(float(pruned.mean()) - 2.0) < 5 * 2.0 * ((1 - d) / (d * n)) ** 0.5
    assert pruned.unique().tolist() == pytest.approx([0.0, 2.0 / d])


def test_svd_of_product_equals_dense_svd():
    g = torch.Generator().manual_seed(7)
    b, a = torch.randn(300, 24, generator=g), torch.randn(24, 200, generator=g)
    dense = b @ a
    t = svd_of_product(b, a, 10)
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    best = (u[:, :10] * s[:10]) @ vh[:10]
    assert float(((t.u * t.s) @ t.vh - best).norm() / best.norm()) < 1e-5
    assert t.stats()["svd_truncation_error"] == pytest.approx(float(s[10:].norm() / s.norm()), rel=1e-4)


@pytest.mark.parametrize("algorithm", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_svd_dense_matches_full_svd(algorithm, shape):
    g = torch.Generator().manual_seed(8)
    m = torch.randn(*shape, generator=g) * torch.linspace(3, 0.01, shape[1])  # a decaying spectrum
    t = svd_dense(m, 8, algorithm, oversample=8, niter=4, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    best_err = float(s[8:].norm() / s.norm())
    err = float((m.double() - (t.u * t.s).double() @ t.vh.double()).norm() / m.double().norm())
    assert err <= best_err * (1.0001 if algorithm == "exact" else 1.01)
    assert t.stats()["svd_truncation_error"] == pytest.approx(err, rel=1e-3)


def test_quantile_matches_torch():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(9))
    for q in (0.0, 0.3, 0.9, 0.999, 1.0):
        assert float(quantile(x, q)) == pytest.approx(float(torch.quantile(x, q)), abs=1e-6)


@pytest.mark.parametrize("force_fallback", [False, True])
def test_blockwise_threshold_is_the_whole_delta_threshold(monkeypatch, force_fallback):
    """ties_svd and magnitude_prune_svd find PEFT's top-k threshold without forming the delta whole."""
    from distmerge.methods import pruned_svd

    g = torch.Generator().manual_seed(9)
    f = Factors(a=torch.randn(8, 512, generator=g), b=torch.randn(640, 8, generator=g), scaling=0.5, weight=1.0,
                adapter=0)
    assert 640 * 512 > SELECT_DIRECT  # the bracketing path, not kthvalue on the whole
    spans = [(r0, min(640, r0 + 96)) for r0 in range(0, 640, 96)]
    if force_fallback:  # a bracket that misses must still give the exact threshold
        monkeypatch.setattr(pruned_svd, "bracket", lambda sample, q: (sample[0], sample[0]))
    whole = torch.cat([pruned_svd._rows(f, r0, r1) for r0, r1 in spans]).abs()
    for density in (0.1, 0.5, 0.9):
        got = pruned_svd.magnitude_threshold(f, spans, density, torch.Generator().manual_seed(1))
        assert got == magnitude_threshold(whole, density)
