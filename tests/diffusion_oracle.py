"""diffusers as the oracle: a tiny Stable Diffusion pipeline built from configs (no downloads), LoRAs made
and saved with diffusers' own functions, and set_adapters + fuse_lora as the reference merge.

The UNet goes through diffusers end to end (lora_state_dict, load_lora_into_unet, set_adapters, fuse_lora).
The text encoder cannot here: diffusers loads it with transformers' load_adapter, which needs PEFT >= 0.22
under transformers 5.x, and the venv pins PEFT 0.21. Its reference is PEFT's own get_delta_weight of each
LoRA as made, weighted by hand.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
# what diffusers' training scripts target: convert_state_dict_to_diffusers renames exactly these, so the file
# has one spelling (a file mixing lora.down and lora_A is read by diffusers' loader with one of them only)
ATTN_TARGETS = (["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"])


@functools.lru_cache(maxsize=1)
def _base_components():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=1000, max_position_embeddings=77, projection_dim=32))
    return unet.eval(), vae.eval(), te.eval(), DDIMScheduler(steps_offset=1, clip_sample=False)


def pipeline():
    """A fresh tiny StableDiffusionPipeline; every call has the same base weights."""
    from diffusers import StableDiffusionPipeline

    unet, vae, te, scheduler = _base_components()
    return StableDiffusionPipeline(vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(te), tokenizer=None,
                                   unet=copy.deepcopy(unet), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _train(model, config, seed: int) -> None:
    """Add a LoRA with diffusers/PEFT and give its factors random values (a trained LoRA's stand-in)."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        model.add_adapter(config)
    else:  # transformers' add_adapter needs PEFT >= 0.22: inject with PEFT itself, as add_adapter does
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name="default")
        model.peft_config = {"default": config}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def make_lora(directory: Path, seed: int, r: int = 4, alpha: float = 8, spelling: str = "peft",
              text_encoder: bool = True, unet_targets=UNET_TARGETS) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save a LoRA with StableDiffusionPipeline.save_lora_weights.

    spelling: 'peft' (unet.<m>.lora_A.weight, with lora_adapter_metadata), 'diffusers' (lora.down/lora.up
    through convert_state_dict_to_diffusers, as diffusers' training scripts save; no metadata: alpha = r
    on load) or 'kohya' (convert_state_dict_to_kohya of the peft state dict, one .safetensors file).
    Returns the path and PEFT's ΔW of each text-encoder module ('text_encoder.<module>').
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline()
    te_targets = TE_TARGETS
    if spelling == "diffusers":
        unet_targets, te_targets = ATTN_TARGETS
    _train(pipe.unet, LoraConfig(r=r, lora_alpha=alpha, target_modules=unet_targets), seed)
    unet_sd = get_peft_model_state_dict(pipe.unet)
    te_sd = None
    if text_encoder:
        _train(pipe.text_encoder, LoraConfig(r=r, lora_alpha=alpha, target_modules=te_targets), seed + 1)
        te_sd = get_peft_model_state_dict(pipe.text_encoder)
    te_deltas = _deltas(pipe.text_encoder) if text_encoder else {}
    directory.mkdir(parents=True, exist_ok=True)
    if spelling == "kohya":
        from safetensors.torch import save_file

        sd = {f"unet.{k}": v for k, v in unet_sd.items()}
        sd.update({f"text_encoder.{k}": v for k, v in (te_sd or {}).items()})
        file = directory / "style.safetensors"
        kohya = convert_state_dict_to_kohya(sd)  # writes alpha = rank: give the file the LoRA's own alpha
        save_file({k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()
                   for k, v in kohya.items()}, str(file))
        _save_peft(pipe.unet, unet_sd, directory.parent / f"{directory.name}_unet_peft")
        return file, te_deltas
    meta = {}
    if spelling == "diffusers":
        unet_sd = convert_state_dict_to_diffusers(unet_sd)
        te_sd = convert_state_dict_to_diffusers(te_sd) if te_sd else None
    else:
        _save_peft(pipe.unet, unet_sd, directory.parent / f"{directory.name}_unet_peft")
        meta = {"unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict()}
        if text_encoder:
            meta["text_encoder_lora_adapter_metadata"] = pipe.text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=unet_sd,
                                              text_encoder_lora_layers=te_sd, **meta)
    return directory, te_deltas


def _save_peft(unet, state_dict, directory: Path) -> None:
    """The UNet's LoRA as a PEFT adapter directory (PEFT's config, PEFT's state dict), for PeftModel."""
    from safetensors.torch import save_file

    unet.peft_config["default"].save_pretrained(str(directory))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state_dict.items()},
              str(directory / "adapter_model.safetensors"))


def _deltas(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        return {f"text_encoder.{n}.weight": m.get_delta_weight("default").float()
                for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def weights_of(pipe) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    out.update({f"text_encoder.{k}": v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()})
    return out


def fused(loras: list[tuple[Path, object]]) -> dict[str, torch.Tensor]:
    """diffusers' own route for the UNet: each LoRA read by lora_state_dict and loaded by load_lora_into_unet,
    weighted by set_adapters(names, weights) (a weight may be a block-scale dict), fused by fuse_lora."""
    from diffusers import StableDiffusionPipeline

    pipe = pipeline()
    names = []
    for i, (path, _) in enumerate(loras):
        p = Path(path)
        kwargs = {"weight_name": p.name} if p.is_file() else {}
        sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(p.parent if p.is_file() else p),
                                                                   return_lora_metadata=True, **kwargs)
        unet_sd = {k: v for k, v in sd.items() if k.startswith("unet.")}
        unet_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")} or None
        StableDiffusionPipeline.load_lora_into_unet(unet_sd, unet_alphas, pipe.unet, adapter_name=f"l{i}",
                                                    _pipeline=pipe, metadata=meta)
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(components=["unet"], adapter_names=names)
    pipe.unload_lora_weights()
    return weights_of(pipe)


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """The largest ‖got − want‖ / ‖want − base‖ over the tensors the LoRAs change; and how many changed."""
    worst, changed = 0.0, 0
    for k, w in want.items():
        delta = (w.double() - base[k].double()).norm()
        if delta == 0:
            assert torch.equal(got[k], w), f"{k} changed but the reference did not"
            continue
        changed += 1
        worst = max(worst, float((got[k].double() - w.double()).norm() / delta))
    return worst, changed
