"""distmerge batch ZOO [key=value ...]"""

from __future__ import annotations

import argparse

from distmerge.config.units import format_size

EXAMPLES = """\
examples:
  distmerge batch configs/zoo_demo.yaml                       # merge what is stale, skip what is up to date
  distmerge batch --plan configs/zoo_demo.yaml                # what would run, and why; merges nothing
  distmerge batch configs/zoo_demo.yaml --only support-bot    # one recipe (and the recipes it merges)
  distmerge batch configs/zoo_demo.yaml --force all-code      # re-merge one recipe even if up to date
  distmerge batch configs/zoo_demo.yaml defaults.merge.seed=3 defaults.runtime.executor=ray
  distmerge batch my_zoo.yaml --evaluate configs/evaluate.yaml   # then score every output: the leaderboard
"""


def add_parser(subs) -> None:
    p = subs.add_parser("batch", help="merge every recipe of a zoo file on one pool, skipping what is up to date",
                        description="Merge many recipes (a zoo file: defaults, recipes, globs, grids, recipe "
                                    "inputs) on one worker pool. A recipe whose output is complete and whose "
                                    "fingerprint (config and input sha256s) is unchanged is skipped. A failed recipe "
                                    "fails alone; the ones that merge its output are blocked. Writes "
                                    "batch_report.json beside the outputs; exit code 2 if any recipe failed or "
                                    "was blocked. key=value overrides apply to the zoo file.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("zoo", help="zoo YAML file (see configs/zoo_demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the zoo file, e.g. "
                                                                    "defaults.merge.seed=3 output_root=/tmp/zoo")
    p.add_argument("--plan", action="store_true", help="print what would run and why; merge nothing")
    p.add_argument("--force", nargs="?", const="*", default=None, action="append", metavar="NAME[,NAME]",
                   help="re-merge every recipe (or these; repeatable) even when up to date")
    p.add_argument("--only", default=None, action="append", metavar="NAME[,NAME]",
                   help="only these recipes (repeatable), and the recipes whose outputs they merge")
    p.add_argument("--evaluate", default=None, metavar="EVAL.yaml",
                   help="then evaluate every merged or up-to-date output with this evaluation config (its "
                        "candidates plus the batch's outputs) and write the leaderboard; cached scores are reused")
    p.set_defaults(run=run)


def _names(values: list[str] | None, recipes: list[str]) -> list[str]:
    """Recipe names from repeated flags, each a name or a comma-separated list; a grid recipe's name holds
    commas and '=' (sweep/method=ties,density=0.3), so a value that is a recipe's whole name is taken as is."""
    out = []
    for value in values or []:
        out += [value] if value in recipes else [n.strip() for n in value.split(",") if n.strip()]
    return out


def run(args) -> int:
    from distmerge.batch import FAILED, UP_TO_DATE, Batch, run_batch, table
    from distmerge.config.load import suggest
    from distmerge.config.zoo import load_zoo
    from distmerge.errors import ConfigError

    overrides = list(args.overrides)
    forced_values = list(args.force or [])
    zoo_keys = [v for v in forced_values if "=" in v and "/" not in v.partition("=")[0]]
    if zoo_keys:  # `--force key=value`: the flag alone, then an override of the zoo
        overrides[:0] = zoo_keys
        forced_values = ["*" if v in zoo_keys else v for v in forced_values]
    zoo = load_zoo(args.zoo, overrides)
    names = [r.name for r in zoo.recipes]
    only = _names(args.only, names)
    forced = ["*"] if "*" in forced_values else _names(forced_values, names)
    unknown = [n for n in only + forced if n != "*" and n not in names]
    if unknown:
        raise ConfigError([f"--only/--force: no recipe is named {n!r}{suggest(n, names)}" for n in unknown])
    if args.plan:
        rows = Batch(zoo, only, forced).plan()
        print(table(rows))
        todo = [r for r in rows if r.status != UP_TO_DATE]
        print(f"\n{len(todo)} of {len(rows)} recipes would merge, reading {format_size(sum(r.bytes for r in todo))}"
              f" of inputs; {len(rows) - len(todo)} are up to date")
        return 2 if any(r.status == FAILED for r in rows) else 0
    if args.evaluate:  # the evaluation config is checked (and the extra found) before anything is merged
        from distmerge.evaluate import require_extra
        from distmerge.config.eval import load_eval_config

        require_extra()
        load_eval_config(args.evaluate, require_candidates=False)
    result = run_batch(zoo, only, forced)
    print(table(result.outcomes))
    print(f"\n{sum(o.status != UP_TO_DATE for o in result.outcomes)} merged or failed, "
          f"{sum(o.status == UP_TO_DATE for o in result.outcomes)} up to date in {result.seconds:.1f}s; "
          f"report: {result.report}")
    if args.evaluate:
        from distmerge.batch import evaluate_outputs
        from distmerge.cli.evaluate import print_result

        print()
        evaluated = evaluate_outputs(zoo, result.outcomes, args.evaluate)
        print_result(evaluated)
        if any(c["error"] for c in evaluated.report["candidates"]):
            return 2
    return 0 if result.ok else 2
