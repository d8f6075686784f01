"""README.md, the model card every output carries: what was merged, how, how well, and how to load it.

`build_card` is a pure function of the manifest (config, method, inputs, modules, versions; not its
`outputs`, which list the card itself) and the output's adapter_config.json, so the same merge gives
the same card byte for byte, on any executor and in a batch or alone. For that, the card leaves out
what says where and when this copy was made rather than what was merged: output.path, overwrite and
the push keys, the runtime keys that do not change the bytes, timings and the creation time.

Metadata is huggingface_hub's `ModelCardData`:
- `base_model` is the adapter_config's base_model_name_or_path when it is a Hub repo id; a local
  path is named in the text only (the Hub refuses metadata that is not a model id).
- `license` only when every input records the same one in the manifest (a Hub input may); distmerge
  reads no file of an adapter but its config and weights, so it never guesses one from a README.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from distmerge.adapters.formats import DEFAULT, FORMATS, Format

LIBRARY = "peft"
TAGS = ["lora", "peft", "merge", "distmerge"]
CARD = "README.md"
# vLLM's LoRAConfig accepts only these max_lora_rank values
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_NOT_MERGED = {"output": ("path", "overwrite", "model_card", "push_to_hub", "hub_private", "hub_revision",
                          "hub_create_pr", "hub_commit_message")}
_AUTO = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
         "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
         "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
_RUNTIME_KEPT = ("cpus_per_worker", "device")  # they change the bytes (BLAS rounding); the rest does not


def card_config(config: dict) -> dict:
    """The manifest's config as the card shows it: what decides the output's bytes, not where it went.

    Keys come in the schema's order, whatever order the manifest holds them in (distmerge.json is
    written with sorted keys), so a card rebuilt from the file is the card that was written.
    """
    from distmerge.config.schema import AdapterSpec, MergeConfig

    out = _ordered(config, MergeConfig)
    out["adapters"] = [_ordered(a, AdapterSpec) for a in out.get("adapters") or []]
    for section, keys in _NOT_MERGED.items():
        for key in keys:
            out.get(section, {}).pop(key, None)
    if isinstance(out.get("runtime"), dict):  # 1 and 1.0 CPUs are one config (the default is an int)
        out["runtime"] = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                          for k, v in out["runtime"].items() if k in _RUNTIME_KEPT}
    return out


def _ordered(values: Any, cls: type) -> Any:
    """A dict with `cls`'s fields first, in declaration order (sections recursively), then any others sorted."""
    import dataclasses
    import typing

    if not isinstance(values, dict):
        return values
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key in fields + sorted(k for k in values if k not in fields):
        if key in values:
            sub = hints.get(key)
            out[key] = _ordered(values[key], sub) if dataclasses.is_dataclass(sub) else values[key]
    return out


def output_rank(adapter_config: dict) -> int:
    """The largest rank of any module: r, or a larger rank_pattern value."""
    return max([int(adapter_config.get("r") or 0), *(adapter_config.get("rank_pattern") or {}).values()])


def hub_base_model(adapter_config: dict) -> str | None:
    """The base model as a Hub repo id, or None (unknown, or a local path)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    base = adapter_config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base or base.startswith((".", "~")) or os.path.isabs(base):
        return None
    try:
        validate_repo_id(base)
    except HFValidationError:
        return None
    return base


def common_license(inputs: list[dict]) -> str | None:
    """The license every input records (on its entry, or its Hub source), if they all record the same one."""
    found = {(e.get("license") or (e.get("hub") or {}).get("license")) for e in inputs}
    return found.pop() if len(found) == 1 and None not in found and "" not in found else None


def build_card(manifest: dict, adapter_config: dict) -> ModelCard:
    """The output's model card, from its manifest (its `outputs` are not read) and adapter_config.json."""
    data = ModelCardData(library_name=LIBRARY, base_model=hub_base_model(adapter_config), tags=list(TAGS),
                         license=common_license(manifest["inputs"]))
    body = "\n".join([
        _intro(manifest, adapter_config),
        _sources(manifest["inputs"]),
        _method(manifest),
        _stats(manifest.get("modules") or {}),
        _usage_of(manifest["method"].get("output_format", DEFAULT), adapter_config),
        _config(manifest["config"]),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(directory: str, manifest: dict, adapter_config: dict) -> str:
    """Write README.md into `directory` (the staging directory, before the manifest lists it)."""
    from distmerge.errors import output_error

    path = os.path.join(directory, CARD)
    try:
        build_card(manifest, adapter_config).save(path)
    except OSError as e:
        raise output_error(e, path) from None
    return path


# --- the sections -------------------------------------------------------------------------------------------


def _intro(m: dict, adapter_config: dict) -> str:
    base = adapter_config.get("base_model_name_or_path") or "an unrecorded base model"
    method = m["method"]
    return (f"# Merged LoRA adapter\n\n"
            f"A PEFT LoRA adapter for `{base}`, merged from {len(m['inputs'])} adapters with `{method['used']}` "
            f"by [distmerge](https://github.com/distmerge/distmerge) {m['distmerge_version']}, straight from the "
            f"adapters' files. Rank {method['rank']}, {method['output_dtype']}. `distmerge.json` beside this card "
            f"records every input file's sha256, the output files' sha256 and per-module statistics.\n")


def _sources(inputs: list[dict]) -> str:
    rows = ["## Source adapters", "", "| adapter | source | weight | rank |", "|---|---|---:|---:|"]
    for e in inputs:
        rank = e.get("rank")
        if rank is not None and e.get("max_rank") not in (None, rank):
            rank = f"{rank} (up to {e['max_rank']} per module)"
        rows.append(f"| {_cell(e['name'])} | {_cell(_source(e))} | {_num(e['weight'])} | "
                    f"{'-' if rank is None else rank} |")
    return "\n".join(rows) + "\n"


def _source(entry: dict) -> str:
    hub = entry.get("hub")
    if isinstance(hub, dict) and hub.get("repo"):
        where = f"{hub['repo']}@{hub.get('commit') or hub.get('revision') or 'main'}"
        return f"`{where}`" + (f" (`{hub['subfolder']}`)" if hub.get("subfolder") else "")
    return f"`{entry['path']}`"


def _method(m: dict) -> str:
    from distmerge.methods import registry

    method, merge = m["method"], m["config"]["merge"]
    found = registry.find(method["used"])
    params = [p for p in (found.params if found else merge) if p in merge and merge[p] is not None]
    lines = ["## Method", "", f"`{method['used']}`" + (
        f" (requested `{method['requested']}`; a single adapter is merged as `linear`)"
        if method["requested"] != method["used"] else "") + (f": {found.summary}" if found else "") + ".", ""]
    lines += [f"- `{p}`: {_num(merge[p])}" for p in params]
    lines += [f"- output rank: {method['rank']}", f"- output dtype: {method['output_dtype']}"]
    return "\n".join(lines) + "\n"


def stats_summary(modules: dict) -> dict[str, Any]:
    """The numbers the card's statistics section shows, from the manifest's per-module stats."""
    out: dict[str, Any] = {"modules": len(modules)}
    errors = {name: s["svd_truncation_error"] for name, s in modules.items() if "svd_truncation_error" in s}
    if errors:
        worst = max(sorted(errors), key=errors.__getitem__)
        out["svd_truncation_error_median"] = statistics.median(errors.values())
        out["svd_truncation_error_worst"] = errors[worst]
        out["svd_truncation_error_worst_module"] = worst
    kept = [s["kept_fraction"] for s in modules.values() if "kept_fraction" in s]
    if kept:
        out["kept_fraction_mean"] = statistics.fmean(kept)
    return out


def _stats(modules: dict) -> str:
    s = stats_summary(modules)
    rows = ["## Merge statistics", "", "| statistic | value |", "|---|---:|", f"| modules merged | {s['modules']} |"]
    if "svd_truncation_error_median" in s:
        rows.append(f"| median SVD truncation error ‖Δ−Δᵣ‖/‖Δ‖ | {_num(s['svd_truncation_error_median'])} |")
        rows.append(f"| worst SVD truncation error | {_num(s['svd_truncation_error_worst'])} "
                    f"(`{s['svd_truncation_error_worst_module']}`) |")
    if "kept_fraction_mean" in s:
        rows.append(f"| mean fraction of values kept | {_num(s['kept_fraction_mean'])} |")
    return "\n".join(rows) + "\n\nPer-module values are in `distmerge.json` (`modules`).\n"


def _usage(adapter_config: dict) -> str:
    base = adapter_config.get("base_model_name_or_path") or "BASE_MODEL"
    auto = _AUTO.get(adapter_config.get("task_type") or "CAUSAL_LM", "AutoModel")
    rank = output_rank(adapter_config)
    vllm_rank = next((r for r in VLLM_RANKS if r >= rank), None)
    if vllm_rank is None:
        vllm = f"vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}; this adapter's rank is {rank}.\n"
    else:
        vllm = (f"With vLLM (`max_lora_rank` is the smallest value vLLM accepts that holds this adapter's rank, "
                f"{rank}):\n\n"
                f"```python\nfrom huggingface_hub import snapshot_download\nfrom vllm import LLM, SamplingParams\n"
                f"from vllm.lora.request import LoRARequest\n\n"
                f"adapter = snapshot_download(\"ORG/NAME\")  # this repo; or the local directory\n"
                f"llm = LLM(model={base!r}, enable_lora=True, max_lora_rank={vllm_rank})\n"
                f"outputs = llm.generate([\"Hello\"], SamplingParams(max_tokens=64),\n"
                f"                       lora_request=LoRARequest(\"merged\", 1, adapter))\n```\n")
    return (f"## Use\n\nWith PEFT:\n\n"
            f"```python\nfrom peft import PeftModel\nfrom transformers import {auto}\n\n"
            f"base = {auto}.from_pretrained({base!r})\n"
            f"model = PeftModel.from_pretrained(base, \"ORG/NAME\")  # this repo; or the local directory\n```\n\n"
            + vllm)


def _usage_of(fmt: str, adapter_config: dict) -> str:
    """The loading snippet of the output's format (adapters/formats.py): a pipeline format loads in diffusers."""
    return _diffusion_usage(FORMATS[fmt]) if FORMATS[fmt].pipeline else _usage(adapter_config)


def _diffusion_usage(fmt: Format) -> str:
    """A diffusers or kohya file: the pipeline loads it alone (the merged factors carry every weight)."""
    file = fmt.file("NAME")  # the file's name for an output directory NAME
    where = "this repo, or the local directory" + ("" if file == fmt.file("OTHER") else  # named after it
                                                    f"; {file}: its {fmt.name} file")
    return (f"## Use\n\nThis is a {fmt.name}-format LoRA. With diffusers, on the pipeline of its base model:\n\n"
            f"```python\npipe.load_lora_weights(\"ORG/NAME\", weight_name=\"{file}\")  # {where}\n"
            f"pipe.fuse_lora()  # optional: fold it into the weights\n```\n\n"
            f"It equals the inputs loaded together, weighted with set_adapters and fused, for method cat; other "
            f"methods merge as their method says, usually at a smaller rank.\n")


def _config(config: dict) -> str:
    text = yaml.safe_dump(card_config(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return (f"## Merge config\n\nThe config distmerge ran (`distmerge merge CONFIG` reproduces the merge; "
            f"runtime keys that do not change the bytes are left out):\n\n```yaml\n{text}```\n")


def _num(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
