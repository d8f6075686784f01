"""A task's examples: JSON lines of {"prompt": ..., "completion": ...}, checked line by line, then a seeded
shuffle (when asked) and the first `limit`. Its sha256 is part of every cached score's key."""

from __future__ import annotations

import hashlib
import json
import random

from distmerge.config.eval import TaskSpec
from distmerge.errors import ConfigError
from distmerge.evaluate.worker import TaskData

SHUFFLE_SEED = "distmerge-eval"  # a fixed seed: the same file, shuffle and limit always select the same examples
MAX_PROBLEMS = 5


def read_task(task: TaskSpec) -> tuple[TaskData, str]:
    """(the examples to score, the data file's sha256)."""
    try:
        with open(task.data, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"task {task.name!r}: cannot read data {task.data}: {e.strerror or e}"]) from None
    examples, problems = [], []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"task {task.name!r}: {task.data}:{n}: expected a JSON object with string prompt and "
                            f"completion, got {line[:80]!r}")
            if len(problems) >= MAX_PROBLEMS:
                break
            continue
        examples.append((row["prompt"], row["completion"]))
    if problems:
        raise ConfigError(problems)
    if not examples:
        raise ConfigError([f"task {task.name!r}: {task.data} holds no examples; write one JSON object per line"])
    if task.shuffle:
        random.Random(SHUFFLE_SEED).shuffle(examples)
    if task.limit:
        examples = examples[:task.limit]
    data = TaskData(task.name, task.metric, task.max_new_tokens, tuple(examples))
    return data, hashlib.sha256(raw).hexdigest()
