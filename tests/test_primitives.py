"""The merge steps alone, in milliseconds, against PEFT's merge_utils where PEFT defines them."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as peft_mu

from distmerge.config.schema import MergeSpec
from distmerge.methods import _primitives, registry
from distmerge.methods._primitives import (SELECT_DIRECT, Combine, combine, kth_smallest, magnitude_thresholds,
                                           prune_rows, random_mask, select_rows, stack, threshold_mask, ties_merge_)
from distmerge.methods._svd import quantile, svd_dense, svd_of_product
from distmerge.methods.base import Factors, ModuleContext, Scratch


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.99, 1.0])
def test_magnitude_mask_is_peft_topk_set(density):
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(1))
    ours = prune_rows(x.reshape(1, -1), density, "magnitude")[0].reshape(x.shape)
    theirs = peft_mu.prune(x, density, "magnitude")
    assert torch.equal(ours, theirs)


def _torch_backend(monkeypatch):
    """Make the CPU take the path a GPU takes: selection and scans in torch instead of numpy."""
    monkeypatch.setattr(_primitives, "_backend", lambda x: (x, _primitives.TORCH_OPS))


@pytest.mark.parametrize("device_path", ["numpy", "torch"])
def test_ties_at_threshold_keep_lowest_indices(device_path, monkeypatch):
    if device_path == "torch":
        _torch_backend(monkeypatch)
    x = torch.tensor([3.0, 1.0, -2.0, 2.0, 2.0, -2.0, 0.5])
    mask = prune_rows(x[None], 3 / 7, "magnitude")[0][0] != 0  # k = 3: the 3 and the first two of the four 2s
    assert mask.tolist() == [True, False, True, True, False, False, False]
    [(t, ties, equal)] = magnitude_thresholds(x.abs()[None], 3 / 7)
    assert (t, ties, equal) == (2.0, 2, 4)
    # all four 2s kept: no budget, the same mask as keeping the first 4 in flat order
    assert threshold_mask(x.abs(), t, 4, all_ties=True)[0].tolist() == threshold_mask(x.abs(), t, 4)[0].tolist()
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


def _rows(data: str, rows: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return {"randn": lambda: torch.randn(rows, n, generator=g).abs(),
            "few_values": lambda: torch.randint(0, 5, (rows, n), generator=g).float(),
            "zeros": lambda: torch.zeros(rows, n),
            "ascending": lambda: torch.arange(rows * n, dtype=torch.float32).reshape(rows, n)}[data]()


@pytest.mark.parametrize("device_path", ["numpy", "torch"])
@pytest.mark.parametrize("data", ["randn", "few_values", "zeros", "ascending"])
def test_select_rows_is_kthvalue_per_row(data, device_path, monkeypatch):
    """Both implementations (numpy on the CPU, torch elsewhere) give each row's exact j-th value and counts."""
    x = _rows(data, 3, SELECT_DIRECT * 2 + 5)
    if device_path == "torch":
        _torch_backend(monkeypatch)
    for j in (1, x.shape[1] // 3, x.shape[1] // 2 + 1, x.shape[1]):
        values, greater, equal = select_rows(x, j)
        t = torch.kthvalue(x, j, dim=1).values[:, None]
        assert values == t[:, 0].tolist()
        assert greater == (x > t).sum(1).tolist() and equal == (x == t).sum(1).tolist()


def test_select_rows_falls_back_when_the_sample_misses(monkeypatch):
    x = _rows("randn", 2, SELECT_DIRECT * 2)
    monkeypatch.setattr(_primitives, "_bracket_positions", lambda size, q: (0, 0))  # a bracket at the minimum
    j = x.shape[1] // 2
    assert select_rows(x, j)[0] == torch.kthvalue(x, j, dim=1).values.tolist()


def test_stack_is_a_view_of_back_to_back_tensors():
    buf = torch.randn(4 * 6)
    parts = [buf[i * 6:(i + 1) * 6].view(2, 3) for i in range(4)]
    s = stack(parts)
    assert torch.equal(s, torch.stack(parts)) and s.data_ptr() == buf.data_ptr()
    shuffled = [parts[1], parts[0], parts[2], parts[3]]  # not in buffer order: a copy
    s = stack(shuffled)
    assert torch.equal(s, torch.stack(shuffled)) and s.data_ptr() != buf.data_ptr()


@pytest.mark.parametrize("recipe,peft_fn", [
    (Combine(), lambda t, w: peft_mu.task_arithmetic(t, w)),
    (Combine(prune="magnitude", elect_sign=True), lambda t, w: peft_mu.ties(t, w, 0.3, "frequency")),
    (Combine(prune="magnitude"), lambda t, w: peft_mu.magnitude_prune(t, w, 0.3)),
])
def test_combine_matches_peft_on_factor_sized_inputs(recipe, peft_fn):
    """Inputs as a worker holds them (back to back in one buffer, past the direct-selection size, one
    of them all zeros like an untrained lora_B): PEFT's exact result, bit for bit."""
    n = SELECT_DIRECT * 3
    buf = torch.randn(4 * n, generator=torch.Generator().manual_seed(4))
    buf[3 * n:] = 0
    tensors = [buf[i * n:(i + 1) * n].view(16, -1) for i in range(4)]
    weights = [0.5, -0.25, 1.5, 1.0]
    ours, _ = combine(tensors, weights, recipe, density=0.3, sign_method="frequency")
    assert torch.equal(ours, peft_fn(tensors, torch.tensor(weights)))


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_merge_matches_peft_sign_election_and_disjoint_merge(method):
    g = torch.Generator().manual_seed(2)
    stacked = torch.randn(4, 9, 7, generator=g)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    mask = peft_mu.calculate_majority_sign_mask(stacked, method)
    theirs = peft_mu.disjoint_merge(stacked * weights.view(-1, 1, 1), mask)
    assert torch.equal(ties_merge_(stacked.clone(), weights, method), theirs)


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


@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 25_000])
def test_count_ones_is_count_nonzero_across_chunks(n, monkeypatch):
    monkeypatch.setattr(_primitives, "EXACT_F32_SUM", 1000)  # chunks as a mask past 2^24 values has them
    mask = random_mask((n,), 0.4, torch.Generator().manual_seed(n))
    assert _primitives.count_ones(mask) == int(torch.count_nonzero(mask))


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


@pytest.mark.parametrize("device_path", ["numpy", "torch"])
@pytest.mark.parametrize("force_fallback", [False, True])
def test_blockwise_threshold_is_the_whole_delta_threshold(monkeypatch, force_fallback, device_path):
    """ties_svd and magnitude_prune_svd find PEFT's top-k threshold, and its ties, without forming the
    delta whole."""
    from distmerge.methods import pruned_svd

    if device_path == "torch":
        _torch_backend(monkeypatch)
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
        assert got == magnitude_thresholds(whole.reshape(1, -1), density)[0]


@pytest.mark.parametrize("device_path", ["numpy", "torch"])
@pytest.mark.parametrize("recipe", [Combine(prune="magnitude"), Combine(prune="magnitude", elect_sign=True)])
def test_blockwise_merged_delta_is_the_whole_delta_merge(monkeypatch, device_path, recipe):
    """The pruned SVD methods' row-block merge equals pruning and merging the whole deltas, also where
    many values tie at the threshold (integer factors) and a tie budget carries from block to block."""
    from distmerge.methods import pruned_svd

    if device_path == "torch":
        _torch_backend(monkeypatch)
    monkeypatch.setattr(pruned_svd, "BLOCK_ELEMENTS", 3 * 4 * 96)  # rows in blocks of 4 for 3 adapters
    g = torch.Generator().manual_seed(3)
    inputs = [Factors(a=torch.randint(-2, 3, (4, 96), generator=g).float(),
                      b=torch.randint(-2, 3, (200, 4), generator=g).float(), scaling=0.5, weight=w, adapter=i)
              for i, w in enumerate([0.7, -0.4, 1.1])]
    assert 200 * 96 > SELECT_DIRECT  # each threshold by bracketing
    ctx = ModuleContext("m", MergeSpec(method="ties_svd", density=0.37, majority_sign_method="total"), 4)
    got, _, _ = pruned_svd.merged_delta(inputs, ctx, recipe)

    deltas = torch.stack([f.b @ f.a * f.scaling for f in inputs]).reshape(3, -1)
    thresholds = magnitude_thresholds(deltas.abs(), 0.37)
    assert all(ties < equal for _, ties, equal in thresholds)  # the tie scan, across blocks, is exercised
    pruned, _ = prune_rows(deltas, 0.37, "magnitude")  # PEFT's top-k, ties at t kept lowest index first
    weighted = pruned * torch.tensor([f.weight for f in inputs])[:, None]
    if recipe.elect_sign:  # PEFT's election and disjoint merge, as in its ties()
        want = peft_mu.disjoint_merge(weighted, peft_mu.calculate_majority_sign_mask(pruned, "total"))
    else:
        want = weighted.sum(0)  # PEFT's magnitude_prune
    assert torch.equal(got.reshape(-1), want)


@pytest.mark.parametrize("method", registry.names())
def test_worker_scratch_never_leaks_into_results(method):
    """A worker reuses one Scratch for every module: a result must not be a view of it, or the next
    module would overwrite it. Merge one module, then another with the same scratch, and the first
    result must still be what a fresh scratch gives."""
    def module(seed):
        g = torch.Generator().manual_seed(seed)
        return [Factors(a=torch.randn(4, 700, generator=g), b=torch.randn(300, 4, generator=g), scaling=0.5,
                        weight=w, adapter=i) for i, w in enumerate([0.6, -0.3, 0.9])]

    spec = MergeSpec(method=method, density=0.4, svd_rank=4)
    rank = 12 if method == "cat" else 4  # cat's rank is the sum of the 3 adapters'
    shared = Scratch()
    run = registry.get(method)
    first = run(module(1), ModuleContext("m", spec, rank, scratch=shared))
    kept = (first.a.clone(), first.b.clone())
    run(module(2), ModuleContext("m", spec, rank, scratch=shared))
    fresh = run(module(1), ModuleContext("m", spec, rank))
    assert torch.equal(first.a, kept[0]) and torch.equal(first.b, kept[1])
    assert torch.equal(first.a, fresh.a) and torch.equal(first.b, fresh.b)
