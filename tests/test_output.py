"""The output: PEFT-loadable, sharded or consolidated by byte copy, reproducible, with a manifest."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distmerge
from distmerge.output.assemble import consolidate
from tests.conftest import BASES, make_adapter, merge_config
from tests.peft_oracle import load_merged, rel_err


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear_svd", "ties_svd", "cat"])
def test_same_bytes_however_the_work_is_split(adapter_sets, tmp_path, method):
    aset = adapter_sets("different_targets")
    outs, splits = [], []
    for i, shard_size in enumerate(["2GB", "5KB", "1"]):  # a few tasks … one task per module
        out = tmp_path / f"o{i}"
        distmerge.merge(merge_config(aset, out, method, density=0.4, seed=11, output={"shard_size": shard_size}))
        outs.append(_sha(out / "adapter_model.safetensors"))
        splits.append(len(json.loads((out / "distmerge.json").read_text())["shards"]))
    assert len(set(splits)) == 3, splits
    assert len(set(outs)) == 1
    other = tmp_path / "seed"
    distmerge.merge(merge_config(aset, other, method, density=0.4, seed=12))
    # the seed changes the tensors of DARE only (the file's bytes always differ: its metadata holds the recipe)
    assert (_tensors_sha(other) != _tensors_sha(tmp_path / "o0")) == method.startswith("dare")


def _tensors_sha(out) -> str:
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        return hashlib.sha256(b"".join(f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys()))).hexdigest()


def test_shards_index_and_consolidation(adapter_sets, tmp_path):
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "one", "ties", density=0.5))
    distmerge.merge(merge_config(aset, tmp_path / "many", "ties", density=0.5,
                                 output={"shard_size": "2KB", "consolidate": False}))
    many = tmp_path / "many"
    index = json.loads((many / "adapter_model.safetensors.index.json").read_text())
    files = sorted(p.name for p in many.glob("adapter_model-*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"adapter_model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    sizes = {}
    for f in files:
        with safe_open(str(many / f), "pt") as h:
            sizes[f] = sum(h.get_tensor(k).numel() * 4 for k in h.keys())
            assert all(index["weight_map"][k] == f for k in h.keys())
        assert sizes[f] <= 2000 or len(index["weight_map"]) == n
    assert index["metadata"]["total_size"] == sum(sizes.values())
    consolidate(str(many))
    assert sorted(p.name for p in many.glob("*.safetensors")) == ["adapter_model.safetensors"]
    assert not (many / "adapter_model.safetensors.index.json").exists()
    assert _sha(many / "adapter_model.safetensors") == _sha(tmp_path / "one" / "adapter_model.safetensors")


def test_dtype_follows_inputs_unless_set(adapter_sets, tmp_path):
    aset = adapter_sets("bf16")
    distmerge.merge(merge_config(aset, tmp_path / "keep", "linear"))
    distmerge.merge(merge_config(aset, tmp_path / "f32", "linear", output={"dtype": "float32"}))
    keep = load_file(str(tmp_path / "keep" / "adapter_model.safetensors"))
    f32 = load_file(str(tmp_path / "f32" / "adapter_model.safetensors"))
    assert {t.dtype for t in keep.values()} == {torch.bfloat16} and {t.dtype for t in f32.values()} == {torch.float32}
    for k in keep:  # math in float32, rounded once at the end
        assert torch.equal(keep[k], f32[k].to(torch.bfloat16))


def test_manifest(adapter_sets, tmp_path):
    aset = adapter_sets("llama")
    result = distmerge.merge(merge_config(aset, tmp_path / "out", "ties_svd", density=0.5, svd_rank=2))
    m = json.loads((tmp_path / "out" / "distmerge.json").read_text())
    assert m == result.manifest and m["distmerge_version"] == distmerge.__version__
    assert m["config"]["merge"]["method"] == "ties_svd" and m["config"]["merge"]["svd_rank"] == 2
    for entry, path in zip(m["inputs"], aset.paths):
        f = entry["files"][0]
        assert f["sha256"] == _sha(path / "adapter_model.safetensors")
    outs = {o["file"]: o for o in m["outputs"]}
    assert set(outs) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}  # the card is listed too
    assert outs["adapter_model.safetensors"]["sha256"] == _sha(tmp_path / "out" / "adapter_model.safetensors")
    assert m["seconds"]["total"] > 0 and m["shards"] and all("worker" in s for s in m["shards"])
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for module, stats in m["modules"].items():
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        assert stats["delta_norm"] == pytest.approx(float((b @ a).norm()), rel=1e-4)
        assert 0.45 < stats["kept_fraction"] <= 0.5
        assert 0 < stats["svd_truncation_error"] < 1
        assert stats["svd_energy_kept"] == pytest.approx(1 - stats["svd_truncation_error"] ** 2, rel=1e-4)


def test_rank_pattern_only_where_rank_differs(adapter_sets, tmp_path):
    aset = adapter_sets("different_targets")  # q: a0+a2, v: a0+a1, o: a1, up: a1+a2 — all rank 4
    distmerge.merge(merge_config(aset, tmp_path / "out", "cat"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 4 for i in range(2)}
    assert cfg["target_modules"] == ["o_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["use_rslora"] is False and cfg["base_model_name_or_path"] == "tiny-base"
    # ‖B·A‖ costs O(rank²): kept where a module is one adapter's rank 4, dropped where cat makes it 8
    stats = json.loads((tmp_path / "out" / "distmerge.json").read_text())["modules"]
    assert {m: "delta_norm" in s for m, s in stats.items()} == {m: s["rank"] == 4 for m, s in stats.items()}


def test_modules_to_save_in_one_adapter_is_carried(adapter_sets, tmp_path):
    plain = adapter_sets("llama").paths[0]
    saved = make_adapter(tmp_path / "saved", "llama", seed=5, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"])
    aset = type(adapter_sets("llama"))("llama", [plain, saved], [0.5, 0.5])
    distmerge.merge(merge_config(aset, tmp_path / "out", "linear"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    _, model = load_merged(BASES["llama"], tmp_path / "out")
    expected = load_file(str(saved / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    got = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(got, expected)
    assert rel_err(got, BASES["llama"]().lm_head.weight) > 0.1  # really the trained head, not the base's
