"""Bad inputs: one clear line naming adapter, tensor and fix; exit code 2; no traceback; nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.cli import main
from tests.conftest import make_adapter

Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def pair(adapter_sets, tmp_path):
    """Fresh copies of two good adapters, to break one of them."""
    aset = adapter_sets("llama")
    paths = []
    for i, p in enumerate(aset.paths[:2]):
        paths.append(tmp_path / f"in{i}")
        shutil.copytree(p, paths[-1])
    return paths


def _run(tmp_path, paths, capsys, method="ties", extra=()):
    cfg = {"adapters": [{"path": str(p), "weight": 0.5} for p in paths],
           "merge": {"method": method, "density": 0.5}, "output": {"path": str(tmp_path / "out")},
           "runtime": {"executor": "local", "progress": False}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    code = main(["merge", str(tmp_path / "cfg.yaml"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.distmerge-*")), "staging left behind"
    return err


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn):
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_different_base_models(pair, tmp_path, capsys):
    _edit_config(pair[1], base_model_name_or_path="other/model")
    err = _run(tmp_path, pair, capsys)
    assert "in1" in err and "'other/model'" in err and "base_model_name_or_path" in err


def test_not_lora(pair, tmp_path, capsys):
    _edit_config(pair[0], peft_type="IA3")
    assert "peft_type is 'IA3'" in _run(tmp_path, pair, capsys)


def test_dora_is_refused(adapter_sets, tmp_path, capsys):
    dora = make_adapter(tmp_path / "dora", "llama", seed=1, r=4, target_modules=["q_proj"], use_dora=True)
    assert "use_dora" in _run(tmp_path, [adapter_sets("llama").paths[0], dora], capsys)


def test_lora_bias_is_refused(pair, tmp_path, capsys):
    _edit_config(pair[1], lora_bias=True)
    assert "lora_bias" in _run(tmp_path, pair, capsys)


def test_modules_to_save_in_two_adapters(tmp_path, capsys):
    paths = [make_adapter(tmp_path / f"m{i}", "llama", seed=i, r=4, target_modules=["q_proj"],
                          modules_to_save=["lm_head"]) for i in range(2)]
    err = _run(tmp_path, paths, capsys)
    assert "base_model.model.lm_head.weight" in err and "modules_to_save" in err


def test_incompatible_shapes(pair, tmp_path, capsys):
    _edit_tensors(pair[1], lambda t: t.__setitem__(Q_B, torch.randn(40, 4)))
    err = _run(tmp_path, pair, capsys)
    assert "self_attn.q_proj" in err and "[40, 4]" in err and "in1" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(pair, tmp_path, capsys, bad):
    def poison(t):
        t[Q_B][1, 2] = bad
    _edit_tensors(pair[0], poison)
    err = _run(tmp_path, pair, capsys)
    assert Q_B in err and "NaN/Inf" in err and "in0" in err


def test_missing_weights(pair, tmp_path, capsys):
    (pair[1] / "adapter_model.safetensors").unlink()
    assert "has no adapter_model.safetensors" in _run(tmp_path, pair, capsys)


def test_truncated_file(pair, tmp_path, capsys):
    f = pair[0] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    err = _run(tmp_path, pair, capsys)
    assert "corrupt or truncated" in err and "in0" in err


def test_pickle_checkpoint_is_not_loaded(pair, tmp_path, capsys):
    f = pair[1] / "adapter_model.safetensors"
    f.rename(pair[1] / "adapter_model.bin")
    assert "pickle" in _run(tmp_path, pair, capsys)


def test_config_disagreeing_with_weights(pair, tmp_path, capsys):
    _edit_config(pair[0], r=8)
    assert "config and the weights disagree" in _run(tmp_path, pair, capsys)


def test_existing_output_is_not_overwritten(pair, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    cfg = {"adapters": [{"path": str(p)} for p in pair], "merge": {"method": "linear"},
           "output": {"path": str(tmp_path / "out")}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    assert main(["merge", str(tmp_path / "cfg.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep").read_text() == "x"
    # overwrite replaces only what distmerge wrote: a directory holding the user's file stays as it is
    assert main(["merge", str(tmp_path / "cfg.yaml"), "output.overwrite=true", "runtime.progress=false"]) == 2
    assert "not a distmerge output" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep"]
