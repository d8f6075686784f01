"""Worker parts → the output's files, index and adapter_config.json, by copying bytes."""

from __future__ import annotations

import json
import os
from typing import Sequence

from distmerge.adapters.header import TensorInfo, read_header
from distmerge.errors import output_error
from distmerge.output.safetensors_io import copy_tensors, sha256_file
from distmerge.planner import INDEX_FILE, SINGLE_FILE, Plan


def write_files(plan: Plan, tensors: dict[str, TensorInfo], dest: str,
                metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write the plan's output files from the parts' byte ranges; {file name: sha256}."""
    hashes = {}
    for fname, names in plan.files:
        hashes[fname] = copy_tensors(os.path.join(dest, fname), [tensors[n] for n in names], metadata)
    if len(plan.files) > 1 or plan.files[0][0] != SINGLE_FILE:
        write_index(dest, {n: fname for fname, names in plan.files for n in names},
                    sum(tensors[n].nbytes for _, names in plan.files for n in names))
    return hashes


def write_index(dest: str, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(os.path.join(dest, INDEX_FILE), index)


def write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise output_error(e, path) from None


def consolidate(directory: str) -> str:
    """Stream a sharded adapter (index + shards) into one adapter_model.safetensors; remove the shards.

    PEFT and vLLM load only a single file. Bytes are copied, never decoded. Returns the new file's sha256.
    """
    with open(os.path.join(directory, INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    tensors, metadata = {}, None
    for shard in shards:
        found, meta = read_header(os.path.join(directory, shard))
        tensors.update(found)
        metadata = metadata or meta  # every shard carries the same recipe (output/formats.py)
    sha = copy_tensors(os.path.join(directory, SINGLE_FILE), [tensors[n] for n in sorted(weight_map)], metadata)
    for shard in shards:
        os.remove(os.path.join(directory, shard))
    os.remove(os.path.join(directory, INDEX_FILE))
    return sha


def file_entries(directory: str, names: Sequence[str], known: dict[str, str] | None = None) -> list[dict]:
    known = known or {}
    out = []
    for n in names:
        p = os.path.join(directory, n)
        st = os.stat(p)  # mtime too: a batch's up-to-date check notices an output edited in place, unread
        out.append({"file": n, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": known.get(n) or sha256_file(p)})
    return out
