"""One merge as a Job: config → inputs → plan → shard tasks → assemble → manifest → atomic commit.

A job knows nothing of executors or Ray: it hands out tasks and takes results. `distmerge merge`
is a batch of one job; `distmerge batch` runs many jobs on one pool. The job's staging directory
is entered before any of its tasks run and removed, unless committed, when the job is closed.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from distmerge._lazy import torch_version
from distmerge.adapters import formats
from distmerge.adapters.adapter import Adapter
from distmerge.adapters.pin import sha256_pinned
from distmerge.config.schema import MergeConfig
from distmerge.output.assemble import file_entries, write_json
from distmerge.output.formats import write_output
from distmerge.output.manifest import MANIFEST, build_manifest
from distmerge.output.owner import check_target
from distmerge.output.staging import Staging
from distmerge.planner import Plan, ShardTask, build_plan, default_num_tasks
from distmerge.shard import ShardResult
from distmerge.sources import local_dirs, open_inputs

log = logging.getLogger("distmerge")
Hasher = Callable[[str, object, str], str]  # (path, planned stamp, adapter name) → sha256


@dataclass(frozen=True)
class MergeResult:
    path: str
    files: tuple[str, ...]
    method: str
    rank: int
    seconds: float
    manifest: dict
    hub: dict | None = None  # where output.push_to_hub uploaded it (publish.hub.record), after the merge


def input_files(adapters: Sequence[Adapter]) -> list[tuple[Adapter, str, object]]:
    """(adapter, file, planned stamp) for every file an adapter's merge depends on."""
    return [(a, f, a.stamps.get(f)) for a in adapters for f in a.inputs]


def file_sha256(adapter: Adapter, file: str, stamp, hasher: Hasher) -> str:
    """An input file's sha256: its name where it is one (a Hub cache blob, not read again), else `hasher`'s."""
    return adapter.known_sha256(file) or hasher(file, stamp, adapter.name)


def fingerprint(cfg: MergeConfig, adapters: Sequence[Adapter], hashes: dict[str, str]) -> dict:
    """Everything that changes the output's bytes, as plain data; its sha256 is the recipe's identity.

    Inputs count by content (sha256), and by where they were taken from (the path as written, a Hub
    input's repo and commit), which the model card shows. The executor, worker count and output path
    do not count, since the bytes do not depend on them; the device and the torch threads
    (cpus_per_worker) do (BLAS rounding), and so do the torch version and distmerge's.
    """
    from distmerge import __version__

    return {
        "distmerge_version": __version__,
        "torch_version": torch_version(),
        "merge": dataclasses.asdict(cfg.merge),
        "output": {"dtype": cfg.output.dtype, "shard_size": cfg.output.shard_size,
                   "consolidate": cfg.output.consolidate, "model_card": cfg.output.model_card},
        "runtime": {"device": cfg.runtime.device, "cpus_per_worker": cfg.runtime.cpus_per_worker},
        "adapters": [{"name": a.name, "weight": a.weight, "from": a.source.get("uri", a.path),
                      **({"hub": a.source["hub"]} if "hub" in a.source else {}),
                      "files": {os.path.basename(f): hashes[f] for f in a.inputs}, **_format_keys(spec, a)}
                     for spec, a in zip(cfg.adapters, adapters)],
        **({"output_format": cfg.output.format} if cfg.output.format else {}),
    }


def _format_keys(spec, adapter: Adapter) -> dict:
    """An input's format and per-module weights, where they differ from a PEFT adapter's defaults (so that
    recipes written before these keys existed keep their fingerprint)."""
    keys = {"format": adapter.format} if adapter.format != formats.DEFAULT else {}
    for k in ("component", "module_weights", "layer_weights", "block_weights"):
        if getattr(spec, k, None) is not None:
            keys[k] = getattr(spec, k)
    return keys


def fingerprint_id(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class Job:
    """One merge. prepare() reads headers and plans; tasks() stages; add() takes results; finish() commits."""

    def __init__(self, cfg: MergeConfig, name: str = "", hasher: Hasher = sha256_pinned):
        self.cfg = cfg
        self.name = name
        self.reason = ""  # why a batch runs it
        self._hasher = hasher
        self.adapters: list[Adapter] = []
        self.plan: Plan | None = None
        self.staging: Staging | None = None
        self.tasks: list[ShardTask] = []
        self.results: dict[int, ShardResult] = {}
        self._t0 = time.perf_counter()
        self._t_plan = self._t_merge = 0.0
        self._hashes: dict[str, cf.Future] = {}

    def prepare(self, adapters: Sequence[Adapter] | None = None) -> Plan:
        """Every check that needs no tensor: the output may be written, inputs read, the merge planned.

        `adapters` are the config's inputs when the caller opened them already (a batch's up-to-date check).
        """
        cfg = self.cfg
        check_target(cfg.output.path, cfg.output.overwrite, local_dirs(cfg))
        self.adapters = list(adapters) if adapters is not None else open_inputs(cfg)
        self.plan = build_plan(cfg, self.adapters)  # every cross-adapter check, before any worker starts
        self._t_plan = time.perf_counter()
        return self.plan

    def __enter__(self) -> "Job":
        self.staging = Staging(self.cfg.output.path, self.cfg.output.overwrite).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            self.staging.__exit__(*exc)

    def shard(self, parallelism: int) -> list[ShardTask]:
        """The job's shard tasks for a pool of this many workers, tagged with the job's name."""
        assert self.plan is not None and self.staging is not None, "prepare() and enter the job first"
        cfg = self.cfg
        self.tasks = self.plan.shard(default_num_tasks(self.plan, cfg.shard_size_bytes, parallelism),
                                     staging=str(self.staging.path), device=cfg.runtime.device,
                                     threads=max(1, int(cfg.runtime.cpus_per_worker)), job=self.name)
        return self.tasks

    def hash_inputs(self, pool: cf.Executor | None) -> None:
        """Start hashing the inputs for the manifest: on `pool` alongside remote workers, else when called."""
        for a, f, stamp in input_files(self.adapters):
            if f not in self._hashes:
                self._hashes[f] = pool.submit(file_sha256, a, f, stamp, self._hasher) if pool else _done(
                    file_sha256(a, f, stamp, self._hasher))

    def add(self, task: ShardTask, result: ShardResult) -> bool:
        """Record a shard's result; True when it was the job's last."""
        self.results[task.index] = result
        done = len(self.results) == len(self.tasks)
        if done:
            self._t_merge = time.perf_counter()
        return done

    def finish(self, executor: str) -> MergeResult:
        """Assemble the parts into the output files, write the model card and the manifest, rename into place."""
        assert self.plan is not None and self.staging is not None
        self.hash_inputs(None)
        cfg, plan, staging = self.cfg, self.plan, str(self.staging.path)
        results = [self.results[t.index] for t in self.tasks]
        tensors = {t.name: t for r in results for t in r.tensors}
        sha = {f: fut.result() for f, fut in self._hashes.items()}
        recipe = fingerprint(cfg, self.adapters, sha)
        hashes = write_output(plan, tensors, staging, cfg.output.path, recipe)
        inputs = [{"name": a.name, "path": a.path, "weight": a.weight, **a.source,
                   "files": [{"file": f, "bytes": a.stamps[f].size, "mtime_ns": a.stamps[f].mtime_ns,
                              "ctime_ns": a.stamps[f].ctime_ns,
                              "sha256": sha[f]} for f in a.inputs]}
                  for a in self.adapters]
        for entry, a in zip(inputs, self.adapters):  # for the model card's table of sources
            entry.update(rank=a.config["r"], max_rank=a.max_rank)
        t_done = time.perf_counter()
        seconds = {"plan": round(self._t_plan - self._t0, 4), "merge": round(self._t_merge - self._t_plan, 4),
                   "assemble": round(t_done - self._t_merge, 4), "total": round(t_done - self._t0, 4)}
        manifest = build_manifest(cfg, plan, self.tasks, results, inputs, [], executor, seconds, recipe,
                                  fingerprint_id(recipe))
        if cfg.output.model_card:  # from the manifest's content, and listed in its outputs like every file
            from distmerge.publish.card import write_card

            write_card(staging, manifest, plan.adapter_config)
        names = sorted(n for n in os.listdir(staging) if n != "_parts")
        manifest["outputs"] = file_entries(staging, names, hashes)
        write_json(os.path.join(staging, MANIFEST), manifest)
        self.staging.commit()
        total = time.perf_counter() - self._t0
        return MergeResult(cfg.output.path, tuple(sorted(names + [MANIFEST])), plan.method, plan.rank, total,
                           manifest)


def _done(value) -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_result(value)
    return f
