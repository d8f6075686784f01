"""Synthetic PEFT LoRA adapters for a Llama-shaped model, written without PEFT or a base model.

They are real PEFT files (adapter_config.json + adapter_model.safetensors, PEFT's key names), so
`distmerge demo` can show a real merge on a fresh machine, and benchmarks can build adapters of
7B widths in seconds. PeftModel.from_pretrained loads them onto a LlamaForCausalLM of the same shape.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from safetensors.torch import save_file

from distmerge.errors import OutputError, output_error

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEMO_BASE = "distmerge/tiny-llama-demo"


def llama_shapes(hidden: int, intermediate: int) -> dict[str, tuple[str, int, int]]:
    """module → (parent, in_features, out_features), for a Llama with as many KV heads as heads."""
    return {
        "q_proj": ("self_attn", hidden, hidden), "k_proj": ("self_attn", hidden, hidden),
        "v_proj": ("self_attn", hidden, hidden), "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", hidden, intermediate), "up_proj": ("mlp", hidden, intermediate),
        "down_proj": ("mlp", intermediate, hidden),
    }


def write_llama_adapter(path: str, *, layers: int, hidden: int, intermediate: int, rank: int, alpha: float,
                        targets: Sequence[str] = LLAMA_TARGETS, dtype: torch.dtype = torch.float32, seed: int = 0,
                        base_model: str = DEMO_BASE, use_rslora: bool = False) -> str:
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(hidden, intermediate)
    tensors = {}
    for layer in range(layers):
        for t in targets:
            parent, fan_in, fan_out = shapes[t]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in**0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) / rank**0.5).to(dtype)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": sorted(targets), "use_rslora": use_rslora,
        "fan_in_fan_out": False, "bias": "none", "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


DEMO_ADAPTERS = ("sql", "chat", "code")


def write_demo(directory: str, *, layers: int = 2, hidden: int = 64, intermediate: int = 160, rank: int = 8,
               seed: int = 0, force: bool = False) -> list[str]:
    """The three adapters configs/quickstart.yaml merges, under DIRECTORY/adapters/.

    Existing adapters there are the user's until `force` says otherwise: refused before anything is written.
    """
    paths = [os.path.join(directory, "adapters", name) for name in DEMO_ADAPTERS]
    there = [p for p in paths if os.path.lexists(p)]
    if there and not force:
        raise OutputError(f"{', '.join(there)} already exist{'s' if len(there) == 1 else ''}; demo never writes "
                          f"over adapters: choose another DIR, or pass --force to replace them")
    try:
        return [write_llama_adapter(path, layers=layers, hidden=hidden, intermediate=intermediate, rank=rank,
                                    alpha=2 * rank, seed=seed + i) for i, path in enumerate(paths)]
    except OSError as e:
        raise output_error(e, e.filename or directory, "write the demo adapters to") from None
