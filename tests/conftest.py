"""Real parts for every test: tiny transformers models built from configs, real PEFT adapters saved
with save_pretrained (random A and B, since PEFT starts B at zero), and PEFT itself as the oracle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the Hub; PEFT would try for base configs

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


def llama_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def gpt2_base():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(torch.nn.Module):
    """A base with Conv2d (k×k and 1×1) and Linear layers, for PEFT's conv LoRA."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.pointwise = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.pointwise(self.conv(x)).mean((2, 3)))


def conv_base():
    torch.manual_seed(0)
    return ConvNet().eval()


BASES: dict[str, Callable] = {"llama": llama_base, "gpt2": gpt2_base, "conv": conv_base}


def _distinct_values(numel: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random values with pairwise-distinct magnitudes that survive `dtype`: in half precision random
    normals tie often, and PEFT's top-k among ties is arbitrary, so a test could not tell right from wrong."""
    grid = torch.arange(2**12, 2**15, dtype=torch.int32)  # bf16 bit patterns of distinct positive values
    mags = grid.to(torch.int16).view(torch.bfloat16).float() if dtype == torch.bfloat16 else \
        grid.to(torch.int16).view(torch.float16).float()
    mags = mags[(mags > 1e-3) & (mags < 2.0)]
    pick = mags[torch.randperm(mags.numel(), generator=gen)[:numel]]
    signs = torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    return (pick * signs).to(dtype)


def make_adapter(path: Path, base: str, seed: int, dtype: torch.dtype = torch.float32, base_name: str = "tiny-base",
                 **lora_kwargs) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(BASES[base](), LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                if dtype == torch.float32:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                else:
                    p.copy_(_distinct_values(p.numel(), gen, dtype).reshape(p.shape).float())
            elif "modules_to_save" in name:  # a "trained" full module, unlike the base's
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.peft_config["default"].base_model_name_or_path = base_name
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(str(path))
    return path


@dataclass
class AdapterSet:
    base: str
    paths: list[Path]
    weights: list[float]


VARIANTS: dict[str, tuple[str, list[dict], list[float]]] = {
    # name: (base, per-adapter LoraConfig kwargs, weights)
    "llama": ("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])] * 3,
              [0.5, 0.3, 0.2]),
    "negative_weights": ("llama", [dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"])] * 2, [1.0, -0.6]),
    "rslora": ("llama", [dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj"])] * 2,
               [0.7, 0.4]),
    "patterns": ("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                rank_pattern={"gate_proj": 2, "layers.1.self_attn.v_proj": 6},
                                alpha_pattern={"v_proj": 3})] * 2, [0.6, 0.5]),
    "embedding": ("llama", [dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])] * 2, [0.5, 0.5]),
    "fp16": ("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])] * 2, [0.6, 0.4]),
    "bf16": ("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])] * 2, [0.6, 0.4]),
    "gpt2_conv1d": ("gpt2", [dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"],
                                  fan_in_fan_out=True)] * 2, [0.5, 0.5]),
    "conv2d": ("conv", [dict(r=2, lora_alpha=4, target_modules=["conv", "pointwise", "head"])] * 2, [0.7, 0.3]),
    "different_targets": ("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                    dict(r=4, lora_alpha=4, target_modules=["v_proj", "o_proj", "up_proj"]),
                                    dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])], [0.4, 0.4, 0.2]),
    "mixed_ranks": ("llama", [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                              dict(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"])], [0.5, 0.5]),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="session")
def adapter_sets(tmp_path_factory):
    """Build each variant's adapters once per session, on first use."""
    root = tmp_path_factory.mktemp("adapters")
    cache: dict[str, AdapterSet] = {}

    def get(name: str) -> AdapterSet:
        if name not in cache:
            base, kwargs, weights = VARIANTS[name]
            paths = [make_adapter(root / name / f"a{i}", base, seed=100 * i + len(name),
                                  dtype=DTYPES.get(name, torch.float32), **kw) for i, kw in enumerate(kwargs)]
            cache[name] = AdapterSet(base, paths, weights)
        return cache[name]

    return get


def merge_config(aset: AdapterSet, out: Path, method: str, **merge_kwargs) -> dict:
    output = merge_kwargs.pop("output", {})
    runtime = merge_kwargs.pop("runtime", {"executor": "local", "progress": False})
    return {
        "adapters": [{"path": str(p), "weight": w} for p, w in zip(aset.paths, aset.weights)],
        "merge": {"method": method, **merge_kwargs},
        "output": {"path": str(out), **output},
        "runtime": runtime,
    }


@pytest.fixture
def shelf(adapter_sets, tmp_path) -> Path:
    """A shared folder of real PEFT adapters, as a model zoo keeps them: sql, chat, code-a, code-b, code-c."""
    import shutil

    root = tmp_path / "adapters"
    for name, src in zip(["sql", "chat", "code-a", "code-b", "code-c"], adapter_sets("llama").paths * 2):
        shutil.copytree(src, root / name)
    return root


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session (test_ray, test_evaluate...): a second ray.init would fail."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_TMPDIR"] = str(tmp)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(tmp), log_to_driver=False)
    yield
    ray.shutdown()
