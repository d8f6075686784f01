"""merge_shard(task): the only place tensors live.

It opens just its tensors, turns each adapter's factors into the method's 2-D inputs, merges one
module at a time, streams the result into one part file and returns metadata, never tensors.
Memory is one module's inputs and outputs (plus one module's dense deltas for the pruned SVD
methods), whatever the shard's size or the number of layers.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

from distmerge._lazy import torch
from distmerge.adapters.header import TensorInfo, torch_dtype
from distmerge.adapters.reader import TensorReader, all_finite, non_finite_error
from distmerge.errors import MergeError
from distmerge.methods import registry
from distmerge.methods.base import Factors, ModuleContext, Scratch
from distmerge.output.safetensors_io import Spec, StreamWriter
from distmerge.planner import ModuleJob, ShardTask, Source


@dataclass(frozen=True)
class ShardResult:
    index: int
    part: str
    tensors: tuple[TensorInfo, ...]
    stats: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]  # (module, ((stat, value), ...))
    seconds: float
    worker: tuple[tuple[str, str], ...]  # host, pid, device
    phases: tuple[tuple[str, float], ...] = ()  # seconds spent reading, merging, writing


class Phases:
    """Seconds per phase of a shard, so a slow merge says whether it waits on I/O or on math."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start

    def items(self) -> tuple[tuple[str, float], ...]:
        return tuple((k, round(v, 4)) for k, v in sorted(self.seconds.items()))


def resolve_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MergeError("runtime.device is cuda but this worker sees no GPU; set runtime.device=auto or cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def task_specs(task: ShardTask) -> list[Spec]:
    specs = []
    for j in task.modules:
        specs += [Spec(j.a_name, task.out_dtype, j.a_shape), Spec(j.b_name, task.out_dtype, j.b_shape)]
    for p in task.passthrough:
        info = p.sources[0][1]
        specs.append(Spec(p.name, info.dtype, info.shape))
    return specs


class InputBuffer:
    """One module's input factors, read back to back into a float32 buffer a worker reuses.

    Fresh buffers per tensor cost a page fault every 4 KiB, which was 3/4 of the read time (measured);
    this one grows to the largest module once per worker, not once per shard: an executor keeps one
    for every shard it runs in a process. Back to back, the A's (and the B's) of equal rank form
    the stacked tensor the merge methods want, so `_primitives.stack` takes them without a copy.
    The views it hands out are valid until the next module is read: outputs are written before that.
    """

    def __init__(self) -> None:
        self._floats = torch.empty(0, dtype=torch.float32)
        self._raw = torch.empty(0, dtype=torch.uint8)  # staging for inputs not stored as float32

    @staticmethod
    def _grow(buf: torch.Tensor, n: int) -> torch.Tensor:
        return buf if buf.numel() >= n else torch.empty(n, dtype=buf.dtype)

    @staticmethod
    def _tensors(job: ModuleJob) -> list[tuple[TensorInfo, Source]]:
        return [(s.a, s) for s in job.sources] + [(s.b, s) for s in job.sources]  # all A's, then all B's

    @classmethod
    def _numel(cls, job: ModuleJob) -> int:
        return sum(math.prod(info.shape) for info, _ in cls._tensors(job))

    def reserve(self, jobs: Sequence[ModuleJob]) -> None:
        """Grow once to the largest of these modules: growing module by module faulted in each size."""
        self._floats = self._grow(self._floats, max(map(self._numel, jobs), default=0))

    def read(self, job: ModuleJob, reader: TensorReader, device: torch.device) -> list[Factors]:
        tensors = self._tensors(job)
        total = self._numel(job)
        self._floats = self._grow(self._floats, total)
        spans, pos = [], 0
        for info, s in tensors:
            n = math.prod(info.shape)
            slot = self._floats[pos:pos + n]
            if info.dtype == "F32":
                reader.read_into(info, s.adapter_name, slot.view(torch.uint8))
            else:
                self._raw = self._grow(self._raw, info.nbytes)
                raw = self._raw[:info.nbytes]
                reader.read_into(info, s.adapter_name, raw)
                slot.copy_(raw.view(torch_dtype(info.dtype)))
            spans.append((pos, pos + n))
            pos += n
        if not all_finite(self._floats[:total]):  # one reduction per module; name the tensor only on failure
            for (info, s), (p0, p1) in zip(tensors, spans):
                if not all_finite(self._floats[p0:p1]):
                    raise non_finite_error(self._floats[p0:p1], info, s.adapter_name)
        block = self._floats[:total].to(device)  # one transfer per module on a GPU
        views = [block[p0:p1] for p0, p1 in spans]
        count = len(job.sources)
        return [Factors(a.view(s.rank, -1), b.view(-1, s.rank), s.scaling, s.weight, s.adapter)
                for s, a, b in zip(job.sources, views[:count], views[count:])]


class WorkerMemory:
    """What a worker keeps from module to module and shard to shard: its input buffer and the merge
    methods' scratch. Each grows to the largest module it has seen, so memory is flat in layers."""

    def __init__(self) -> None:
        self.inputs = InputBuffer()
        self.scratch = Scratch()


def merge_module(job: ModuleJob, task: ShardTask, reader: TensorReader, device: torch.device, phase: Phases,
                 memory: WorkerMemory) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One module: (lora_A, lora_B) in their saved layout and dtype, and the module's stats."""
    with phase("read"):
        inputs = memory.inputs.read(job, reader, device)
    with phase("math"):
        a, b, stats = _merge_math(job, task, inputs, device, memory.scratch)
    with phase("write"):
        dtype = torch_dtype(task.out_dtype)
        a_out = a.reshape(job.a_shape).to(dtype).cpu()
        b_out = b.reshape(job.b_shape).to(dtype).cpu()
        if dtype != torch.float32 and not (all_finite(a_out) and all_finite(b_out)):
            raise overflow_error(job, task, a, b)
    return a_out, b_out, stats


def overflow_error(job: ModuleJob, task: ShardTask, a: torch.Tensor, b: torch.Tensor) -> MergeError:
    """The float32 result is finite (checked in the math) but does not fit the output dtype."""
    dtype = torch_dtype(task.out_dtype)
    biggest = max(float(a.abs().max()), float(b.abs().max()))
    return MergeError(f"module {job.module!r}: the {task.method} merge's factors reach |{biggest:.4g}|, beyond "
                      f"{str(dtype).removeprefix('torch.')}'s largest value {torch.finfo(dtype).max:.4g}, so the "
                      f"output would hold Inf; set output.dtype: float32, or use smaller weights")


def _merge_math(job: ModuleJob, task: ShardTask, inputs: list[Factors], device: torch.device, scratch: Scratch
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    method = registry.get(task.method)
    try:
        merged = method(inputs, ModuleContext(job.module, task.spec, job.rank, device, scratch))
    except torch.linalg.LinAlgError as e:  # non-finite or overflowing sums reach LAPACK as NaN/Inf
        names = ", ".join(f"{s.adapter_name} (weight {s.weight:g})" for s in job.sources)
        raise MergeError(f"module {job.module!r}: the {task.method} merge of {names} failed in its SVD "
                         f"({str(e).splitlines()[0][:160]}); the weighted delta overflows float32 or is not "
                         f"finite: use smaller weights") from None
    a, b = merged.a, merged.b
    if a.shape[0] != job.rank or b.shape[1] != job.rank:
        raise AssertionError(f"{task.method} returned rank {a.shape[0]}/{b.shape[1]} for {job.module}, "
                             f"planned {job.rank}")
    if not (all_finite(a) and all_finite(b)):
        names = ", ".join(s.adapter_name for s in job.sources)
        raise MergeError(f"module {job.module!r}: the {task.method} merge of {names} produced NaN/Inf; "
                         f"check the weights and the inputs' magnitudes")
    stats = {"rank": float(job.rank), **merged.stats}
    if job.rank <= max(s.rank for s in job.sources):
        # ‖B·A‖_F without forming B·A: √ sum((BᵀB) ∘ (AAᵀ)), O((m+n)·rank²). For cat (rank Σrᵢ) that is
        # more than the merge itself and grows with the square of the adapter count, so cat has none.
        stats["delta_norm"] = float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())
    return a, b, stats


def merge_shard(task: ShardTask, memory: WorkerMemory | None = None) -> ShardResult:
    """Merge one shard task and write its part file; returns metadata only. `memory` is the worker's,
    reused from shard to shard; the result does not depend on it.

    The math runs on task.threads threads wherever it runs: LAPACK and BLAS results depend on the thread
    count, and one config must give the same bytes on every executor.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        return _merge_shard(task, memory or WorkerMemory())
    finally:
        torch.set_num_threads(threads)


def _merge_shard(task: ShardTask, memory: WorkerMemory) -> ShardResult:
    start = time.perf_counter()
    device = resolve_device(task.device)
    path = os.path.join(task.staging, "_parts", task.part_name)
    stats = []
    phase = Phases(device)
    memory.inputs.reserve(task.modules)
    with StreamWriter(path, task_specs(task), digest=False) as writer, TensorReader() as reader:
        for job in task.modules:
            a, b, s = merge_module(job, task, reader, device, phase, memory)
            with phase("write"):
                writer.write(job.a_name, a)
                writer.write(job.b_name, b)
            stats.append((job.module, tuple(sorted(s.items()))))
        for p in task.passthrough:
            with phase("read"):
                tensor = reader.load_raw(p.sources[0][1], p.sources[0][0])
                for owner, info in p.sources[1:]:
                    if not torch.equal(tensor, reader.load_raw(info, owner)):
                        raise MergeError(f"tensor {p.name!r} differs between adapters {p.sources[0][0]!r} and "
                                         f"{owner!r}; a saved base layer must be the same in every adapter")
            with phase("write"):
                writer.write(p.name, tensor)
        tensors = tuple(writer.tensors())
        with phase("write"):
            writer.close()
    worker = (("host", socket.gethostname()), ("pid", str(os.getpid())), ("device", str(device)))
    return ShardResult(task.index, path, tensors, tuple(stats), time.perf_counter() - start, worker,
                       phase.items())
