"""Output formats: how a plan's merged tensors become files a loader reads (peft, diffusers, kohya).

The names and the detection of each format live in the one table, adapters/formats.py; here are the
writers. Tensors are copied from the workers' parts by byte range, renamed where the format names
them differently; nothing is decoded. Every file carries the recipe and the input hashes in its
safetensors metadata, as distmerge.json does, so a file copied away alone still says what it is.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Callable

from distmerge import lora
from distmerge._lazy import torch
from distmerge.adapters.formats import DIFFUSERS_FILE, FORMATS, METADATA_KEY, pipeline_components
from distmerge.adapters.header import TensorInfo
from distmerge.output.assemble import write_files, write_json
from distmerge.output.safetensors_io import write_renamed
from distmerge.planner import Plan

Writer = Callable[[Plan, dict[str, TensorInfo], str, str, dict[str, str]], dict[str, str]]


# What the file's recipe leaves out of the fingerprint's: the keys that decide only how files are laid out
# (the same bytes however the work is split, tests/test_output.py), and where each input was read from (a
# Hub input merges to the bytes of the same local files, tests/test_hub.py); distmerge.json keeps them.
LAYOUT_KEYS = ("shard_size", "consolidate", "model_card")
PROVENANCE_KEYS = ("name", "from", "hub", "files")  # files: {file name: sha256}; a Hub blob's name is its hash


def recipe_metadata(recipe: dict) -> dict[str, str]:
    """The recipe (method, each input's weight, sha256s, format and per-module weights, versions) as file
    metadata; inputs in config order."""
    # the math's torch threads, as the job derives them from cpus_per_worker: 0.5, 1 and 1.0 give the same bytes
    runtime = {("threads" if k == "cpus_per_worker" else k): (max(1, int(v)) if k == "cpus_per_worker" else v)
               for k, v in recipe.get("runtime", {}).items()}
    doc = {**recipe, "output": {k: v for k, v in recipe.get("output", {}).items() if k not in LAYOUT_KEYS},
           "runtime": runtime,
           "adapters": [{"sha256": sorted(a["files"].values()),
                         **{k: v for k, v in a.items() if k not in PROVENANCE_KEYS}} for a in recipe["adapters"]]}
    return {"format": "pt", "distmerge.recipe": json.dumps(doc, sort_keys=True, separators=(",", ":"))}


def write_output(plan: Plan, tensors: dict[str, TensorInfo], dest: str, out_path: str, recipe: dict
                 ) -> dict[str, str]:
    """Write the plan's output in its format into `dest` (the staging directory); {file: sha256}."""
    return WRITERS[plan.out_format](plan, tensors, dest, out_path, recipe_metadata(recipe))


def _peft(plan: Plan, tensors: dict[str, TensorInfo], dest: str, out_path: str, meta: dict[str, str]):
    component = _component(plan)
    if component is None:  # PEFT inputs: the planner's names and adapter_config are PEFT's own
        hashes = write_files(plan, tensors, dest, meta)
        write_json(os.path.join(dest, "adapter_config.json"), plan.adapter_config)
        return hashes
    # one diffusion component (checked by the planner) as the PEFT adapter of that model
    prefix = f"{component}."
    items = [(lora.factor_key(lora.PEFT_PREFIX + j.module[len(prefix):], role, False), tensors[name])
             for j in plan.jobs for role, name in (("A", j.a_name), ("B", j.b_name))]
    sha = write_renamed(os.path.join(dest, "adapter_model.safetensors"), sorted(items, key=lambda x: x[0]), meta)
    cfg = _lora_config(plan, component)
    cfg.update(peft_type="LORA", base_model_name_or_path=plan.adapter_config.get("base_model_name_or_path"),
               task_type=None, inference_mode=True, init_lora_weights=True, modules_to_save=None, bias="none",
               fan_in_fan_out=False)
    write_json(os.path.join(dest, "adapter_config.json"), cfg)
    return {"adapter_model.safetensors": sha}


def _diffusers(plan: Plan, tensors: dict[str, TensorInfo], dest: str, out_path: str, meta: dict[str, str]):
    fmt = FORMATS["diffusers"]
    items = [(fmt.key(j.module, role), tensors[name]) for j in plan.jobs
             for role, name in (("A", j.a_name), ("B", j.b_name))]
    components = sorted({j.module.partition(".")[0] for j in plan.jobs})
    adapter_meta = {f"{c}.{k}": v for c in components for k, v in _lora_config(plan, c).items()}
    meta = {**meta, METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True)}
    return {DIFFUSERS_FILE: write_renamed(os.path.join(dest, DIFFUSERS_FILE), sorted(items, key=lambda x: x[0]),
                                          meta)}


def _kohya(plan: Plan, tensors: dict[str, TensorInfo], dest: str, out_path: str, meta: dict[str, str]):
    """lora_down/lora_up with alpha = rank, so kohya's scale alpha/rank is 1: the merged factors carry it."""
    fmt = FORMATS["kohya"]
    items: list = []
    for j in plan.jobs:
        items += [(fmt.key(j.module, "A"), tensors[j.a_name]), (fmt.key(j.module, "B"), tensors[j.b_name]),
                  (fmt.key(j.module, "alpha"), torch.tensor(float(j.rank), dtype=torch.float32))]
    meta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(plan.rank),
            "ss_network_alpha": str(plan.rank)}
    name = fmt.file(out_path)
    return {name: write_renamed(os.path.join(dest, name), sorted(items, key=lambda x: x[0]), meta)}


def _component(plan: Plan) -> str | None:
    """The one pipeline component of a diffusion plan, None for PEFT names."""
    comps = pipeline_components(j.module for j in plan.jobs)
    return comps.pop() if comps is not None and len(comps) == 1 else None


def _lora_config(plan: Plan, component: str) -> dict:
    """A LoraConfig for one component's modules, named within it: every module at alpha = its rank."""
    prefix = f"{component}."
    ranks = {j.module[len(prefix):]: j.rank for j in plan.jobs if j.module.startswith(prefix)}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "use_dora": False, "use_rslora": False, "lora_bias": False}


WRITERS: dict[str, Writer] = {"peft": _peft, "diffusers": _diffusers, "kohya": _kohya}
assert set(WRITERS) == set(FORMATS), "every format in adapters/formats.py has a writer"
