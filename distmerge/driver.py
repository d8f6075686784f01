"""The driver: config → plan → executor → assemble → atomic finalize. It never loads a tensor."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable

from distmerge.adapters import open_adapter
from distmerge.adapters.adapter import Adapter
from distmerge.config import ConfigSource, format_size, load_config
from distmerge.config.schema import MergeConfig
from distmerge.executors import make_executor
from distmerge.output.assemble import file_entries, write_files, write_json
from distmerge.output.manifest import MANIFEST, build_manifest
from distmerge.output.owner import check_target
from distmerge.output.safetensors_io import sha256_file
from distmerge.output.staging import Staging
from distmerge.plan import Plan, build_plan, default_num_tasks
from distmerge.progress import Progress

log = logging.getLogger("distmerge")


@dataclass(frozen=True)
class MergeResult:
    path: str
    files: tuple[str, ...]
    method: str
    rank: int
    seconds: float
    manifest: dict


def open_inputs(cfg: MergeConfig) -> list[Adapter]:
    return [open_adapter(spec, i) for i, spec in enumerate(cfg.adapters)]


def plan(config: ConfigSource, overrides: Iterable[str] = ()) -> Plan:
    """Read configs and headers and plan the merge; nothing is merged or written."""
    cfg = load_config(config, overrides)
    return build_plan(cfg, open_inputs(cfg))


def merge(config: ConfigSource, overrides: Iterable[str] = ()) -> MergeResult:
    """Merge the adapters a config names; the output directory appears only when complete."""
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    check_target(cfg.output.path, cfg.output.overwrite, [(a.name, a.path) for a in cfg.adapters])
    adapters = open_inputs(cfg)
    the_plan = build_plan(cfg, adapters)  # every cross-adapter check, before any worker starts
    t_plan = time.perf_counter()
    # Staging is entered first so that it is removed last: workers are stopped before their directory goes.
    with Staging(cfg.output.path, cfg.output.overwrite) as staging, make_executor(cfg.runtime) as executor, \
            cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hasher:
        # Inputs are hashed for the manifest while remote workers merge; an in-process executor merges on
        # these cores, and hashing alongside only slowed it (measured: 2x on linear), so it waits.
        def hash_inputs() -> dict[str, cf.Future]:
            return {f: hasher.submit(sha256_file, f) for a in adapters for f in a.files}

        input_hashes = None if executor.in_process else hash_inputs()
        tasks = the_plan.shard(default_num_tasks(the_plan, cfg.shard_size_bytes, executor.parallelism),
                               staging=str(staging.path), device=cfg.runtime.device,
                               threads=max(1, int(cfg.runtime.cpus_per_worker)))
        log.info("merging %d adapters with %s into %s: %d modules in %d shards on %s (%d at a time)",
                 len(adapters), the_plan.method, cfg.output.path, len(the_plan.jobs), len(tasks), executor.name,
                 executor.parallelism)
        with Progress(tasks, enabled=cfg.runtime.progress) as progress:
            results = executor.run(tasks, progress.update)
        t_merge = time.perf_counter()
        if input_hashes is None:
            input_hashes = hash_inputs()  # alongside the assembly below
        tensors = {t.name: t for r in results for t in r.tensors}
        hashes = write_files(the_plan, tensors, str(staging.path))
        write_json(os.path.join(staging.path, "adapter_config.json"), the_plan.adapter_config)
        inputs = [{"name": a.name, "path": a.path, "weight": a.weight,
                   "files": [{"file": f, "bytes": os.path.getsize(f), "sha256": input_hashes[f].result()}
                             for f in a.files]} for a in adapters]
        names = sorted(os.listdir(staging.path))
        names = [n for n in names if n != "_parts"]
        t_done = time.perf_counter()
        seconds = {"plan": round(t_plan - t0, 4), "merge": round(t_merge - t_plan, 4),
                   "assemble": round(t_done - t_merge, 4), "total": round(t_done - t0, 4)}
        manifest = build_manifest(cfg, the_plan, tasks, results, inputs, file_entries(str(staging.path), names, hashes),
                                  executor.name, seconds)
        write_json(os.path.join(staging.path, MANIFEST), manifest)
        staging.commit()
    total = time.perf_counter() - t0
    log.info("wrote %s (%s, rank %d) in %.1fs", cfg.output.path, format_size(the_plan.out_bytes), the_plan.rank, total)
    return MergeResult(cfg.output.path, tuple(sorted(names + [MANIFEST])), the_plan.method, the_plan.rank, total,
                       manifest)

