"""distmerge methods"""

from __future__ import annotations

RANK = {"same": "r (ranks must match)", "sum": "sum of ranks", "svd": "svd_rank or max rank"}


def add_parser(subs) -> None:
    p = subs.add_parser("methods", help="list the merge methods",
                        description="List every registered merge method, its output rank and the merge.* keys it "
                                    "reads.", epilog="example:\n  distmerge methods")
    p.set_defaults(run=run)


def run(args) -> int:
    from distmerge.methods import all_methods

    rows = [(m.name, RANK.get(m.rank_rule, m.rank_rule), ", ".join(m.params), m.summary) for m in all_methods()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[3]}\n{'':<{widths[0]}}  {'':<{widths[1]}}  "
              f"params: {r[2]}")
    return 0
