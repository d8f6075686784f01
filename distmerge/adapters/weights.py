"""Per-module weights: module_weights, layer_weights and diffusers' block-scale dict.

Each gives a factor per module that multiplies the adapter's `weight` for that module (the planner's
Source.weight), so every method sees it exactly as PEFT's add_weighted_adapter sees a weight. Names
are the adapter's internal module names (adapters/formats.py): `unet.down_blocks.0...` for diffusion
formats, the base model's own name (no `base_model.model.`) for PEFT directories.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from distmerge import lora
from distmerge.config.schema import AdapterSpec

# the first integer path segment after one of these is the layer index (transformers, GPT-2, T5, ...)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
UNET_PARTS = ("down", "mid", "up")


def normalize_module_weights(raw: Any) -> tuple[tuple[str, float], ...] | None:
    """An ordered mapping, or a list of one-entry mappings or [pattern, factor] pairs, as ((pattern, factor), ...)."""
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return tuple((str(k), v) for k, v in raw.items())
    pairs = []
    for item in raw:
        if isinstance(item, Mapping) and len(item) == 1:
            pairs.extend(item.items())
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pairs.append((item[0], item[1]))
        else:
            raise ValueError(f"entry {item!r} is neither {{pattern: factor}} nor [pattern, factor]")
    return tuple(pairs)


def problems(spec: AdapterSpec) -> Iterable[str]:
    """What is wrong with an adapter's weight keys, as 'key: found, expected, fix' (config validation)."""
    try:
        pairs = normalize_module_weights(spec.module_weights) or ()
    except (ValueError, TypeError) as e:
        yield f"module_weights: {e}; write an ordered mapping such as {{'unet\\\\.up_blocks': 0.5, '.*': 1.0}}"
        pairs = ()
    for pattern, factor in pairs:
        if not isinstance(pattern, str) or not _compiles(pattern):
            yield f"module_weights: {pattern!r} is not a valid regular expression"
        if not _finite(factor):
            yield f"module_weights[{pattern!r}]: expected a finite number, got {factor!r}"
    if spec.layer_weights is not None:
        values = list(spec.layer_weights)
        if not values or not all(_finite(v) for v in values):
            yield f"layer_weights: expected a non-empty list of finite numbers, got {values!r}"
    yield from _block_problems(spec.block_weights)


def _block_problems(bw: Any) -> Iterable[str]:
    if bw is None or _finite(bw):
        return
    if not isinstance(bw, Mapping):
        yield f"block_weights: expected a number or a mapping of component → scale, got {bw!r}"
        return
    for component, value in bw.items():
        if component == "unet" and isinstance(value, Mapping):
            for part, v in value.items():
                if part not in UNET_PARTS:
                    yield f"block_weights.unet: unknown part {part!r}, expected one of down, mid, up"
                elif part == "mid" and not (_finite(v) or (isinstance(v, list) and len(v) == 1 and _finite(v[0]))):
                    yield f"block_weights.unet.mid: expected one number, got {v!r}"
                elif part != "mid" and not (_finite(v) or isinstance(v, Mapping)):
                    yield f"block_weights.unet.{part}: expected a number or {{block_<i>: number or list}}, got {v!r}"
                elif isinstance(v, Mapping):
                    for block, s in v.items():
                        ok = re.fullmatch(r"block_\d+", str(block)) and (
                            _finite(s) or (isinstance(s, list) and s and all(_finite(x) for x in s)))
                        if not ok:
                            yield (f"block_weights.unet.{part}.{block}: expected block_<i>: a number or a list of "
                                   f"numbers (one per transformer layer), got {s!r}")
        elif not _finite(value):
            yield (f"block_weights.{component}: expected a number (block dicts are for the unet, as in "
                   f"set_adapters), got {value!r}")


def multipliers(spec: AdapterSpec, names: Iterable[str]) -> dict[str, float]:
    """{module: factor} for the modules whose factor is not 1; every key of `spec` applies, multiplied."""
    names = list(names)
    keys = {n: lora.pattern_key(n) for n in names}
    out = {n: 1.0 for n in names}
    pairs = normalize_module_weights(spec.module_weights) or ()
    compiled = [(re.compile(p), float(f)) for p, f in pairs]
    for n, key in keys.items():
        factor = next((f for rx, f in compiled if rx.search(key)), None)
        if factor is not None:
            out[n] *= factor
    if spec.layer_weights is not None:
        for n, factor in layer_factors(list(spec.layer_weights), keys).items():
            out[n] *= factor
    if spec.block_weights is not None:
        for n, factor in block_factors(spec.block_weights, keys).items():
            out[n] *= factor
    return {n: f for n, f in out.items() if f != 1.0}


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_factors(values: list[float], keys: Mapping[str, str]) -> dict[str, float]:
    """mergekit's gradient: the values spread evenly from the first layer to the last, interpolated linearly.
    The layer count is the largest index among the adapter's modules + 1; modules outside layers keep 1."""
    idx = {n: layer_index(k) for n, k in keys.items()}
    found = [i for i in idx.values() if i is not None]
    if not found:
        return {}
    last = max(found)
    out = {}
    for n, i in idx.items():
        if i is None:
            continue
        t = i / last if last else 0.0
        pos = t * (len(values) - 1)
        k = min(int(math.floor(pos)), len(values) - 1)
        frac = pos - k
        out[n] = float(values[k]) if frac == 0 else float(values[k]) * (1 - frac) + float(values[k + 1]) * frac
    return out


def block_factors(bw: Any, keys: Mapping[str, str]) -> dict[str, float]:
    """Each module's scale under diffusers' set_adapters(names, [bw]): a component not named keeps 1.0; the
    unet dict is expanded as diffusers' _maybe_expand_lora_scales_for_one_adapter does and looked up as
    set_weights_and_activate_adapters' get_module_weight does (a substring match on the attention block, else
    the attention of the resnet's index in the same block, else 1.0). A down/up block counts as having
    attention layers when the adapter adapts a module in them (diffusers asks the model)."""
    out: dict[str, float] = {}
    unet = bw.get("unet") if isinstance(bw, Mapping) else None
    expanded = _expand(unet, list(keys.values())) if isinstance(unet, Mapping) else {}
    for n, key in keys.items():
        component, _, path = key.partition(".")
        if _finite(bw):
            out[n] = float(bw)
            continue
        value = bw.get(component, 1.0) if isinstance(bw, Mapping) else 1.0
        if component == "unet" and isinstance(value, Mapping):
            out[n] = _unet_scale(expanded, path)
        elif value is not None:
            out[n] = float(value)
    return out


def _unet_scale(expanded: Mapping[str, float], path: str) -> float:
    for key, v in expanded.items():
        if key in path:
            return v
    parts = path.split(".")
    if len(parts) < 4:
        return 1.0
    return expanded.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)


def _expand(scales: Mapping, names: list[str]) -> dict[str, float]:
    """{"down_blocks.1.attentions.0": s, ..., "mid_block.attentions.0": s} for the blocks the adapter has.

    diffusers asks the model which blocks hold transformers and how many; distmerge has only the adapter, so
    it counts the adapter's own attention modules, and refuses what that count cannot decide: a scale on a
    block where the adapter adapts modules but no attention (set_adapters would scale them if the model has
    attentions there, and leave them at 1.0 if not), and a per-layer list of another length."""
    mid = scales.get("mid", 1.0)
    out = {"mid_block.attentions.0": float(mid[0] if isinstance(mid, list) else mid)}
    for part in ("down", "up"):
        rx = re.compile(rf"^unet\.{part}_blocks\.(\d+)\.(?:attentions\.(\d+)\.)?")
        seen: dict[int, int] = {}  # block → its adapted attention count (0: modules, but no attention)
        for n in names:
            m = rx.match(n)
            if m:
                i = int(m.group(1))
                seen[i] = max(seen.get(i, 0), int(m.group(2)) + 1 if m.group(2) is not None else 0)
        value = scales.get(part, 1.0)
        for i, count in sorted(seen.items()):
            block = value.get(f"block_{i}", 1.0) if isinstance(value, Mapping) else value
            if count == 0:
                if any(float(x) != 1.0 for x in (block if isinstance(block, list) else [block])):
                    raise ValueError(f"block_weights.unet.{part} scales {part}_blocks.{i}, where the adapter "
                                     f"adapts modules but no attention module; distmerge infers a block's layers "
                                     f"from the adapter's attention modules and none are adapted there: leave "
                                     f"block_{i} at 1.0 and scale those modules with module_weights")
                continue
            if isinstance(block, list):
                if len(block) == 1:
                    block = block * count
                elif len(block) != count:
                    raise ValueError(f"block_weights.unet.{part}.block_{i} has {len(block)} values, but the "
                                     f"adapter has {count} transformer layers there (distmerge counts the adapter's "
                                     f"own attention modules); give one value per layer, or one for all")
            for j in range(count):
                out[f"{part}_blocks.{i}.attentions.{j}"] = float(block[j] if isinstance(block, list) else block)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _compiles(p: str) -> bool:
    try:
        re.compile(p)
    except (re.error, RecursionError, OverflowError):
        return False
    return True
