"""PEFT as the oracle: its own add_weighted_adapter on a real base model, and its own loader for ours."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch

from distmerge.config.schema import MergeSpec
from distmerge.methods.base import ModuleContext


def lora_layers(model, adapter: str):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            yield name, module


def deltas(model, adapter: str, unscale: bool = False) -> dict[str, torch.Tensor]:
    """Each module's delta weight; `unscale` divides out the adapter's own scaling (see rsLoRA)."""
    out = {}
    with torch.no_grad():
        for name, module in lora_layers(model, adapter):
            d = module.get_delta_weight(adapter).float()
            out[name] = d / module.scaling[adapter] if unscale else d
    return out


def _key(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


@contextmanager
def seeded_dare(model, adapters: list[str], seed: int):
    """Make PEFT's unseeded random_pruning draw the masks distmerge draws for the same tensor.

    PEFT passes only values, so each tensor is recognised by its bytes: every adapter's A and B, and
    the dense delta that get_delta_weight builds, map to (tensor name, adapter index) as distmerge
    names them. The rest of PEFT's DARE (rescale, weights, sign election) then runs unchanged.
    """
    import peft.utils.merge_utils as mu
    from peft.tuners.lora import LoraLayer

    table = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for i, a in enumerate(adapters):
                if a in module.lora_A:
                    A, B = module.lora_A[a].weight, module.lora_B[a].weight
                elif a in module.lora_embedding_A:
                    A, B = module.lora_embedding_A[a], module.lora_embedding_B[a]
                else:
                    continue
                table[_key(A)] = (name, f"{name}.lora_A", i, (A.shape[0], -1), False)
                table[_key(B)] = (name, f"{name}.lora_B", i, (B.shape[0], -1), False)
                delta = module.get_delta_weight(a)
                lora_layout = (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).shape
                transposed = bool(getattr(module, "fan_in_fan_out", False)) or a in module.lora_embedding_A
                table[_key(delta)] = (name, f"{name}.delta", i, tuple(lora_layout), transposed)

    original = mu.random_pruning

    def random_pruning(tensor, density, rescale):
        module, tensor_name, index, shape, transposed = table[_key(tensor)]
        ctx = ModuleContext(module, MergeSpec(seed=seed), rank=1)
        g = ctx.generator(tensor_name, index)
        n0 = tensor.shape[0] if not transposed else tensor.shape[1]
        mask = torch.rand((n0, tensor.numel() // n0), generator=g) < density
        mask = (mask.T if transposed else mask).reshape(tensor.shape).to(tensor.dtype)
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    mu.random_pruning = random_pruning
    try:
        yield
    finally:
        mu.random_pruning = original


def peft_merge(base_factory, paths, weights, method: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter on the same files; each module's delta with the merged factors' own
    scale (B·A), since PEFT's merged scaling is wrong for rsLoRA."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_factory(), str(paths[0]), adapter_name="a0")
    names = ["a0"]
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
        names.append(f"a{i}")
    with seeded_dare(model, names, seed):
        model.add_weighted_adapter(names, list(weights), "merged", combination_type=method, **kwargs)
    return deltas(model, "merged", unscale=True)


def load_merged(base_factory, path) -> tuple[dict[str, torch.Tensor], object]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_factory(), str(path))
    return deltas(model, "default"), model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
