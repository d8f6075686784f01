"""A config document as plain data: a YAML file, a dict or a DictConfig, with key=value overrides applied.

The file means what OmegaConf would read (its YAML rules, copied from omegaconf/_yaml.py) and the
overrides are OmegaConf's dotlist (torchtune's way). OmegaConf itself is imported only where it is
needed: to resolve `${...}` interpolations, and for override keys beyond plain dotted paths. Building a
DictConfig of a 50-recipe zoo took longer than checking that the whole zoo was up to date.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

MAX_ALIAS_EXPANSION = 100  # OmegaConf's ratio: aliases may not grow a document over 1,000 nodes by more


class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """OmegaConf's YAML rules: YAML 1.2 numbers (1e-3 is a float, not a string), dates left as strings, a key
    given twice refused, merge keys (<<) as OmegaConf flattens them (the first mapping of a list wins), and
    no alias bombs. Not OmegaConf's 10,000-node cap on every document: a zoo of a few hundred recipes is
    that big, written out by hand."""

    def construct_document(self, node: yaml.Node) -> Any:
        memo: dict[int, int] = {}
        unique: set[int] = set()
        active: set[int] = set()

        def count(n: yaml.Node) -> int:  # nodes after alias expansion; a recursive alias is refused
            if id(n) in memo:
                return memo[id(n)]
            if id(n) in active:
                raise yaml.constructor.ConstructorError(None, None, "YAML recursive aliases are not supported",
                                                        n.start_mark)
            active.add(id(n))
            unique.add(id(n))
            children = (n.value if isinstance(n, yaml.SequenceNode) else
                        [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else [])
            total = 1 + sum(count(c) for c in children)
            active.discard(id(n))
            memo[id(n)] = total
            return total

        expanded = count(node)
        if expanded > 1000 and expanded > MAX_ALIAS_EXPANSION * len(unique):
            raise yaml.constructor.ConstructorError(
                None, None, f"YAML aliases expand the document from {len(unique)} nodes to {expanded}, over "
                            f"{MAX_ALIAS_EXPANSION}x; write the repeated parts out, or use fewer nested aliases",
                node.start_mark)
        return super().construct_document(node)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """OmegaConf's flatten_mapping (omegaconf/_yaml.py), not PyYAML's, whose result for merge lists
        depends on PyYAML's version (6.0.4 lets the last mapping win for keys longer than a letter)."""
        merge_tag, str_tag = "tag:yaml.org,2002:merge", yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG
        explicit = set()
        for key, _ in node.value:
            if key.tag == str_tag:
                if key.value in explicit:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {key.value}", key.start_mark)
                explicit.add(key.value)
        merge: list = []
        index = 0
        while index < len(node.value):
            key, value = node.value[index]
            if key.tag == merge_tag:
                del node.value[index]
                if isinstance(value, yaml.MappingNode):
                    self.flatten_mapping(value)
                    merge.extend(value.value)
                elif isinstance(value, yaml.SequenceNode):
                    submerge = []
                    for sub in value.value:
                        if not isinstance(sub, yaml.MappingNode):
                            raise yaml.constructor.ConstructorError(
                                "while constructing a mapping", node.start_mark,
                                f"expected a mapping for merging, but found {sub.id}", sub.start_mark)
                        self.flatten_mapping(sub)
                        submerge.append(sub.value)
                    for values in reversed(submerge):
                        merge.extend(values)
                else:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found {value.id}", value.start_mark)
            elif key.tag == "tag:yaml.org,2002:value":
                key.tag = str_tag
                index += 1
            else:
                index += 1
        if merge:
            node.value = [(k, v) for k, v in merge if k.tag != str_tag or k.value not in explicit] + node.value


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _YamlLoader.yaml_implicit_resolvers.items()}


def read_document(source: Any, overrides: list[str],
                  keys: str = "adapters, merge, output and runtime") -> tuple[dict, list[str]]:
    """A YAML file, dict or DictConfig with key=value overrides applied, as plain data; and what went wrong."""
    problems: list[str] = []
    try:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                return {}, [f"config file {str(path)!r} does not exist; pass the path of a YAML file "
                            f"such as configs/quickstart.yaml"]
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_YamlLoader)
            data = {} if data is None else plain_copy(data)  # a YAML alias is one object: unshare it
        elif isinstance(source, Mapping):  # a dict, or a DictConfig (whose nodes plain_copy converts)
            data = plain_copy(source)  # never the caller's dict: overrides write into it
        else:
            return {}, [f"config must be a YAML path, a dict or a DictConfig, got {type(source).__name__}"]
    except (yaml.YAMLError, OSError, UnicodeDecodeError, RecursionError) as e:
        return {}, [f"cannot read config {source!s}: {yaml_problem(e)}"]
    if not isinstance(data, dict):
        return {}, [f"the config's top level must be a mapping with {keys}"]

    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not key=value; write for example merge.density=0.5")
            continue
        try:
            data = set_key(data, key.strip(), yaml.load(text, Loader=_YamlLoader) if text.strip() else None)
        except (yaml.YAMLError, ValueError) as e:
            problems.append(f"override {item!r} cannot be applied: {yaml_problem(e)}")
    if _interpolated(data):
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
        except OmegaConfBaseException as e:
            problems.append(f"interpolation failed: {first_line(e)}")
            data = {}
    return data, problems


def set_key(data: dict, key: str, value: Any) -> dict:
    """OmegaConf.update(data, key, value, merge=True, force_add=True): an override, or a zoo's grid value.
    Plain dotted keys are set on the plain data (put); the rest of OmegaConf's key grammar (a['x.y'],
    escapes, a path through a ${...}) by OmegaConf itself, on the whole document. The document, changed;
    ValueError, in words, for a key that cannot be placed."""
    if _put(data, key, value):
        return data
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create(data)
    try:
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    except (OmegaConfBaseException, IndexError, KeyError) as e:
        raise ValueError(first_line(e)) from None
    return OmegaConf.to_container(cfg, resolve=False)


def _interpolated(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_interpolated(v) for v in value.values())
    return isinstance(value, list) and any(_interpolated(v) for v in value)


def plain_copy(value: Any) -> Any:
    """A deep copy of config data as dicts, lists and scalars, sharing no mutable part: a tuple becomes a list,
    a dataclass (a schema section) its dict, and an OmegaConf node its container, unresolved."""
    if isinstance(value, Mapping):
        omegaconf = sys.modules.get("omegaconf")  # an OmegaConf node exists only where omegaconf is imported
        if omegaconf is not None and isinstance(value, omegaconf.DictConfig):
            value = omegaconf.OmegaConf.to_container(value, resolve=False)
        return {k: plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_copy(v) for v in value]
    if isinstance(value, (str, int, float, type(None))):
        return value
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(value, omegaconf.ListConfig):
        return plain_copy(omegaconf.OmegaConf.to_container(value, resolve=False))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_copy(dataclasses.asdict(value))
    return value


def merge_into(dst: dict, src: Mapping) -> dict:
    """OmegaConf.merge's rule on plain data: mappings merge key by key; lists and scalars replace."""
    for key, value in src.items():
        if isinstance(dst.get(key), dict) and isinstance(value, Mapping):
            merge_into(dst[key], value)
        else:
            dst[key] = plain_copy(value)
    return dst


_PLAIN_KEY = re.compile(r"^[^.\[\]\\'\"]+(?:\.[^.\[\]\\'\"]+|\[-?\d+\])*$")


def _put(cfg: dict, key: str, value: Any) -> bool:
    """Set a plain dotted key (merge.density, adapters.1.weight, adapters[-1].weight), creating missing
    mappings on the way and merging a mapping into a mapping: OmegaConf.update(merge=True, force_add=True).

    False, having changed nothing, for what only OmegaConf's key grammar or its interpolation can place
    (quoted or escaped keys, a path through a `${...}` value): set_key hands those to OmegaConf."""
    if not _PLAIN_KEY.match(key):
        return False
    parts = re.sub(r"\[(-?\d+)\]", r".\1", key).split(".")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[:depth]))
        if isinstance(node, str) and "${" in node:
            return False
    last, at = parts[-1], ".".join(parts[:-1])
    if isinstance(node, list):
        index = _index(node, last, at)
        old = node[index]
    else:
        _container(node, last, at)
        index, old = last, node.get(last)
    node[index] = merge_into(old, value) if isinstance(old, dict) and isinstance(value, Mapping) else plain_copy(value)
    return True


def _child(node: Any, part: str, at: str) -> Any:
    """The node under `part`, a new mapping where there is none (force_add)."""
    if isinstance(node, list):
        return node[_index(node, part, at)]
    _container(node, part, at)
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, at: str) -> int:
    if not re.fullmatch(r"-?\d+", part) or not -len(node) <= int(part) < len(node):
        span = f" (0 to {len(node) - 1}, or -1 for the last)" if node else ""
        raise ValueError(f"{at} is a list of {len(node)}; {part!r} is not an index into it{span}")
    return int(part)


def _container(node: Any, part: str, at: str) -> None:
    if not isinstance(node, dict):
        raise ValueError(f"{at or 'the config'} is {node!r}, not a mapping that could hold {part!r}")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def yaml_problem(e: BaseException) -> str:
    """A YAML error on one line, with what it found and where ("found duplicate key density at line 3")."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        return first_line(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(e, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")
