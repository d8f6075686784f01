"""DELLA and model breadcrumbs against mergekit itself: mergekit.sparsify prunes each dense delta (DELLA's
Bernoulli draws replaced by distmerge's seeded uniforms, the one part that cannot be matched otherwise),
and mergekit's get_mask elects the sign; the merge tail is merge_group's (weighted, normalised for DELLA)."""

from __future__ import annotations

import pytest
import torch

from distmerge.config.schema import MergeSpec
from distmerge.methods import registry
from distmerge.methods.base import Factors, ModuleContext

sparsify = pytest.importorskip("mergekit.sparsify")
gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")

MODULE = "model.layers.0.mlp.down_proj"


def _adapters(m=40, n=36, r=4, weights=(0.7, -0.4, 0.5)) -> list[Factors]:
    g = torch.Generator().manual_seed(1)
    return [Factors(a=torch.randn(r, n, generator=g), b=torch.randn(m, r, generator=g), scaling=0.5 + 0.25 * i,
                    weight=w, adapter=i) for i, w in enumerate(weights)]


def _mergekit(tensors, weights, kind: str, spec: MergeSpec, draws, monkeypatch) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group on deltas (base = 0): della is
    della_magprune + l1 rescale + sum consensus + normalize; breadcrumbs is magnitude_outliers, summed."""
    if kind == "della":
        pending = list(draws)
        monkeypatch.setattr(torch, "bernoulli", lambda p: (pending.pop(0) < p).to(p.dtype))
        pruned = [sparsify.sparsify(t, spec.density, sparsify.SparsificationMethod.della_magprune,
                                    epsilon=spec.della_epsilon, rescale_norm=sparsify.RescaleNorm.l1) for t in tensors]
        monkeypatch.undo()
    else:
        pruned = [sparsify.sparsify(t, spec.density, sparsify.SparsificationMethod.magnitude_outliers,
                                    gamma=spec.breadcrumbs_gamma) for t in tensors]
    deltas = torch.stack(pruned)
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
    deltas = deltas * w
    if kind == "della":
        mask = gta.get_mask(deltas, method="sum")
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        return (deltas * mask).sum(dim=0) / divisor
    return deltas.sum(dim=0)


def _draws(shape, module: str, role: str, inputs, seed: int) -> list[torch.Tensor]:
    """The uniforms distmerge draws for each adapter's tensor: seeded by (seed, tensor name, adapter index)."""
    return [torch.rand(shape, generator=ModuleContext(module, MergeSpec(seed=seed), 1).generator(
        f"{module}.{role}", f.adapter)) for f in inputs]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["della", "breadcrumbs"])
def test_dense_variant_matches_mergekit(kind, monkeypatch):
    inputs = _adapters()
    m, n = 40, 36
    spec = MergeSpec(method=f"{kind}_svd", density=0.4, seed=5, svd_rank=min(m, n), breadcrumbs_gamma=0.05)
    out = registry.get(f"{kind}_svd")(inputs, ModuleContext(MODULE, spec, min(m, n)))
    deltas = [(f.b @ f.a).mul_(f.scaling) for f in inputs]
    draws = _draws((m, n), MODULE, "della", inputs, spec.seed)
    expected = _mergekit(deltas, [f.weight for f in inputs], kind, spec, draws, monkeypatch)
    err = _rel(out.b.double() @ out.a.double(), expected)
    assert err <= 1e-5, f"{kind}_svd: relative error {err:.2e} against mergekit"
    kept = (expected != 0).double().mean()
    assert 0.2 < kept < 0.95  # the pruning did something


@pytest.mark.parametrize("kind", ["della", "breadcrumbs"])
def test_factor_variant_matches_mergekit_on_a_and_b(kind, monkeypatch):
    """della / breadcrumbs merge A and B apart, with PEFT's √|weight·scaling| weights (sign on A)."""
    inputs = _adapters()
    spec = MergeSpec(method=kind, density=0.5, seed=5, breadcrumbs_gamma=0.1)
    out = registry.get(kind)(inputs, ModuleContext(MODULE, spec, 4))
    scaled = [f.weight * f.scaling for f in inputs]
    w_a = [abs(x) ** 0.5 * (1 if x >= 0 else -1) for x in scaled]
    w_b = [abs(x) ** 0.5 for x in scaled]
    a = _mergekit([f.a for f in inputs], w_a, kind, spec, _draws(tuple(inputs[0].a.shape), MODULE, "lora_A",
                                                                   inputs, spec.seed), monkeypatch)
    b = _mergekit([f.b for f in inputs], w_b, kind, spec, _draws(tuple(inputs[0].b.shape), MODULE, "lora_B",
                                                                   inputs, spec.seed), monkeypatch)
    assert _rel(out.a, a) <= 1e-6 and _rel(out.b, b) <= 1e-6


def test_della_is_the_same_in_row_blocks(monkeypatch):
    """The dense path builds the delta in row blocks; DELLA's two passes redraw the same masks, so a split
    into many blocks gives the bytes of one block."""
    import distmerge.methods.pruned_svd as ps

    inputs = _adapters(m=64, n=48)
    spec = MergeSpec(method="della_svd", density=0.5, seed=2)
    ctx = ModuleContext(MODULE, spec, 4)
    whole = registry.get("della_svd")(inputs, ctx)
    monkeypatch.setattr(ps, "BLOCK_ELEMENTS", 48 * 3 * 5)  # 5 rows a block
    import distmerge.methods.della_breadcrumbs as db

    monkeypatch.setattr(db, "block_rows", lambda m, n, a: 5)
    split = registry.get("della_svd")(inputs, ModuleContext(MODULE, spec, 4))
    assert torch.equal(whole.a, split.a) and torch.equal(whole.b, split.b)


@pytest.mark.parametrize("variant,name", [("gpt2_conv1d", "della_svd"), ("conv2d", "breadcrumbs_svd"),
                                          ("bf16", "della_svd"), ("rslora", "breadcrumbs_svd")])
def test_adapter_variants_load_in_peft_and_match_mergekit(adapter_sets, tmp_path, monkeypatch, variant, name):
    """Through real files: PEFT's own deltas of each adapter, pruned and merged by mergekit, against
    distmerge's output loaded back by PEFT (svd_rank at full width, so the SVD truncates nothing)."""
    import distmerge
    from tests.conftest import BASES, merge_config
    from tests.peft_oracle import load_merged, lora_layers
    from tests.test_spaces import _lora_layout, _peft_tasks

    aset = adapter_sets(variant)
    kind = name.removesuffix("_svd")
    cfg = merge_config(aset, tmp_path / "out", name, output={"dtype": "float32"}, density=0.5, seed=4,
                       svd_rank=4096)
    distmerge.merge(cfg)
    ours, model = load_merged(BASES[aset.base], tmp_path / "out")
    layers = dict(lora_layers(model, "default"))
    spec = MergeSpec(density=0.5, seed=4)
    for module, group in _peft_tasks(BASES[aset.base], aset.paths, aset.weights).items():
        shape = tuple(group[0].delta.shape)
        draws = [torch.rand(shape, generator=ModuleContext(module, spec, 1).generator(f"{module}.della", t.adapter))
                 for t in group]
        expected = _mergekit([t.delta.float() for t in group], [t.weight for t in group], kind, spec, draws,
                             monkeypatch)
        err = _rel(_lora_layout(layers[module], "default", ours[module]), expected)
        assert err <= 1e-5, f"{variant} {name} {module}: relative error {err:.2e}"
