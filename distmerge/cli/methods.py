"""distmerge methods"""

from __future__ import annotations

RANK = {"same": "r (ranks must match)", "sum": "sum of ranks", "svd": "svd_rank or max rank",
        "span": "sum of ranks, or svd_rank"}


def add_parser(subs) -> None:
    p = subs.add_parser("methods", help="list the merge methods",
                        description="List every registered merge method: the space its rule acts in, the rule, its "
                                    "output rank, the merge.* keys it reads and whose definition it follows.",
                        epilog="example:\n  distmerge methods")
    p.set_defaults(run=run)


def run(args) -> int:
    from distmerge.methods import all_methods

    rows = [(m.name, RANK.get(m.rank_rule, m.rank_rule), ", ".join(m.params), m.summary,
             f"{m.space}/{m.rule or m.name}", m.source) for m in all_methods()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    pad = f"{'':<{widths[0]}}  {'':<{widths[1]}}  "
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[3]}\n{pad}space/rule: {r[4]}; params: {r[2]}\n"
              f"{pad}source: {r[5]}")
    return 0
