"""One input adapter: its LoraConfig, its files and its modules, from headers alone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge import lora
from distmerge.adapters.header import FLOAT_DTYPES, TensorInfo, read_header
from distmerge.config.schema import AdapterSpec
from distmerge.errors import AdapterError

SINGLE = "adapter_model.safetensors"
INDEX = "adapter_model.safetensors.index.json"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
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


def open_adapter(spec: AdapterSpec, index: int) -> Adapter:
    """Read an adapter directory's config and safetensors headers; refuse what cannot merge correctly."""
    name = spec.name or Path(spec.path).name
    cfg = _read_config(spec.path, name)
    files = _weight_files(spec.path, name)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        found, _ = read_header(f, name)
        tensors.update(found)
    modules, extras = _modules(tensors, cfg, name)
    if not modules:
        raise AdapterError(f"adapter {name!r}: {spec.path} holds no lora_A/lora_B tensors; is it a LoRA adapter?")
    return Adapter(index, name, spec.path, spec.weight, cfg, tuple(files), modules, extras)


def _read_config(path: str, name: str) -> dict[str, Any]:
    file = os.path.join(path, "adapter_config.json")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot read {file}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter {name!r}: {file} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {file} must hold a JSON object (a LoraConfig)")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'; "
                           f"distmerge merges LoRA adapters only")
    refusals = [
        (cfg.get("use_dora"), "use_dora is true: DoRA's magnitude vectors cannot be merged as LoRA factors"),
        (cfg.get("lora_bias"), "lora_bias is true: the lora_B biases have no merge rule in PEFT"),
        (cfg.get("bias", "none") != "none", f"bias is {cfg.get('bias')!r}: trained base biases would be dropped "
                                             f"by the merge; retrain with bias='none'"),
        (cfg.get("target_parameters"), "target_parameters is set: PEFT cannot merge adapters on nn.Parameter"),
        (str(cfg.get("init_lora_weights", True)).lower().startswith(MUTATING_INITS),
         f"init_lora_weights is {cfg.get('init_lora_weights')!r}: its factors are relative to a base that "
         f"PEFT modified; convert it to a plain LoRA (path_initial_model_for_weight_conversion) first"),
    ]
    for bad, why in refusals:
        if bad:
            raise AdapterError(f"adapter {name!r}: {why}")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise AdapterError(f"adapter {name!r}: adapter_config.json has {key}={cfg.get(key)!r}, "
                               f"expected a positive number")
    return cfg


def _weight_files(path: str, name: str) -> list[str]:
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(path, v) for v in weight_map.values()})
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise AdapterError(f"adapter {name!r}: {index} is not a valid index ({type(e).__name__}: {e}); "
                               f"it needs a weight_map of tensor name → file") from None
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise AdapterError(f"adapter {name!r}: {index} names {os.path.basename(missing[0])}, which is missing "
                               f"from {path}; copy the complete adapter")
        return files
    pickles = [p for p in PICKLES if os.path.isfile(os.path.join(path, p))]
    if pickles:
        raise AdapterError(
            f"adapter {name!r}: {path} has only {pickles[0]}, a pickle checkpoint; distmerge does not load "
            f"pickles (loading one can run code). Convert it once, in a trusted environment: "
            f"PeftModel.from_pretrained(base, path).save_pretrained(path, safe_serialization=True)")
    raise AdapterError(f"adapter {name!r}: {path} has no {SINGLE} or {INDEX}; save it with save_pretrained")


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
