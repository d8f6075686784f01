"""Where adapters come from: every input format and location becomes one local directory to read.

A source kind is registered once, by the prefix of an adapter's `path`: `hf://` for the Hugging Face
Hub (sources/hub.py), anything else a local directory. Each resolves a path to a `Located`: the
directory holding adapter_config.json and the weights, the root that every read is confined to, and
the provenance the manifest records. The planner, the methods and the workers never learn where an
adapter came from. Sources never import Ray: the driver resolves (downloads) before planning, and
workers only read what it resolved.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from distmerge.config.schema import AdapterSpec, MergeConfig, RuntimeSpec

if TYPE_CHECKING:
    from distmerge.adapters.adapter import Adapter


@dataclass(frozen=True)
class Located:
    path: str  # a local directory holding adapter_config.json and the weights
    root: str  # every file the adapter reads must resolve inside it
    provenance: dict = field(default_factory=dict)  # what the manifest records beyond the path and hashes
    # sha256 of files whose name already is their hash (Hub cache blobs): not read again to hash them
    known_sha256: Callable[[str], str | None] = lambda path: None


def _local(spec: AdapterSpec, runtime: RuntimeSpec) -> Located:
    return Located(spec.path, spec.path)


@dataclass(frozen=True)
class Kind:
    """A source kind other than a local directory, by the prefix of its paths."""

    locate: Callable[[AdapterSpec, RuntimeSpec], Located]  # download or find; called when a merge starts
    problem: Callable[[str], "str | None"]  # what is wrong with a path's syntax, checked with the config
    default_name: Callable[[str], str]  # the adapter's name when the config gives none


def _hub_kind() -> Kind:
    from distmerge.sources import hub  # no huggingface_hub import until a Hub input is resolved

    return Kind(lambda spec, runtime: hub.locate(spec.path, runtime.hub_cache),
                lambda path: None if hub.parse(path) else f"not a Hub path distmerge can read; write {hub.SYNTAX}",
                hub.default_name)


PREFIXES: dict[str, Callable[[], Kind]] = {"hf://": _hub_kind}


def kind_of(path: str) -> Kind | None:
    """The source kind of a path that names no local directory yet; None for a local directory."""
    return next((make() for prefix, make in PREFIXES.items() if path.startswith(prefix)), None)


def is_remote(path: str) -> bool:
    return any(path.startswith(p) for p in PREFIXES)


def locate(spec: AdapterSpec, runtime: RuntimeSpec) -> Located:
    kind = kind_of(spec.path)
    return kind.locate(spec, runtime) if kind else _local(spec, runtime)


class Opened:
    """Adapters already opened in this run, so that a batch whose recipes share adapters reads each one's
    config and headers once (a 50-recipe zoo over 12 adapters: 200 opens became 12, most of an up-to-date
    rerun's time). An adapter is reused only while every file it read has the size, mtime, ctime and inode
    it had; the name, weight and position come from each recipe's own spec."""

    def __init__(self) -> None:
        self._adapters: dict[str, Adapter] = {}

    def open(self, spec: AdapterSpec, index: int, root: str | None) -> Adapter:
        from distmerge.adapters import open_adapter

        how = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("name", "weight")}
        key = json.dumps([how, root], sort_keys=True, default=repr)
        known = self._adapters.get(key)
        if known is None or not all(_unchanged(f, stamp) for f, stamp in known.stamps.items()):
            known = self._adapters[key] = open_adapter(spec, index, root)
        return dataclasses.replace(known, index=index, name=spec.name or Path(spec.path).name, weight=spec.weight)


def _unchanged(path: str, stamp) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) == (
        stamp.size, stamp.mtime_ns, stamp.ctime_ns, stamp.ino, stamp.dev)


def open_inputs(cfg: MergeConfig, opened: Opened | None = None) -> list[Adapter]:
    """Every input located (Hub inputs downloaded to the cache first) and opened from its headers (through
    `opened`, a run's memo, where one is given)."""
    from distmerge.adapters import open_adapter

    adapters = []
    for i, spec in enumerate(cfg.adapters):
        found = locate(spec, cfg.runtime)
        local = dataclasses.replace(spec, path=found.path)
        adapter = opened.open(local, i, found.root) if opened is not None else open_adapter(local, i, root=found.root)
        source = {"uri": spec.path, **found.provenance} if is_remote(spec.path) else {}
        adapters.append(dataclasses.replace(adapter, source=source, known_sha256=found.known_sha256))
    return adapters


def local_dirs(cfg: MergeConfig) -> list[tuple[str, str]]:
    """(name, directory) of the inputs that are local directories: what an output must not overwrite."""
    return [(a.name or os.path.basename(a.path), a.path) for a in cfg.adapters if not is_remote(a.path)]
