"""Config: every error at once with its key path and a fix; overrides; the frozen result."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from distmerge.cli import main
from distmerge.config import load_config
from distmerge.errors import ConfigError


def _base(adapter_sets, tmp_path) -> dict:
    aset = adapter_sets("llama")
    return {"adapters": [{"path": str(p), "weight": w} for p, w in zip(aset.paths, aset.weights)],
            "merge": {"method": "ties", "density": 0.5}, "output": {"path": str(tmp_path / "out")}}


def test_all_errors_reported_at_once(adapter_sets, tmp_path):
    cfg = _base(adapter_sets, tmp_path)
    cfg["merge"] = {"methd": "ties", "method": "tie", "density": 1.5, "majority_sign_method": "mean"}
    cfg["adapters"].append({"path": str(tmp_path / "nope")})
    cfg["output"]["dtype"] = "fp16"
    cfg["runtime"] = {"executer": "ray"}
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    problems = e.value.problems
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "merge.methd: unknown key; did you mean 'method'?" in text
    assert "merge.method: unknown method 'tie'; did you mean 'ties'?" in text
    assert "merge.density: must be in (0, 1], got 1.5" in text
    assert "merge.majority_sign_method" in text
    assert "adapters[3].path: adapter directory" in text and "does not exist" in text
    assert "output.dtype" in text and "'float16'" in text
    assert "runtime.executer: unknown key; did you mean 'executor'?" in text


def test_pruning_method_needs_density(adapter_sets, tmp_path):
    cfg = _base(adapter_sets, tmp_path)
    del cfg["merge"]["density"]
    with pytest.raises(ConfigError, match="merge.density: method 'ties' prunes and needs a density"):
        load_config(cfg)


def test_types_are_checked(adapter_sets, tmp_path):
    cfg = _base(adapter_sets, tmp_path)
    cfg["merge"]["svd_rank"] = "big"
    cfg["adapters"][0]["weight"] = "heavy"
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert {p.split(":")[0] for p in e.value.problems} == {"merge.svd_rank", "adapters[0].weight"}


def test_overrides_win_and_config_is_frozen(adapter_sets, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(_base(adapter_sets, tmp_path)))
    cfg = load_config(str(path), ["merge.method=dare_ties", "merge.density=0.25", "adapters.1.weight=-1",
                                  "output.shard_size=10MB", "merge.svd_rank=null"])
    assert (cfg.merge.method, cfg.merge.density, cfg.adapters[1].weight) == ("dare_ties", 0.25, -1.0)
    assert cfg.shard_size_bytes == 10_000_000
    assert cfg.adapters[0].name == "a0"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.merge.method = "linear"


def test_bad_override_and_missing_file(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("adapters: []\n")
    assert main(["merge", str(tmp_path / "c.yaml"), "merge.density"]) == 2
    err = capsys.readouterr().err
    assert "not key=value" in err and "at least one adapter" in err and "Traceback" not in err


def test_new_method_parameters_are_validated_together(adapter_sets, tmp_path):
    """iso_common_fraction, della_epsilon and breadcrumbs_gamma are checked with the rest, each with its fix."""
    cfg = _base(adapter_sets, tmp_path)
    cfg["merge"] = {"method": "della_svd", "density": 0.1, "della_epsilon": 0.2, "iso_common_fraction": 1.5,
                    "breadcrumbs_gamma": -0.1}
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3, text
    assert "merge.della_epsilon: density ± epsilon must lie in (0, 1)" in text and "e.g. to 0.05" in text
    assert "merge.iso_common_fraction: must be in [0, 1], got 1.5" in text
    assert "merge.breadcrumbs_gamma: must be in [0, 1), got -0.1" in text
    cfg["merge"] = {"method": "core_ties"}
    with pytest.raises(ConfigError, match="merge.density: method 'core_ties' prunes and needs a density"):
        load_config(cfg)
    cfg["merge"] = {"method": "iso_cts", "iso_common_fraction": 0.5}
    assert load_config(cfg).merge.iso_common_fraction == 0.5


YAML_CASES = {
    "numbers and dates": "a: 1e-3\nb: 1_000\nc: .5\nd: 2024-01-01\ne: yes\nf: ~\ng: 0x10\nh: 1:30\ni: .inf\nj: 010\n"
                         "k: '1e3'\nl: [1, 2.5e+2, -3.]\n",
    "anchors, merge keys, interpolation": "base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\nn: ${m.y}\no: ${base}\n",
    "empty": "",
    # a merge that builds on a merge (PyYAML 6.0.4's own flattening refuses this as a duplicate key)
    "chained merge keys": "a: &a {density: 0.1, method: ties}\nb: &b {<<: *a, density: 0.5}\nc: {<<: *b, seed: 1}\n",
    # in a merge list the first mapping wins (PyYAML 6.0.4 lets the last win for keys longer than a letter)
    "merge list precedence": "a: &a {method: ties, density: 0.1}\nb: &b {method: svd}\nn: {<<: [*a, *b]}\n",
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_a_file_reads_as_omegaconf_reads_it(case, tmp_path):
    """distmerge reads YAML itself (OmegaConf only resolves ${...}); OmegaConf.load is the oracle."""
    from omegaconf import OmegaConf

    from distmerge.config.document import read_document

    path = tmp_path / "c.yaml"
    path.write_text(YAML_CASES[case])
    assert read_document(str(path), []) == (OmegaConf.to_container(OmegaConf.load(path), resolve=True), [])


def test_overrides_on_plain_data_follow_omegaconf_update(tmp_path):
    """Each override as OmegaConf.update(merge=True, force_add=True) would apply it, on the oracle's side too;
    an alias is unshared first, so an override of one place does not change the other."""
    from omegaconf import OmegaConf

    from distmerge.config.document import read_document

    text = ("defaults: &d {merge: {method: ties}}\nother: *d\nadapters: [{path: a}, {path: b}]\n"
            "linked: ${defaults}\n")
    overrides = ["defaults.merge.density=0.5", "adapters.1.weight=-1", "adapters[0].name=x", "new.deep.key=3",
                 "defaults.merge={seed: 4}", "other.merge=null", "adapters[-1].weight=9", "adapters.-2.weight=7",
                 "defaults[merge].tag=a", "linked.merge.through=1"]  # the last two: OmegaConf's own grammar
    (tmp_path / "c.yaml").write_text(text)
    oracle = OmegaConf.load(tmp_path / "c.yaml")
    for item in overrides:
        key, _, value = item.partition("=")
        OmegaConf.update(oracle, key, yaml.safe_load(value), merge=True, force_add=True)
    raw, problems = read_document(str(tmp_path / "c.yaml"), overrides)
    assert problems == [] and raw == OmegaConf.to_container(oracle, resolve=True)
    assert raw["other"]["merge"] is None and raw["adapters"][1]["weight"] == 9 and raw["adapters"][0]["weight"] == 7
    assert raw["defaults"]["merge"] == {"method": "ties", "density": 0.5, "seed": 4, "tag": "a", "through": 1}

    raw, problems = read_document(str(tmp_path / "c.yaml"), ["adapters.2.weight=1", "defaults.merge.method.x=1"])
    assert problems == [
        "override 'adapters.2.weight=1' cannot be applied: adapters is a list of 2; '2' is not an index into it "
        "(0 to 1, or -1 for the last)",
        "override 'defaults.merge.method.x=1' cannot be applied: defaults.merge.method is 'ties', not a mapping "
        "that could hold 'x'"], problems
    raw, problems = read_document(str(tmp_path / "c.yaml"), ["merge.density=${nowhere}"])
    assert problems and problems[0].startswith("interpolation failed")


def test_alias_bombs_and_recursive_aliases_are_refused_not_expanded(tmp_path):
    """OmegaConf's guard, kept: a few lines of aliases must not expand into millions of nodes."""
    from distmerge.config.document import read_document

    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef"))
    (tmp_path / "bomb.yaml").write_text(bomb)
    raw, problems = read_document(str(tmp_path / "bomb.yaml"), [])
    assert raw == {} and len(problems) == 1 and "YAML aliases expand the document" in problems[0], problems
    (tmp_path / "loop.yaml").write_text("a: &a {b: *a}\n")
    raw, problems = read_document(str(tmp_path / "loop.yaml"), [])
    assert raw == {} and "recursive aliases" in problems[0], problems
    # an honest big file (a zoo of 600 recipes, ~13,000 nodes) is read whole; OmegaConf.load refuses it (its
    # 10,000-node cap, meant for aliases, counts every node)
    zoo = {"recipes": [{"name": f"r{i}", "adapters": [{"path": f"/a/{j}", "weight": 0.25} for j in range(4)]}
                       for i in range(600)]}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(zoo))
    assert read_document(str(tmp_path / "big.yaml"), []) == (zoo, [])


def test_sources_holding_omegaconf_nodes_or_schema_sections(adapter_sets, tmp_path):
    """A dict may hold OmegaConf containers or schema dataclasses, as OmegaConf.create accepted them."""
    from omegaconf import OmegaConf

    from distmerge.config.schema import MergeSpec

    cfg = _base(adapter_sets, tmp_path)
    cfg["adapters"] = OmegaConf.create(cfg["adapters"])
    cfg["merge"] = MergeSpec(method="ties", density=0.5)
    assert load_config(cfg, ["adapters.0.weight=2"]).adapters[0].weight == 2.0
    assert load_config(OmegaConf.create(_base(adapter_sets, tmp_path)), ["merge.density=0.25"]).merge.density == 0.25
