"""A zoo file: many merge recipes over shared defaults, expanded into ordinary merge configs.

    # distmerge batch configs/zoo_nightly.yaml
    defaults: {merge: {method: ties, density: 0.5}, output: {dtype: bfloat16}, runtime: {executor: auto}}
    output_root: /shared/merged/zoo       # a recipe writes output_root/NAME unless it sets output.path
    recipes:
      - {name: support-bot, adapters: [{path: /shared/adapters/sql, weight: 0.5}, {path: /shared/adapters/chat}]}
      - {name: all-code, adapters: {glob: "/shared/adapters/code-*", weight: equal}, merge: {method: svd}}
      - {name: mix, adapters: [{recipe: support-bot, weight: 0.7}, {recipe: all-code, weight: 0.3}]}
      - {name: sweep, adapters: [...], grid: {merge.method: [ties, svd], merge.density: [0.3, 0.5]}}

Each expanded recipe is validated by the same `validate` as `distmerge merge`, so a recipe run in a
batch and the same config run alone are one config, byte for byte. Every problem of every recipe is
reported at once, prefixed with the recipe's name; cycles, unknown recipe names, two recipes writing
one path (or pushing to one Hub branch) and globs matching nothing are refused before anything runs.
Pure: no tensors, no Ray.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from distmerge.config.document import merge_into, plain_copy, read_document, set_key
from distmerge.config.load import ConfigSource, build_section, suggest, validate
from distmerge.config.schema import MergeConfig, RuntimeSpec
from distmerge.errors import ConfigError

TOP_KEYS = ("defaults", "output_root", "recipes")
DEFAULT_KEYS = ("merge", "output", "runtime")
RECIPE_KEYS = ("name", "adapters", "merge", "output", "grid")
_NAME = re.compile(r"^[A-Za-z0-9_.=,+@-]+(/[A-Za-z0-9_.=,+@-]+)*$")


@dataclass(frozen=True)
class Recipe:
    name: str
    config: MergeConfig
    needs: tuple[str, ...]  # recipes whose outputs this one merges: they run first


@dataclass(frozen=True)
class Zoo:
    source: str
    output_root: str | None
    runtime: RuntimeSpec  # one pool for the whole batch
    recipes: tuple[Recipe, ...]  # dependency order

    def get(self, name: str) -> Recipe:
        return next(r for r in self.recipes if r.name == name)

    def closure(self, names: Iterable[str]) -> list[str]:
        """These recipes and every recipe they depend on, in dependency order."""
        want, stack = set(), list(names)
        while stack:
            n = stack.pop()
            if n not in want:
                want.add(n)
                stack.extend(self.get(n).needs)
        return [r.name for r in self.recipes if r.name in want]


def load_zoo(source: ConfigSource, overrides: Iterable[str] = ()) -> Zoo:
    """Read a zoo file (overrides apply to the zoo document, e.g. defaults.merge.seed=3) into recipes."""
    raw, problems = read_document(source, list(overrides), keys="defaults, output_root and recipes")
    if problems and not raw:
        raise ConfigError(problems)
    zoo = _expand(raw, str(source) if isinstance(source, (str, os.PathLike)) else "<zoo>", problems)
    if problems:
        raise ConfigError(problems)
    return zoo


def _expand(raw: Mapping[str, Any], source: str, p: list[str]) -> Zoo:
    for key in raw:
        if key not in TOP_KEYS:
            p.append(f"{key}: unknown key{suggest(key, TOP_KEYS)} (a zoo has {', '.join(TOP_KEYS)})")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        p.append(f"defaults: expected a mapping of merge-config sections, got {defaults!r}")
        defaults = {}
    for key in list(defaults):
        if key not in DEFAULT_KEYS:
            why = "adapters belong to each recipe" if key == "adapters" else f"one of {', '.join(DEFAULT_KEYS)}"
            p.append(f"defaults.{key}: unknown key{suggest(key, DEFAULT_KEYS)} ({why})")
        elif defaults[key] is not None and not isinstance(defaults[key], Mapping):
            p.append(f"defaults.{key}: expected a mapping of {key} keys, got {defaults[key]!r}")
            defaults = {k: v for k, v in defaults.items() if k != key}
    root = raw.get("output_root")
    if root is not None and not isinstance(root, str):
        p.append(f"output_root: expected a directory path, got {root!r}")
        root = None
    root = os.path.realpath(os.path.expanduser(root)) if root else None
    runtime = build_section(RuntimeSpec, defaults.get("runtime"), "defaults.runtime", p) or RuntimeSpec()

    items = raw.get("recipes")
    if not isinstance(items, list) or not items:
        p.append("recipes: expected a non-empty list of recipes, each with a name and adapters")
        items = []
    named = _named_recipes(items, p)
    outputs = {name: _output_path(body, name, root) for name, body in named.items()}
    for name, path in outputs.items():
        if path is None:
            p.append(f"recipe {name!r}: no output path; set output_root at the top, or output.path in the recipe")
    _check_outputs({n: o for n, o in outputs.items() if o}, p)

    inputs = {name: _adapter_items(name, body.get("adapters"), outputs, p)
              for name, body in named.items() if outputs[name]}
    recipes = []
    pending = frozenset(os.path.realpath(o) for o in outputs.values() if o)  # once: validate compares real paths
    for name in _dependency_order({n: needs for n, (items, needs) in inputs.items() if items is not None}, p):
        cfg_raw = _recipe_config(name, named[name], defaults, inputs[name][0], outputs[name], p)
        if cfg_raw is None:
            continue
        try:
            recipes.append(Recipe(name, validate(cfg_raw, pending=pending), tuple(inputs[name][1])))
        except ConfigError as e:
            p.extend(f"recipe {name!r}: {problem}" for problem in e.problems)
    _check_pushes(recipes, p)
    return Zoo(source, root, runtime, tuple(recipes))


def _check_pushes(recipes: Sequence[Recipe], p: list[str]) -> None:
    """No two recipes commit to one Hub branch: the later upload would replace the earlier (a grid's points)."""
    seen: dict[tuple[str, str], str] = {}
    for r in recipes:
        o = r.config.output
        if not o.push_to_hub or o.hub_create_pr:  # each pull request is its own
            continue
        key = (o.push_to_hub, o.hub_revision or "main")
        if key in seen:
            p.append(f"recipes {seen[key]!r} and {r.name!r} both push to {key[0]}@{key[1]}; give each its own "
                     f"output.push_to_hub or output.hub_revision (or set output.hub_create_pr)")
        else:
            seen[key] = r.name


def _named_recipes(items: Sequence[Any], p: list[str]) -> dict[str, dict]:
    """Every recipe by name, grids expanded into one recipe per combination."""
    named: dict[str, dict] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            p.append(f"recipes[{i}]: expected a mapping with a name and adapters, e.g. "
                     f"{{name: support-bot, adapters: [{{path: /shared/adapters/sql}}]}}")
            continue
        name = item["name"]
        if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
            p.append(f"recipes[{i}].name: {name!r} is not a usable name; it becomes a directory under output_root, "
                     f"so use letters, digits and . _ - = , + @ (and / between parts)")
            continue
        for key in item:
            if key not in RECIPE_KEYS:
                if key == "runtime":
                    p.append(f"recipe {name!r}: runtime: one pool runs the whole batch, so runtime is the batch's: "
                             f"set it under defaults.runtime or on the command line")
                else:
                    p.append(f"recipe {name!r}: {key}: unknown key{suggest(key, RECIPE_KEYS)} (a recipe has "
                             f"{', '.join(RECIPE_KEYS)})")
        body = {k: v for k, v in item.items() if k in RECIPE_KEYS and k != "grid"}
        for combo_name, combo in _grid(name, item.get("grid"), p):
            if combo_name in named:
                p.append(f"recipe {combo_name!r}: the name is used twice; recipe names must be unique")
                continue
            named[combo_name] = {**body, "_grid": combo}
    return named


def _grid(name: str, grid: Any, p: list[str]) -> list[tuple[str, dict]]:
    if grid is None:
        return [(name, {})]
    if not isinstance(grid, Mapping) or not grid:
        p.append(f"recipe {name!r}: grid: expected a mapping of key → list of values, e.g. "
                 f"{{merge.method: [ties, svd], merge.density: [0.3, 0.5]}}")
        return []
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            p.append(f"recipe {name!r}: grid.{key}: expected a non-empty list of values, got {grid[key]!r}")
            return []
        if str(key).split(".")[0] not in ("merge", "output", "adapters") or key == "output.path":
            p.append(f"recipe {name!r}: grid.{key}: a grid varies merge.*, output.* (not output.path) or "
                     f"adapters.N.weight keys")
            return []
    short = [str(k).split(".")[-1] for k in keys]
    labels = short if len(set(short)) == len(short) else [str(k) for k in keys]
    return [(f"{name}/" + ",".join(f"{lab}={v}" for lab, v in zip(labels, values)), dict(zip(keys, values)))
            for values in itertools.product(*(grid[k] for k in keys))]


def _output_path(body: Mapping, name: str, root: str | None) -> str | None:
    out = body.get("output")
    path = out.get("path") if isinstance(out, Mapping) else None
    if isinstance(path, str) and path:
        return os.path.realpath(os.path.expanduser(path))
    return os.path.join(root, name) if root else None


def _check_outputs(outputs: Mapping[str, str], p: list[str]) -> None:
    """No two recipes write one path, and no output lies inside another (its manifest would not list it)."""
    by_path = sorted((path, name) for name, path in outputs.items())
    for (pa, na), (pb, nb) in zip(by_path, by_path[1:]):
        if pa == pb:
            p.append(f"recipes {na!r} and {nb!r} both write {pa}; give each its own output.path")
        elif pb.startswith(pa + os.sep):
            p.append(f"recipe {nb!r} writes {pb}, inside recipe {na!r}'s output {pa}; outputs must not nest")


def _recipe_config(name: str, body: Mapping, defaults: Mapping, adapters: list, output: str,
                   p: list[str]) -> dict | None:
    """The recipe's merge config as plain data: defaults, then its own keys, then its grid values.

    OmegaConf.merge's rules (mappings merge key by key; lists and scalars replace) on plain data: the
    document is already resolved, and a DictConfig per recipe was two thirds of expanding a 50-recipe zoo."""
    where = f"recipe {name!r}"
    # a batch re-merges stale outputs in place: overwrite (which replaces only distmerge's own outputs) is on
    cfg = merge_into({"output": {"overwrite": True}},
                     {k: defaults[k] for k in DEFAULT_KEYS if defaults.get(k) is not None})
    for section in ("merge", "output"):
        if section in body:
            if not isinstance(body[section], Mapping):
                p.append(f"{where}: {section}: expected a mapping, got {body[section]!r}")
                return None
            merge_into(cfg, {section: body[section]})
    cfg["adapters"] = plain_copy(adapters)
    for key, value in body["_grid"].items():
        try:
            cfg = set_key(cfg, str(key), value)
        except ValueError as e:  # an index past the adapters' end, a key into a scalar
            p.append(f"{where}: grid.{key} cannot be applied: {e}")
            return None
    cfg = set_key(cfg, "output.path", output)
    return cfg


def _adapter_items(name: str, raw: Any, outputs: Mapping[str, str | None], p: list[str]
                   ) -> tuple[list | None, list[str]]:
    """A recipe's adapters with globs and recipe references resolved to paths."""
    where = f"recipe {name!r}: adapters"
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        p.append(f"{where}: expected a list of {{path}}, {{glob}} or {{recipe}} entries with weights")
        return None, []
    items, needs = [], []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping) or sum(k in item for k in ("path", "glob", "recipe")) != 1:
            p.append(f"{where}[{i}]: expected exactly one of path, glob or recipe, e.g. {{path: /shared/adapters/sql, "
                     f"weight: 0.5}}, got {item!r}")
            return None, []
        if "recipe" in item:
            ref = item["recipe"]
            if ref not in outputs:
                p.append(f"{where}[{i}].recipe: no recipe is named {ref!r}{suggest(str(ref), outputs)}")
                return None, []
            if outputs[ref] is None:
                return None, []  # that recipe's missing output path is reported already
            needs.append(ref)
            rest = {k: v for k, v in item.items() if k != "recipe"}
            items.append({"name": str(ref).replace("/", "_"), **rest, "path": outputs[ref]})
        elif "glob" in item:
            # adapter directories (PEFT, diffusers), and single-file LoRAs (kohya, diffusers .safetensors)
            matches = sorted(m for m in glob.glob(os.path.expanduser(str(item["glob"])))
                             if os.path.isdir(m) or (m.endswith(".safetensors") and os.path.isfile(m)))
            if not matches:
                p.append(f"{where}[{i}].glob: {item['glob']!r} matches no adapter directory or .safetensors file; "
                         f"check the pattern")
                return None, []
            weight = item.get("weight", "equal")
            if weight == "equal":
                weight = 1.0 / len(matches)
            rest = {k: v for k, v in item.items() if k not in ("glob", "weight", "name")}
            items += [{"path": m, "weight": weight, **rest} for m in matches]
        else:
            items.append(dict(item))
    return items, needs


def _dependency_order(needs: Mapping[str, Sequence[str]], p: list[str]) -> list[str]:
    """Recipes in file order, each after the recipes it needs; a cycle is named and refused (with its members)."""
    done: list[str] = []
    state: dict[str, str] = {}
    cyclic: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done" or name not in needs:
            return
        if state.get(name) == "active":
            cycle = path[path.index(name):] + [name]
            cyclic.update(cycle)
            p.append(f"recipes {' → '.join(repr(c) for c in cycle)} form a cycle; a recipe cannot merge its own output")
            return
        state[name] = "active"
        for need in needs[name]:
            visit(need, path + [name])
        state[name] = "done"
        done.append(name)

    for name in needs:
        visit(name, [])
    return [n for n in done if n not in cyclic]
