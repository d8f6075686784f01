"""One input adapter: its LoraConfig, its files and its modules, from headers alone."""

from __future__ import annotations

import fnmatch
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from distmerge import lora
from distmerge.adapters.pin import Stamp
from distmerge.adapters.header import FLOAT_DTYPES, BadJSON, TensorInfo, json_kind, load_json, read_header, show
from distmerge.config.schema import AdapterSpec
from distmerge.errors import AdapterError

SINGLE = "adapter_model.safetensors"
INDEX = "adapter_model.safetensors.index.json"
SHARD_GLOB = "adapter_model*.safetensors"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG, MAX_INDEX = 16 * 2**20, 64 * 2**20  # a LoraConfig is kB, an index of 200k tensors ~30 MB
# PEFT builds nn.Linear(in, r) from r, so r must be an int: 8.0 fails in torch there, and distmerge would
# write an adapter PEFT cannot load. Integral floats are refused, not rounded. lora_alpha may be a float.
NUMBERS = {"r": True, "lora_alpha": False}  # key: integer?
PATTERNS = {"rank_pattern": True, "alpha_pattern": False}
# Keys the planner sorts, joins and copies into the output config: a wrong type there is a traceback.
NAME_KEYS = {"target_modules": ((str, list), "a regex string or a list of module names"),
             "modules_to_save": (list, "a list of module names"), "base_model_name_or_path": (str, "a string")}
# init_lora_weights values whose saved factors are relative to a base that PEFT mutated at init.
MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its two factors and the scaling PEFT would apply."""

    name: str  # as saved, e.g. base_model.model.model.layers.0.self_attn.q_proj
    embedding: bool
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scaling: float
    multiplier: float = 1.0  # module_weights / layer_weights / block_weights: multiplies the adapter's weight


@dataclass(frozen=True)
class Adapter:
    index: int
    name: str
    path: str
    weight: float
    config: dict[str, Any] = field(repr=False)
    files: tuple[str, ...]
    modules: dict[str, LoraModule] = field(repr=False)
    extras: dict[str, TensorInfo] = field(repr=False)  # modules_to_save, saved embedding base layers
    config_file: str = ""  # adapter_config.json, resolved
    stamps: dict[str, Stamp] = field(default_factory=dict, repr=False)  # every file read, as planned
    source: dict = field(default_factory=dict)  # where it came from: the path as given, Hub repo and commit
    known_sha256: Callable[[str], Optional[str]] = field(default=lambda path: None, repr=False, compare=False)
    format: str = "peft"  # its entry in adapters/formats.py

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every file the merge depends on: the weights, and the config where the format has one."""
        return (*self.files, self.config_file) if self.config_file else self.files

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values()) + sum(
            t.nbytes for t in self.extras.values())

    @property
    def max_rank(self) -> int:
        """PEFT's rank for this adapter in add_weighted_adapter: r, or the largest rank_pattern value."""
        return max([self.config["r"], *(self.config.get("rank_pattern") or {}).values()])

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for m in self.modules.values() for t in (m.a, m.b)}


def open_peft(spec: AdapterSpec, index: int, root: str | None = None) -> Adapter:
    """Read a PEFT adapter directory's config and safetensors headers; refuse what cannot merge correctly.

    Every file read must resolve inside `root` (default: the adapter directory itself); a Hub cache
    passes the repo's cache folder, whose snapshot files are symlinks into its blobs.
    """
    name = spec.name or Path(spec.path).name
    root = _real_dir(root or spec.path, name)
    cfg, config_file, config_stamp = _read_config(spec.path, root, name)
    found = _weights(spec.path, root, name)
    tensors = {t: info for part in found.values() for t, info in part.items()}
    modules, extras = _modules(tensors, cfg, name)
    if not modules:
        raise AdapterError(f"adapter {name!r}: {spec.path} holds no lora_A/lora_B tensors; is it a LoRA adapter?")
    stamps = {info.file: info.stamp for info in tensors.values()}
    stamps[config_file] = config_stamp
    return Adapter(index, name, spec.path, spec.weight, cfg, tuple(found), modules, extras, config_file, stamps)


def confined(path: str, root: str, name: str) -> str:
    """path's real location, after symlinks, if it is a regular file inside root; AdapterError otherwise.

    Every file an adapter reads passes here, so that an index entry, an absolute path or a symlink cannot
    make distmerge read a file that is not the adapter's, merge it and copy it into the output.
    """
    try:
        real = os.path.realpath(path, strict=True)  # strict: a loop or a dangling link raises OSError
        regular = stat.S_ISREG(os.stat(real).st_mode)
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {path}: {getattr(e, 'strerror', None) or e}; "
                           f"check the path and its symlinks") from None
    if os.path.commonpath([real, root]) != root:
        raise AdapterError(f"adapter {name!r}: {path} resolves to {real}, outside the adapter's directory "
                           f"{root}; an adapter may read only its own files: copy the file in instead of linking")
    if not regular:
        raise AdapterError(f"adapter {name!r}: {path} is not a regular file; replace it with the adapter's file")
    return real


def _real_dir(path: str, name: str) -> str:
    try:
        return os.path.realpath(path, strict=True)
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot resolve the adapter path {path}: "
                           f"{getattr(e, 'strerror', None) or e}; check the path and its symlinks") from None


def _read_json(file: str, name: str, limit: int) -> tuple[Any, Stamp]:
    """A small JSON file of the adapter, read in binary and decoded strictly; AdapterError quoting none of it."""
    try:
        with open(file, "rb") as f:
            stamp = Stamp.of(f.fileno())
            raw = f.read(limit + 1)
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot read {file}: {e.strerror or e}") from None
    if len(raw) > limit:
        raise AdapterError(f"adapter {name!r}: {file} is larger than {limit >> 20} MiB; it is not a PEFT "
                           f"adapter file, re-save the adapter")
    try:
        return load_json(raw), stamp
    except BadJSON as e:
        raise AdapterError(f"adapter {name!r}: {file} {e}; re-save the adapter with save_pretrained") from None


def _read_config(path: str, root: str, name: str) -> tuple[dict[str, Any], str, Stamp]:
    """The LoraConfig, checked; with the file it came from and that file's stamp."""
    file = confined(os.path.join(path, "adapter_config.json"), root, name)
    cfg, stamp = _read_json(file, name, MAX_CONFIG)
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {file} must hold a JSON object (a LoraConfig), found "
                           f"{json_kind(cfg)}")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {show(cfg.get('peft_type'))}, expected 'LORA'; "
                           f"distmerge merges LoRA adapters only")
    refusals = [
        (cfg.get("use_dora"), "use_dora is true: DoRA's magnitude vectors cannot be merged as LoRA factors"),
        (cfg.get("lora_bias"), "lora_bias is true: the lora_B biases have no merge rule in PEFT"),
        (cfg.get("bias", "none") != "none", f"bias is {show(cfg.get('bias'))}: trained base biases would be "
                                             f"dropped by the merge; retrain with bias='none'"),
        (cfg.get("target_parameters"), "target_parameters is set: PEFT cannot merge adapters on nn.Parameter"),
        (str(cfg.get("init_lora_weights", True)).lower().startswith(MUTATING_INITS),
         f"init_lora_weights is {show(cfg.get('init_lora_weights'))}: its factors are relative to a base that "
         f"PEFT modified; convert it to a plain LoRA (path_initial_model_for_weight_conversion) first"),
    ]
    for bad, why in refusals:
        if bad:
            raise AdapterError(f"adapter {name!r}: {why}")
    for problem in _config_problems(cfg):
        raise AdapterError(f"adapter {name!r}: {file} has {problem}")
    return cfg, file, stamp


def _config_problems(cfg: dict[str, Any]) -> Iterator[str]:
    """What in a LoraConfig would make a traceback or a wrong merge, each as 'key=value, expected ...'."""
    for key, integer in NUMBERS.items():
        if not _positive(cfg.get(key), integer):
            yield f"{key}={show(cfg.get(key))}, expected a positive {'integer' if integer else 'finite number'}"
    for key, integer in PATTERNS.items():
        yield from _pattern_problems(key, cfg.get(key), integer)
    for key, (kinds, want) in NAME_KEYS.items():
        value = cfg.get(key)
        if value is not None and not (isinstance(value, kinds) and _all_str(value)):
            yield f"{key}={show(value)}, expected {want}"


def _positive(value: Any, integer: bool) -> bool:
    """A positive number PEFT can use: not a bool, finite as a float, and an int where PEFT needs one."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float: PEFT's alpha / r would fail on it
        return False


def _pattern_problems(key: str, patterns: Any, integer: bool) -> Iterator[str]:
    if patterns is None:  # absent or null: PEFT's default, no pattern
        return
    if not isinstance(patterns, dict):
        yield f"{key}={show(patterns)}, expected an object of module regex → value"
        return
    for p, value in patterns.items():
        if not lora.valid_pattern(p):
            yield f"{key} key {show(p)}, which is not a valid regular expression; fix or remove it"
        elif not _positive(value, integer):
            yield (f"{key}[{show(p)}]={show(value)}, expected a positive "
                   f"{'integer' if integer else 'finite number'}")


def _all_str(value: Any) -> bool:
    return isinstance(value, str) or all(isinstance(x, str) for x in value)


def _weights(path: str, root: str, name: str) -> dict[str, dict[str, TensorInfo]]:
    """{real file: its tensors} for the single weights file, or for every shard the index names, which must
    hold exactly the tensors the index maps to them; every file confined to root."""
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.lexists(single):
        real = confined(single, root, name)
        return {real: read_header(real, name)[0]}
    if os.path.lexists(index):
        weight_map = _read_index(confined(index, root, name), name)
        _refuse_unlisted(path, set(weight_map.values()), name)
        shards = {f: confined(_shard_path(path, index, f, name), root, name) for f in sorted(set(weight_map.values()))}
        found = {f: read_header(real, name)[0] for f, real in shards.items()}
        _check_shards(found, weight_map, index, name)
        return {shards[f]: tensors for f, tensors in found.items()}
    pickles = [p for p in PICKLES if os.path.isfile(os.path.join(path, p))]
    if pickles:
        raise AdapterError(
            f"adapter {name!r}: {path} has only {pickles[0]}, a pickle checkpoint; distmerge does not load "
            f"pickles (loading one can run code). Convert it once, in a trusted environment: "
            f"PeftModel.from_pretrained(base, path).save_pretrained(path, safe_serialization=True)")
    raise AdapterError(f"adapter {name!r}: {path} has no {SINGLE} or {INDEX}; save it with save_pretrained")


def _read_index(index: str, name: str) -> dict[str, str]:
    """The index's weight_map, tensor name → plain file name in the adapter directory."""
    doc, _ = _read_json(index, name, MAX_INDEX)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise AdapterError(f"adapter {name!r}: {index} is not a valid index: it needs an object with a weight_map "
                           f"of tensor name → file name; re-save the adapter")
    bad = next((f for f in weight_map.values() if not _plain_name(f)), None)
    if bad is not None:
        raise AdapterError(f"adapter {name!r}: {index} maps tensors to {show(bad)}, expected a plain file name in "
                           f"the adapter directory (no directories, no absolute paths); copy the shard into the "
                           f"adapter directory and name it alone")
    return weight_map


def _plain_name(file: str) -> bool:
    return file not in ("", ".", "..") and not any(c in file for c in "/\\\0")


def _shard_path(path: str, index: str, file: str, name: str) -> str:
    shard = os.path.join(path, file)
    if not os.path.lexists(shard):
        raise AdapterError(f"adapter {name!r}: {index} names {file}, which is missing from {path}; "
                           f"copy the complete adapter")
    return shard


def _refuse_unlisted(path: str, listed: set[str], name: str) -> None:
    """A weights file the index does not list is refused: distmerge will not guess whether it belongs."""
    try:
        present = sorted(f for f in os.listdir(path) if fnmatch.fnmatchcase(f, SHARD_GLOB))
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot list {path}: {e.strerror or e}") from None
    unlisted = [f for f in present if f not in listed]
    if unlisted:
        raise AdapterError(f"adapter {name!r}: {path} holds {unlisted[0]}, which its index {INDEX} does not list; "
                           f"remove the file, or re-save the adapter so that the index names every shard")


def _check_shards(found: dict[str, dict[str, TensorInfo]], weight_map: dict[str, str], index: str,
                  name: str) -> None:
    """Each tensor in exactly one shard, the one the index maps it to, and every indexed tensor present."""
    home: dict[str, str] = {}
    for file, tensors in found.items():
        for t in tensors:
            if t in home:
                raise AdapterError(f"adapter {name!r}: tensor {show(t)} is in both {home[t]} and {file}; "
                                   f"a tensor must be in one shard only — re-save the adapter")
            home[t] = file
    for t, file in home.items():
        if weight_map.get(t) != file:
            listed = f"maps it to {weight_map[t]}" if t in weight_map else "does not list it"
            raise AdapterError(f"adapter {name!r}: {file} holds tensor {show(t)}, but {index} {listed}; "
                               f"the index and the shards disagree — re-save the adapter")
    for t, file in weight_map.items():
        if t not in home:
            raise AdapterError(f"adapter {name!r}: {index} maps tensor {show(t)} to {file}, which does not hold "
                               f"it; the index and the shards disagree — re-save the adapter")


def _modules(tensors: dict[str, TensorInfo], cfg: dict, name: str):
    pairs: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, bool] = {}
    extras: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        parsed = lora.parse_lora_key(key)
        if parsed is None:
            if ".lora_" in key:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} is a LoRA tensor distmerge cannot merge "
                                   f"(lora_magnitude_vector, lora biases?); only lora_A/lora_B are supported")
            extras[key] = info
            continue
        module, role, kind = parsed
        pairs.setdefault(module, {})[role] = info
        kinds[module] = kind == "embedding"
    r0, alpha0, rs = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora"))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, fac in sorted(pairs.items()):
        if set(fac) != {"A", "B"}:
            have = next(iter(fac.values())).name
            raise AdapterError(f"adapter {name!r}: module {module!r} has {have!r} but not its "
                               f"lora_{'B' if 'A' in fac else 'A'} partner; the adapter file is incomplete")
        a, b = fac["A"], fac["B"]
        for t in (a, b):
            if t.dtype not in FLOAT_DTYPES:
                raise AdapterError(f"adapter {name!r}: tensor {t.name!r} has dtype {t.dtype}; expected "
                                   f"F32, F16 or BF16 (quantized adapters must be dequantized first)")
        rank = int(lora.match_pattern(ranks, module, r0))
        alpha = float(lora.match_pattern(alphas, module, alpha0))
        r_a, r_b = a.shape[0], (b.shape[1] if len(b.shape) > 1 else -1)
        if len(a.shape) < 2 or len(b.shape) < 2 or r_a != r_b or r_a != rank or any(s != 1 for s in b.shape[2:]):
            raise AdapterError(
                f"adapter {name!r}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"but its config gives rank {rank} (r={r0}, rank_pattern={ranks or {}}); "
                f"the config and the weights disagree — re-save the adapter")
        modules[module] = LoraModule(module, kinds[module], a, b, rank, alpha, lora.scaling(alpha, rank, rs))
    return modules, extras
