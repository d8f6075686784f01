"""An evaluation worker: the base model loaded once, adapters loaded into it and unloaded, one after another.

The base is loaded in `dtype`: on a GPU, spread by accelerate's device map (`device_map="auto"`,
`max_memory`) when it does not fit one device; on the CPU otherwise. Each adapter is loaded into the
resident model with PEFT's load_adapter / set_adapter / delete_adapter; the base is never reloaded, and
the base alone is scored with the adapters disabled. transformers, peft and accelerate are imported
here only, behind the `eval` extra.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

BATCH = 16  # examples per padded forward pass; part of the cache key (padding changes float rounding)
SLACK = 0.85  # the share of a GPU's free memory the base may take before it is spread with a device map


@dataclass(frozen=True)
class TaskData:
    """A task's examples as the worker needs them: plain strings, picklable for Ray."""

    name: str
    metric: str
    max_new_tokens: int
    examples: tuple[tuple[str, str], ...]  # (prompt, completion)


@dataclass(frozen=True)
class EvalItem:
    """One adapter (None: the base alone) to score on some tasks. `job`/`index` name it to the pool."""

    job: str
    adapter: str | None
    tasks: tuple[TaskData, ...]
    index: int = 0
    label: str = ""


@dataclass(frozen=True)
class EvalResult:
    scores: tuple[tuple[str, float, int], ...]  # (task, score, examples or tokens counted)
    seconds: float
    worker: tuple[tuple[str, str], ...] = ()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _weights_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith((".safetensors", ".bin")))


class _loading:
    """A base model or tokenizer transformers cannot load is the user's error (exit 2, one line), not a bug; running
    out of memory, or a missing package, is not a bad directory and passes through."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not isinstance(e, Exception) or isinstance(e, (ImportError, MemoryError)) \
                or "out of memory" in str(e).lower():
            return False
        from distmerge.errors import DistmergeError

        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistmergeError(f"base_model: cannot load {self.path}: {first}; expected a transformers model directory "
                             f"saved with save_pretrained (config.json, weights, tokenizer)") from None


class Evaluator:
    """The resident base model and its tokenizer; `evaluate(item)` scores one adapter on its tasks."""

    def __init__(self, base_model: str, dtype: str = "float32", device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import transformers

        self.device = resolve_device(device)
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        # `torch_dtype` was renamed `dtype` in transformers 4.56; the old name still works there, with a warning
        kwargs: dict = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": getattr(torch, dtype)}
        if self.device == "cuda":
            free, _total = torch.cuda.mem_get_info()
            if _weights_bytes(base_model) > SLACK * free and torch.cuda.device_count() >= 1:
                # larger than one device: accelerate spreads it over the GPUs (and the CPU if it must)
                kwargs["device_map"] = "auto"
                kwargs["max_memory"] = {i: int(SLACK * torch.cuda.mem_get_info(i)[0])
                                        for i in range(torch.cuda.device_count())}
        with _loading(base_model):
            self.model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        if "device_map" not in kwargs:
            self.model.to(self.device)
        self.model.eval()
        self.pad_id = next((i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None), 0)
        self.peft = None  # the PeftModel around the base, once an adapter was loaded
        self.forward = self.model  # what scores: the base, or the PeftModel with one active adapter
        self._n = 0
        self._active: str | None = None

    @property
    def input_device(self):
        return self.model.get_input_embeddings().weight.device

    # --- adapters ---------------------------------------------------------------------------------------

    def _swap(self, path: str) -> None:
        """Load an adapter into the resident model and make it the active one; the previous one is deleted
        only then (PEFT keeps at least one adapter in a PeftModel). The base weights are never touched."""
        from peft import PeftModel

        self._n += 1
        name = f"candidate{self._n}"
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
        else:
            self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            self.peft.set_adapter(name)
            self.peft.delete_adapter(self._active)
        self.peft.eval()
        self._active = name

    def evaluate(self, item: EvalItem) -> list[tuple[str, float, int]]:
        import contextlib

        import torch

        if item.adapter is not None:
            self._swap(item.adapter)
            self.forward = self.peft
            scope = contextlib.nullcontext()
        else:
            self.forward = self.peft if self.peft is not None else self.model
            scope = self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
        with scope, torch.inference_mode():
            return [(t.name, *self.score(t)) for t in item.tasks]

    # --- metrics ---------------------------------------------------------------------------------------------

    def score(self, task: TaskData) -> tuple[float, int]:
        if task.metric == "loss":
            return self.loss(task.examples)
        return self.exact_match(task.examples, task.max_new_tokens)

    def encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """(ids of prompt + completion, how many are the prompt's): tokenized apart, so the boundary is exact."""
        p = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return list(p) + list(c), len(p)

    def loss(self, examples: Sequence[tuple[str, str]]) -> tuple[float, int]:
        """The mean cross-entropy over every completion token: one padded forward per batch of BATCH."""
        import torch
        import torch.nn.functional as F

        encoded = [self.encode(p, c) for p, c in examples]
        total, count = 0.0, 0
        for start in range(0, len(encoded), BATCH):
            chunk = encoded[start:start + BATCH]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (seq, n_prompt) in enumerate(chunk):  # right padding: positions stay 0..len-1
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
                labels[row, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
            dev = self.input_device
            logits = self.forward(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            shifted = labels[:, 1:].to(logits.device)
            ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                 ignore_index=-100, reduction="sum")
            total += float(ce.double())
            count += int((shifted != -100).sum())
        return (total / count if count else math.nan), count

    def exact_match(self, examples: Sequence[tuple[str, str]], max_new_tokens: int) -> tuple[float, int]:
        """Greedy generation of up to max_new_tokens, equal to the completion once whitespace is stripped."""
        import torch

        hits = 0
        for start in range(0, len(examples), BATCH):
            chunk = examples[start:start + BATCH]
            prompts = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p, _ in chunk]
            width = max(len(x) for x in prompts)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(prompts):  # left padding: every prompt ends where generation starts
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            dev = self.input_device
            out = self.forward.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad_id)
            for row, (_p, completion) in enumerate(chunk):
                text = self.tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True)
                hits += text.strip() == completion.strip()
        return (hits / len(examples) if examples else math.nan), len(examples)


class _threads:
    """torch's thread count for a block, restored after: BLAS sums depend on it, and the local pool shares the
    driver's process."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


class EvalWorker:
    """The Ray actor (and the local pool's one worker): an Evaluator kept for every item it is handed."""

    def __init__(self, base_model: str, dtype: str, device: str, threads: int = 1) -> None:
        from distmerge.executors.ray import _start_hooks

        _start_hooks()
        from distmerge.errors import DistmergeError

        self._args = (base_model, dtype, device)
        self.threads = threads  # runtime.cpus_per_worker, as for merging: the same scores on every executor
        self.evaluator, self._error = None, None
        try:
            with _threads(threads):
                self.evaluator = Evaluator(*self._args)
        except DistmergeError as e:  # a base model that cannot be loaded: said by ping(), as a task's error carries
            self._error = e          # its cause back to the driver, where a dead Ray actor carries only text

    def ping(self) -> tuple[str, str]:
        import socket

        if self._error is not None:
            raise self._error
        return socket.gethostname(), self.evaluator.device

    def run(self, item: EvalItem) -> EvalResult:
        import socket
        import time

        from distmerge.executors.ray import _fault_hooks

        _fault_hooks()
        t0 = time.perf_counter()
        try:
            with _threads(self.threads):
                if self.evaluator is None:
                    self.evaluator = Evaluator(*self._args)
                scores = self.evaluator.evaluate(item)
        except Exception:
            # an adapter that failed half-loaded (shapes that do not fit this base) may have left layers in the
            # resident model: the next item gets a freshly loaded base, the only time a worker reloads it
            self.evaluator = None
            raise
        return EvalResult(tuple(scores), time.perf_counter() - t0,
                          (("host", socket.gethostname()), ("pid", str(os.getpid()))))
