"""distmerge against PEFT's add_weighted_adapter, from adapter files on disk to a merged adapter on disk.

    pip install -e ".[bench]"
    python benchmarks/bench_vs_peft.py --out /tmp/distmerge-bench           # issue 4's setup (~30 min here)
    python benchmarks/bench_vs_peft.py --out /tmp/distmerge-bench --tiny    # seconds: what CI runs

The default setup is a Llama with 7B widths (hidden 4096, intermediate 11008), 2 layers, and 8 adapters
of rank 16 on all 7 projections, weights 1/8, density 0.5. Every merge runs as its own process, timed
from start to exit, with the peak RSS of its whole process tree. PEFT loads a saved base model (bf16,
as 7B checkpoints ship) and the adapters, merges, and saves; distmerge reads the adapter files only.

Where PEFT's SVD methods would run for many minutes (the largest module has ≥ --sample-above
elements), PEFT merges a sample instead: one module of each shape from layer 0. Its per-module merge
seconds are measured inside the process and scaled to every module of that shape; the table marks
those rows with ~. The sample still loads the whole base model and holds the largest module's dense
deltas, so its peak RSS is PEFT's, less the unsampled adapters' few MB.

Writes OUT/results.json, OUT/benchmarks.md (the table and the targets of issue 4) and, with
matplotlib, OUT/benchmarks.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from proctree import Measured, run_measured  # noqa: E402

from distmerge import lora  # noqa: E402
from distmerge.demo import LLAMA_TARGETS, write_llama_adapter  # noqa: E402
from distmerge.methods import registry  # noqa: E402
from native_methods import markdown as native_markdown, native_methods, run as run_native  # noqa: E402
from native_methods import targets as native_targets  # noqa: E402

PRUNED_SVD = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SVD_METHODS = ("svd",) + PRUNED_SVD
UNSEEDED = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")  # PEFT's DARE has no seed
FACTOR_METHODS = ("linear", "cat", "ties", "magnitude_prune", "dare_linear", "dare_ties")  # merge-vs-read targets
TIMED_RUNS = 5  # their merge phase is the fastest of 5 processes, as the read baseline is


@dataclass(frozen=True)
class Setup:
    layers: int = 2
    hidden: int = 4096
    intermediate: int = 11008
    adapters: int = 8
    rank: int = 16
    density: float = 0.5

    @property
    def weights(self) -> list[float]:
        return [1.0 / self.adapters] * self.adapters


TINY = Setup(layers=2, hidden=128, intermediate=344, adapters=3, rank=8)


# ---------------------------------------------------------------- data
def build_data(root: str, setup: Setup) -> dict:
    """Adapters (distmerge.demo writes real PEFT files) and a saved base model; reused when unchanged."""
    stamp_path = os.path.join(root, "setup.json")
    paths = {"root": root, "adapters": [os.path.join(root, "adapters", f"a{i}") for i in range(setup.adapters)],
             "base": os.path.join(root, "base")}
    if os.path.exists(stamp_path) and json.load(open(stamp_path)) == asdict(setup):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    for i, p in enumerate(paths["adapters"]):
        write_llama_adapter(p, layers=setup.layers, hidden=setup.hidden, intermediate=setup.intermediate,
                            rank=setup.rank, alpha=2 * setup.rank, seed=i)
    made = run_measured([sys.executable, os.path.join(HERE, "peft_merge.py"), "make-base", paths["base"],
                         "--layers", str(setup.layers), "--hidden", str(setup.hidden),
                         "--intermediate", str(setup.intermediate)])
    if made.returncode:
        raise SystemExit(f"building the base model failed:\n{made.stderr[-3000:]}")
    json.dump(asdict(setup), open(stamp_path, "w"))
    return paths


def module_shapes(adapter: str) -> dict[str, tuple[int, int]]:
    """PEFT module key (model.layers.0.self_attn.q_proj) → (out_features, in_features)."""
    shapes = {}
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(".lora_B.weight"):
                module = k[len("base_model.model."):-len(".lora_B.weight")]
                a = f.get_slice(k.replace("lora_B", "lora_A")).get_shape()
                shapes[module] = (f.get_slice(k).get_shape()[0], a[1])
    return shapes


def sample_modules(shapes: dict[str, tuple[int, int]]) -> list[str]:
    """One module of each shape, the first of each in order."""
    seen, picked = set(), []
    for module, shape in sorted(shapes.items(), key=lambda kv: _layer_order(kv[0])):
        if shape not in seen:
            seen.add(shape)
            picked.append(module)
    return picked


def _layer_order(module: str) -> tuple:
    parts = module.split(".")
    return (int(parts[2]), LLAMA_TARGETS.index(parts[-1]))


def write_sample(paths: dict, modules: list[str]) -> list[str]:
    """Copies of the adapters holding only `modules`, with target_modules naming exactly those."""
    out = []
    for src in paths["adapters"]:
        dst = os.path.join(paths["root"], "sample", os.path.basename(src))
        os.makedirs(dst, exist_ok=True)
        with safe_open(os.path.join(src, "adapter_model.safetensors"), "pt") as f:
            keep = {k: f.get_tensor(k) for k in f.keys()
                    if k[len("base_model.model."):].rsplit(".lora_", 1)[0] in modules}
        save_file(keep, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = json.load(open(os.path.join(src, "adapter_config.json")))
        cfg["target_modules"] = modules
        json.dump(cfg, open(os.path.join(dst, "adapter_config.json"), "w"), indent=2)
        out.append(dst)
    return out


# ---------------------------------------------------------------- runs
def run_distmerge(paths: dict, setup: Setup, method: str, algorithm: str, out: str, executor: str,
                  runs: int = 1, between: Callable[[], None] | None = None) -> dict:
    """Wall seconds and peak RSS from one run sampled by run_measured; the merge phase and its split
    from the fastest of `runs` processes (the others unsampled), as the read baseline is timed.
    `between` runs before each of the unsampled processes: the read baseline, interleaved."""
    cfg = {"adapters": [{"path": p, "weight": w} for p, w in zip(paths["adapters"], setup.weights)],
           "merge": {"method": method, "density": setup.density, "svd_algorithm": algorithm},
           "output": {"path": out, "overwrite": True},
           "runtime": {"executor": executor, "progress": False, "cpus_per_worker": os.cpu_count() or 1}}
    for key in ("density", "svd_algorithm"):
        if key not in registry.get(method).params:
            del cfg["merge"][key]
    cfg_path = out + ".yaml"
    os.makedirs(os.path.dirname(cfg_path), exist_ok=True)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    cmd = [sys.executable, "-m", "distmerge", "merge", cfg_path]
    m = run_measured(cmd)
    _check(m, f"distmerge {method}")
    manifests = [json.load(open(os.path.join(out, "distmerge.json")))]
    for _ in range(runs - 1):
        if between is not None:
            between()
        again = subprocess.run(cmd, capture_output=True, text=True)
        if again.returncode != 0:
            raise SystemExit(f"distmerge {method} failed (exit {again.returncode}):\n{again.stderr[-3000:]}")
        manifests.append(json.load(open(os.path.join(out, "distmerge.json"))))
    best = min(manifests, key=lambda x: x["seconds"]["merge"])
    return {"wall_s": m.wall_s, "peak_rss": m.peak_rss, "merge_s": best["seconds"]["merge"],
            "merge_runs_s": [x["seconds"]["merge"] for x in manifests], "phases": best["worker_seconds"],
            "modules": best["modules"]}


def run_peft(paths: dict, adapters: list[str], setup: Setup, method: str, out: str) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "peft_merge.py"), "merge", "--base", paths["base"], "--out", out,
           "--method", method, "--adapters", *adapters, "--weights", *map(str, setup.weights)]
    if "density" in registry.get(method).params:
        cmd += ["--density", str(setup.density)]
    m = run_measured(cmd)
    _check(m, f"PEFT {method}")
    report = json.loads(m.stdout.strip().splitlines()[-1])
    return {"wall_s": m.wall_s, "peak_rss": m.peak_rss, **report}


def read_once_runs(paths: dict, runs: int = 5) -> list[float]:
    """How long reading every input tensor into memory once takes: safetensors' load_file, then each
    tensor copied out of the map (load_file alone maps the file and reads nothing). Timed as distmerge
    is, in fresh processes on a warm page cache. The report uses the fastest of every run: a busy
    moment on a small machine only ever adds time, and one run of this script once measured 0.086 s
    as the best of 5 at its start, where an hour earlier the best was 0.014 s; so main() also reads
    between the factor methods' timed merges, and a slow start cannot flatter their ratios."""
    files = [os.path.join(p, "adapter_model.safetensors") for p in paths["adapters"]]
    for f in files:  # warm the page cache, as it is for every run in the table
        with open(f, "rb") as h:
            while h.read(1 << 24):
                pass
    code = ("import sys, time\nfrom safetensors.torch import load_file\nt = time.perf_counter()\n"
            "for f in sys.argv[1:]:\n    for v in load_file(f).values(): v.clone()\n"
            "print(time.perf_counter() - t)")
    seconds = []
    for _ in range(runs):
        m = run_measured([sys.executable, "-c", code, *files])
        _check(m, "reading the inputs")
        seconds.append(float(m.stdout.strip().splitlines()[-1]))
    return seconds


def _check(m: Measured, what: str) -> None:
    if m.returncode:
        raise SystemExit(f"{what} failed (exit {m.returncode}):\n{m.stderr[-4000:]}")


def extrapolate(peft: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """PEFT's whole-model time from a sample: its fixed costs as measured, plus every module's merge
    at the seconds PEFT took for a module of the same shape."""
    per_shape = {(o, i): s for o, i, s in peft["modules"]}
    missing = set(shapes.values()) - set(per_shape)
    if missing:
        raise SystemExit(f"the PEFT sample has no module of shape {sorted(missing)}")
    sampled = sum(s for _, _, s in peft["modules"])
    full = sum(per_shape[shape] for shape in shapes.values())
    return {**peft, "wall_s": peft["wall_s"] - sampled + full, "merge_s": peft["merge_s"] - sampled + full,
            "sampled_modules": len(peft["modules"]), "extrapolated": True}


# ---------------------------------------------------------------- agreement
def _delta(directory: str, module: str) -> torch.Tensor:
    cfg = json.load(open(os.path.join(directory, "adapter_config.json")))
    scale = lora.scaling(cfg["lora_alpha"], cfg["r"], bool(cfg.get("use_rslora")))
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as f:
        a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").double()
        b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").double()
    return b @ a * scale


def agreement(ours: str, peft: str, module: str) -> float:
    """‖ΔPEFT − Δdistmerge‖ / ‖ΔPEFT‖ on one module, where both are deterministic."""
    theirs = _delta(os.path.join(peft, "merged"), module)
    return float((_delta(ours, module) - theirs).norm() / theirs.norm())


# ---------------------------------------------------------------- report
def truncation_ratio(randomized: dict, exact: dict) -> float:
    """max over modules of randomized / exact truncation error ‖Δ−Δᵣ‖/‖Δ‖."""
    return max(randomized["modules"][m]["svd_truncation_error"] / exact["modules"][m]["svd_truncation_error"]
               for m in exact["modules"])


def targets(rows: list[dict], read_s: float) -> list[dict]:
    by = {(r["method"], r["algorithm"]): r for r in rows}
    checks = []

    def check(what, value, ok, goal):
        checks.append({"target": what, "measured": value, "goal": goal, "met": bool(ok)})

    if ("svd", "exact") in by:
        r = by[("svd", "exact")]
        check("svd: speedup", r["speedup"], r["speedup"] >= 100, "≥ 100×")
        check("svd: peak RSS vs PEFT", r["rss_ratio"], r["rss_ratio"] <= 0.1, "≤ 0.10")
    for m in ("ties_svd", "magnitude_prune_svd"):
        if (m, "exact") in by:
            r = by[(m, "exact")]
            check(f"{m} exact: speedup", r["speedup"], r["speedup"] >= 2, "≥ 2×")
            check(f"{m} exact: peak RSS vs PEFT", r["rss_ratio"], r["rss_ratio"] <= 0.25, "≤ 0.25")
        if (m, "randomized") in by:
            r = by[(m, "randomized")]
            check(f"{m} randomized: speedup", r["speedup"], r["speedup"] >= 20, "≥ 20×")
            check(f"{m} randomized: truncation error vs exact", r["trunc_ratio"], r["trunc_ratio"] <= 1.01,
                  "≤ 1.01×")
    for m in FACTOR_METHODS:
        if (m, "exact") in by:
            r = by[(m, "exact")]
            check(f"{m}: speedup", r["speedup"], r["speedup"] >= 3, "≥ 3×")
            check(f"{m}: merge vs reading the inputs once", r["merge_s"] / read_s, r["merge_s"] / read_s <= 2,
                  "≤ 2×")
    return checks


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def markdown(setup: Setup, rows: list[dict], checks: list[dict], env: dict, reads: list[float], command: str) -> str:
    read_s = min(reads)
    lines = [
        f"Setup: {setup.adapters} adapters of rank {setup.rank} on {len(LLAMA_TARGETS)} projections × {setup.layers} "
        f"layers, hidden {setup.hidden}, intermediate {setup.intermediate}, weights 1/{setup.adapters}, density "
        f"{setup.density}. Reading every input tensor once takes {read_s:.3f} s: the fastest of {len(reads)} "
        f"processes spread over the run (the slowest took {max(reads):.3f} s).",
        "",
        f"Machine: {env['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        f"Command: `{command}`",
        "",
        "| method | svd_algorithm | distmerge s | PEFT s | speedup | distmerge peak RSS | PEFT peak RSS | RSS ratio "
        "| distmerge merge s | trunc. error vs exact | ΔW vs PEFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tilde = "~" if r["peft_extrapolated"] else ""
        trunc = f"{r['trunc_ratio']:.4f}×" if r.get("trunc_ratio") is not None else ""
        agree = "unseeded in PEFT" if r["agreement"] is None else f"{r['agreement']:.1e}"
        alg = r["algorithm"] if r["method"] in PRUNED_SVD else ""
        lines.append(f"| {r['method']} | {alg} | {r['wall_s']:.2f} | {tilde}{r['peft_wall_s']:.1f} | "
                     f"{tilde}{r['speedup']:.1f}× | {_gb(r['peak_rss'])} | {_gb(r['peft_peak_rss'])} | "
                     f"{r['rss_ratio']:.3f} | {r['merge_s']:.2f} | {trunc} | {agree} |")
    if any(r["peft_extrapolated"] for r in rows):
        n = next(r["peft_sampled_modules"] for r in rows if r["peft_extrapolated"])
        lines += ["", f"~ PEFT merged a sample of {n} modules (one of each shape) and its per-module seconds were "
                      "scaled to all modules of that shape; its import, loading and saving are as measured."]
    lines += ["", "Where PEFT's time goes (seconds): import / load base + adapters / merge / save", "",
              "| method | import | load | merge | save |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["algorithm"] == "exact":
            p = r["peft_phases"]
            tilde = "~" if r["peft_extrapolated"] else ""
            lines.append(f"| {r['method']} | {p['import_s']:.2f} | {p['load_s']:.2f} | {tilde}{p['merge_s']:.1f} | "
                         f"{p['save_s']:.2f} |")
    lines += ["", "Where distmerge's merge time goes (seconds, summed over shards), against reading the inputs once. "
              f"For the factor methods, the fastest of {TIMED_RUNS} processes, as the read is timed; the table "
              "above shows the run whose RSS was sampled.",
              "", "| method | svd_algorithm | read | math | write | merge | merge / read once |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["phases"]
        alg = r["algorithm"] if r["method"] in PRUNED_SVD else ""
        lines.append(f"| {r['method']} | {alg} | {p.get('read', 0):.3f} | {p.get('math', 0):.3f} | "
                     f"{p.get('write', 0):.3f} | {r['merge_s']:.3f} | {r['merge_s'] / read_s:.1f}× |")
    lines += ["", "Targets (issue 4):", "", "| target | goal | measured | met |", "|---|---|---:|---|"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['goal']} | {c['measured']:.4g} | {'yes' if c['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [r["method"] + (" (rand.)" if r["algorithm"] == "randomized" else "") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    ys = range(len(rows))
    ax1.barh(ys, [r["speedup"] for r in rows], color=["#999" if r["peft_extrapolated"] else "#2b6" for r in rows])
    ax1.set_xscale("log")
    ax1.axvline(1, color="k", lw=0.8)
    ax1.set_yticks(list(ys), labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("speedup over PEFT, end to end (grey: PEFT extrapolated)")
    ax2.barh(ys, [1 / r["rss_ratio"] for r in rows], color="#36b")
    ax2.set_xscale("log")
    ax2.axvline(1, color="k", lw=0.8)
    ax2.set_xlabel("PEFT peak RSS / distmerge peak RSS")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work directory: data, outputs and the report")
    p.add_argument("--tiny", action="store_true", help="a seconds-long setup for smoke tests")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--adapters", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--methods", default="all", help="comma-separated, or all")
    p.add_argument("--no-randomized", action="store_true", help="skip svd_algorithm=randomized for pruned SVD")
    p.add_argument("--sample-above", type=int, default=1 << 22,
                   help="run PEFT's SVD methods on a sample when a module has at least this many elements")
    p.add_argument("--peft-sample", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--native", default="auto",
                   help="LoRA-native methods (no PEFT counterpart) timed against svd, ties_svd and their dense "
                        "versions (benchmarks/native_methods.py): all, none, or comma-separated; auto: all when "
                        "--methods is all")
    p.add_argument("--dense-modules", type=int, default=1, help="modules the native methods' dense versions run on")
    args = p.parse_args(argv)

    base = TINY if args.tiny else Setup()
    setup = Setup(**{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in asdict(base).items()
                     if k != "density"}, density=base.density)
    peft_methods = [m for m in registry.names() if registry.get(m).source == "PEFT"]
    methods = peft_methods if args.methods == "all" else args.methods.split(",")
    os.makedirs(args.out, exist_ok=True)
    paths = build_data(os.path.join(args.out, "data"), setup)
    shapes = module_shapes(paths["adapters"][0])
    biggest = max(o * i for o, i in shapes.values())
    sample = sample_modules(shapes)
    sample_adapters = None
    reads = read_once_runs(paths)
    print(f"inputs read once in {min(reads):.3f} s (fastest of {len(reads)}; more are read between the factor "
          f"methods' merges); {len(shapes)} modules; PEFT sample: {', '.join(sample)}", flush=True)

    rows = []
    for method in methods:
        sampled = method in SVD_METHODS and (args.peft_sample == "always" or
                                             (args.peft_sample == "auto" and biggest >= args.sample_above))
        if sampled and sample_adapters is None:
            sample_adapters = write_sample(paths, sample)
        peft_out = os.path.join(args.out, "peft", method)
        shutil.rmtree(peft_out, ignore_errors=True)
        peft = run_peft(paths, sample_adapters if sampled else paths["adapters"], setup, method, peft_out)
        peft = extrapolate(peft, shapes) if sampled else {**peft, "extrapolated": False, "sampled_modules": None}
        algorithms = ("exact", "randomized") if method in PRUNED_SVD and not args.no_randomized else ("exact",)
        exact = None
        for algorithm in algorithms:
            out = os.path.join(args.out, "distmerge", f"{method}-{algorithm}")
            factor = method in FACTOR_METHODS
            ours = run_distmerge(paths, setup, method, algorithm, out, args.executor, runs=TIMED_RUNS if factor else 1,
                                 between=(lambda: reads.extend(read_once_runs(paths, 1))) if factor else None)
            exact = exact or ours
            compare = sample[0] if sampled else sorted(shapes)[0]
            row = {"method": method, "algorithm": algorithm, "wall_s": ours["wall_s"], "peak_rss": ours["peak_rss"],
                   "merge_s": ours["merge_s"], "merge_runs_s": ours["merge_runs_s"], "phases": ours["phases"],
                   "peft_wall_s": peft["wall_s"], "peft_peak_rss": peft["peak_rss"],
                   "peft_extrapolated": peft["extrapolated"], "peft_sampled_modules": peft["sampled_modules"],
                   "peft_phases": {k: peft[k] for k in ("import_s", "load_s", "merge_s", "save_s")},
                   "speedup": peft["wall_s"] / ours["wall_s"], "rss_ratio": ours["peak_rss"] / peft["peak_rss"],
                   "agreement": None if method in UNSEEDED or algorithm != "exact" else
                   agreement(out, peft_out, compare),
                   "trunc_ratio": truncation_ratio(ours, exact) if algorithm == "randomized" else None}
            rows.append(row)
            print(f"{method:>20} {algorithm:>10}: distmerge {row['wall_s']:7.2f} s {_gb(row['peak_rss']):>10} | "
                  f"PEFT {'~' if sampled else ' '}{row['peft_wall_s']:8.1f} s {_gb(row['peft_peak_rss']):>10} | "
                  f"{row['speedup']:7.1f}× faster, RSS {row['rss_ratio']:.3f}", flush=True)

    import peft as peft_pkg
    import ray
    import transformers
    env = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {_gb(_mem_total())} RAM, "
                      f"{platform.system()} {platform.release()}, no GPU used",
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "peft": peft_pkg.__version__, "transformers": transformers.__version__, "ray": ray.__version__}}
    read_s = min(reads)
    print(f"inputs read once: fastest {read_s:.3f} s, slowest {max(reads):.3f} s, of {len(reads)} processes",
          flush=True)
    checks = targets(rows, read_s)
    command = "python benchmarks/bench_vs_peft.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown(setup, rows, checks, env, reads, command)
    native = None
    names = native_methods() if args.native == "all" or (args.native == "auto" and args.methods == "all") else \
        ([] if args.native in ("none", "auto") else args.native.split(","))
    if names:
        native = run_native(paths["adapters"], setup.weights, sample, names, setup.density, args.dense_modules)
        native["targets"] = native_targets(native["rows"])
        report += "\n" + native_markdown(native, f"Same adapters; modules (one of each shape): {', '.join(sample)}.",
                                          command)
    with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write(report)
    json.dump({"setup": asdict(setup), "env": env, "read_once_s": read_s, "read_once_runs_s": reads, "rows": rows,
               "targets": checks, "native": native},
              open(os.path.join(args.out, "results.json"), "w"), indent=2)
    plotted = plot(rows, os.path.join(args.out, "benchmarks.png"))
    print("\n" + report)
    print(f"wrote {args.out}/results.json, benchmarks.md" + (", benchmarks.png" if plotted else ""))
    return 0


def _mem_total() -> int:
    import psutil
    return psutil.virtual_memory().total


if __name__ == "__main__":
    sys.exit(main())
