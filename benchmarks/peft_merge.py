"""PEFT's side of the benchmark, run the way a PEFT user merges: load the base model, load every
adapter onto it, add_weighted_adapter, save_pretrained. One process per merge, like distmerge's.

    python benchmarks/peft_merge.py make-base OUT --layers 2 --hidden 4096 --intermediate 11008
    python benchmarks/peft_merge.py merge --base BASE --out OUT --method ties --density 0.5 \\
        --adapters A0 A1 ... --weights 0.125 0.125 ...

`merge` prints one JSON line: its phases in seconds, and the seconds PEFT spent on each module
(timed by wrapping LoraModel's per-module merge functions), which the benchmark scales up when
PEFT is run on a sample of the modules.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.perf_counter()


def make_base(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.hidden // 128)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # stored like a real 7B checkpoint
    model.save_pretrained(args.out)


def _timed(fn, log: list):
    def wrapper(self, *a, **kw):
        t = time.perf_counter()
        lora_a, lora_b = fn(self, *a, **kw)
        log.append([int(lora_b.shape[0]), int(lora_a.reshape(lora_a.shape[0], -1).shape[1]),
                    time.perf_counter() - t])
        return lora_a, lora_b
    return wrapper


def merge(args) -> None:
    import torch
    from peft import PeftModel
    from peft.tuners.lora.model import LoraModel
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
    names = [f"a{i}" for i in range(len(args.adapters))]
    model = PeftModel.from_pretrained(base, args.adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], args.adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    t_load = time.perf_counter()

    modules: list = []
    for fn in ("_svd_generalized_task_arithmetic_weighted_adapter", "_generalized_task_arithmetic_weighted_adapter"):
        setattr(LoraModel, fn, _timed(getattr(LoraModel, fn), modules))
    kwargs = {"combination_type": args.method}
    if args.density is not None:
        kwargs["density"] = args.density
    model.add_weighted_adapter(names, args.weights, "merged", majority_sign_method="total", **kwargs)
    t_merge = time.perf_counter()
    model.save_pretrained(args.out, selected_adapters=["merged"])
    t_save = time.perf_counter()
    print(json.dumps({"import_s": t_import - T0, "load_s": t_load - t_import, "merge_s": t_merge - t_load,
                      "save_s": t_save - t_merge, "modules": modules, "torch_threads": torch.get_num_threads()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("make-base")
    b.add_argument("out")
    b.add_argument("--layers", type=int, required=True)
    b.add_argument("--hidden", type=int, required=True)
    b.add_argument("--intermediate", type=int, required=True)
    b.add_argument("--vocab", type=int, default=256)
    m = sub.add_parser("merge")
    m.add_argument("--base", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--method", required=True)
    m.add_argument("--density", type=float)
    m.add_argument("--adapters", nargs="+", required=True)
    m.add_argument("--weights", nargs="+", type=float, required=True)
    args = p.parse_args(argv)
    (make_base if args.cmd == "make-base" else merge)(args)


if __name__ == "__main__":
    sys.exit(main())
