"""distmerge's output, loaded by PEFT, against PEFT's own add_weighted_adapter: every method on every
adapter variant, comparing each module's effective delta B·A·scaling."""

from __future__ import annotations

import json

import pytest

import distmerge
from distmerge.errors import AdapterError
from distmerge.methods import registry
from tests.conftest import BASES, VARIANTS, merge_config
from tests.peft_oracle import load_merged, peft_merge, rel_err

METHODS = [m for m in registry.names() if registry.get(m).source == "PEFT"]  # the rest have no PEFT counterpart
SAME_RANK = [m for m in METHODS if registry.get(m).rank_rule == "same"]
PRUNING = {m for m in METHODS if "density" in registry.get(m).params}


def _tolerance(method: str) -> float:
    return 1e-3 if method.endswith("svd") else 1e-5


def _peft_kwargs(method: str) -> dict:
    return {"density": 0.5} if method in PRUNING else {}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_matches_peft(adapter_sets, tmp_path, variant, method):
    aset = adapter_sets(variant)
    base = BASES[aset.base]
    cfg = merge_config(aset, tmp_path / "out", method, seed=3, output={"dtype": "float32"},
                       **_peft_kwargs(method))
    if variant == "mixed_ranks" and method in SAME_RANK:
        with pytest.raises(AdapterError, match=r"needs equal ranks.*r=2.*r=6.*cat"):
            distmerge.merge(cfg)
        assert not (tmp_path / "out").exists()
        return
    distmerge.merge(cfg)
    ours, model = load_merged(base, tmp_path / "out")
    theirs = peft_merge(base, aset.paths, aset.weights, method, seed=3, **_peft_kwargs(method))
    assert set(ours) == set(theirs)
    for name in theirs:
        err = rel_err(ours[name], theirs[name])
        assert err <= _tolerance(method), f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("method", ["ties", "ties_svd", "dare_ties"])
def test_frequency_sign_election_matches_peft(adapter_sets, tmp_path, method):
    aset = adapter_sets("llama")
    cfg = merge_config(aset, tmp_path / "out", method, density=0.4, majority_sign_method="frequency")
    distmerge.merge(cfg)
    ours, _ = load_merged(BASES[aset.base], tmp_path / "out")
    theirs = peft_merge(BASES[aset.base], aset.paths, aset.weights, method, density=0.4,
                        majority_sign_method="frequency")
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) <= _tolerance(method)


@pytest.mark.parametrize("method", ["svd", "magnitude_prune_svd"])
def test_svd_rank_matches_peft(adapter_sets, tmp_path, method):
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "out", method, svd_rank=3, **_peft_kwargs(method)))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3
    ours, _ = load_merged(BASES[aset.base], tmp_path / "out")
    theirs = peft_merge(BASES[aset.base], aset.paths, aset.weights, method, svd_rank=3, **_peft_kwargs(method))
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) <= 1e-3, name


@pytest.mark.parametrize("method", ["svd", "ties_svd"])
def test_svd_clamp_is_peft_formula(adapter_sets, tmp_path, method):
    """svd_clamp clamps U·S and Vᵀ to ±torch.quantile(all their entries, q), PEFT's formula. The quantile
    is over signed entries, and an SVD leaves each triplet's sign free: PEFT inherits LAPACK's, distmerge
    fixes its own (largest entry of each u positive), so clamped outputs are compared with PEFT's formula
    applied to our factors, whose unclamped product matches PEFT (test_matches_peft)."""
    import torch
    from safetensors.torch import load_file

    aset = adapter_sets("llama")
    kw = _peft_kwargs(method)
    distmerge.merge(merge_config(aset, tmp_path / "free", method, **kw))
    distmerge.merge(merge_config(aset, tmp_path / "out", method, svd_clamp=0.9, **kw))
    unclamped = load_file(str(tmp_path / "free" / "adapter_model.safetensors"))
    clamped = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert unclamped.keys() == clamped.keys()
    for a_key in [k for k in unclamped if "lora_A" in k]:
        b_key = a_key.replace("lora_A", "lora_B")
        hi = torch.quantile(torch.cat([unclamped[b_key].flatten(), unclamped[a_key].flatten()]), 0.9)
        for key in (a_key, b_key):
            torch.testing.assert_close(clamped[key], unclamped[key].clamp(-hi, hi), rtol=1e-6, atol=1e-7)
        assert not all(torch.equal(clamped[k], unclamped[k]) for k in (a_key, b_key))  # the clamp did something


def test_single_adapter_merges_as_linear(adapter_sets, tmp_path):
    aset = adapter_sets("llama")
    one = type(aset)(aset.base, aset.paths[:1], [0.8])
    result = distmerge.merge(merge_config(one, tmp_path / "out", "ties", density=0.5))
    assert result.method == "linear"
    ours, _ = load_merged(BASES[aset.base], tmp_path / "out")
    theirs = peft_merge(BASES[aset.base], one.paths, one.weights, "ties", density=0.5)
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) <= 1e-5


def test_rslora_output_carries_its_scaling(adapter_sets, tmp_path):
    """PEFT keeps use_rslora on the merged adapter (alpha = r), so it rescales by √r on load; ours does not."""
    aset = adapter_sets("rslora")
    distmerge.merge(merge_config(aset, tmp_path / "out", "cat"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"] == 16
    _, model = load_merged(BASES[aset.base], tmp_path / "out")
    from tests.peft_oracle import lora_layers

    assert {m.scaling["default"] for _, m in lora_layers(model, "default")} == {1.0}
