"""Diffusion LoRAs: diffusers and kohya files in and out, checked against diffusers' own set_adapters + fuse_lora.

The LoRAs are made and saved by diffusers itself (save_lora_weights, convert_state_dict_to_diffusers,
convert_state_dict_to_kohya) on a tiny UNet2DConditionModel and CLIP text encoder built from configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import distmerge  # noqa: E402
from distmerge.adapters import weights  # noqa: E402
from distmerge.adapters.formats import unflatten  # noqa: E402
from distmerge.config.load import load_config  # noqa: E402
from distmerge.errors import AdapterError, ConfigError  # noqa: E402
from tests.diffusion_oracle import fused, make_lora, max_rel_err, pipeline, weights_of  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
BLOCKS = {"unet": {"down": 0.9, "up": {"block_0": 0.6, "block_1": [0.4, 0.8]}}, "text_encoder": 0.5}
TOL = 1e-5


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Three LoRAs of one tiny pipeline, one per spelling: (path, text-encoder ΔW by PEFT)."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "peft": make_lora(root / "peft", seed=1, r=4, alpha=8),  # lora_A/lora_B + lora_adapter_metadata
        "diffusers": make_lora(root / "diffusers", seed=2, r=2, alpha=2, spelling="diffusers"),  # lora.down
        "kohya": make_lora(root / "kohya", seed=3, r=4, alpha=2, spelling="kohya"),  # alpha/rank = 0.5
        "unet_only": make_lora(root / "unet_only", seed=4, r=3, alpha=6, text_encoder=False),
    }


@pytest.fixture(scope="module")
def base():
    return weights_of(pipeline())


def _merge(tmp_path, adapters, method="cat", merge=None, **output):
    cfg = {"adapters": adapters, "merge": {"method": method, **(merge or {})},
           "output": {"path": str(tmp_path / "out"), "model_card": False, **output},
           "runtime": {"executor": "local", "progress": False}}
    return distmerge.merge(cfg)


@pytest.mark.parametrize("method", ["linear", "ties", "ties_svd"])
def test_methods_equal_peft_add_weighted_adapter_on_the_unet(loras, base, tmp_path, method):
    """As diffusers' guide does for the other methods: PEFT's add_weighted_adapter on the UNet (the same
    LoRAs as PEFT directories) against distmerge's merge of the diffusers and kohya files, loaded by diffusers."""
    from tests.peft_oracle import peft_merge, rel_err

    (a, _), (c, _) = loras["peft"], loras["kohya"]
    kwargs = {"density": 0.5} if "ties" in method else {}
    result = _merge(tmp_path, [{"path": str(a), "weight": 0.6}, {"path": str(c), "weight": 0.5}], method=method,
                    merge=kwargs, format="diffusers")
    assert result.method == method
    got = fused([(Path(result.path), 1.0)])
    theirs = peft_merge(lambda: pipeline().unet, [a.parent / "peft_unet_peft", c.parent.parent / "kohya_unet_peft"],
                        [0.6, 0.5], method, **kwargs)
    assert len(theirs) > 40
    for name, delta in theirs.items():
        key = "unet." + name.removeprefix("base_model.model.") + ".weight"
        ours = got[key].double() - base[key].double()
        err = rel_err(ours.flatten(), delta.double().flatten())
        assert err <= (1e-3 if method.endswith("svd") else TOL), (name, err)


def _file_deltas(out: Path) -> dict[str, torch.Tensor]:
    """Each module's ΔW in an output file, by the format's own rules, written here from the formats' docs:
    kohya alpha/rank from the alpha tensor; diffusers alpha/r from lora_adapter_metadata. Keys: kohya's names."""
    from safetensors import safe_open

    file = next(out.glob("*.safetensors"))
    with safe_open(str(file), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    deltas = {}
    for k, down in sd.items():
        if k.endswith(".lora_down.weight"):  # kohya
            m = k[:-len(".lora_down.weight")]
            up, alpha = sd[f"{m}.lora_up.weight"], float(sd[f"{m}.alpha"])
        elif k.endswith(".lora_A.weight"):  # diffusers
            m = k[:-len(".lora_A.weight")]
            up = sd[f"{m}.lora_B.weight"]
            component, path = m.split(".", 1)
            cfg = {key.split(".", 1)[1]: v for key, v in json.loads(meta["lora_adapter_metadata"]).items()
                   if key.startswith(component + ".")}
            alpha = cfg["alpha_pattern"].get(path, cfg["lora_alpha"]) / cfg["rank_pattern"].get(path, cfg["r"])
            alpha *= down.shape[0]
            m = {"unet": "lora_unet_", "text_encoder": "lora_te1_"}[component] + path.replace(".", "_")
        else:
            continue
        deltas[m] = alpha / down.shape[0] * (up.flatten(1).double() @ down.flatten(1).double())
    return deltas


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_cat_equals_set_adapters_and_fuse_lora(loras, base, tmp_path, fmt):
    """The seed's route (load_lora_weights, set_adapters with block scales, fuse_lora) against distmerge's cat
    output loaded alone and fused: all three spellings, mixed, a negative weight, and diffusers' block dict."""
    (a, te_a), (b, te_b), (c, te_c) = loras["peft"], loras["diffusers"], loras["kohya"]
    result = _merge(tmp_path, [{"path": str(a), "weight": 1.0, "block_weights": BLOCKS},
                               {"path": str(b), "weight": -0.4}, {"path": str(c), "weight": 1.1}], format=fmt)
    out = Path(result.path)
    want = fused([(a, BLOCKS), (b, -0.4), (c, 1.1)])
    target = next(out.glob("*.safetensors")) if fmt == "kohya" else out
    got = fused([(target, 1.0)])
    err, changed = max_rel_err({k: v for k, v in got.items() if k.startswith("unet.")},
                               {k: v for k, v in want.items() if k.startswith("unet.")}, base)
    assert changed > 40 and err <= TOL, (err, changed)
    # the text encoder: PEFT's ΔW of each LoRA as made, weighted by hand (text_encoder: 0.5 for the first)
    deltas = _file_deltas(out)
    for name in te_a:
        key = "lora_te1_" + name[len("text_encoder."):-len(".weight")].replace(".", "_")
        expect = 0.5 * te_a[name] - 0.4 * te_b.get(name, torch.zeros(())) + 1.1 * te_c[name]
        assert float((deltas[key] - expect.double()).norm() / expect.double().norm()) <= TOL, key
    # the recipe and the input hashes travel in the file
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["distmerge.recipe"])
    manifest = json.loads((out / "distmerge.json").read_text())
    assert recipe["merge"] == manifest["recipe"]["merge"]
    assert [a["sha256"] for a in recipe["adapters"]] == [[f["sha256"] for f in x["files"]] for x in manifest["inputs"]]
    assert [x["format"] for x in recipe["adapters"]] == ["diffusers", "diffusers", "kohya"]
    assert recipe["adapters"][0]["block_weights"] == BLOCKS and recipe["output_format"] == fmt
    assert [a["weight"] for a in recipe["adapters"]] == [1.0, -0.4, 1.1]
    if fmt == "kohya":
        assert meta["ss_network_dim"] == str(result.rank) and meta["ss_network_alpha"] == str(result.rank)


def test_round_trip_peft_diffusers_kohya_peft(loras, base, tmp_path):
    """PEFT → diffusers → kohya → PEFT, each hop re-reading the previous output: ΔW unchanged at every hop,
    through diffusers' loader (diffusers, kohya) and PEFT's (PEFT). The start is the UNet LoRA as a PEFT
    directory (PEFT's config and state dict), named as the pipeline's unet by component."""
    from peft import PeftModel

    src, _ = loras["unet_only"]
    want = {k: v for k, v in fused([(src, 1.0)]).items() if k.startswith("unet.")}  # the same LoRA, by diffusers
    current = src.parent / "unet_only_unet_peft"
    for i, fmt in enumerate(["diffusers", "kohya", "peft"]):
        spec = {"path": str(current), **({"component": "unet"} if i == 0 else {})}
        out = Path(_merge(tmp_path / f"hop{i}", [spec], format=fmt).path)
        if fmt == "peft":
            unet = PeftModel.from_pretrained(pipeline().unet, str(out)).merge_and_unload()
            got = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        else:
            got = fused([(next(out.glob("*.safetensors")) if fmt == "kohya" else out, 1.0)])
        err, changed = max_rel_err(got, want, base)
        assert changed > 40 and err <= TOL, (fmt, err)
        current = out  # a kohya output directory is read as its one .safetensors file
    # the default output format is the inputs' own
    r = _merge(tmp_path / "default", [{"path": str(src)}], model_card=True)
    assert (Path(r.path) / "pytorch_lora_weights.safetensors").is_file()
    card = (Path(r.path) / "README.md").read_text()
    assert "load_lora_weights" in card and "PeftModel" not in card
    with pytest.raises(AdapterError, match="component: unet"):  # a PEFT UNet adapter must say it is one
        _merge(tmp_path / "nocomp", [{"path": str(src.parent / "unet_only_unet_peft")}], format="diffusers")


def _save(path: Path, tensors: dict, metadata=None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _kohya_pair(prefix="lora_unet_down_blocks_0_attentions_0_proj_in", rows=32):
    return {f"{prefix}.lora_down.weight": torch.randn(2, rows), f"{prefix}.lora_up.weight": torch.randn(rows, 2),
            f"{prefix}.alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("extra, needle", [
    ({"lora_unet_x.weird": torch.zeros(1)}, "'lora_unet_x.weird', which is not a kohya LoRA key"),
    ({"lora_unet_y.hada_w1_a": torch.zeros(2, 2)}, "LyCORIS LoHa"),
    ({"lora_unet_y.lokr_w1": torch.zeros(2, 2)}, "LyCORIS LoKr"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.zeros(1, 32)}, "DoRA"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 2)}, "Flux"),
    ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 2)}, "sgm"),
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, "not both factors"),
])
def test_refused_with_file_and_key(tmp_path, extra, needle):
    f = _save(tmp_path / "in" / "bad.safetensors", {**_kohya_pair(), **extra})
    with pytest.raises(AdapterError) as e:
        _merge(tmp_path, [{"path": str(f)}])
    assert needle in str(e.value) and str(f) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_mixed_bases_refused(tmp_path, adapter_sets):
    a = _save(tmp_path / "a.safetensors", _kohya_pair(), {"ss_base_model_version": "sd_v1"})
    b = _save(tmp_path / "b.safetensors", _kohya_pair(), {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(AdapterError, match="sd_v1") as e:
        _merge(tmp_path, [{"path": str(a)}, {"path": str(b)}])
    assert "ss_base_model_version" in str(e.value) and str(b) in str(e.value)
    c = _save(tmp_path / "c.safetensors", _kohya_pair(rows=64))  # the same module, another width
    with pytest.raises(AdapterError) as e:
        _merge(tmp_path, [{"path": str(a)}, {"path": str(c)}])
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in str(e.value) and str(c) in str(e.value)
    with pytest.raises(AdapterError, match="PEFT directory"):  # a PEFT LLM adapter with a diffusion LoRA
        _merge(tmp_path, [{"path": str(adapter_sets("llama").paths[0])}, {"path": str(c)}])
    assert not (tmp_path / "out").exists()


def test_kohya_keys_both_ways():
    from distmerge.adapters.formats import FORMATS

    kohya = FORMATS["kohya"]
    for key, module in (("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                         ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "B")),
                        ("lora_te_text_model_encoder_layers_3_self_attn_out_proj.alpha",
                         ("text_encoder.text_model.encoder.layers.3.self_attn.out_proj", "alpha")),
                        ("lora_unet_mid_block_attentions_0_proj_out.lora_down.weight",
                         ("unet.mid_block.attentions.0.proj_out", "A"))):
        assert kohya.parse(key) == module
        assert kohya.key(*module) == key.replace("lora_te_", "lora_te1_")


def test_unflatten_matches_diffusers_names():
    assert unflatten("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert unflatten("up_blocks_0_resnets_2_time_emb_proj") == "up_blocks.0.resnets.2.time_emb_proj"
    assert unflatten("text_model_encoder_layers_11_self_attn_q_proj") == "text_model.encoder.layers.11.self_attn.q_proj"


def test_config_errors(tmp_path, loras):
    path = str(loras["peft"][0])
    bad = {"adapters": [{"path": path, "format": "kohay", "module_weights": {"(": 1.0}, "component": "unte",
                         "block_weights": {"unet": {"side": 1.0}, "text_encoder": {"x": 1}}, "layer_weights": []}],
           "output": {"path": str(tmp_path / "o"), "format": "difusers"}}
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    text = "\n".join(e.value.problems)
    for needle in ("adapters[0].format", "did you mean 'kohya'", "module_weights: '(' is not a valid regular",
                   "block_weights.unet: unknown part 'side'", "block_weights.text_encoder: expected a number",
                   "layer_weights: expected a non-empty list", "output.format", "did you mean 'diffusers'",
                   "adapters[0].component", "did you mean 'unet'"):
        assert needle in text, (needle, text)


def test_a_block_scale_dict_as_the_weight_means_block_weights(tmp_path, loras):
    """set_adapters takes the block-scale dict in the weight's place; a config may too."""
    path = str(loras["peft"][0])
    scales = {"unet": {"down": 0.9, "up": {"block_0": 0.6}}, "text_encoder": 0.5}
    out = {"path": str(tmp_path / "o")}
    as_weight = load_config({"adapters": [{"path": path, "weight": scales}], "output": out})
    as_key = load_config({"adapters": [{"path": path, "block_weights": scales}], "output": out})
    assert as_weight.adapters == as_key.adapters and as_weight.adapters[0].weight == 1.0
    with pytest.raises(ConfigError, match=r"adapters\[0\]\.weight: a block-scale dict here means block_weights"):
        load_config({"adapters": [{"path": path, "weight": scales, "block_weights": scales}]})


def test_layer_interpolation_is_mergekits():
    keys = {f"m.layers.{i}.q": f"m.layers.{i}.q" for i in range(5)} | {"m.norm": "m.norm"}
    got = weights.layer_factors([0.0, 1.0, 0.0], keys)
    assert got == pytest.approx({"m.layers.0.q": 0.0, "m.layers.1.q": 0.5, "m.layers.2.q": 1.0,
                                 "m.layers.3.q": 0.5, "m.layers.4.q": 0.0})
    assert "m.norm" not in got


def test_block_scales_follow_set_adapters():
    """diffusers' expansion and lookup, by hand, on the module names of a two-block UNet."""
    names = [f"unet.{p}" for p in (
        "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.proj_in",
        "mid_block.resnets.0.conv1", "up_blocks.1.attentions.0.proj_in", "up_blocks.1.attentions.1.proj_in",
        "up_blocks.1.resnets.1.conv1", "up_blocks.0.attentions.2.proj_in")] + ["text_encoder.encoder.layers.0.fc1"]
    got = weights.block_factors({"unet": {"down": 0.9, "mid": 0.7, "up": {"block_1": [0.4, 0.8]}},
                                 "text_encoder": 0.5}, {n: n for n in names})
    assert got == {"unet.down_blocks.0.attentions.0.proj_in": 0.9, "unet.down_blocks.0.resnets.0.conv1": 0.9,
                   "unet.mid_block.attentions.0.proj_in": 0.7, "unet.mid_block.resnets.0.conv1": 1.0,
                   "unet.up_blocks.1.attentions.0.proj_in": 0.4, "unet.up_blocks.1.attentions.1.proj_in": 0.8,
                   "unet.up_blocks.1.resnets.1.conv1": 0.8, "unet.up_blocks.0.attentions.2.proj_in": 1.0,
                   "text_encoder.encoder.layers.0.fc1": 0.5}


def test_block_list_shorter_than_the_blocks_layers_is_refused():
    names = {f"unet.up_blocks.1.attentions.{j}.proj_in": f"unet.up_blocks.1.attentions.{j}.proj_in" for j in range(3)}
    with pytest.raises(ValueError, match="block_1 has 2 values, but the adapter has 3 transformer layers"):
        weights.block_factors({"unet": {"up": {"block_1": [0.5, 0.7]}}}, names)
    assert weights.block_factors({"unet": {"up": {"block_1": [0.5]}}}, names) == {n: 0.5 for n in names}


def test_module_and_layer_weights_through_peft(adapter_sets, tmp_path):
    """Per-module weights on PEFT adapters: each merged module's ΔW (loaded by PEFT) is Σ wᵢ·mᵢ·ΔWᵢ with every
    mᵢ written out by hand; first pattern wins, layer_weights multiply on top."""
    from tests.conftest import llama_base
    from tests.peft_oracle import load_merged

    aset = adapter_sets("llama")  # q_proj, v_proj, down_proj on 2 layers; r=4, alpha=8
    mw = {r"self_attn\.q_proj": 0.5, r"layers\.1\.": 2.0, r"v_proj": -1.0}
    _merge(tmp_path, [{"path": str(aset.paths[0]), "weight": 0.8, "module_weights": mw},
                      {"path": str(aset.paths[1]), "weight": 0.3, "layer_weights": [1.0, 0.25]}])
    hand0 = {"layers.0.self_attn.q_proj": 0.5, "layers.1.self_attn.q_proj": 0.5, "layers.0.self_attn.v_proj": -1.0,
             "layers.1.self_attn.v_proj": 2.0, "layers.0.mlp.down_proj": 1.0, "layers.1.mlp.down_proj": 2.0}
    hand1 = {k: 1.0 if k.startswith("layers.0.") else 0.25 for k in hand0}
    inputs = [load_merged(llama_base, p)[0] for p in aset.paths[:2]]
    out, _ = load_merged(llama_base, tmp_path / "out")
    assert len(out) == 6
    for name, delta in out.items():
        short = name.split("model.model.")[-1].removeprefix("model.")
        short = short[short.index("layers."):]
        expect = 0.8 * hand0[short] * inputs[0][name] + 0.3 * hand1[short] * inputs[1][name]
        assert float((delta.double() - expect.double()).norm() / expect.double().norm()) <= TOL, name


def test_fingerprint_sees_format_and_weights(adapter_sets, tmp_path, loras):
    from distmerge.job import fingerprint, fingerprint_id
    from distmerge.sources import open_inputs

    path = str(adapter_sets("llama").paths[0])

    def doc(path, **keys):
        cfg = load_config({"adapters": [{"path": str(path), **keys}], "output": {"path": str(tmp_path / "o")}})
        adapters = open_inputs(cfg)
        return fingerprint(cfg, adapters, {f: "0" * 64 for a in adapters for f in a.inputs})

    ids = {fingerprint_id(doc(path, **k)) for k in ({}, {"module_weights": {"q_proj": 0.5}},
                                                    {"module_weights": {"q_proj": 0.6}}, {"layer_weights": [1, .5]})}
    assert len(ids) == 4
    plain = json.dumps(doc(path))  # a PEFT recipe without the new keys keeps the fingerprint it had
    assert '"format"' not in plain and "output_format" not in plain and "module_weights" not in plain
    src = loras["unet_only"][0]
    assert doc(src)["adapters"][0]["format"] == "diffusers"
    assert fingerprint_id(doc(src, block_weights={"text_encoder": 0.5})) != fingerprint_id(doc(src))


@pytest.mark.parametrize("key, value, needle", [
    ("unet.alpha_pattern", {"proj_in": "x"}, "unet.alpha_pattern['proj_in']='x', expected a positive finite number"),
    ("unet.alpha_pattern", {"proj_in": float("nan")}, "expected a positive finite number"),
    ("unet.alpha_pattern", {"proj_in": -2}, "unet.alpha_pattern['proj_in']=-2"),
    ("unet.rank_pattern", {"proj_in": 2.5}, "unet.rank_pattern['proj_in']=2.5, expected a positive integer"),
    ("unet.rank_pattern", {"proj_in": True}, "expected a positive integer"),
])
def test_bad_pattern_values_in_diffusers_metadata_are_refused(tmp_path, capsys, key, value, needle):
    """lora_adapter_metadata's rank_pattern/alpha_pattern values are the file's: a bad one is an AdapterError
    naming the file, the key and the value (exit 2), not an internal error."""
    import yaml

    from distmerge.cli import main

    module = "unet.down_blocks.0.attentions.0.proj_in"
    meta = {"unet.r": 2, "unet.lora_alpha": 2, key: value}
    f = _save(tmp_path / "in" / "pytorch_lora_weights.safetensors",
              {f"{module}.lora_A.weight": torch.randn(2, 32), f"{module}.lora_B.weight": torch.randn(32, 2)},
              {"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(AdapterError) as e:
        _merge(tmp_path, [{"path": str(f)}])
    assert needle in str(e.value) and str(f) in str(e.value) and "re-save" in str(e.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"adapters": [{"path": str(f)}], "output": {"path": str(tmp_path / "out")},
                                   "runtime": {"executor": "local", "progress": False}}))
    assert main(["merge", str(cfg)]) == 2
    assert "internal error" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_zoo_glob_takes_kohya_files(tmp_path):
    """glob: /loras/*.safetensors over single-file LoRAs expands to one adapter per file, as directories do."""
    from distmerge.config.zoo import load_zoo

    shelf = tmp_path / "loras"
    files = [_save(shelf / f"{n}.safetensors", _kohya_pair()) for n in ("a", "b")]
    (shelf / "notes.txt").write_text("not a LoRA")
    doc = {"output_root": str(tmp_path / "zoo"), "defaults": {"runtime": {"executor": "local", "progress": False}},
           "recipes": [{"name": "both", "adapters": {"glob": str(shelf / "*"), "weight": "equal"},
                        "merge": {"method": "linear"}, "output": {"model_card": False}}]}
    (tmp_path / "zoo.yaml").write_text(json.dumps(doc))
    cfg = load_zoo(tmp_path / "zoo.yaml").get("both").config
    assert [(a.path, a.weight) for a in cfg.adapters] == [(str(f), 0.5) for f in files]
    result = distmerge.merge(cfg)
    assert (Path(result.path) / "both.safetensors").is_file()  # kohya in, kohya out


def test_a_block_scale_the_adapters_attentions_cannot_place_is_refused(tmp_path):
    """distmerge counts a block's transformer layers from the adapter's attention modules (diffusers asks the
    model): a scale on a block where the adapter has modules but no attention, or a per-layer list longer than
    the adapted attentions, cannot be placed as set_adapters would place it, so it is refused, not read as 1.0."""
    names = [f"unet.up_blocks.0.resnets.{j}.conv1" for j in range(2)] + \
        [f"unet.up_blocks.1.attentions.{j}.proj_in" for j in range(2)] + ["unet.up_blocks.1.resnets.1.conv1"]
    keys = {n: n for n in names}
    with pytest.raises(ValueError, match="block_weights.unet.up scales up_blocks.0, where the adapter adapts "
                                         "modules but no attention module; distmerge infers"):
        weights.block_factors({"unet": {"up": 0.5}}, keys)
    with pytest.raises(ValueError, match="scales up_blocks.0"):
        weights.block_factors({"unet": {"up": {"block_0": [0.5]}}}, keys)
    with pytest.raises(ValueError, match="block_1 has 3 values, but the adapter has 2 transformer layers"):
        weights.block_factors({"unet": {"up": {"block_1": [0.5, 0.6, 0.7]}}}, keys)
    got = weights.block_factors({"unet": {"up": {"block_0": 1.0, "block_1": [0.5, 0.6]}, "down": 0.3}}, keys)
    assert got == {**{n: 1.0 for n in names[:2]}, names[2]: 0.5, names[3]: 0.6, names[4]: 0.6}
    f = _save(tmp_path / "in" / "resnets.safetensors", _kohya_pair("lora_unet_up_blocks_0_resnets_0_time_emb_proj"))
    with pytest.raises(AdapterError) as e:
        _merge(tmp_path, [{"path": str(f), "name": "res", "block_weights": {"unet": {"up": 0.5}}}])
    assert str(e.value).startswith("adapter 'res': block_weights.unet.up scales up_blocks.0")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
