"""Zoo files: defaults, globs, grids and recipe inputs expand into ordinary merge configs; every refusal
is reported at once, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distmerge.config import load_config
from distmerge.config.zoo import load_zoo
from distmerge.errors import ConfigError


def _zoo(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "zoo.yaml"
    path.write_text(json.dumps(doc))
    return path


def _doc(shelf: Path, tmp_path: Path, *recipes: dict) -> dict:
    return {"defaults": {"merge": {"method": "ties", "density": 0.5}, "output": {"dtype": "float32"},
                         "runtime": {"executor": "local", "progress": False}},
            "output_root": str(tmp_path / "zoo"), "recipes": list(recipes)}


def test_defaults_globs_grids_and_recipe_inputs(shelf, tmp_path):
    doc = _doc(shelf, tmp_path,
               {"name": "support-bot", "adapters": [{"path": str(shelf / "sql"), "weight": 0.5},
                                                    {"path": str(shelf / "chat"), "weight": 0.5}]},
               {"name": "mix", "adapters": [{"recipe": "support-bot", "weight": 0.7},
                                            {"recipe": "all-code", "weight": 0.3}]},
               {"name": "all-code", "adapters": {"glob": str(shelf / "code-*"), "weight": "equal"},
                "merge": {"method": "svd", "svd_rank": 2}},
               {"name": "sweep", "adapters": [{"path": str(shelf / "sql")}, {"path": str(shelf / "chat")}],
                "grid": {"merge.method": ["ties", "dare_ties"], "merge.density": [0.3, 0.5, 0.7]}})
    zoo = load_zoo(_zoo(tmp_path, doc))
    names = [r.name for r in zoo.recipes]
    assert names.index("mix") > names.index("all-code") and names.index("mix") > names.index("support-bot")
    assert zoo.get("mix").needs == ("support-bot", "all-code")
    code = zoo.get("all-code").config
    assert [a.name for a in code.adapters] == ["code-a", "code-b", "code-c"]
    assert [a.weight for a in code.adapters] == pytest.approx([1 / 3] * 3)
    assert (code.merge.method, code.merge.svd_rank, code.merge.density) == ("svd", 2, 0.5)  # defaults underneath
    mix = zoo.get("mix").config
    assert [a.path for a in mix.adapters] == [str(tmp_path / "zoo" / "support-bot"), str(tmp_path / "zoo" / "all-code")]
    sweep = [r for r in zoo.recipes if r.name.startswith("sweep/")]
    assert [r.name for r in sweep] == [f"sweep/method={m},density={d}" for m in ("ties", "dare_ties")
                                       for d in (0.3, 0.5, 0.7)]
    r = zoo.get("sweep/method=dare_ties,density=0.3")
    assert (r.config.merge.method, r.config.merge.density) == ("dare_ties", 0.3)
    assert r.config.output.path == str(tmp_path / "zoo" / "sweep" / "method=dare_ties,density=0.3")
    assert zoo.closure(["mix"]) == [n for n in names if n in ("support-bot", "all-code", "mix")]


def test_a_recipe_is_the_config_it_would_be_alone(shelf, tmp_path):
    """Each expanded recipe is a plain merge config: `distmerge merge` of it is the same frozen object."""
    doc = _doc(shelf, tmp_path, {"name": "one", "adapters": [str(shelf / "sql"), str(shelf / "chat")],
                                 "merge": {"density": 0.25}})
    zoo = load_zoo(_zoo(tmp_path, doc), ["defaults.merge.seed=7"])
    alone = load_config({"adapters": [{"path": str(shelf / "sql")}, {"path": str(shelf / "chat")}],
                         "merge": {"method": "ties", "density": 0.25, "seed": 7},
                         "output": {"dtype": "float32", "path": str(tmp_path / "zoo" / "one"), "overwrite": True},
                         "runtime": {"executor": "local", "progress": False}})
    assert zoo.get("one").config == alone


def test_every_refusal_at_once(shelf, tmp_path):
    doc = _doc(shelf, tmp_path,
               {"name": "a", "adapters": [{"recipe": "b"}]},
               {"name": "b", "adapters": [{"recipe": "a"}, {"path": str(shelf / "sql")}]},
               {"name": "c", "adapters": {"glob": str(shelf / "nothing-*")}},
               {"name": "d", "adapters": [{"recipe": "supprt-bot"}]},
               {"name": "e", "adapters": [str(shelf / "sql")], "output": {"path": str(tmp_path / "same")}},
               {"name": "f", "adapters": [str(shelf / "chat")], "output": {"path": str(tmp_path / "same")}},
               {"name": "g", "adapters": [str(shelf / "sql")], "runtime": {"executor": "ray"},
                "merge": {"method": "tiess"}},
               {"name": "g", "adapters": [str(shelf / "sql")]},
               {"name": "../up", "adapters": [str(shelf / "sql")]})
    with pytest.raises(ConfigError) as e:
        load_zoo(_zoo(tmp_path, doc))
    text = "\n".join(e.value.problems)
    assert "recipes 'a' → 'b' → 'a' form a cycle" in text
    assert "recipe 'c': adapters[0].glob" in text and "matches no adapter directory or .safetensors file" in text
    assert "recipe 'd': adapters[0].recipe: no recipe is named 'supprt-bot'" in text
    assert "recipes 'e' and 'f' both write" in text
    assert "recipe 'g': runtime: one pool runs the whole batch" in text
    assert "recipe 'g': merge.method: unknown method 'tiess'; did you mean 'ties'?" in text
    assert "recipe 'g': the name is used twice" in text
    assert "'../up' is not a usable name" in text
    assert len(e.value.problems) == 8, text


def test_nested_outputs_and_bad_grids_are_refused(shelf, tmp_path):
    doc = _doc(shelf, tmp_path,
               {"name": "x", "adapters": [str(shelf / "sql")]},
               {"name": "x/inner", "adapters": [str(shelf / "sql")]},
               {"name": "y", "adapters": [str(shelf / "sql")], "grid": {"runtime.device": ["cpu"]}},
               {"name": "z", "adapters": [str(shelf / "sql")], "grid": {"merge.density": []}})
    with pytest.raises(ConfigError) as e:
        load_zoo(_zoo(tmp_path, doc))
    text = "\n".join(e.value.problems)
    assert "inside recipe 'x''s output" in text
    assert "recipe 'y': grid.runtime.device" in text and "recipe 'z': grid.merge.density" in text


def test_a_default_section_that_is_not_a_mapping_is_a_config_error(shelf, tmp_path):
    doc = _doc(shelf, tmp_path, {"name": "x", "adapters": [str(shelf / "sql")],
                                 "grid": {"adapters.5.weight": [1.0]}})
    doc["defaults"] = {"output": "fast"}
    with pytest.raises(ConfigError) as e:
        load_zoo(_zoo(tmp_path, doc))
    assert e.value.problems == [
        "defaults.output: expected a mapping of output keys, got 'fast'",
        "recipe 'x/weight=1.0': grid.adapters.5.weight cannot be applied: adapters is a list of 1; '5' is not an "
        "index into it (0 to 0, or -1 for the last)"], e.value.problems
