"""distmerge evaluate EVAL [key=value ...]"""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  distmerge evaluate configs/evaluate.yaml                      # base, sources and candidates on every task
  distmerge evaluate configs/evaluate.yaml runtime.executor=ray # one evaluation actor per GPU (or CPU actors)
  distmerge evaluate configs/evaluate.yaml tasks.0.limit=50 output=./eval-quick
  distmerge batch my_zoo.yaml --evaluate configs/evaluate.yaml     # merge a grid, then evaluate it
"""


def add_parser(subs) -> None:
    p = subs.add_parser("evaluate", help="score merged adapters on each source task and pick the best merge",
                        description="Score the base model, each task's source adapter and every candidate on every "
                                    "task (loss or exact_match), rank the candidates by retention (the share of each "
                                    "source adapter's gain they keep) and write report.md, report.json, "
                                    "retention.png and the best candidate's config. Scores are cached by adapter "
                                    "content, task data and settings. Needs pip install \"distmerge[eval]\".",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="evaluation YAML file (see configs/evaluate.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, OmegaConf dotlist syntax")
    p.set_defaults(run=run)


def print_result(result) -> None:
    from distmerge.evaluate.report import tables

    print(tables(result.report))
    best = result.report["best"]
    print(f"\nbest: {best['name']} (mean retention {best['mean_retention']:.3f})" if best else
          "\nno candidate has a defined retention (does each task have a source that beats the base?)")
    if best and best["config"]:
        print(f"its config: {best['config']}")
    print(f"{result.evaluated} scores computed, {result.cached} from the cache, in {result.seconds:.1f}s; "
          f"report: {result.output}/report.md")


def run(args) -> int:
    from distmerge.evaluate import evaluate

    result = evaluate(args.config, args.overrides)
    print_result(result)
    return 2 if any(c["error"] for c in result.report["candidates"]) else 0
