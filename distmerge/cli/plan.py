"""distmerge plan CONFIG [key=value ...]"""

from __future__ import annotations

import argparse

from distmerge.config import format_size

EXAMPLES = """\
examples:
  distmerge plan configs/quickstart.yaml
  distmerge plan configs/many_adapters_ray.yaml runtime.num_workers=16 merge.method=ties_svd
"""


def add_parser(subs) -> None:
    p = subs.add_parser("plan", help="print the shard plan (bytes, peak memory); merge nothing",
                        description="Read only the adapters' configs and safetensors headers, check that they can "
                                    "be merged, and print the shards a merge would run.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(run=run)


def run(args) -> int:
    from distmerge.config import load_config
    from distmerge.sources import open_inputs
    from distmerge.planner import build_plan, default_num_tasks

    cfg = load_config(args.config, args.overrides)
    plan = build_plan(cfg, open_inputs(cfg))
    workers = cfg.runtime.num_workers or 1
    tasks = plan.shard(default_num_tasks(plan, cfg.shard_size_bytes, workers))
    method = plan.method + ("" if plan.method == plan.requested_method else f" (requested {plan.requested_method}; "
                                                                               f"a single adapter merges as linear)")
    print(f"method {method}, output rank {plan.rank}, dtype {plan.out_dtype}, {len(plan.jobs)} modules, "
          f"{len(plan.passthrough)} pass-through tensors")
    print(f"reads {format_size(plan.in_bytes)}, writes {format_size(plan.out_bytes)}; "
          f"{len(tasks)} shards for {workers} worker(s)\n")
    print(f"{'shard':>5} {'modules':>7} {'read':>11} {'write':>11} {'peak mem':>11} {'est. s':>8}")
    for t in tasks:
        print(f"{t.index:>5} {len(t.modules):>7} {format_size(t.in_bytes):>11} {format_size(t.out_bytes):>11} "
              f"{format_size(t.peak_bytes):>11} {t.cost:>8.2f}")
    print("\npeak mem: the merge's working set per worker, besides ~0.25 GiB for Python and torch (more in a Ray "
          "worker);\non a GPU worker, all but the input buffer is GPU memory")
    print("output files:")
    for name, tensors in plan.files:
        print(f"  {name} ({len(tensors)} tensors)")
    return 0
