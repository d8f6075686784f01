"""YAML + key=value overrides → one frozen, validated `MergeConfig`.

config/document.py reads the file and applies the overrides (OmegaConf's YAML rules and dotlist); the
checks are ours, so that every problem is collected and reported at once with its key path and a fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping, Union


from distmerge.config import schema
from distmerge.config.document import read_document
from distmerge.config.schema import AdapterSpec, MergeConfig, MergeSpec, OutputSpec, RuntimeSpec
from distmerge.config.units import parse_size
from distmerge.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

ConfigSource = Union[str, os.PathLike, Mapping[str, Any], "DictConfig", MergeConfig]


def load_config(source: ConfigSource, overrides: Iterable[str] = ()) -> MergeConfig:
    """Build the config from a YAML path, a dict or a DictConfig, with `key=value` overrides on top."""
    overrides = list(overrides)
    if isinstance(source, MergeConfig):
        if not overrides:
            return source
        source = dataclasses.asdict(source)
    raw, problems = read_document(source, overrides)
    if problems and not raw:
        raise ConfigError(problems)
    try:
        cfg = validate(raw)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


# --- validation -------------------------------------------------------------------------------------


def validate(raw: Mapping[str, Any], pending: Collection[str] = ()) -> MergeConfig:
    """Check everything, collect every problem, then build the frozen config.

    `pending` are the real paths (os.path.realpath) of adapters that another merge of the same batch will
    write: not checked on disk yet.
    """
    p: list[str] = []
    sections = _check_keys(raw, MergeConfig, "", p)
    adapters = _adapters(raw.get("adapters"), p, pending)
    merge = build_section(MergeSpec, sections.get("merge"), "merge", p)
    output = build_section(OutputSpec, sections.get("output"), "output", p)
    runtime = build_section(RuntimeSpec, sections.get("runtime"), "runtime", p)
    if merge is not None:
        _check_merge(merge, p)
    if output is not None:
        output = _check_output(output, p)
    if runtime is not None:
        _check_runtime(runtime, p)
    if p:
        raise ConfigError(p)
    return MergeConfig(adapters=tuple(adapters), merge=merge, output=output, runtime=runtime)


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def one_of(p: list[str], key: str, value: Any, choices: Collection[str], null: str | None = None) -> None:
    """A key whose value is one of `choices` (or null, where `null` says what null means: "" for nothing)."""
    if (value is None and null is not None) or value in choices:
        return
    nullable = "" if null is None else f" or null ({null})" if null else " or null"
    p.append(f"{key}: expected one of {', '.join(choices)}{nullable}, got {value!r}{suggest(value, choices)}")


def _check_keys(raw: Any, cls: type, where: str, p: list[str]) -> dict:
    prefix = f"{where}." if where else ""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        p.append(f"{where or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            p.append(f"{prefix}{key}: unknown key{suggest(key, names)} (valid keys: {', '.join(names)})")
    return {k: v for k, v in raw.items() if k in names}


def _expected(tp: Any) -> tuple[tuple[type, ...], bool]:
    """Python types a field accepts, and whether null is allowed."""
    optional = False
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        tp = Union[tuple(args)] if len(args) > 1 else args[0]
    types = tuple(typing.get_args(tp)) if typing.get_origin(tp) is Union else (tp,)
    types = tuple(t for t in types if t is not type(None))
    if float in types:
        return (int, *types), optional
    return types, optional


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """A schema class's field types, resolved once: get_type_hints re-evaluates every annotation string, which
    was a quarter of expanding a 50-recipe zoo."""
    return typing.get_type_hints(cls)


def build_section(cls: type, raw: Any, where: str, p: list[str]):
    values = _check_keys(raw, cls, where, p)
    hints = _hints(cls)
    ok = True
    for name, value in values.items():
        types, optional = _expected(hints[name])
        if value is None and optional:
            continue
        if isinstance(value, bool) and bool not in types:
            bad = True
        else:
            bad = not isinstance(value, types)
        if bad:
            want = " or ".join(t.__name__ for t in types) + (" or null" if optional else "")
            p.append(f"{where}.{name}: expected {want}, got {value!r}")
            ok = False
    if not ok:
        return None
    values = {k: (float(v) if hints[k] in (float, typing.Optional[float]) and v is not None else v)
              for k, v in values.items()}
    return cls(**values)


def _adapters(raw: Any, p: list[str], pending: Collection[str] = ()) -> list[AdapterSpec]:
    if not raw:
        p.append("adapters: at least one adapter is needed, e.g. adapters: [{path: ./adapters/sql, weight: 1.0}]")
        return []
    if not isinstance(raw, (list, tuple)):  # a tuple: a frozen MergeConfig given back with overrides
        p.append(f"adapters: expected a list of {{path, weight}}, got {type(raw).__name__}")
        return []
    specs: list[AdapterSpec] = []
    for i, item in enumerate(raw):
        where = f"adapters[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping) or "path" not in item:
            p.append(f"{where}: expected a mapping with a path, e.g. {{path: ./adapters/sql, weight: 0.5}}")
            continue
        if isinstance(item.get("weight"), Mapping):  # set_adapters' form: a block-scale dict in the weight's place
            if item.get("block_weights") is not None:
                p.append(f"{where}.weight: a block-scale dict here means block_weights, which is set too; give "
                         f"one of them")
                continue
            item = {**item, "weight": 1.0, "block_weights": item["weight"]}
        spec = build_section(AdapterSpec, item, where, p)
        if spec is None:
            continue
        spec = _check_format_keys(spec, where, p)
        from distmerge.sources import kind_of  # imported here: sources import the config's schema

        kind = kind_of(spec.path)
        if kind is not None:  # resolved (downloaded) by its source when the merge starts, not checked here
            problem = kind.problem(spec.path)
            if problem:
                p.append(f"{where}.path: {spec.path!r} is {problem}")
            if spec.weight != spec.weight or spec.weight in (float("inf"), float("-inf")):
                p.append(f"{where}.weight: expected a finite number, got {spec.weight}")
            specs.append(spec)
            continue
        path = Path(spec.path).expanduser()
        real = os.path.realpath(path)
        problem = None if real in pending else _formats().path_problem(str(path), spec.format)
        if problem:
            p.append(f"{where}.path: {problem}")
        if spec.weight != spec.weight or spec.weight in (float("inf"), float("-inf")):
            p.append(f"{where}.weight: expected a finite number, got {spec.weight}")
        specs.append(dataclasses.replace(spec, path=real))
    _name_adapters(specs, p)
    return [s for s in specs]


def _formats():
    """adapters/formats.py, imported on use: the adapters import this package's schema."""
    from distmerge.adapters import formats

    return formats


def _check_format_keys(spec: AdapterSpec, where: str, p: list[str]) -> AdapterSpec:
    """format and the per-module weight keys (adapters/formats.py, adapters/weights.py); module_weights
    normalized to ordered (pattern, factor) pairs."""
    from distmerge.adapters import weights

    formats = _formats()
    one_of(p, f"{where}.format", spec.format, formats.names(), null="detected")
    one_of(p, f"{where}.component", spec.component, formats.COMPONENTS, null="")
    found = [f"{where}.{problem}" for problem in weights.problems(spec)]
    p.extend(found)
    if found:
        return spec
    return dataclasses.replace(spec, module_weights=weights.normalize_module_weights(spec.module_weights),
                               layer_weights=None if spec.layer_weights is None else tuple(spec.layer_weights))


def _name_adapters(specs: list[AdapterSpec], p: list[str]) -> None:
    """Give each adapter a unique display name; explicit duplicates are an error."""
    explicit = [s.name for s in specs if s.name]
    for name in {n for n in explicit if explicit.count(n) > 1}:
        p.append(f"adapters: name {name!r} is used twice; names must be unique")
    taken = set(explicit)
    for i, s in enumerate(specs):
        if s.name:
            continue
        base = _default_name(s.path) or f"adapter{i}"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        specs[i] = dataclasses.replace(s, name=name)


def _default_name(path: str) -> str:
    """The adapter's directory name, or for hf://ORG/NAME@REV/SUB the subfolder's (else the repo's) name."""
    from distmerge.sources import kind_of  # imported here: sources import the config's schema

    kind = kind_of(path)
    return kind.default_name(path) if kind else Path(path).name


def _check_merge(m: MergeSpec, p: list[str]) -> None:
    from distmerge.methods import registry

    method = registry.find(m.method)
    if method is None:
        p.append(f"merge.method: unknown method {m.method!r}{suggest(m.method, registry.names())} "
                 f"(one of: {', '.join(registry.names())})")
    elif "density" in method.params and m.density is None:
        p.append(f"merge.density: method {m.method!r} prunes and needs a density in (0, 1], e.g. merge.density=0.5")
    if m.density is not None and not (0 < m.density <= 1):
        p.append(f"merge.density: must be in (0, 1], got {m.density}; it is the fraction of values kept")
    one_of(p, "merge.majority_sign_method", m.majority_sign_method, schema.SIGN_METHODS)
    if m.svd_rank is not None and m.svd_rank < 1:
        p.append(f"merge.svd_rank: must be a positive rank or null (the largest input rank), got {m.svd_rank}")
    if m.svd_clamp is not None and not (0 < m.svd_clamp <= 1):
        p.append(f"merge.svd_clamp: a quantile in (0, 1] or null, got {m.svd_clamp}")
    one_of(p, "merge.svd_algorithm", m.svd_algorithm, schema.SVD_ALGORITHMS)
    if m.svd_oversample < 0:
        p.append(f"merge.svd_oversample: must be >= 0, got {m.svd_oversample}")
    if m.svd_niter < 0:
        p.append(f"merge.svd_niter: must be >= 0, got {m.svd_niter}")
    if not 0 <= m.iso_common_fraction <= 1:
        p.append(f"merge.iso_common_fraction: must be in [0, 1], got {m.iso_common_fraction}; it is the share of "
                 f"the merged rank given to common directions (Iso-CTS uses 0.8)")
    if not 0 <= m.breadcrumbs_gamma < 1:
        p.append(f"merge.breadcrumbs_gamma: must be in [0, 1), got {m.breadcrumbs_gamma}; it is the fraction of "
                 f"largest magnitudes dropped (mergekit's default 0.01)")
    if not 0 <= m.della_epsilon < 1:
        p.append(f"merge.della_epsilon: must be in [0, 1), got {m.della_epsilon} (mergekit's default 0.15)")
    elif (method is not None and "della_epsilon" in method.params and m.density is not None and m.density < 1
          and not (0 < m.density - m.della_epsilon and m.density + m.della_epsilon < 1)):
        p.append(f"merge.della_epsilon: density ± epsilon must lie in (0, 1), got density {m.density} and epsilon "
                 f"{m.della_epsilon}; lower merge.della_epsilon, e.g. to {min(m.density, 1 - m.density) / 2:g}")


def _check_output(o: OutputSpec, p: list[str]) -> OutputSpec:
    if not o.path:
        p.append("output.path: must name the directory to create, e.g. ./merged")
        return o
    one_of(p, "output.format", o.format, _formats().names(), null="the inputs' format")
    one_of(p, "output.dtype", o.dtype, schema.DTYPES, null="")
    try:
        parse_size(o.shard_size)
    except ValueError as e:
        p.append(f"output.shard_size: {e}")
    _check_push(o, p)
    # whether an existing path may be replaced is decided in one place, output.owner.check_target
    path = os.path.realpath(Path(o.path).expanduser())
    return dataclasses.replace(o, path=path, shard_size=str(o.shard_size))


def _check_push(o: OutputSpec, p: list[str]) -> None:
    """The Hub keys: checked here, offline, so that a typo fails before the merge, not after it."""
    if o.push_to_hub is None and o.hub_revision is None and o.hub_commit_message is None:
        return
    from distmerge.publish.hub import repo_id_problem, revision_problem

    if o.push_to_hub is not None:
        why = repo_id_problem(o.push_to_hub)
        if why:
            p.append(f"output.push_to_hub: {why}; e.g. output.push_to_hub=my-org/support-bot-merged")
    if o.hub_revision is not None:
        why = revision_problem(o.hub_revision)
        if why:
            p.append(f"output.hub_revision: {why}; name a branch such as nightly, or null for main")
    message = o.hub_commit_message
    if message is not None and (not message.strip() or "\n" in message or "\r" in message):
        p.append(f"output.hub_commit_message: a commit's one-line summary, or null for distmerge's; got {message!r}")


def _check_runtime(r: RuntimeSpec, p: list[str]) -> None:
    one_of(p, "runtime.executor", r.executor, schema.EXECUTORS)
    one_of(p, "runtime.device", r.device, schema.DEVICES)
    if not 0 < r.connect_timeout_s < float("inf"):  # NaN fails too
        p.append(f"runtime.connect_timeout_s: must be a finite number of seconds > 0 to reach runtime.address, "
                 f"got {r.connect_timeout_s}")
    if r.num_workers is not None and r.num_workers < 1:
        p.append(f"runtime.num_workers: must be >= 1 or null, got {r.num_workers}")
    if r.gpus_per_worker is not None and r.gpus_per_worker < 0:
        p.append(f"runtime.gpus_per_worker: must be >= 0 or null, got {r.gpus_per_worker}")
    if r.cpus_per_worker <= 0:
        p.append(f"runtime.cpus_per_worker: must be > 0, got {r.cpus_per_worker}")
    if r.gpu_wait_s < 0:
        p.append(f"runtime.gpu_wait_s: must be >= 0, got {r.gpu_wait_s}")
    if r.task_timeout_s is not None and r.task_timeout_s <= 0:
        p.append(f"runtime.task_timeout_s: must be > 0 or null (no timeout), got {r.task_timeout_s}")
    if r.max_retries < 0:
        p.append(f"runtime.max_retries: must be >= 0, got {r.max_retries}")
