"""Headers → module jobs → shard tasks. Pure: no Ray, no tensors, milliseconds to run.

The planner is where every cross-adapter rule is checked (same base model, compatible shapes,
equal ranks where the method needs them, modules_to_save in one adapter only), so a bad input is
refused before a worker starts. It fixes every output shape, so the output's bytes and layout are
known before any math runs and do not depend on how the work is split.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from distmerge import lora
from distmerge.adapters import formats
from distmerge.adapters.adapter import Adapter
from distmerge.adapters.header import DTYPE_SIZES, TORCH_TO_ST, TensorInfo
from distmerge.config.schema import MergeConfig, MergeSpec
from distmerge.errors import AdapterError
from distmerge.methods import registry
from distmerge.methods.base import RANK_SAME, RANK_SPAN, RANK_SUM, RANK_SVD

# Rough rates for the cost model; only ratios between modules matter for balancing.
READ_BYTES_PER_S = 1.0e9
FLOPS_PER_S = 5.0e10
SINGLE_FILE = "adapter_model.safetensors"
INDEX_FILE = "adapter_model.safetensors.index.json"


@dataclass(frozen=True)
class Source:
    """One adapter's factors for one module."""

    adapter: int
    adapter_name: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    scaling: float
    weight: float


@dataclass(frozen=True)
class ModuleJob:
    module: str
    embedding: bool
    rank: int  # output rank
    a_name: str
    b_name: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    sources: tuple[Source, ...]
    in_bytes: int
    out_bytes: int
    flops: float
    work_bytes: int  # the merge's working set, for the memory estimate (tests/test_memory.py checks it)

    @property
    def cost(self) -> float:
        return (self.in_bytes + self.out_bytes) / READ_BYTES_PER_S + self.flops / FLOPS_PER_S


@dataclass(frozen=True)
class PassThrough:
    """A tensor copied unmerged: modules_to_save, or an embedding base layer PEFT saved."""

    name: str
    sources: tuple[tuple[str, TensorInfo], ...]  # (adapter name, tensor); >1 only for identical base layers

    @property
    def nbytes(self) -> int:
        return self.sources[0][1].nbytes


@dataclass(frozen=True)
class ShardTask:
    """A plain, picklable unit of work: merge these modules, write one part file."""

    index: int
    method: str
    spec: MergeSpec
    out_dtype: str  # safetensors spelling
    modules: tuple[ModuleJob, ...]
    passthrough: tuple[PassThrough, ...]
    staging: str = ""
    device: str = "auto"
    threads: int = 1  # torch threads for the math: fixed by config, since BLAS bits depend on it
    job: str = ""  # the batch recipe it belongs to: a pool runs the tasks of many jobs at once

    @property
    def part_name(self) -> str:
        return f"part-{self.index:05d}.safetensors"

    @property
    def files(self) -> list[str]:
        """The input files this task reads."""
        return sorted({s.a.file for m in self.modules for s in m.sources} | {s.b.file for m in self.modules
                                                                               for s in m.sources}
                      | {i.file for p in self.passthrough for _, i in p.sources})

    @property
    def in_bytes(self) -> int:
        return sum(m.in_bytes for m in self.modules) + sum(p.nbytes for p in self.passthrough)

    @property
    def out_bytes(self) -> int:
        return sum(m.out_bytes for m in self.modules) + sum(p.nbytes for p in self.passthrough)

    @property
    def cost(self) -> float:
        return sum(m.cost for m in self.modules) + sum(p.nbytes for p in self.passthrough) / READ_BYTES_PER_S

    @property
    def peak_bytes(self) -> int:
        """Estimated working set: the largest module's, since modules stream through one at a time."""
        return max([m.work_bytes for m in self.modules] + [p.nbytes * 2 for p in self.passthrough] + [0])


@dataclass(frozen=True)
class Plan:
    requested_method: str
    method: str  # what runs: PEFT merges a single adapter as linear
    rank: int
    out_dtype: str
    jobs: tuple[ModuleJob, ...]
    passthrough: tuple[PassThrough, ...]
    files: tuple[tuple[str, tuple[str, ...]], ...]  # output file → tensor names, in canonical order
    adapter_config: dict
    spec: MergeSpec
    out_format: str = "peft"  # adapters/formats.py: how output/formats.py names and files the tensors

    @property
    def in_bytes(self) -> int:
        return sum(j.in_bytes for j in self.jobs) + sum(p.nbytes for p in self.passthrough)

    @property
    def out_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs) + sum(p.nbytes for p in self.passthrough)

    @property
    def peak_bytes(self) -> int:
        """The working set of the largest module: what any shard of this plan peaks at."""
        return max([j.work_bytes for j in self.jobs] + [p.nbytes * 2 for p in self.passthrough] + [0])

    def shard(self, num_tasks: int, staging: str = "", device: str = "auto", threads: int = 1,
              job: str = "") -> list[ShardTask]:
        """Split the jobs into at most num_tasks tasks of balanced cost (longest first, to the lightest)."""
        items = [(j.cost, 0, i) for i, j in enumerate(self.jobs)]
        items += [(p.nbytes / READ_BYTES_PER_S, 1, i) for i, p in enumerate(self.passthrough)]
        n = max(1, min(num_tasks, len(items)))
        bins: list[tuple[float, int]] = [(0.0, k) for k in range(n)]
        members: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for cost, kind, i in sorted(items, key=lambda x: (-x[0], x[1], x[2])):
            load, k = heapq.heappop(bins)
            members[k].append((kind, i))
            heapq.heappush(bins, (load + cost, k))
        tasks = []
        for k, group in enumerate(m for m in members if m):
            group.sort()
            tasks.append(ShardTask(
                index=k, method=self.method, spec=self.spec, out_dtype=self.out_dtype,
                modules=tuple(self.jobs[i] for kind, i in group if kind == 0),
                passthrough=tuple(self.passthrough[i] for kind, i in group if kind == 1),
                staging=staging, device=device, threads=threads, job=job))
        return tasks


def default_num_tasks(plan: Plan, shard_size: int, parallelism: int) -> int:
    """Enough tasks to keep every worker busy (4 each, for balance and retries) and to bound a task's bytes."""
    by_bytes = math.ceil((plan.in_bytes + plan.out_bytes) / shard_size)
    return max(by_bytes, 4 * max(1, parallelism))


# --- building the plan ---------------------------------------------------------------------------------


def build_plan(cfg: MergeConfig, adapters: Sequence[Adapter]) -> Plan:
    _check_same_base(adapters)
    out_format = formats.output_format(cfg.output.format, list(adapters))
    requested = cfg.merge.method
    method = registry.get("linear" if len(adapters) == 1 else requested)
    out_dtype = _out_dtype(cfg.output.dtype, adapters)
    nominal_svd = cfg.merge.svd_rank or max(a.max_rank for a in adapters)
    jobs = [_job(name, srcs, method, cfg.merge, nominal_svd, out_dtype)
            for name, srcs in sorted(_sources(adapters).items())]
    passthrough = _passthrough(adapters)
    rank = _mode_rank(jobs)
    adapter_config = _adapter_config(adapters, jobs, passthrough, rank)
    names = sorted([n for j in jobs for n in (j.a_name, j.b_name)] + [p.name for p in passthrough])
    item = DTYPE_SIZES[out_dtype]
    sizes = {p.name: p.nbytes for p in passthrough}
    sizes.update({n: _numel(shape) * item for j in jobs for n, shape in ((j.a_name, j.a_shape), (j.b_name, j.b_shape))})
    single = formats.FORMATS[out_format].file  # a single-file format (diffusers, kohya) is always consolidated
    files = _layout(names, sizes, cfg.shard_size_bytes, cfg.output.consolidate or single is not None)
    if single is not None:
        files = ((single(cfg.output.path), tuple(names)),)
    return Plan(requested, method.name, rank, out_dtype, tuple(jobs), tuple(passthrough), files,
                adapter_config, cfg.merge, out_format)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _check_same_base(adapters: Sequence[Adapter]) -> None:
    first: Adapter | None = None
    for a in adapters:
        base = a.config.get("base_model_name_or_path")
        if not base:
            continue
        if first is None:
            first = a
        elif base != first.config["base_model_name_or_path"]:
            raise AdapterError(
                f"adapter {a.name!r} was trained on {base!r} but adapter {first.name!r} on "
                f"{first.config['base_model_name_or_path']!r}; LoRA deltas of different base models cannot be "
                f"merged. If both name the same model, make base_model_name_or_path equal in their "
                f"adapter_config.json" + ("" if a.format == first.format == "peft" else
                                          " (for a kohya file: its ss_base_model_version / modelspec.architecture "
                                          f"metadata; {a.name!r} is {a.files[0]})"))
    for key in ("fan_in_fan_out",):
        values = {bool(a.config.get(key)) for a in adapters}
        if len(values) > 1:
            names = ", ".join(f"{a.name}={bool(a.config.get(key))}" for a in adapters)
            raise AdapterError(f"adapters disagree on {key} ({names}); they must target the same layer types")


def _out_dtype(requested: str | None, adapters: Sequence[Adapter]) -> str:
    if requested:
        return TORCH_TO_ST[requested]
    found = set().union(*(a.dtypes for a in adapters))
    return found.pop() if len(found) == 1 else "F32"


def _sources(adapters: Sequence[Adapter]) -> dict[str, list[tuple[Adapter, object]]]:
    by_module: dict[str, list] = {}
    for a in adapters:
        for name, mod in a.modules.items():
            by_module.setdefault(name, []).append((a, mod))
    return by_module


def _job(name: str, pairs: list, method, spec: MergeSpec, nominal_svd: int, out_dtype: str) -> ModuleJob:
    first_a, first = pairs[0]
    for a, mod in pairs[1:]:
        if (mod.embedding != first.embedding or mod.a.shape[1:] != first.a.shape[1:]
                or mod.b.shape[0] != first.b.shape[0] or mod.b.shape[2:] != first.b.shape[2:]):
            raise AdapterError(
                f"module {name!r}: adapter {a.name!r} has lora_A {list(mod.a.shape)} / lora_B {list(mod.b.shape)} "
                f"({mod.a.name!r} in {mod.a.file}) but adapter {first_a.name!r} has {list(first.a.shape)} / "
                f"{list(first.b.shape)} ({first.a.name!r} in {first.a.file}); the adapters must come from the "
                f"same base model architecture")
    ranks = [mod.rank for _, mod in pairs]
    m, n = first.b.shape[0], _numel(first.a.shape[1:])
    if method.rank_rule == RANK_SAME:
        if len(set(ranks)) > 1:
            detail = ", ".join(f"{a.name}: r={mod.rank}" for a, mod in pairs)
            raise AdapterError(
                f"module {name!r}: method {method.name!r} merges A and B separately and needs equal ranks, got "
                f"{detail}; use method cat (rank = sum) or an *_svd method (rank = svd_rank)")
        rank = ranks[0]
    elif method.rank_rule == RANK_SUM:
        rank = sum(ranks)
    elif method.rank_rule == RANK_SVD:
        rank = min(nominal_svd, m, n)
    elif method.rank_rule == RANK_SPAN:
        rank = min(spec.svd_rank or sum(ranks), m, n)
    else:
        raise ValueError(f"method {method.name!r} has unknown rank rule {method.rank_rule!r}")
    a_shape = lora.a_shape(rank, first.a.shape[1:])
    b_shape = lora.b_shape(rank, m, first.b.shape[2:])
    out_bytes = (_numel(a_shape) + _numel(b_shape)) * DTYPE_SIZES[out_dtype]
    # the worker's float32 input buffer, the method's temporaries, the result cast to the output dtype
    in_f32 = 4 * sum(mod.a.numel + mod.b.numel for _, mod in pairs)
    work = in_f32 + method.work(m, n, ranks, rank, spec) + out_bytes
    sources = tuple(Source(a.index, a.name, mod.a, mod.b, mod.rank, mod.scaling, a.weight * mod.multiplier)
                    for a, mod in pairs)
    return ModuleJob(
        module=name, embedding=first.embedding, rank=rank,
        a_name=lora.factor_key(name, "A", first.embedding), b_name=lora.factor_key(name, "B", first.embedding),
        a_shape=a_shape, b_shape=b_shape, sources=sources,
        in_bytes=sum(mod.a.nbytes + mod.b.nbytes for _, mod in pairs), out_bytes=out_bytes,
        flops=method.flops(m, n, ranks, rank, spec), work_bytes=work)


def _passthrough(adapters: Sequence[Adapter]) -> list[PassThrough]:
    found: dict[str, list[tuple[str, TensorInfo]]] = {}
    for a in adapters:
        for name, info in a.extras.items():
            found.setdefault(name, []).append((a.name, info))
    out = []
    for name, srcs in sorted(found.items()):
        if len(srcs) > 1 and ".base_layer." not in name:
            owners = ", ".join(repr(s[0]) for s in srcs)
            raise AdapterError(
                f"tensor {name!r} (modules_to_save) is in adapters {owners}; full modules cannot be merged as LoRA "
                f"factors, as in PEFT. Keep modules_to_save in one adapter only, or remove the tensor")
        shapes = {(i.shape, i.dtype) for _, i in srcs}
        if len(shapes) > 1:
            raise AdapterError(f"tensor {name!r} has different shapes or dtypes across adapters "
                               f"({', '.join(f'{o}: {list(i.shape)} {i.dtype}' for o, i in srcs)}); "
                               f"the adapters must share one base model")
        out.append(PassThrough(name, tuple(srcs)))
    return out


def _mode_rank(jobs: Sequence[ModuleJob]) -> int:
    counts = Counter(j.rank for j in jobs)
    return max(counts, key=lambda r: (counts[r], r))


def _layout(names: list[str], sizes: dict[str, int], shard_size: int, consolidate: bool):
    if consolidate:
        return ((SINGLE_FILE, tuple(names)),)
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        if groups[-1] and used + sizes[n] > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += sizes[n]
    total = len(groups)
    return tuple((f"adapter_model-{k + 1:05d}-of-{total:05d}.safetensors", tuple(g)) for k, g in enumerate(groups))


# --- the output's adapter_config.json ----------------------------------------------------------------------


_LAYER_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def _adapter_config(adapters: Sequence[Adapter], jobs: Sequence[ModuleJob], passthrough, rank: int) -> dict:
    """A LoraConfig whose factors carry every scaling: lora_alpha = r per module, use_rslora off.

    PEFT's add_weighted_adapter keeps use_rslora from the first adapter, so a merged rsLoRA adapter is
    rescaled by alpha/√r on load, √r too much. We set use_rslora false and alpha = rank everywhere.
    """
    cfg = dict(adapters[0].config)
    base = next((a.config["base_model_name_or_path"] for a in adapters if a.config.get("base_model_name_or_path")),
                cfg.get("base_model_name_or_path"))
    rank_pattern = {lora.pattern_key(j.module): j.rank for j in jobs if j.rank != rank}
    same_layers = all(all(a.config.get(k) == adapters[0].config.get(k) for k in _LAYER_KEYS) for a in adapters)
    if same_layers:
        targets = _union_targets([a.config.get("target_modules") for a in adapters])
    else:  # layer selections differ: name exactly the modules we wrote
        targets = sorted(lora.pattern_key(j.module) for j in jobs)
        cfg.update({k: None for k in _LAYER_KEYS})
    saved = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])}) or None
    cfg.update(
        r=rank, lora_alpha=rank, use_rslora=False, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern),
        target_modules=targets, base_model_name_or_path=base, modules_to_save=saved,
        init_lora_weights=True, inference_mode=True, use_dora=False, lora_bias=False, bias="none")
    for j in jobs:  # PEFT must resolve every module to the rank we wrote, with scaling 1
        got = lora.match_pattern(rank_pattern, j.module, rank)
        if got != j.rank:
            raise AssertionError(f"rank_pattern resolves {j.module} to {got}, wrote {j.rank}")
    return cfg


def _union_targets(targets: list) -> list | str | None:
    if all(isinstance(t, (list, tuple)) for t in targets):
        return sorted({x for t in targets for x in t})
    if all(isinstance(t, str) for t in targets):
        unique = list(dict.fromkeys(targets))
        return unique[0] if len(unique) == 1 else "|".join(f"({t})" for t in unique)
    # PEFT refuses a mix of regex and list; a list [x, y] means the regex (.*\.)?(x|y), so join as regexes
    parts = []
    for t in targets:
        if isinstance(t, str):
            parts.append(f"({t})")
        elif t:
            parts.append(r"((.*\.)?(" + "|".join(re.escape(x) for x in sorted(t)) + "))")
    return "|".join(dict.fromkeys(parts))
