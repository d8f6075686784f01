"""distmerge.json: what was merged, from what, by whom, how long it took, and what came out."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
from typing import TYPE_CHECKING, Sequence

import safetensors

from distmerge._lazy import torch_version
from distmerge.config.schema import MergeConfig

if TYPE_CHECKING:  # annotations only: shard.py imports output/, which imports this module
    from distmerge.planner import Plan, ShardTask
    from distmerge.shard import ShardResult

MANIFEST = "distmerge.json"
MAX_MANIFEST = 64 * 2**20


def read_manifest(directory) -> dict | None:
    """The manifest of a distmerge output, with its `outputs` checked to be plain file names with a size
    and a sha256; None when there is none or it is not one distmerge wrote. The one reader: a crafted
    entry such as "../x" must never make distmerge stat, hash, upload or delete a file outside."""
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST))
        if not isinstance(manifest.get("distmerge_version"), str):
            return None
        for o in manifest["outputs"]:
            name = o["file"]
            if (not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name
                    or "\0" in name or not isinstance(o["bytes"], int) or not isinstance(o["sha256"], str)):
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def weights_bytes(manifest: dict) -> int:
    """The bytes of an output's weight files (its .safetensors), as its manifest lists them."""
    return sum(o["bytes"] for o in manifest["outputs"] if o["file"].endswith(".safetensors"))


def build_manifest(cfg: MergeConfig, plan: Plan, tasks: Sequence[ShardTask], results: Sequence[ShardResult],
                   inputs: list[dict], outputs: list[dict], executor: str, seconds: dict[str, float],
                   recipe: dict, fingerprint: str) -> dict:
    """`recipe` is everything that decides the output's bytes; a batch skips a recipe whose `fingerprint`
    (its sha256) is unchanged, and says which of its parts changed when it is not."""
    from distmerge import __version__

    modules = {m: dict(s) for r in results for m, s in r.stats}
    phases: dict[str, float] = {}
    for r in results:
        for k, v in r.phases:
            phases[k] = phases.get(k, 0.0) + v
    manifest = {
        "distmerge_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "fingerprint": fingerprint,
        "recipe": recipe,
        "method": {"requested": plan.requested_method, "used": plan.method, "rank": plan.rank,
                   "output_dtype": plan.out_dtype, "output_format": plan.out_format},
        "executor": executor,
        "seconds": seconds,
        "worker_seconds": {k: round(v, 4) for k, v in sorted(phases.items())},  # summed over shards
        "inputs": inputs,
        "outputs": outputs,
        "modules": dict(sorted(modules.items())),
        "shards": [{"index": t.index, "modules": len(t.modules), "passthrough": len(t.passthrough),
                    "in_bytes": t.in_bytes, "out_bytes": t.out_bytes, "seconds": round(r.seconds, 4),
                    "phases": dict(r.phases),
                    "worker": dict(r.worker)} for t, r in zip(tasks, results)],
        "versions": {"python": platform.python_version(), "torch": torch_version(),
                     "safetensors": safetensors.__version__},
    }
    return json.loads(json.dumps(manifest))  # plain JSON types, as a reader of distmerge.json sees them
