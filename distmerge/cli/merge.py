"""distmerge merge CONFIG [key=value ...]"""

from __future__ import annotations

import argparse

from distmerge.config import format_size

EXAMPLES = """\
examples:
  distmerge merge configs/quickstart.yaml
  distmerge merge configs/quickstart.yaml merge.method=dare_ties merge.density=0.3 merge.seed=1
  distmerge merge configs/quickstart.yaml adapters.0.weight=-0.5 output.path=./merged-neg output.dtype=float32
  distmerge merge configs/many_adapters_ray.yaml runtime.executor=ray runtime.num_workers=8
  distmerge merge configs/quickstart.yaml output.push_to_hub=my-org/support-merged output.hub_private=true
"""


def add_parser(subs) -> None:
    p = subs.add_parser("merge", help="merge the adapters a config names",
                        description="Merge LoRA adapters as a YAML config says; key=value overrides win over the "
                                    "file. The output directory appears only when the merge is complete.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, OmegaConf dotlist syntax")
    p.set_defaults(run=run)


def run(args) -> int:
    from distmerge.driver import merge
    from distmerge.output.manifest import weights_bytes

    result = merge(args.config, args.overrides)
    size = weights_bytes(result.manifest)
    print(f"merged {len(result.manifest['inputs'])} adapters with {result.method} (rank {result.rank}) into "
          f"{result.path}: {format_size(size)} in {result.seconds:.2f}s")
    for o in result.manifest["outputs"]:
        print(f"  {o['file']:<48} {format_size(o['bytes']):>11}  sha256 {o['sha256'][:16]}")
    if result.hub:
        from distmerge.publish.hub import describe

        print(describe(result.hub))
    return 0
