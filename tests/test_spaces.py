"""Core Space, KnOTS, TSV-M, Iso-C/Iso-CTS against dense float64 references written from the papers and
their reference codes (dense SVDs of d_out×d_in deltas), never from distmerge's factor-space code; and
the identities those methods must keep (re-factorisation invariance above all)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from distmerge.config.schema import MergeSpec
from distmerge.methods import registry
from distmerge.methods.base import Factors, ModuleContext

MODULE = "model.layers.0.self_attn.q_proj"
SPACE_METHODS = [m.name for m in registry.all_methods() if m.space in ("core", "knots", "span")]


def _adapters(ranks=(3, 3, 2), m=24, n=20, weights=(0.7, -0.4, 0.5), seed=0) -> list[Factors]:
    g = torch.Generator().manual_seed(seed)
    return [Factors(a=torch.randn(r, n, generator=g), b=torch.randn(m, r, generator=g), scaling=0.5 + 0.25 * i,
                    weight=w, adapter=i) for i, (r, w) in enumerate(zip(ranks, weights))]


def _run(name: str, inputs, **spec) -> torch.Tensor:
    method = registry.get(name)
    m, n = inputs[0].b.shape[0], inputs[0].a.shape[1]
    merge = MergeSpec(method=name, **spec)
    rank = min(merge.svd_rank or sum(f.a.shape[0] for f in inputs), m, n)
    out = method(inputs, ModuleContext(MODULE, merge, rank))
    assert out.a.shape == (rank, n) and out.b.shape == (m, rank)
    return (out.b.double() @ out.a.double())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# --- dense float64 references -----------------------------------------------------------------------------


@dataclass
class Task:
    """One adapter on one module as the references see it: its dense ΔW = scaling·B·A (float64, LoRA
    layout d_out×d_in), its rank, its weight and index (which seeds DARE)."""

    delta: torch.Tensor
    rank: int
    weight: float
    adapter: int


def _tasks(inputs: list[Factors]) -> list[Task]:
    return [Task(_delta(f), f.a.shape[0], f.weight, f.adapter) for f in inputs]


def _delta(f: Factors) -> torch.Tensor:
    return f.scaling * f.b.double() @ f.a.double()


def _canonical_dense(t: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """B' = U S^½, A' = S^½ Vᵀ from the dense delta's SVD, its own rank r."""
    u, s, vh = torch.linalg.svd(t.delta)
    r = t.rank
    return u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]


def _ties_dense(tensors, weights, density):
    """TIES (Yadav et al. 2023) as PEFT weighs it: each task keeps its top-k magnitudes, the sign of the
    sum of kept values is elected, the weighted values agreeing with it are averaged over their count."""
    kept = []
    for t in tensors:
        flat = t.reshape(-1)
        k = int(density * flat.numel())
        mask = torch.zeros_like(flat)
        mask[flat.abs().argsort(descending=True)[:k]] = 1
        kept.append((flat * mask).reshape(t.shape))
    stack = torch.stack(kept)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(stack) == sign).double()
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * t.dim())
    return (stack * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def _dare_dense(tensors, tasks, density, space, seed, module):
    """DARE (Yu et al. 2024): drop each value with probability 1 - density, rescale the rest by 1/density;
    the draws come from the generator distmerge seeds by (seed, tensor name, adapter index)."""
    out = []
    for x, t in zip(tensors, tasks):
        g = ModuleContext(module, MergeSpec(seed=seed), 1).generator(f"{module}.{space}", t.adapter)
        mask = (torch.rand(x.numel(), generator=g) < density).double().reshape(x.shape)
        out.append(x * mask / density)
    return out


def _core_dense(tasks):
    """Core Space (task_merger.get_core_matrices): bases from SVDs of the stacked (canonical) factors,
    Mₜ = U_Bᵀ ΔWₜ V_Aᵀ."""
    canon = [_canonical_dense(t) for t in tasks]
    u_b = torch.linalg.svd(torch.cat([b for b, _ in canon], 1), full_matrices=False)[0]
    vh_a = torch.linalg.svd(torch.cat([a for _, a in canon], 0), full_matrices=False)[2]
    return u_b, [u_b.T @ t.delta @ vh_a.T for t in tasks], vh_a


def _knots_dense(tasks):
    """KnOTS (get_knots_components): SVD of [ΔW₁ … ΔW_T], σ kept above noise, task matrices ΣVₜ."""
    u, s, vh = torch.linalg.svd(torch.cat([t.delta for t in tasks], 1), full_matrices=False)
    k = int((s > s[0] * 1e-6).sum())
    n = tasks[0].delta.shape[1]
    return u[:, :k], [s[:k, None] * vh[:k, i * n:(i + 1) * n] for i in range(len(tasks))]


def _polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _tsv_dense(tasks):
    """TSV-M (TSVM_utils): per-task SVDs at the task's rank, concatenated, U and V orthogonalised."""
    us, ss, vs = [], [], []
    for t in tasks:
        u, s, vh = torch.linalg.svd(t.weight * t.delta, full_matrices=False)
        us.append(u[:, :t.rank])
        ss.append(s[:t.rank])
        vs.append(vh[:t.rank])
    return _polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _polar(torch.cat(vs, 0).T).T


def _iso_dense(tasks):
    """Iso-C (iso.py): the summed delta with its nonzero singular values set to their mean."""
    u, s, vh = torch.linalg.svd(sum(t.weight * t.delta for t in tasks), full_matrices=False)
    k = int((s > s[0] * 1e-6).sum())
    return s[:k].mean() * u[:, :k] @ vh[:k]


def _iso_cts_dense(tasks, fraction):
    """Iso-CTS (the reference's iso_cts), over the merged delta's rank k instead of min(m, n)."""
    deltas = [t.weight * t.delta for t in tasks]
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    k = int((s > s[0] * 1e-6).sum())
    n_tasks = len(deltas)
    common = int(k * fraction)
    per_task = min(k // n_tasks, round((k - common) / n_tasks))
    common = k - n_tasks * per_task
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    for d in deltas:
        tu, ts, tvh = torch.linalg.svd(d - u[:, :common] @ u[:, :common].T @ d, full_matrices=False)
        us.append(tu[:, :per_task])
        ss.append(ts[:per_task])
        vs.append(tvh[:per_task])
    return torch.cat(ss).mean() * _polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 0).T).T


def reference(name: str, tasks: list[Task], density=0.5, seed=3, fraction=0.8, module=MODULE) -> torch.Tensor:
    """The merged ΔW of method `name`, from dense deltas only."""
    w = [t.weight for t in tasks]
    if name.startswith("core_"):
        u_b, cores, vh_a = _core_dense(tasks)
        rule = name[len("core_"):]
        if rule == "ties":
            merged = _ties_dense(cores, w, density)
        elif rule == "dare_ties":
            merged = _ties_dense(_dare_dense(cores, tasks, density, "core", seed, module), w, 1.0)
        elif rule == "dare_linear":
            merged = sum(x * wt for x, wt in zip(_dare_dense(cores, tasks, density, "core", seed, module), w))
        else:
            return {"tsv": _tsv_dense, "iso": _iso_dense}[rule](tasks)
        return u_b @ merged @ vh_a
    if name.startswith("knots_"):
        u, reps = _knots_dense(tasks)
        if name == "knots_dare_ties":
            reps = _dare_dense(reps, tasks, density, "knots", seed, module)
        return u @ _ties_dense(reps, w, 1.0 if name == "knots_dare_ties" else density)
    if name == "tsv":
        return _tsv_dense(tasks)
    if name == "iso_c":
        return _iso_dense(tasks)
    if name == "iso_cts":
        return _iso_cts_dense(tasks, fraction)
    raise KeyError(name)


def _spec(name: str) -> dict:
    return {"density": 0.5, "seed": 3} if "density" in registry.get(name).params else {}


@pytest.mark.parametrize("name", SPACE_METHODS)
def test_matches_dense_reference(name):
    inputs = _adapters()
    err = _rel(_run(name, inputs, **_spec(name)), reference(name, _tasks(inputs)))
    assert err <= 1e-5, f"{name}: relative error {err:.2e} against the dense reference"


@pytest.mark.parametrize("name", SPACE_METHODS)
def test_refactorisation_does_not_change_the_output(name):
    """B·R, R⁻¹·A is the same ΔW; every method here must give the same output for it."""
    inputs = _adapters()
    g = torch.Generator().manual_seed(7)
    moved = []
    for f in inputs:
        r = f.a.shape[0]
        q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        mix = q1 @ torch.diag(torch.exp(torch.rand(r, generator=g, dtype=torch.float64) * 2 - 1)) @ q2
        moved.append(Factors(a=(torch.linalg.inv(mix) @ f.a.double()).float(), b=(f.b.double() @ mix).float(),
                             scaling=f.scaling, weight=f.weight, adapter=f.adapter))
    err = _rel(_run(name, moved, **_spec(name)), _run(name, inputs, **_spec(name)))
    assert err <= 1e-5, f"{name}: re-factorised inputs moved the output by {err:.2e}"


def test_peft_ties_changes_under_refactorisation():
    """The property above is not free: PEFT's ties (A and B merged apart) gives another ΔW for B·R, R⁻¹·A."""
    from peft.utils.merge_utils import ties

    inputs = _adapters(ranks=(3, 3, 3))
    g = torch.Generator().manual_seed(7)
    mixes = [torch.randn(3, 3, generator=g) + 2 * torch.eye(3) for _ in inputs]

    def peft_ties(fs, rs):
        w = torch.tensor([f.weight * f.scaling for f in fs])
        a = ties(torch.stack([torch.linalg.inv(r) @ f.a for f, r in zip(fs, rs)]), w.abs().sqrt() * w.sign(), 0.5)
        b = ties(torch.stack([f.b @ r for f, r in zip(fs, rs)]), w.abs().sqrt(), 0.5)
        return b.double() @ a.double()

    assert _rel(peft_ties(inputs, mixes), peft_ties(inputs, [torch.eye(3)] * 3)) > 1e-2
    moved = [Factors(a=torch.linalg.inv(r) @ f.a, b=f.b @ r, scaling=f.scaling, weight=f.weight, adapter=f.adapter)
             for f, r in zip(inputs, mixes)]
    assert _rel(_run("core_ties", moved, density=0.5), _run("core_ties", inputs, density=0.5)) <= 1e-5


def test_core_space_with_sum_is_cat():
    """Core Space is lossless: a plain weighted sum of the cores is the exact sum of the deltas."""
    from distmerge.methods.spaces import ELEMENTWISE, elementwise, merge_in_space

    inputs = _adapters()
    ctx = ModuleContext(MODULE, MergeSpec(), 8)
    out = merge_in_space(inputs, ctx, "core", elementwise(ELEMENTWISE["sum"]))
    cat = sum(f.weight * _delta(f) for f in inputs)
    assert _rel(out.b.double() @ out.a.double(), cat) <= 1e-5


def test_spectral_rules_do_not_depend_on_the_basis():
    """core_tsv and core_iso are tsv and iso_c: the Core Space bases are orthonormal (the paper's claim)."""
    inputs = _adapters()
    assert _rel(_run("core_tsv", inputs), _run("tsv", inputs)) <= 1e-5
    assert _rel(_run("core_iso", inputs), _run("iso_c", inputs)) <= 1e-5


@pytest.mark.parametrize("name", [n for n in SPACE_METHODS if not n.startswith("iso") and n != "core_iso"])
def test_single_adapter_returns_its_delta(name):
    """One adapter, weight 1 (density 1 where the method prunes): its own ΔW. Iso methods flatten the
    spectrum by definition, so they are left out."""
    [f] = _adapters(ranks=(3,), weights=(1.0,))
    spec = {"density": 1.0} if "density" in registry.get(name).params else {}
    assert _rel(_run(name, [f], **spec), _delta(f)) <= 1e-5


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "core_tsv", "core_iso"])
def test_zero_weight_adapter_changes_nothing(name):
    """Weights (1, 0) equal the first adapter alone, for the spectral methods. Not for TIES: PEFT's
    sign election votes on the unweighted values, so a zero-weight task still votes and is counted."""
    pair = _adapters(ranks=(3, 2), weights=(1.0, 0.0))
    assert _rel(_run(name, pair), _run(name, pair[:1])) <= 1e-5


def test_svd_rank_truncates_and_records_the_error():
    inputs = _adapters()
    method = registry.get("core_ties")
    full = method(inputs, ModuleContext(MODULE, MergeSpec(density=0.5), 8))
    cut = method(inputs, ModuleContext(MODULE, MergeSpec(density=0.5, svd_rank=3), 3))
    assert cut.a.shape[0] == 3 and cut.stats["svd_truncation_error"] > 0
    u, s, vh = torch.linalg.svd(full.b.double() @ full.a.double())
    best = u[:, :3] * s[:3] @ vh[:3]
    assert _rel(cut.b.double() @ cut.a.double(), best) <= 1e-5
    assert abs(cut.stats["svd_truncation_error"] - float(s[3:].norm() / s.norm())) <= 1e-5


# --- the parity harness's adapter variants, through real files, loaded back by PEFT ------------------------

VARIANT_CASES = [("llama", "core_ties"), ("llama", "core_dare_ties"), ("llama", "knots_dare_ties"),
                 ("llama", "core_dare_linear"), ("negative_weights", "knots_ties"), ("rslora", "tsv"),
                 ("patterns", "iso_cts"), ("embedding", "core_tsv"), ("bf16", "iso_c"), ("fp16", "iso_cts"),
                 ("gpt2_conv1d", "knots_ties"), ("conv2d", "core_ties"), ("different_targets", "tsv"),
                 ("mixed_ranks", "core_iso")]


def _lora_layout(module, adapter: str, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's delta weight in LoRA's B·A layout (d_out × d_in·k·k): fan_in_fan_out and embedding deltas are
    stored transposed, conv deltas 4-D."""
    if getattr(module, "fan_in_fan_out", False) or adapter in getattr(module, "lora_embedding_A", {}):
        delta = delta.T
    return delta.reshape(delta.shape[0], -1).double()


def _peft_tasks(base, paths, weights) -> dict[str, list[Task]]:
    """Each module's tasks, from PEFT's own loading of each adapter (its scaling, rsLoRA, patterns)."""
    from peft import PeftModel

    from tests.peft_oracle import lora_layers

    found: dict[str, list[Task]] = {}
    for i, (path, w) in enumerate(zip(paths, weights)):
        model = PeftModel.from_pretrained(base(), str(path))
        with torch.no_grad():
            for name, module in lora_layers(model, "default"):
                delta = _lora_layout(module, "default", module.get_delta_weight("default").float())
                found.setdefault(name, []).append(Task(delta, module.r["default"], w, i))
    return found


@pytest.mark.parametrize("variant,name", VARIANT_CASES)
def test_adapter_variants_load_in_peft_and_match_the_reference(adapter_sets, tmp_path, variant, name):
    import distmerge
    from tests.conftest import BASES, merge_config
    from tests.peft_oracle import load_merged, lora_layers

    aset = adapter_sets(variant)
    distmerge.merge(merge_config(aset, tmp_path / "out", name, output={"dtype": "float32"}, **_spec(name)))
    ours, model = load_merged(BASES[aset.base], tmp_path / "out")
    layers = dict(lora_layers(model, "default"))
    tasks = _peft_tasks(BASES[aset.base], aset.paths, aset.weights)
    assert set(ours) == set(tasks)
    for module, group in tasks.items():
        expected = reference(name, group, module=module)
        err = _rel(_lora_layout(layers[module], "default", ours[module]), expected)
        assert err <= 1e-5, f"{variant} {name} {module}: relative error {err:.2e}"


def test_methods_command_shows_space_rule_rank_and_source(capsys):
    from distmerge.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("core_ties"):out.index("core_dare_ties")]
    assert "sum of ranks, or svd_rank" in block and "space/rule: core/ties" in block
    assert "params: weight, density, majority_sign_method, svd_rank, svd_clamp" in block and "Core Space" in block
    assert "space/rule: span/iso_cts" in out and "iso_common_fraction" in out
    assert "space/rule: full/della, then svd" in out and "della_epsilon" in out and "mergekit" in out
