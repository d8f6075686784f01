"""`distmerge evaluate EVAL.yaml`: the evaluation config, its schema and its checks.

Kept beside the merge config's schema.py and load.py, in their style (frozen dataclasses, every problem
collected with its key path and a fix, "did you mean" for unknown keys), but in a file of its own: an
evaluation is a consumer of merge outputs, and its keys are not merge keys.

    base_model: /models/llama-3-8b          # local dir or hf://org/name@rev
    dtype: bfloat16
    tasks:
      - {name: sql, data: /data/sql.jsonl, metric: loss, limit: 200, source: /shared/adapters/sql}
      - {name: chat, data: /data/chat.jsonl, metric: exact_match, max_new_tokens: 32, source: ...}
    candidates: [/shared/merged/zoo/support-bot, {batch: configs/zoo_nightly.yaml}]
    output: ./eval-report
    runtime: {executor: auto}
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from distmerge.config.document import read_document
from distmerge.config.load import ConfigSource, _check_runtime, build_section, one_of, suggest
from distmerge.config.schema import DTYPES, RuntimeSpec
from distmerge.errors import ConfigError

METRICS = ("loss", "exact_match")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    data: str  # a JSON-lines file of {"prompt": ..., "completion": ...}
    metric: str = "loss"
    limit: Optional[int] = None  # the first N examples (after the seeded shuffle when shuffle is true)
    shuffle: bool = False
    max_new_tokens: int = 32  # exact_match: the longest greedy generation
    source: Optional[str] = None  # the adapter trained for this task: retention's reference


@dataclass(frozen=True)
class Candidate:
    """A merged adapter to compare; `recipe` names the zoo recipe it came from ({batch: ZOO.yaml})."""

    path: str
    name: str
    recipe: Optional[str] = None
    zoo: Optional[str] = None


@dataclass(frozen=True)
class EvalConfig:
    base_model: str = ""
    dtype: str = "float32"
    tasks: tuple[TaskSpec, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    output: str = "./eval-report"
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)


TOP_KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig))


def load_eval_config(source: ConfigSource, overrides: Iterable[str] = (), extra_candidates: Iterable[Candidate] = (),
                     require_candidates: bool = True) -> EvalConfig:
    """The YAML file (or dict) with key=value overrides, checked whole: every problem is reported at once.

    `extra_candidates` are added after the file's (`distmerge batch --evaluate` adds the batch's outputs)."""
    raw, problems = read_document(source, list(overrides), keys=", ".join(TOP_KEYS))
    if problems and not raw:
        raise ConfigError(problems)
    try:
        cfg = validate_eval(raw, list(extra_candidates), require_candidates)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def validate_eval(raw: Mapping[str, Any], extra: list[Candidate] = (), require_candidates: bool = True) -> EvalConfig:
    p: list[str] = []
    for key in raw:
        if key not in TOP_KEYS:
            p.append(f"{key}: unknown key{suggest(key, TOP_KEYS)} (valid keys: {', '.join(TOP_KEYS)})")
    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        p.append("base_model: expected the base model's directory or hf://ORG/NAME@REV, e.g. "
                 "base_model: /models/llama-3-8b")
        base = ""
    elif base.startswith("hf://"):
        from distmerge.sources.hub import SYNTAX, parse

        if parse(base) is None:
            p.append(f"base_model: {base!r} is not a Hub path distmerge can read; write {SYNTAX}")
    else:
        path = Path(base).expanduser()
        if not (path / "config.json").is_file():
            p.append(f"base_model: {base!r} is not a model directory (no config.json there); point it at a "
                     f"directory written by save_pretrained, or hf://ORG/NAME")
        base = os.path.realpath(path)
    dtype = raw.get("dtype", "float32")
    one_of(p, "dtype", dtype, DTYPES)
    tasks = _tasks(raw.get("tasks"), p)
    candidates = _candidates(raw.get("candidates"), p) + list(extra)
    if require_candidates and not candidates and not any(t.source for t in tasks):
        p.append("candidates: nothing to evaluate; list merged adapters, e.g. candidates: [./merged], or "
                 "{batch: configs/zoo.yaml} for every output of a batch")
    _unique_names(candidates, p)
    output = raw.get("output", "./eval-report")
    if not isinstance(output, str) or not output:
        p.append(f"output: expected the report's directory, e.g. output: ./eval-report, got {output!r}")
        output = ""
    runtime = build_section(RuntimeSpec, raw.get("runtime"), "runtime", p)
    if runtime is not None:
        _check_runtime(runtime, p)
    if p:
        raise ConfigError(p)
    return EvalConfig(base, dtype, tuple(tasks), tuple(candidates), os.path.realpath(os.path.expanduser(output)),
                      runtime)


def _adapter_problem(path: str) -> str | None:
    from distmerge.sources import kind_of

    kind = kind_of(path)
    if kind is not None:
        return kind.problem(path)
    d = Path(path).expanduser()
    if not d.is_dir():
        return f"adapter directory {path!r} does not exist"
    if not (d / "adapter_config.json").is_file():
        return f"{path!r} has no adapter_config.json; is it a PEFT adapter saved with save_pretrained?"
    return None


def _local(path: str) -> str:
    from distmerge.sources import is_remote

    return path if is_remote(path) else os.path.realpath(os.path.expanduser(path))


def _tasks(raw: Any, p: list[str]) -> list[TaskSpec]:
    if not isinstance(raw, list) or not raw:
        p.append("tasks: expected a non-empty list of tasks, e.g. tasks: [{name: sql, data: ./sql.jsonl, "
                 "metric: loss, source: ./adapters/sql}]")
        return []
    out, seen = [], set()
    for i, item in enumerate(raw):
        where = f"tasks[{i}]"
        if not isinstance(item, Mapping) or not item.get("name") or not item.get("data"):
            p.append(f"{where}: expected a mapping with a name and data, e.g. {{name: sql, data: ./sql.jsonl}}")
            continue
        spec = build_section(TaskSpec, item, where, p)
        if spec is None:
            continue
        where = f"tasks[{i}] ({spec.name})"
        if spec.name in seen:
            p.append(f"{where}.name: {spec.name!r} is used twice; task names must be unique")
        seen.add(spec.name)
        one_of(p, f"{where}.metric", spec.metric, METRICS)
        if spec.limit is not None and spec.limit < 1:
            p.append(f"{where}.limit: must be >= 1 or null (every example), got {spec.limit}")
        if spec.max_new_tokens < 1:
            p.append(f"{where}.max_new_tokens: must be >= 1, got {spec.max_new_tokens}")
        data = os.path.realpath(os.path.expanduser(spec.data))
        if not os.path.isfile(data):
            p.append(f"{where}.data: {spec.data!r} is not a file; expected JSON lines of "
                     f'{{"prompt": ..., "completion": ...}}')
        source = spec.source
        if source is not None:
            problem = _adapter_problem(source)
            if problem:
                p.append(f"{where}.source: {problem}; it is the adapter trained for this task")
            source = _local(source)
        out.append(dataclasses.replace(spec, data=data, source=source))
    return out


def _candidates(raw: Any, p: list[str]) -> list[Candidate]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        p.append(f"candidates: expected a list of adapter paths or {{batch: ZOO.yaml}}, got {type(raw).__name__}")
        return []
    out: list[Candidate] = []
    for i, item in enumerate(raw):
        where = f"candidates[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping) or sum(k in item for k in ("path", "batch")) != 1:
            p.append(f"{where}: expected an adapter path, {{path: DIR, name: NAME}} or {{batch: ZOO.yaml}}, "
                     f"got {item!r}")
            continue
        unknown = [k for k in item if k not in ("path", "name", "batch")]
        for k in unknown:
            p.append(f"{where}.{k}: unknown key{suggest(k, ('path', 'name', 'batch'))} "
                     f"(a candidate has path and name, or batch)")
        if "batch" in item:
            out += _batch_candidates(str(item["batch"]), where, p)
            continue
        path = str(item["path"])
        problem = _adapter_problem(path)
        if problem:
            p.append(f"{where}.path: {problem}; run the merge that writes it first")
            continue
        name = item.get("name") or _default_name(path)
        out.append(Candidate(_local(path), str(name)))
    return out


def _default_name(path: str) -> str:
    from distmerge.config.load import _default_name as name_of

    return name_of(path.rstrip("/"))


def _batch_candidates(zoo_path: str, where: str, p: list[str]) -> list[Candidate]:
    """Every recipe's output of a zoo file, named by its recipe (outputs not written yet are skipped then)."""
    from distmerge.config.zoo import load_zoo

    try:
        zoo = load_zoo(zoo_path)
    except ConfigError as e:
        p.extend(f"{where}.batch: {zoo_path}: {problem}" for problem in e.problems)
        return []
    return [Candidate(r.config.output.path, r.name, r.name, os.path.realpath(zoo_path)) for r in zoo.recipes]


def _unique_names(candidates: list[Candidate], p: list[str]) -> None:
    by_name: dict[str, str] = {}
    for c in candidates:
        if c.name in by_name and by_name[c.name] != c.path:
            p.append(f"candidates: two candidates are named {c.name!r} ({by_name[c.name]} and {c.path}); "
                     f"give one a name: {{path: ..., name: ...}}")
        by_name.setdefault(c.name, c.path)
