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
import os
from dataclasses import dataclass, field
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


def _hub(spec: AdapterSpec, runtime: RuntimeSpec) -> Located:
    from distmerge.sources import hub  # huggingface_hub is imported only for Hub inputs

    return hub.locate(spec.path, runtime.hub_cache)


PREFIXES: dict[str, Callable[[AdapterSpec, RuntimeSpec], Located]] = {"hf://": _hub}


def is_remote(path: str) -> bool:
    """A path that names no local directory yet: config validation leaves it to its source."""
    return any(path.startswith(p) for p in PREFIXES)


def locate(spec: AdapterSpec, runtime: RuntimeSpec) -> Located:
    for prefix, kind in PREFIXES.items():
        if spec.path.startswith(prefix):
            return kind(spec, runtime)
    return _local(spec, runtime)


def open_inputs(cfg: MergeConfig) -> list[Adapter]:
    """Every input located (Hub inputs downloaded to the cache first) and opened from its headers."""
    from distmerge.adapters import open_adapter

    adapters = []
    for i, spec in enumerate(cfg.adapters):
        found = locate(spec, cfg.runtime)
        local = dataclasses.replace(spec, path=found.path)
        adapter = open_adapter(local, i, root=found.root)
        source = {"uri": spec.path, **found.provenance} if is_remote(spec.path) else {}
        adapters.append(dataclasses.replace(adapter, source=source, known_sha256=found.known_sha256))
    return adapters


def local_dirs(cfg: MergeConfig) -> list[tuple[str, str]]:
    """(name, directory) of the inputs that are local directories: what an output must not overwrite."""
    return [(a.name or os.path.basename(a.path), a.path) for a in cfg.adapters if not is_remote(a.path)]
