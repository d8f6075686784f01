"""The evaluation driver: what must be scored, the cache, the pool, the report.

- **Units.** The base alone (every task), each task's source adapter (its task), every candidate (every
  task). Adapters are known by their content (sha256 of their files), so a source listed again as a
  candidate, or a grid point that merges to the same bytes, is scored once.
- **Cache.** A score is kept under (adapter content, task data sha256, evaluation settings) in
  OUTPUT/scores_cache.json; re-evaluating an unchanged zoo scores nothing and starts no worker. A
  distmerge output's sha256s come from its manifest (sizes and mtimes checked), so nothing is re-read.
- **Pool.** `local`: one worker in this process. `ray`: the merge executor's pool (RayExecutor) with
  EvalWorker actors, one per GPU or CPU actors where there are none, fed by ray.wait, a dead or hung
  actor replaced and its adapter scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from distmerge.config.eval import Candidate, EvalConfig, load_eval_config
from distmerge.errors import ConfigError, DistmergeError, OutputError, output_error
from distmerge.evaluate.worker import BATCH, EvalItem, EvalResult, TaskData
from distmerge.output.owner import written_by_us
from distmerge.output.safetensors_io import sha256_file

log = logging.getLogger("distmerge")
CACHE = "scores_cache.json"
SCORING = 1  # bump when a metric's computation changes: every cached score is then stale
# every file PEFT may load an adapter from: adapter_model.safetensors / .bin / .pt, sharded weights and their
# index, and the config; an adapter is known by all of them, or two .bin adapters with one config would be one.
# A trainer checkpoint's other files (optimizer.pt, training_args.bin) are not the adapter and are not read.
WEIGHTS = "adapter_model"
WEIGHT_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def is_adapter_file(name: str) -> bool:
    return name == "adapter_config.json" or (name.startswith(WEIGHTS) and name.endswith(WEIGHT_ENDINGS))


@dataclass
class Unit:
    """One adapter's identity and the tasks it is scored on."""

    key: str  # "base" or the sha256 of its files
    path: str | None
    names: list[str] = field(default_factory=list)  # the candidates / sources it is
    tasks: list[str] = field(default_factory=list)


@dataclass
class EvalRun:
    report: dict
    output: str
    evaluated: int  # (adapter, task) scores computed this run; the rest came from the cache
    cached: int
    seconds: float


def adapter_identity(path: str, known: dict[str, str] | None = None) -> str:
    """sha256 over an adapter's weight and config files (is_adapter_file), by name and content: from a distmerge
    manifest when it is current, else hashed (through `known`, a cache of earlier hashes, where given)."""
    from distmerge.batch import previous_output

    manifest = previous_output(path)
    if manifest is not None:
        files = {o["file"]: o["sha256"] for o in manifest["outputs"] if is_adapter_file(o["file"])}
    else:
        files = {}
        for name in sorted(os.listdir(path)):
            if is_adapter_file(name) and os.path.isfile(os.path.join(path, name)):
                files[name] = file_sha256(os.path.join(path, name), {} if known is None else known)
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def file_sha256(path: str, known: dict[str, str]) -> str:
    """A file's sha256, taken from `known` while its size, mtime and ctime are those it was hashed at (ctime,
    which no tool sets, catches a file replaced with its old mtime kept), else read and recorded there."""
    st = os.stat(path)
    key = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    if key not in known:
        known[key] = sha256_file(path)
    return known[key]


def base_identity(path: str, dtype: str) -> dict:
    """The base model's config by content and its weights by name, size and mtime (not hashed: gigabytes)."""
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        st = os.stat(full)
        files[name] = sha256_file(full) if name.endswith(".json") else [st.st_size, st.st_mtime_ns]
    return {"path": path, "dtype": dtype, "files": files}


BASE_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")  # config, weights, tokenizer; no pickles


def resolve_base(cfg: EvalConfig) -> str:
    """A local directory holding the base model: hf:// is downloaded once into the Hub cache."""
    if not cfg.base_model.startswith("hf://"):
        return cfg.base_model
    from distmerge.sources.hub import parse, snapshot

    ref = parse(cfg.base_model)  # a valid Hub path: config/eval.py checked it
    local = snapshot(ref, BASE_FILES, cfg.runtime.hub_cache, f"base_model {cfg.base_model!r}")
    return os.path.join(local, ref.subfolder) if ref.subfolder else local


def _resolve_adapter(path: str, cfg: EvalConfig) -> str:
    from distmerge.config.schema import AdapterSpec
    from distmerge.sources import is_remote, locate

    return locate(AdapterSpec(path), cfg.runtime).path if is_remote(path) else path


class Cache:
    """OUTPUT/scores_cache.json: score and count by key; written whole after each result (temp file, rename)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, CACHE)
        self.scores: dict[str, list] = {}
        self.files: dict[str, str] = {}  # file_sha256's memo: source adapters are not re-read every run
        try:
            with open(self.path) as f:
                doc = json.load(f)
            if isinstance(doc, dict) and doc.get("distmerge_eval_cache") == SCORING:
                self.scores = dict(doc.get("scores") or {})
                files = doc.get("files")
                self.files = {k: v for k, v in files.items() if isinstance(v, str)} if isinstance(files, dict) else {}
        except (OSError, ValueError):
            pass
        self._saved = (len(self.scores), len(self.files))

    @staticmethod
    def key(adapter: str, settings: dict) -> str:
        return hashlib.sha256(json.dumps([adapter, settings], sort_keys=True).encode()).hexdigest()

    def save(self) -> None:
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)  # made with the first score, not before
            with open(tmp, "w") as f:
                json.dump({"distmerge_eval_cache": SCORING, "scores": self.scores, "files": self.files}, f)
            os.replace(tmp, self.path)
        except OSError as e:
            raise output_error(e, self.path, "write the score cache") from None
        self._saved = (len(self.scores), len(self.files))

    @property
    def changed(self) -> bool:
        return self._saved != (len(self.scores), len(self.files))


class _Feed:
    """The pool's feed: one item per adapter; results go to the cache as they come."""

    def __init__(self, items: list[EvalItem], on_done, on_failed, bar):
        self._queue = deque(items)
        self._left = len(items)
        self.on_done, self.on_failed, self.bar = on_done, on_failed, bar

    def next_task(self):
        return self._queue.popleft() if self._queue else None

    def finished(self) -> bool:
        return self._left == 0

    def done(self, task: EvalItem, result: EvalResult) -> None:
        self._left -= 1
        self.on_done(task, result)
        self.bar.update(1)

    def failed(self, task: EvalItem, error: Exception) -> None:
        self._left -= 1
        self.on_failed(task, error)
        self.bar.update(1)


class LocalPool:
    """One EvalWorker in this process, loaded on the first item."""

    name = "local"
    parallelism = 1

    def __init__(self, base: str, dtype: str, device: str, threads: int = 1):
        self._args = (base, dtype, device, threads)
        self._worker = None

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc) -> None:
        self._worker = None

    def run(self, feed: _Feed) -> None:
        from distmerge.evaluate.worker import EvalWorker

        while True:
            item = feed.next_task()
            if item is None:
                return
            if self._worker is None:
                self._worker = EvalWorker(*self._args)
                self._worker.ping()  # an unloadable base model: the user's error, raised here (exit 2)
            try:
                result = self._worker.run(item)
            except Exception as e:  # a bad adapter (shapes that do not fit the base) fails that candidate only
                feed.failed(item, e)
                continue
            feed.done(item, result)


def host_peak(weights: int, gpu: bool) -> int:
    """The host memory an evaluation actor reserves beyond RayExecutor's WORKER_BASE_BYTES, from the base's weight
    bytes. On the CPU: the resident base and what a forward pass allocates beside it (2x). With a GPU the base is
    resident there: transformers loads with low_cpu_mem_usage (shards to meta-initialised parameters), so the host
    holds at most one load's worth before .to(cuda), or the part a device map spills to the CPU. Asking 2x per GPU
    actor would reserve 8 x 32 GB of host memory for an 8B bf16 base on an 8-GPU node, and never place a 70B one."""
    return weights if gpu else 2 * weights


def make_pool(cfg: EvalConfig, base: str):
    from distmerge.executors import resolve_executor_name

    threads = max(1, int(cfg.runtime.cpus_per_worker))  # as for merging: the torch threads in every executor
    if resolve_executor_name(cfg.runtime) == "ray":
        from distmerge.evaluate.worker import EvalWorker, _weights_bytes, resolve_device
        from distmerge.executors.ray import RayExecutor

        per = cfg.runtime.gpus_per_worker  # None: one GPU per actor where the cluster has GPUs (worker_shape)
        gpu = cfg.runtime.device != "cpu" and (per > 0 if per is not None else resolve_device(cfg.runtime.device)
                                               == "cuda")
        return RayExecutor(cfg.runtime, host_peak(_weights_bytes(base), gpu), worker=EvalWorker,
                           worker_args=(base, cfg.dtype, cfg.runtime.device, threads))
    return LocalPool(base, cfg.dtype, cfg.runtime.device, threads)


def check_output(directory: str) -> None:
    """The report directory is ours to write: new, or holding a report.json distmerge wrote."""
    from distmerge.evaluate.report import OURS

    existing = directory  # itself, or the nearest parent that exists: a file there could never hold the report
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"output: {existing} exists and is not a directory, so the report cannot be written in "
                          f"{directory}; choose a new directory or an earlier report's. Nothing was written")
    report = os.path.join(directory, "report.json")
    if os.path.lexists(report):
        if not written_by_us(report, "distmerge_evaluate"):
            raise OutputError(f"{report} exists and distmerge did not write it; choose another output directory "
                              f"or move that file away. Nothing was written")
        return
    clash = [n for n in OURS if os.path.lexists(os.path.join(directory, n)) and not (n == CACHE and written_by_us(
        os.path.join(directory, n), "distmerge_eval_cache"))]  # a cache alone: a first run stopped before its report
    if clash:
        raise OutputError(f"{directory} holds {', '.join(clash)}, which distmerge did not write (no report.json "
                          f"of its own there); choose another output directory. Nothing was written")


def evaluate(config, overrides: Iterable[str] = (), extra_candidates: Iterable[Candidate] = ()) -> EvalRun:
    """Score the base, the sources and every candidate on every task; write the report; return it."""
    from distmerge.progress import bar as progress_bar

    from distmerge.adapters.formats import lora_file
    from distmerge.evaluate.data import read_task
    from distmerge.evaluate.report import build_report, write_report

    t0 = time.perf_counter()
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config, overrides, extra_candidates)
    check_output(cfg.output)
    tasks: dict[str, TaskData] = {}
    data_sha: dict[str, str] = {}
    problems: list[str] = []
    for t in cfg.tasks:
        try:
            tasks[t.name], data_sha[t.name] = read_task(t)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    base = resolve_base(cfg)
    base_id = base_identity(base, cfg.dtype)
    settings = {t.name: {"scoring": SCORING, "batch": BATCH, "base": base_id, "data": data_sha[t.name],
                         "metric": t.metric, "limit": t.limit, "shuffle": t.shuffle,
                         "max_new_tokens": t.max_new_tokens if t.metric == "exact_match" else None}
                for t in cfg.tasks}

    units: dict[str, Unit] = {"base": Unit("base", None, ["base"], [t.name for t in cfg.tasks])}
    missing: list[dict] = []

    cache = Cache(cfg.output)  # the directory is made by the first score or the report: none if loading fails

    def unit_of(path: str, name: str, needs: list[str]) -> str:
        local = _resolve_adapter(path, cfg)
        key = adapter_identity(local, cache.files)
        u = units.setdefault(key, Unit(key, local))
        u.names.append(name)
        u.tasks += [t for t in needs if t not in u.tasks]
        return key

    source_keys = {t.name: unit_of(t.source, f"source:{t.name}", [t.name]) for t in cfg.tasks if t.source}
    candidates: list[tuple[Candidate, str]] = []
    seen: set[str] = set()
    for c in cfg.candidates:
        if c.path in seen:
            continue
        seen.add(c.path)
        if not c.path.startswith("hf://") and not os.path.isfile(os.path.join(c.path, "adapter_config.json")):
            other = lora_file(c.path) if os.path.isdir(c.path) else None
            if other is not None:  # a diffusers or kohya output: PEFT cannot load it into a transformers model
                why = (f"{os.path.basename(other)} is not a PEFT adapter; evaluation needs a PEFT-format adapter "
                       f"(adapter_config.json): merge it with output.format: peft")
                missing.append({"name": c.name, "path": c.path, "reason": why})
                log.warning("%s: skipped: %s", c.name, why)
            else:
                missing.append({"name": c.name, "path": c.path, "reason": "no adapter there yet (not merged?)"})
                log.warning("%s: skipped: no adapter at %s yet (run the batch that merges it)", c.name, c.path)
            continue
        candidates.append((c, unit_of(c.path, c.name, list(tasks))))

    scores: dict[tuple[str, str], tuple[float, int]] = {}
    items: list[EvalItem] = []
    cached = 0
    for u in units.values():
        todo = []
        for t in u.tasks:
            hit = cache.scores.get(Cache.key(u.key, settings[t]))
            if hit is not None:
                scores[(u.key, t)] = (float(hit[0]), int(hit[1]))
                cached += 1
            else:
                todo.append(tasks[t])
        if todo:
            label = ", ".join(u.names[:3]) + ("…" if len(u.names) > 3 else "")
            items.append(EvalItem(u.key, u.path, tuple(todo), label=label))

    failures: dict[str, str] = {}

    def on_done(item: EvalItem, result: EvalResult) -> None:
        for task, score, count in result.scores:
            scores[(item.job, task)] = (score, count)
            cache.scores[Cache.key(item.job, settings[task])] = [score, count]
        cache.save()

    def on_failed(item: EvalItem, error: Exception) -> None:
        why = str(error) if isinstance(error, DistmergeError) else \
            f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        failures[item.job] = why
        log.warning("%s: evaluation failed: %s", item.label, why)

    evaluated = sum(len(i.tasks) for i in items)
    if items:  # nothing new to score: no worker, no base model loaded
        bar = progress_bar(cfg.runtime.progress, total=len(items), unit="adapter", desc="evaluate")
        try:
            with make_pool(cfg, base) as pool:
                log.info("evaluating %d adapters (%d scores; %d cached) on %s", len(items), evaluated, cached,
                         pool.name)
                pool.run(_Feed(items, on_done, on_failed, bar))
        finally:
            bar.close()
    if "base" in failures:
        raise DistmergeError(f"the base model {cfg.base_model} could not be evaluated: {failures['base']}")
    report = build_report(cfg, tasks, scores, units, source_keys, candidates, failures, missing,
                          evaluated=evaluated, cached=cached, seconds=time.perf_counter() - t0)
    try:
        os.makedirs(cfg.output, exist_ok=True)
    except OSError as e:
        raise output_error(e, cfg.output, "create the report directory") from None
    write_report(cfg.output, report, candidates)
    if cache.changed:  # hashes learnt in a run that scored nothing new
        cache.save()
    return EvalRun(report, cfg.output, evaluated, cached, time.perf_counter() - t0)
