"""LoRA conventions shared by the planner and the worker: names, scaling and factor layouts.

Every LoRA layer PEFT saves (Linear, GPT-2 Conv1D, Embedding, ConvNd) has the same algebra once
flattened: Δ = scaling · B₂ A₂ with A₂ = A.reshape(r, -1) and B₂ = B.reshape(out, r). The merge
methods only ever see these 2-D factors; the layer's own layout is restored on write. fan_in_fan_out
(Conv1D) transposes only the *delta* PEFT builds, not the factors, so it never touches the math here.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

# PEFT's saved keys: <prefix>.<module>.lora_A.weight, or lora_embedding_A for embeddings.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_(?:embedding_)?)(?P<role>[AB])(?P<suffix>\.weight)?$")
PEFT_PREFIX = "base_model.model."


def parse_lora_key(name: str) -> tuple[str, str, str] | None:
    """(module, role 'A'|'B', 'embedding'|'layer') for a LoRA factor key, None for anything else."""
    m = _LORA_KEY.match(name)
    if not m:
        return None
    embedding = m.group("kind") == "lora_embedding_"
    if embedding == bool(m.group("suffix")):  # lora_A.weight, or lora_embedding_A with no .weight
        return None
    return m.group("module"), m.group("role"), "embedding" if embedding else "layer"


def factor_key(module: str, role: str, embedding: bool) -> str:
    return f"{module}.lora_embedding_{role}" if embedding else f"{module}.lora_{role}.weight"


def pattern_key(module: str) -> str:
    """The module name PEFT matches rank_pattern/alpha_pattern against (the base model's own name)."""
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def match_pattern(patterns: Mapping[str, float], module: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    key = pattern_key(module)
    for p in patterns:
        if _pattern_regex(p).match(key):
            return patterns[p]
    return default


def valid_pattern(p: str) -> bool:
    """Whether a rank_pattern/alpha_pattern key is a regex on its own (so "a)|(b" cannot rewrite the group it
    is wrapped in) and in the form match_pattern uses."""
    try:
        re.compile(p)
        _pattern_regex(p)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _pattern_regex(p: str) -> re.Pattern:
    return re.compile(rf"(.*\.)?({p})$")


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def a_shape(rank: int, a_tail: tuple[int, ...]) -> tuple[int, ...]:
    """lora_A's saved shape for a rank: (r, in) for Linear, (r, in, k, k) for Conv2d."""
    return (rank, *a_tail)


def b_shape(rank: int, b_out: int, b_tail: tuple[int, ...]) -> tuple[int, ...]:
    """lora_B's saved shape: (out, r), or (out, r, 1, 1) for Conv2d."""
    return (b_out, rank, *b_tail)
