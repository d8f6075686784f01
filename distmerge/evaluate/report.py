"""Retention, the leaderboard and its files: report.json, report.md, retention.png, best_config.yaml.

Retention of a candidate on a task says how much of the task's source adapter it keeps:
- exact_match: candidate accuracy / source accuracy (the normalized accuracy of the task-arithmetic papers);
- loss: (base − candidate) / (base − source), the share of the source's gain over the base that is kept.
It is undefined (null) when the source does not beat the base (or scores 0). Candidates are ranked by
their mean retention over the tasks where it is defined, the worst task shown beside it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from typing import Sequence

from distmerge.errors import output_error

OURS = ("report.json", "report.md", "retention.png", "best_config.yaml", "scores_cache.json")


def retention(metric: str, base: float | None, source: float | None, candidate: float | None) -> float | None:
    if base is None or source is None or candidate is None or any(map(math.isnan, (base, source, candidate))):
        return None
    if metric == "exact_match":
        return candidate / source if source > 0 else None
    gain = base - source
    return (base - candidate) / gain if gain > 0 else None


def build_report(cfg, tasks: dict, scores: dict, units: dict, source_keys: dict, candidates: Sequence, failures: dict,
                 missing: list, evaluated: int, cached: int, seconds: float) -> dict:
    from distmerge import __version__

    def score(key: str | None, task: str) -> float | None:
        got = scores.get((key, task)) if key else None
        return None if got is None else got[0]

    rows_tasks = []
    for t in cfg.tasks:
        base, source = score("base", t.name), score(source_keys.get(t.name), t.name)
        rows_tasks.append({"name": t.name, "metric": t.metric, "examples": len(tasks[t.name].examples),
                           "data": t.data, "source": t.source, "base_score": base, "source_score": source,
                           "source_retention": retention(t.metric, base, source, source)})
    rows = []
    for c, key in candidates:
        row = {"name": c.name, "path": c.path, "recipe": c.recipe, "scores": {}, "retention": {}}
        for t in rows_tasks:
            s = score(key, t["name"])
            row["scores"][t["name"]] = s
            row["retention"][t["name"]] = retention(t["metric"], t["base_score"], t["source_score"], s)
        defined = {k: v for k, v in row["retention"].items() if v is not None}
        row["mean_retention"] = sum(defined.values()) / len(defined) if defined else None
        worst = min(defined, key=defined.get) if defined else None
        row["worst_task"], row["worst_retention"] = worst, defined.get(worst) if worst else None
        row["error"] = failures.get(key)
        rows.append(row)
    rows.sort(key=lambda r: (r["mean_retention"] is None, -(r["mean_retention"] or 0.0), r["name"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank if r["mean_retention"] is not None else None
    best = rows[0] if rows and rows[0]["mean_retention"] is not None else None
    return {
        "distmerge_evaluate": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": cfg.base_model, "dtype": cfg.dtype,
        "retention": {"loss": "(base - candidate) / (base - source)",
                      "exact_match": "candidate accuracy / source accuracy"},
        "tasks": rows_tasks, "candidates": rows,
        "best": {"name": best["name"], "path": best["path"], "mean_retention": best["mean_retention"],
                 "config": None} if best else None,
        "missing": missing, "scores_computed": evaluated, "scores_cached": cached, "seconds": round(seconds, 3),
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def tables(report: dict) -> str:
    """The leaderboard (ranked by mean retention) and the raw scores, as markdown: printed and in report.md."""
    names = [t["name"] for t in report["tasks"]]
    lead = [[str(r["rank"] or "-"), r["name"], _fmt(r["mean_retention"]),
             f"{r['worst_task']} {_fmt(r['worst_retention'])}" if r["worst_task"] else "-",
             *(_fmt(r["retention"][n]) for n in names)] + ([f"failed: {r['error'][:80]}"] if r["error"] else [])
            for r in report["candidates"]]
    width = 4 + len(names) + any(r["error"] for r in report["candidates"])
    lead = [row + [""] * (width - len(row)) for row in lead]
    head = ["rank", "candidate", "mean retention", "worst task", *(f"{n} retention" for n in names)]
    head += ["note"] if width > len(head) else []
    scores_head = ["", *(f"{t['name']} ({t['metric']})" for t in report["tasks"])]
    scores = [["base", *(_fmt(t["base_score"], 4) for t in report["tasks"])],
              ["source (own task)", *(_fmt(t["source_score"], 4) for t in report["tasks"])]]
    scores += [[r["name"], *(_fmt(r["scores"][n], 4) for n in names)] for r in report["candidates"]]
    return "\n\n".join([markdown_table(head, lead), markdown_table(scores_head, scores)])


def heatmap(report: dict, path: str, title: str = "retention: candidates × tasks") -> None:
    """candidates × tasks, colour = retention (clipped to [0, 1.2]), each cell written out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["candidates"]
    names = [t["name"] for t in report["tasks"]]
    values = [[r["retention"][n] if r["retention"][n] is not None else float("nan") for n in names] for r in rows]
    fig = Figure(figsize=(1.6 + 1.1 * len(names), 1.0 + 0.32 * max(1, len(rows))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if rows:
        im = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.2, aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")


def _text(content: str):
    def write(path: str) -> None:
        with open(path, "w") as f:
            f.write(content)

    return write


def _write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(e, path, "write the evaluation report") from None


def best_config(best: dict, candidates: Sequence) -> str | None:
    """The merge config that made the best candidate (its distmerge.json), as YAML; None when it has none."""
    import yaml

    from distmerge.output.manifest import read_manifest

    manifest = read_manifest(best["path"])
    if manifest is None or not isinstance(manifest.get("config"), dict):
        return None
    recipe = next((c.recipe for c, _ in candidates if c.path == best["path"] and c.recipe), None)
    head = (f"# distmerge merge best_config.yaml\n#\n# The merge that kept the most of every task: {best['name']}"
            f"{f' (recipe {recipe})' if recipe else ''}, mean retention {best['mean_retention']:.3f}.\n")
    return head + yaml.safe_dump(manifest["config"], sort_keys=False)


def write_report(directory: str, report: dict, candidates: Sequence) -> None:
    """report.json first: it marks the directory as distmerge's (run.check_output), so a run interrupted
    while writing the others can be run again."""
    text = tables(report)
    config_path = os.path.join(directory, "best_config.yaml")
    config = best_config(report["best"], candidates) if report["best"] else None
    if config is not None:
        report["best"]["config"] = config_path

    def dump(p: str) -> None:
        with open(p, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")

    _write(os.path.join(directory, "report.json"), dump)
    if config is not None:
        _write(config_path, _text(config))
    elif os.path.lexists(config_path):  # an earlier run's, ours (check_output saw our report.json): stale now
        os.remove(config_path)
    md = ["# Evaluation report", "",
          f"Base model `{report['base_model']}` ({report['dtype']}); retention of a candidate on a task: "
          "(base − candidate) / (base − source) for loss, candidate / source accuracy for exact_match.", ""]
    if report["best"]:
        md += [f"**Best: {report['best']['name']}**, mean retention {report['best']['mean_retention']:.3f}"
               + (" (its config: best_config.yaml)" if config else ""), ""]
    md += [text, "", "![retention](retention.png)", ""]
    if report["missing"]:
        md += ["Not evaluated: " + ", ".join(f"{m['name']} ({m['reason']})" for m in report["missing"]), ""]
    _write(os.path.join(directory, "report.md"), _text("\n".join(md)))
    _write(os.path.join(directory, "retention.png"), lambda p: heatmap(report, p))
