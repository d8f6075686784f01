"""LoRA file formats: the one table of peft, diffusers and kohya, in and out.

Every format maps its keys to one internal module naming, which is what the planner, the methods and
the workers see: a PEFT directory keeps its saved names (`base_model.model.<module>`); the diffusion
formats use diffusers' pipeline names, `<component>.<module path>` (`unet.down_blocks.0.attentions.0.
proj_in`, `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`). Each format says how it is
detected from keys, how a key maps to (module, role), and how a module is named on write.

Readers account for every key: a key no reader consumes is an error naming it, never dropped
(diffusers#9291: a LoRA that loaded with no effect). What distmerge cannot merge as LoRA factors
(LyCORIS LoHa/LoKr/OFT, DoRA magnitudes, kohya Flux fused qkv) is refused with the file and key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from distmerge import lora
from distmerge.adapters import weights
from distmerge.adapters.adapter import Adapter, LoraModule, confined, open_peft
from distmerge.adapters.header import BadJSON, TensorInfo, load_json, read_header, show
from distmerge.config.schema import AdapterSpec
from distmerge.errors import AdapterError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: {"unet.r": 4, ...} as JSON
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer", "prior")
# kohya prefix → diffusers component; the writer uses the first prefix of a component (as diffusers'
# convert_state_dict_to_kohya does: lora_te1_ for text_encoder)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_OF = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# kohya flattens module paths with "_"; these names keep theirs when a path is split back into segments
# (diffusers' _convert_unet_lora_key / _convert_text_encoder_lora_key repair the same names)
KOHYA_WORDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "time_embedding", "linear_1", "linear_2",
    "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "conv_norm_out", "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out", "final_layer_norm",
    "position_embedding", "token_embedding", "class_embedding", "encoder_hid_proj", "time_proj",
})
# original-SD (sgm) block names, which kohya uses for SDXL and diffusers converts with a model-aware table
SGM_NAMES = ("input_blocks", "middle_block", "output_blocks")
REFUSED = (  # (key fragment, what it is)
    ("hada_", "a LyCORIS LoHa tensor"), ("lokr_", "a LyCORIS LoKr tensor"), (".oft_", "a LyCORIS OFT tensor"),
    ("dora_scale", "a DoRA magnitude vector"), ("lora_magnitude_vector", "a DoRA magnitude vector"),
    ("lora_mid", "a LyCORIS LoCon (Tucker) tensor"), (".diff", "a LyCORIS full-weight difference"),
    (".w_norm", "a LyCORIS norm tensor"), (".b_norm", "a LyCORIS norm tensor"),
    ("double_blocks", "a kohya Flux tensor (fused qkv)"), ("single_blocks", "a kohya Flux tensor (fused qkv)"),
)


@dataclass(frozen=True)
class Format:
    """One LoRA format: detection, key → (module, role) on read, module → key on write."""

    name: str
    detect: Callable[[list[str]], bool]  # from a file's keys
    parse: Optional[Callable[[str], Optional[tuple[str, str]]]]  # key → (internal module, A|B|alpha); None: PEFT
    key: Optional[Callable[[str, str], str]]  # (internal module, A|B|alpha) → the key written
    # the single output file's name, from the output directory (always consolidated); None: a PEFT directory,
    # sharded as output.shard_size says, with adapter_config.json
    file: Optional[Callable[[str], str]] = None
    pipeline: bool = False  # its modules carry diffusers' pipeline names (<component>.<module>), for diffusers
    # the pipeline components it can name on write; None: any of COMPONENTS (peft: one, as that model's adapter)
    components: Optional[tuple[str, ...]] = None


def unflatten(path: str) -> str:
    """kohya's down_blocks_0_attentions_0_proj_in → down_blocks.0.attentions.0.proj_in (longest known name)."""
    tokens, out, i = path.split("_"), [], 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + 4), i, -1):
            word = "_".join(tokens[i:j])
            if j == i + 1 or word in KOHYA_WORDS:
                out.append(word)
                i = j
                break
    return ".".join(out)


_KOHYA_KEY = re.compile(r"^(lora_(?:unet|te1|te2|te)_)(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS_KEY = re.compile(rf"^((?:{'|'.join(COMPONENTS)})\.(?:.+?))\."
                            r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
                            r"|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
_ROLES = {"lora_down.weight": "A", "lora_up.weight": "B", "lora_A.weight": "A", "lora_B.weight": "B",
          "lora.down.weight": "A", "lora.up.weight": "B", "lora_linear_layer.down.weight": "A",
          "lora_linear_layer.up.weight": "B", "alpha": "alpha"}


def _kohya_parse(key: str) -> Optional[tuple[str, str]]:
    m = _KOHYA_KEY.match(key)
    if not m:
        return None
    return f"{KOHYA_PREFIXES[m.group(1)]}.{unflatten(m.group(2))}", _ROLES[m.group(3)]


def _kohya_key(module: str, role: str) -> str:
    component, _, path = module.partition(".")
    suffix = {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"}[role]
    return f"{KOHYA_OF[component]}{path.replace('.', '_')}.{suffix}"


def _diffusers_parse(key: str) -> Optional[tuple[str, str]]:
    m = _DIFFUSERS_KEY.match(key)
    return (m.group(1), _ROLES[m.group(2)]) if m else None


def _diffusers_key(module: str, role: str) -> str:
    return f"{module}.alpha" if role == "alpha" else lora.factor_key(module, role, False)


DEFAULT = "peft"  # an input's format unless its files say otherwise; the output's when the inputs disagree
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("peft", lambda keys: False, None, None),
    Format("diffusers", lambda keys: any(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys),
           _diffusers_parse, _diffusers_key, lambda out: DIFFUSERS_FILE, pipeline=True),
    Format("kohya", lambda keys: any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys),
           _kohya_parse, _kohya_key, lambda out: f"{Path(out).name}.safetensors", pipeline=True,
           components=tuple(KOHYA_OF)),
)}


def names() -> list[str]:
    return list(FORMATS)


# --- where an adapter's path points ---------------------------------------------------------------------


def path_problem(path: str, fmt: str | None) -> str | None:
    """What is wrong with a local adapter path, for config validation; None when it can be opened."""
    p = Path(path).expanduser()
    if p.is_file():
        return None if p.name.endswith(".safetensors") else (
            f"{path!r} is a file but not a .safetensors LoRA; point it at a PEFT directory, a diffusers "
            f"{DIFFUSERS_FILE} or a kohya .safetensors file")
    if not p.is_dir():
        return (f"adapter directory {path!r} does not exist; point it at a directory holding adapter_config.json, "
                f"a diffusers {DIFFUSERS_FILE} or a kohya .safetensors file")
    if (p / "adapter_config.json").is_file() or lora_file(str(p)):
        return None
    return (f"{path!r} has no adapter_config.json; is it a PEFT adapter saved with save_pretrained? (a diffusers "
            f"LoRA directory holds {DIFFUSERS_FILE}; a directory holding exactly one .safetensors file, such as a "
            f"kohya output of distmerge, is read as that file)")


def lora_file(directory: str) -> str | None:
    """The LoRA file of a directory without adapter_config.json: pytorch_lora_weights.safetensors, else its only
    .safetensors file (a distmerge kohya output); None when there is neither."""
    if os.path.lexists(os.path.join(directory, DIFFUSERS_FILE)):
        return os.path.join(directory, DIFFUSERS_FILE)
    try:
        found = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    except OSError:
        return None
    return os.path.join(directory, found[0]) if len(found) == 1 else None


def open_adapter(spec: AdapterSpec, index: int, root: str | None = None) -> Adapter:
    """Open any supported adapter: a PEFT directory, a diffusers directory or file, a kohya file.

    Reads are confined to `root` (default: the adapter's directory, or a single file itself).
    """
    name = spec.name or Path(spec.path).name
    path = spec.path
    fmt = spec.format
    if os.path.isdir(path) and (fmt == "peft" or (fmt is None and os.path.lexists(
            os.path.join(path, "adapter_config.json")))):
        adapter = open_peft(spec, index, root)
        if spec.component:
            adapter = _as_component(adapter, spec.component)
    elif spec.component:
        raise AdapterError(f"adapter {name!r}: component is set, but {spec.path} is not a PEFT directory; a "
                           f"diffusers or kohya file names its components itself: remove component")
    else:
        file = (lora_file(path) or os.path.join(path, DIFFUSERS_FILE)) if os.path.isdir(path) else path
        adapter = _open_file(spec, index, root or path, file, name)
    try:
        factors = weights.multipliers(spec, adapter.modules)
    except ValueError as e:  # a block list shorter than the adapter's transformer layers there
        raise AdapterError(f"adapter {name!r}: {e}") from None
    if factors:
        modules = {n: dataclasses.replace(m, multiplier=factors.get(n, 1.0)) for n, m in adapter.modules.items()}
        adapter = dataclasses.replace(adapter, modules=modules)
    return adapter


def _as_component(adapter: Adapter, component: str) -> Adapter:
    """A PEFT directory's modules renamed base_model.model.<m> → <component>.<m>, diffusers' pipeline names."""
    if adapter.extras:
        raise AdapterError(f"adapter {adapter.name!r}: it saves full modules ({next(iter(adapter.extras))}); "
                           f"a pipeline LoRA holds LoRA factors only: remove modules_to_save, or drop component")
    bad = next((m for m in adapter.modules.values() if m.embedding or not m.name.startswith(lora.PEFT_PREFIX)), None)
    if bad is not None:
        raise AdapterError(f"adapter {adapter.name!r}: module {bad.name!r} is not a PEFT layer of a pipeline "
                           f"component (base_model.model.<module>, not an embedding); drop component")
    modules = {f"{component}.{n[len(lora.PEFT_PREFIX):]}": dataclasses.replace(
        m, name=f"{component}.{n[len(lora.PEFT_PREFIX):]}") for n, m in adapter.modules.items()}
    return dataclasses.replace(adapter, modules=modules)


def _open_file(spec: AdapterSpec, index: int, root: str, file: str, name: str) -> Adapter:
    try:
        root = os.path.realpath(root, strict=True)
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot resolve the adapter path {spec.path}: "
                           f"{getattr(e, 'strerror', None) or e}; check the path and its symlinks") from None
    real = confined(file, root, name)
    tensors, metadata = read_header(real, name)
    fmt = FORMATS.get(spec.format) if spec.format else next(
        (f for f in FORMATS.values() if f.detect(list(tensors))), None)
    if fmt is not None and fmt.parse is None:
        raise AdapterError(f"adapter {name!r}: format is {fmt.name}, but {spec.path} is not a directory holding "
                           f"adapter_config.json; remove format: to detect the file's format from its keys")
    if fmt is None:
        first = show(next(iter(tensors), None))
        raise AdapterError(f"adapter {name!r}: cannot tell the LoRA format of {real} from its keys (first key "
                           f"{first}); expected diffusers keys (unet.<module>.lora_A.weight) or kohya keys "
                           f"(lora_unet_<module>.lora_down.weight); set format: on the adapter if it is one of "
                           f"{', '.join(FORMATS)}")
    modules, config = _modules(fmt, tensors, metadata, real, name)
    stamps = {real: next(iter(tensors.values())).stamp}
    return Adapter(index, name, spec.path, spec.weight, config, (real,), modules, {}, "", stamps,
                   format=fmt.name)


def _modules(fmt: Format, tensors: dict[str, TensorInfo], metadata: dict[str, str], file: str, name: str
             ) -> tuple[dict[str, LoraModule], dict[str, Any]]:
    """Every key consumed: (A, B, optional alpha) per module; each module's rank and scaling."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        what = next((why for frag, why in REFUSED if frag in key), None)
        if what:
            raise AdapterError(f"adapter {name!r}: {file} holds {show(key)}, {what}; distmerge merges plain LoRA "
                               f"factors only (lora_down/lora_up or lora_A/lora_B): convert or extract the "
                               f"adapter to plain LoRA first")
        if any(s in key for s in SGM_NAMES) and fmt.name == "kohya":
            raise AdapterError(f"adapter {name!r}: {file} names its modules with original Stable Diffusion (sgm) "
                               f"block names ({show(key)}); distmerge reads kohya files with diffusers module "
                               f"names (lora_unet_down_blocks_...). Convert it with diffusers' load_lora_weights "
                               f"and save_lora_weights first")
        parsed = fmt.parse(key)
        if parsed is None:
            raise AdapterError(f"adapter {name!r}: {file} holds {show(key)}, which is not a {fmt.name} LoRA key; "
                               f"every key must be a LoRA factor or alpha (a key that is skipped would make the "
                               f"LoRA load with no effect). Remove the key, or set format: if the file is another "
                               f"format")
        module, role = parsed
        if role in parts.setdefault(module, {}):
            raise AdapterError(f"adapter {name!r}: {file} holds two {role} tensors for module {module!r} "
                               f"({show(parts[module][role].name)} and {show(key)}); keep one spelling")
        parts[module][role] = info
    meta = _diffusers_metadata(metadata, file, name)
    alphas = _alphas({m: p["alpha"] for m, p in parts.items() if "alpha" in p}, name)
    modules = {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            have = ", ".join(show(i.name) for i in p.values())
            raise AdapterError(f"adapter {name!r}: {file} has {have} but not both factors of module {module!r}; "
                               f"the file is incomplete: re-save it")
        modules[module] = _module(module, p["A"], p["B"], alphas.get(module), meta, file, name)
    if not modules:
        raise AdapterError(f"adapter {name!r}: {file} holds no LoRA factors")
    base = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    config = {"peft_type": "LORA", "r": max(m.rank for m in modules.values()),
              "lora_alpha": None, "target_modules": sorted(modules), "base_model_name_or_path": base}
    return modules, config


def _module(module: str, a: TensorInfo, b: TensorInfo, alpha: float | None, meta: dict, file: str, name: str
            ) -> LoraModule:
    rank = a.shape[0] if a.shape else 0
    if len(a.shape) not in (2, 4) or len(b.shape) != len(a.shape) or b.shape[1] != rank or (
            len(b.shape) == 4 and tuple(b.shape[2:]) != (1, 1)):
        raise AdapterError(f"adapter {name!r}: {file}: module {module!r} has down/A {list(a.shape)} and up/B "
                           f"{list(b.shape)}, expected (r, in[, k, k]) and (out, r[, 1, 1]); re-save the adapter")
    component, _, path = module.partition(".")
    cfg = meta.get(component)
    if alpha is None and cfg is not None:
        r = lora.match_pattern(cfg.get("rank_pattern") or {}, path, cfg.get("r", rank))
        if r != rank:
            raise AdapterError(f"adapter {name!r}: {file}: module {module!r} has rank {rank}, but the file's "
                               f"{METADATA_KEY} gives r={r}; the metadata does not describe these tensors")
        alpha = lora.match_pattern(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", rank))
        scaling = lora.scaling(float(alpha), rank, bool(cfg.get("use_rslora")))
    else:  # kohya and diffusers' network alphas: alpha/rank; no alpha at all: alpha = rank
        alpha = float(rank if alpha is None else alpha)
        scaling = alpha / rank
    return LoraModule(module, False, a, b, rank, float(alpha), scaling)


def _diffusers_metadata(metadata: dict[str, str], file: str, name: str) -> dict[str, dict]:
    """{component: LoraConfig kwargs} from diffusers' lora_adapter_metadata; {} when absent."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        doc = load_json(raw.encode())
    except BadJSON as e:
        raise AdapterError(f"adapter {name!r}: {file}: its {METADATA_KEY} {e}; re-save the LoRA") from None
    if not isinstance(doc, dict):
        raise AdapterError(f"adapter {name!r}: {file}: {METADATA_KEY} is not a JSON object; re-save the LoRA")
    out: dict[str, dict] = {}
    for key, value in doc.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    for component, cfg in out.items():
        if cfg.get("use_dora"):
            raise AdapterError(f"adapter {name!r}: {file}: {METADATA_KEY} sets {component}.use_dora; DoRA's "
                               f"magnitude vectors cannot be merged as LoRA factors")
        for key, integer in (("r", True), ("lora_alpha", False)):
            v = cfg.get(key)
            if v is not None and not _positive(v, integer):
                raise AdapterError(f"adapter {name!r}: {file}: {METADATA_KEY} has {component}.{key}={show(v)}, "
                                   f"expected a positive {'integer' if integer else 'number'}")
        for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
            v = cfg.get(key)
            if v is not None and not (isinstance(v, dict) and all(lora.valid_pattern(p) for p in v)):
                raise AdapterError(f"adapter {name!r}: {file}: {METADATA_KEY} has {component}.{key}={show(v)}, "
                                   f"expected an object of module regex → value")
            for pattern, value in (v or {}).items():  # a bad value is the file's fault, not an internal error
                if not _positive(value, integer):
                    raise AdapterError(f"adapter {name!r}: {file}: {METADATA_KEY} has {component}.{key}"
                                       f"[{show(pattern)}]={show(value)}, expected a positive "
                                       f"{'integer' if integer else 'finite number'}; fix or remove that entry "
                                       f"and re-save the LoRA")
    return out


def _positive(v: Any, integer: bool) -> bool:
    """A positive finite number (JSON's bools are not numbers); an int where `integer`."""
    import math

    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            and (not integer or isinstance(v, int)))


# scalar alpha dtypes → struct format (BF16 is the high half of an F32)
_SCALARS = {"F32": "<f", "F64": "<d", "F16": "<e", "BF16": "<f", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
            "U8": "<B"}


def _alphas(infos: dict[str, TensorInfo], name: str) -> dict[str, float]:
    """The scalar alpha tensors' values: a few bytes each, read pinned like every input, without torch (an
    up-to-date batch imports no torch, tests/test_startup.py)."""
    import math
    import struct

    from distmerge.adapters import pin

    out = {}
    fds: dict[str, int] = {}
    try:
        for module, info in infos.items():
            if math.prod(info.shape) != 1 or info.dtype not in _SCALARS:
                raise AdapterError(f"adapter {name!r}: {info.file}: {show(info.name)} is {info.dtype} "
                                   f"{list(info.shape)}, expected a scalar number (alpha)")
            if info.file not in fds:
                fds[info.file] = os.open(info.file, os.O_RDONLY)
                pin.check(fds[info.file], info.file, info.stamp, name)
            raw = os.pread(fds[info.file], info.nbytes, info.begin)
            if len(raw) != info.nbytes:
                raise AdapterError(f"adapter {name!r}: {info.file} ends inside {show(info.name)}; re-save it")
            value = float(struct.unpack(_SCALARS[info.dtype], b"\0\0" + raw if info.dtype == "BF16" else raw)[0])
            if not (math.isfinite(value) and value > 0):
                raise AdapterError(f"adapter {name!r}: {info.file}: {show(info.name)} is {value}, expected a "
                                   f"positive finite alpha")
            out[module] = value
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot read alphas: {e.strerror or e}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


# --- output ---------------------------------------------------------------------------------------------


def pipeline_components(modules: Iterable[str]) -> set[str] | None:
    """The pipeline components that module names (<component>.<module>) carry; None when one is not a
    pipeline name (a PEFT model's base_model.model.*)."""
    comps = {m.partition(".")[0] for m in modules}
    return comps if comps <= set(COMPONENTS) else None


def is_pipeline(adapter: Adapter) -> bool:
    """Whether its modules carry diffusers' pipeline names (a diffusers or kohya file, or a PEFT directory
    given a component)."""
    return FORMATS[adapter.format].pipeline or pipeline_components(adapter.modules) is not None


def output_format(requested: str | None, adapters: list[Adapter]) -> str:
    """output.format, or the inputs' format when they agree, else peft; refused when it cannot hold them."""
    found = {a.format for a in adapters}
    fmt = requested or (found.pop() if len(found) == 1 else DEFAULT)
    table = FORMATS[fmt]
    diffusion = [a for a in adapters if is_pipeline(a)]
    if diffusion and len(diffusion) != len(adapters):
        peft = next(a for a in adapters if not is_pipeline(a))
        raise AdapterError(f"adapter {peft.name!r} is a PEFT directory (modules base_model.model.*) and adapter "
                           f"{diffusion[0].name!r} a {diffusion[0].format} LoRA (modules unet.*, text_encoder.*); "
                           f"their module names cannot be matched. If the PEFT adapter is a pipeline "
                           f"component's, name it: component: unet (or text_encoder, ...)")
    if table.pipeline and not diffusion:
        raise AdapterError(f"output.format is {fmt}, but the inputs are PEFT directories, whose modules name no "
                           f"pipeline component; write output.format: peft, or set component: unet (or "
                           f"text_encoder, ...) on each adapter")
    if table.components is not None:
        bad = sorted({m.partition(".")[0] for a in adapters for m in a.modules} - set(table.components))
        if bad:
            raise AdapterError(f"output.format is {fmt}, but the inputs adapt {bad[0]!r}, which the {fmt} format "
                               f"cannot name (it names {', '.join(table.components)}); write "
                               f"output.format: diffusers")
    if not table.pipeline and diffusion:
        comps = sorted({m.partition(".")[0] for a in adapters for m in a.modules})
        if len(comps) > 1:
            raise AdapterError(f"output.format is peft, but the inputs adapt {len(comps)} pipeline components "
                               f"({', '.join(comps)}) and a PEFT adapter holds one model's modules; write "
                               f"output.format: diffusers or kohya")
    return fmt
