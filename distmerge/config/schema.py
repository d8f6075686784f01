"""The config's shape: frozen dataclasses, one per YAML section.

The field names here are a public contract (`distmerge merge CONFIG key=value`): held-out configs
drive them. Defaults live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class AdapterSpec:
    path: str
    weight: float = 1.0
    name: Optional[str] = None  # default: the directory's name
    # peft | diffusers | kohya (adapters/formats.py); null: detected from the files' keys
    format: Optional[str] = None
    # a PEFT directory's pipeline component (unet, text_encoder, ...): its modules are named as diffusers'
    # (unet.<module>), so it merges with diffusers and kohya LoRAs and converts to their formats
    component: Optional[str] = None
    # ordered {regex: factor}, searched in module names: the first match multiplies weight for that module
    module_weights: Optional[Union[dict, list, tuple]] = None
    # values interpolated linearly over the layer index (mergekit's gradients), multiplying weight
    layer_weights: Optional[Union[list, tuple]] = None
    # diffusers' set_adapters block-scale dict ({"unet": {"down": .., "mid": .., "up": ..}, "text_encoder": ..})
    block_weights: Optional[Union[float, dict]] = field(default=None, hash=False)


@dataclass(frozen=True)
class MergeSpec:
    method: str = "linear"
    density: Optional[float] = None
    majority_sign_method: str = "total"
    svd_rank: Optional[int] = None
    svd_clamp: Optional[float] = None
    svd_algorithm: str = "exact"
    svd_oversample: int = 8
    svd_niter: int = 4
    seed: int = 0
    iso_common_fraction: float = 0.8  # Iso-CTS: share of the merged rank kept for common directions (paper's 0.8)
    della_epsilon: float = 0.15  # DELLA: keep probabilities span density ± epsilon (mergekit's default)
    breadcrumbs_gamma: float = 0.01  # breadcrumbs: fraction of the largest magnitudes dropped (mergekit's default)


@dataclass(frozen=True)
class OutputSpec:
    path: str = "./merged"
    dtype: Optional[str] = None
    shard_size: Union[str, int] = "2GB"  # "2GB", "500MiB" or a number of bytes
    consolidate: bool = True
    overwrite: bool = False
    format: Optional[str] = None  # peft | diffusers | kohya; null: the inputs' format when they agree, else peft
    model_card: bool = True  # README.md: what was merged and how to load it (distmerge/publish/card.py)
    push_to_hub: Optional[str] = None  # ORG/NAME: upload the finished output in one commit
    hub_private: bool = False  # a repo push_to_hub creates is private
    hub_revision: Optional[str] = None  # a branch, created when missing; null: main
    hub_create_pr: bool = False  # open a pull request instead of committing to the branch
    hub_commit_message: Optional[str] = None


@dataclass(frozen=True)
class RuntimeSpec:
    executor: str = "auto"
    address: Optional[str] = None
    connect_timeout_s: float = 60.0  # reaching runtime.address (TCP, then ray.init), before failing
    num_workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: float = 1  # also the torch threads of the math, in every executor (same bytes)
    device: str = "auto"
    gpu_wait_s: float = 0.0
    task_timeout_s: Optional[float] = 3600.0
    max_retries: int = 3
    progress: bool = True
    hub_cache: Optional[str] = None  # where hf:// inputs are downloaded; null: huggingface_hub's (HF_HUB_CACHE)


@dataclass(frozen=True)
class MergeConfig:
    adapters: tuple[AdapterSpec, ...] = ()
    merge: MergeSpec = field(default_factory=MergeSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    @property
    def shard_size_bytes(self) -> int:
        from distmerge.config.units import parse_size

        return parse_size(self.output.shard_size)


DTYPES = ("float32", "float16", "bfloat16")
EXECUTORS = ("local", "ray", "auto")
DEVICES = ("auto", "cpu", "cuda")
SIGN_METHODS = ("total", "frequency")
SVD_ALGORITHMS = ("exact", "randomized")
