"""distmerge demo [DIR]"""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  distmerge demo ./demo && distmerge merge configs/quickstart.yaml
  distmerge demo ./demo --layers 4 --rank 16 && distmerge plan configs/quickstart.yaml
"""


def add_parser(subs) -> None:
    p = subs.add_parser("demo", help="write three example LoRA adapters to merge (no download, no base model)",
                        description="Write three synthetic PEFT LoRA adapters (sql, chat, code) for a tiny "
                                    "Llama-shaped model under DIR/adapters/, the inputs of configs/quickstart.yaml.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default="./demo", help="where to write (default ./demo)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=160)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace adapters already at DIR/adapters/{sql,chat,code}")
    p.set_defaults(run=run)


def run(args) -> int:
    from distmerge.demo import write_demo

    paths = write_demo(args.dir, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                       rank=args.rank, seed=args.seed, force=args.force)
    for p in paths:
        print(f"wrote {p}")
    print("next: distmerge merge configs/quickstart.yaml")
    return 0
