"""`distmerge batch ZOO` against one `distmerge merge CFG` process per recipe, locally and on Ray.

    python benchmarks/bench_batch.py --out /tmp/dmbatch            # the model-zoo issue's setup (~12 min here)
    python benchmarks/bench_batch.py --out /tmp/dmbatch --tiny     # seconds, local only: what CI runs

The setup: a pool of 12 adapters (distmerge.demo.write_llama_adapter: 2 layers, hidden 256,
intermediate 512, rank 8, all 7 projections) and a zoo of 50 recipes, each merging 4 adapters of the
pool picked by a seeded RNG, weight 0.25 each, the methods cycling ties / dare_ties / magnitude_prune
(density 0.5) / linear. The separate side runs, for each recipe, the merge config the zoo expands it
to (`load_zoo(zoo).recipes[i].config`, written out with `dataclasses.asdict`), with only output.path
moved, so both sides merge the same thing; the outputs' safetensors sha256s are compared.

Every run is a real process (`python -m distmerge ...`), timed from start to exit, with the peak RSS of
its process tree (benchmarks/proctree.py). With Ray, the benchmark starts one head of its own
(`ray start --head --num-cpus=2`, a temp dir under /tmp, free ports) and every driver connects to it
(runtime.address); the Ray workers are the head's children, not the driver's, so Ray rows also give
the peak of driver tree + head tree (GCS, raylet, workers) sampled together, and the idle head's RSS.
Only that head is stopped at the end, by its processes' ids (never `ray stop`).

Runs, in order: the CLI's floor (`python -m distmerge --version`, 3 times); local: N separate merges,
then the batch (3 times, each into a fresh output_root), then the up-to-date rerun (3 times, on the
first batch's root); Ray: the separate merges (--ray-separate of them, default all; per-recipe time
extrapolated to the zoo when fewer), the batch, and its up-to-date rerun.

Writes OUT/results.json and OUT/batch.md (the table and the issue's targets); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from proctree import run_measured  # noqa: E402

from distmerge.config.zoo import load_zoo  # noqa: E402
from distmerge.demo import LLAMA_TARGETS, write_llama_adapter  # noqa: E402

METHODS = ({"method": "ties", "density": 0.5}, {"method": "dare_ties", "density": 0.5, "seed": 7},
           {"method": "magnitude_prune", "density": 0.5}, {"method": "linear"})
MERGE_TIMEOUT_S = 300  # one `distmerge merge` process
BATCH_TIMEOUT_S = 1800  # one `distmerge batch` process
FLOORS = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"],
          "python -m distmerge --version": ["-m", "distmerge", "--version"]}
POLL_S = 0.05  # proctree's poll: the exit is seen within it, so each process's wall time is ≤ 50 ms long
REPEATS = 3  # local batch first runs, up-to-date reruns and CLI floors, for the run-to-run spread (1 with --tiny)


@dataclass(frozen=True)
class Setup:
    recipes: int = 50
    pool: int = 12
    per_recipe: int = 4
    layers: int = 2
    hidden: int = 256
    intermediate: int = 512
    rank: int = 8


TINY = Setup(recipes=4, pool=6, layers=2, hidden=64, intermediate=128, rank=4)


def say(msg: str) -> None:
    print(f"[bench_batch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data
def build_adapters(root: str, setup: Setup) -> list[str]:
    """The adapter pool, rebuilt only when the setup changed."""
    stamp = os.path.join(root, "setup.json")
    paths = [os.path.join(root, f"a{i:02d}") for i in range(setup.pool)]
    shape = {k: v for k, v in asdict(setup).items() if k in ("pool", "layers", "hidden", "intermediate", "rank")}
    if os.path.exists(stamp) and json.load(open(stamp)) == shape:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    for i, p in enumerate(paths):
        write_llama_adapter(p, layers=setup.layers, hidden=setup.hidden, intermediate=setup.intermediate,
                            rank=setup.rank, alpha=2 * setup.rank, seed=100 + i)
    json.dump(shape, open(stamp, "w"))
    return paths


def write_zoo(path: str, adapters: list[str], setup: Setup, output_root: str) -> list[dict]:
    """The zoo file (JSON is YAML); recipe i merges setup.per_recipe adapters picked by Random(i)."""
    recipes = []
    for i in range(setup.recipes):
        picks = sorted(random.Random(i).sample(range(len(adapters)), setup.per_recipe))
        recipes.append({"name": f"r{i:02d}",
                        "adapters": [{"path": adapters[j], "weight": 1.0 / setup.per_recipe} for j in picks],
                        "merge": dict(METHODS[i % len(METHODS)])})
    zoo = {"defaults": {"output": {"dtype": None}, "runtime": {"executor": "local", "progress": False}},
           "output_root": output_root, "recipes": recipes}
    with open(path, "w") as f:
        json.dump(zoo, f, indent=1)
    return recipes


def write_separate_configs(zoo_path: str, directory: str, out_root: str) -> list[tuple[str, str, str]]:
    """(recipe, config path, output dir) per recipe: the config the zoo expands it to, output.path moved."""
    os.makedirs(directory, exist_ok=True)
    rows = []
    for recipe in load_zoo(zoo_path).recipes:
        cfg = asdict(recipe.config)
        safe = recipe.name.replace("/", "_")
        cfg["output"]["path"] = os.path.join(out_root, safe)
        cfg_path = os.path.join(directory, f"{safe}.yaml")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=1)
        rows.append((recipe.name, cfg_path, cfg["output"]["path"]))
    return rows


def pick(n: int, total: int) -> list[int]:
    """n recipe indices spread evenly over the zoo (so the method mix is kept when n < total)."""
    n = max(1, min(n, total))
    return sorted({i * total // n for i in range(n)})


# ---------------------------------------------------------------- measuring
def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


class ClusterSampler:
    """Peak RSS of this benchmark's children (the driver's tree) plus the Ray head's processes and their
    descendants (GCS, raylet, workers), summed at the same instants, in a thread.

    One sample is one pass over /proc for parent ids, then the RSS of the processes in those trees: a
    psutil children(recursive=True) per head process scans /proc each time, and took 44 ms of CPU per
    sample here, half a core at this poll, taken from the merges it measures."""

    def __init__(self, head_temp: str | None, poll_s: float = 0.1):
        self.poll_s = poll_s
        self.head = [p.pid for p in head_processes(head_temp)] if head_temp else []  # the head's own: fixed
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        kids: dict[int, list[int]] = {}
        for p in psutil.process_iter(["ppid"]):
            kids.setdefault(p.info["ppid"], []).append(p.pid)
        stack, seen, total = list(kids.get(os.getpid(), [])) + self.head, set(), 0
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            stack.extend(kids.get(pid, []))
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.poll_s)

    def __enter__(self) -> "ClusterSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def measure(cmd: list[str], timeout_s: float, head_temp: str | None = None, what: str = "") -> dict:
    load = os.getloadavg()[0]
    # proctree's default 20 ms poll scans /proc for the tree each time (a quarter of a core here); every
    # process measured is one process (a Ray driver's workers are the head's), whose peak the kernel's
    # VmHWM gives whatever the poll, and the exit is seen within POLL_S
    if head_temp is None:  # local: the process tree is everything, and proctree samples it
        m = run_measured(cmd, env=_env(), timeout_s=timeout_s, poll_s=POLL_S)
    else:
        with ClusterSampler(head_temp) as sampler:
            m = run_measured(cmd, env=_env(), timeout_s=timeout_s, poll_s=POLL_S)
    if m.returncode != 0:
        raise SystemExit(f"{what or ' '.join(cmd)} failed (exit {m.returncode}):\n{(m.stdout + m.stderr)[-4000:]}")
    row = {"wall_s": m.wall_s, "peak_rss": m.peak_rss, "load1": load}
    if head_temp:
        row["cluster_peak_rss"] = sampler.peak
    return row


def run_separate(configs: list[tuple[str, str, str]], indices: list[int], overrides: list[str],
                 head_temp: str | None, label: str) -> dict:
    """One `distmerge merge` process per chosen recipe, one after another."""
    runs = []
    t0 = time.perf_counter()
    for n, i in enumerate(indices):
        name, cfg, out = configs[i]
        shutil.rmtree(out, ignore_errors=True)
        r = measure([sys.executable, "-m", "distmerge", "merge", cfg, *overrides], MERGE_TIMEOUT_S, head_temp,
                    f"{label}: distmerge merge {name}")
        runs.append({"recipe": name, **r})
        if n == 0 or (n + 1) % 10 == 0 or n + 1 == len(indices):
            say(f"{label}: {n + 1}/{len(indices)} separate merges, {time.perf_counter() - t0:.1f} s so far "
                f"(last {r['wall_s']:.2f} s)")
    total = time.perf_counter() - t0
    walls = [r["wall_s"] for r in runs]
    row = {"processes": len(runs), "wall_s": total, "per_recipe_s": total / len(runs),
           "per_process_s": {"min": min(walls), "median": statistics.median(walls), "max": max(walls)},
           "peak_rss": max(r["peak_rss"] for r in runs), "runs": runs}
    if head_temp:
        row["cluster_peak_rss"] = max(r["cluster_peak_rss"] for r in runs)
    return row


def run_batch(zoo: str, overrides: list[str], report_dir: str, head_temp: str | None, label: str) -> dict:
    r = measure([sys.executable, "-m", "distmerge", "batch", zoo, *overrides], BATCH_TIMEOUT_S, head_temp,
                f"{label}: distmerge batch")
    report = json.load(open(os.path.join(report_dir, "batch_report.json")))
    r.update({"processes": 1, "report_seconds": report["seconds"], "counts": report["counts"],
              "inputs_hashed": report["inputs_hashed"]})
    say(f"{label}: {r['wall_s']:.2f} s, peak RSS {_mb(r['peak_rss'])}, {report['counts']}, "
        f"inputs hashed {report['inputs_hashed']}, in-process {report['seconds']:.2f} s")
    return r


def summarize(runs: list[dict]) -> dict:
    """The median run (by wall time) of repeats, with the spread of all of them."""
    walls = sorted(r["wall_s"] for r in runs)
    mid = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    return {**mid, "repeats_wall_s": [r["wall_s"] for r in runs], "spread_s": [walls[0], walls[-1]]}


# ---------------------------------------------------------------- Ray head
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """The head's own processes: every one names its temp dir on its command line."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def start_head(temp_dir: str) -> str:
    gcs, agent, metrics, client = _free_ports(4)
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false", f"--dashboard-agent-listen-port={agent}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    env = {**_env(), "RAY_TMPDIR": temp_dir}
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        stop_head(temp_dir)
        raise SystemExit(f"ray start failed (exit {started.returncode}):\n{(started.stdout + started.stderr)[-3000:]}")
    return f"127.0.0.1:{gcs}"


def stop_head(temp_dir: str) -> None:
    """Stop only the head this benchmark started (and its workers), by process id; never `ray stop`."""
    procs = head_processes(temp_dir)
    for p in list(procs):
        try:
            procs += [c for c in p.children(recursive=True) if c.pid not in {q.pid for q in procs}]
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def idle_rss(temp_dir: str, seconds: float = 2.0) -> int:
    """The idle head's RSS, the largest of a few samples."""
    s = ClusterSampler(temp_dir)
    peak = 0
    for _ in range(int(seconds / 0.2)):
        peak = max(peak, s.sample())
        time.sleep(0.2)
    return peak


# ---------------------------------------------------------------- agreement
def output_shas(directory: str) -> dict[str, str]:
    shas = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            h = hashlib.sha256()
            with open(os.path.join(directory, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            shas[name] = h.hexdigest()
    return shas


def compare(names: list[str], left: str, right_dirs: dict[str, str]) -> dict:
    """sha256 of every output safetensors file of these recipes: batch output_root `left` vs `right_dirs`."""
    mismatched = []
    for name in names:
        a = output_shas(os.path.join(left, name))
        b = output_shas(right_dirs[name])
        if not a or a != b:
            mismatched.append(name)
    return {"compared": len(names), "identical": len(names) - len(mismatched), "mismatched": mismatched}


# ---------------------------------------------------------------- report
def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def targets(res: dict) -> list[dict]:
    runs, checks = res["runs"], []

    def check(what, num, den, goal):
        ratio = num / den
        checks.append({"target": what, "goal": f"≥ {goal}×", "measured": ratio, "met": ratio >= goal})

    local_sep = runs["local_separate"]["extrapolated_wall_s"]
    check("local: separate processes / batch", local_sep, runs["local_batch"]["wall_s"], 2)
    if "ray_batch" in runs:
        check("Ray: separate processes / batch", runs["ray_separate"]["extrapolated_wall_s"],
              runs["ray_batch"]["wall_s"], 10)
    check("local batch first run / up-to-date rerun", runs["local_batch"]["wall_s"], runs["rerun"]["wall_s"], 50)
    if "ray_rerun" in runs:
        check("Ray batch first run / up-to-date rerun (not in the issue; same head)", runs["ray_batch"]["wall_s"],
              runs["ray_rerun"]["wall_s"], 50)
    return checks


def markdown(res: dict, command: str) -> str:
    s, runs = res["setup"], res["runs"]
    n = s["recipes"]
    lines = [
        f"Setup: a zoo of {n} recipes, each merging {s['per_recipe']} of a pool of {s['pool']} adapters "
        f"(write_llama_adapter: {len(LLAMA_TARGETS)} projections × {s['layers']} layers, hidden {s['hidden']}, "
        f"intermediate {s['intermediate']}, rank {s['rank']}, float32; "
        f"{_mb(res['adapter_bytes'])} per adapter file), weight 1/{s['per_recipe']} each, methods cycling "
        + " / ".join(m["method"] for m in METHODS) + " (density 0.5 where it applies).",
        "",
        f"Machine: {res['env']['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in res["env"]["versions"].items())
        + f". Window: {res['window'][0]} to {res['window'][1]} UTC.",
        "",
        f"Command: `{command}`; distmerge from {res['code']['path']}"
        + (f" at {res['code']['commit'][:7]}" if res["code"].get("commit") else "")
        + (f" with uncommitted changes to {', '.join(res['code']['dirty'])}" if res["code"].get("dirty") else "") + ".",
        "",
        "What every process pays before it merges anything (median, min-max of "
        f"{len(next(iter(res['floor_s'].values()))['runs'])}): "
        + "; ".join(f"`{k}` {v['median']:.2f} s ({min(v['runs']):.2f}-{max(v['runs']):.2f})"
                    for k, v in res["floor_s"].items()) + ".",
        "",
        "| run | processes | wall s | per recipe s | peak RSS (process tree) | peak RSS incl. Ray head + workers | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    order = [("local_separate", "local: separate `distmerge merge`"), ("local_batch", "local: `distmerge batch`"),
             ("rerun", "local: `distmerge batch`, up to date"),
             ("ray_separate", "Ray: separate `distmerge merge`"), ("ray_batch", "Ray: `distmerge batch`"),
             ("ray_rerun", "Ray: `distmerge batch`, up to date")]
    for key, label in order:
        if key not in runs:
            continue
        r = runs[key]
        if "per_process_s" in r:
            p = r["per_process_s"]
            extra = "" if r["processes"] == n else \
                f"; {r['processes']} of {n} run, **extrapolated** to {n}: {r['extrapolated_wall_s']:.1f} s"
            note = f"one process: {p['min']:.2f} / {p['median']:.2f} / {p['max']:.2f} s (min/median/max){extra}"
            wall = f"{r['wall_s']:.1f}" if r["processes"] == n else f"{r['wall_s']:.1f} (~{r['extrapolated_wall_s']:.0f})"
        else:
            c = r["counts"]
            note = (f"{c['merged']} merged, {c['up to date']} up to date, inputs hashed {r['inputs_hashed']}, "
                    f"in-process {r['report_seconds']:.2f} s")
            if "repeats_wall_s" in r:
                note += f"; median of {len(r['repeats_wall_s'])}: " + ", ".join(f"{w:.2f}" for w in r["repeats_wall_s"])
            wall = f"{r['wall_s']:.2f}"
        cluster = _mb(r["cluster_peak_rss"]) if "cluster_peak_rss" in r else ""
        lines.append(f"| {label} | {r['processes']} | {wall} | {r['per_recipe_s']:.3f} | {_mb(r['peak_rss'])} | "
                     f"{cluster} | {note} |")
    if "ray_head_idle_rss" in res:
        lines += ["", (f"The idle Ray head (GCS, raylet, their helpers; no workers) holds "
                       f"{_mb(res['ray_head_idle_rss'])} before the Ray runs; it is inside the last column, "
                       f"not the one before.")]
    idn = res["identical"]
    lines += ["", "Same bytes (sha256 of every output .safetensors file, per recipe): "
              + "; ".join(f"{k}: {v['identical']} of {v['compared']} identical"
                          + (f" (differ: {', '.join(v['mismatched'])})" if v["mismatched"] else "")
                          for k, v in idn.items()) + "."]
    lines += ["", "Targets (the model-zoo issue):", "", "| target | goal | measured | met |", "|---|---|---:|---|"]
    for c in res["targets"]:
        lines.append(f"| {c['target']} | {c['goal']} | {c['measured']:.1f}× | {'yes' if c['met'] else '**no**'} |")
    inside = [(f"local first run {runs['local_batch']['report_seconds']:.2f} s, up-to-date rerun "
               f"{runs['rerun']['report_seconds']:.3f} s "
               f"({runs['local_batch']['report_seconds'] / max(runs['rerun']['report_seconds'], 1e-3):.0f}×)")]
    if "ray_rerun" in runs:
        inside.append(f"Ray first run {runs['ray_batch']['report_seconds']:.2f} s, up-to-date rerun "
                      f"{runs['ray_rerun']['report_seconds']:.2f} s")
    lines += ["", "Inside the batch process only (batch_report.json's `seconds`: no interpreter start, no imports): "
              + "; ".join(inside) + "."]
    return "\n".join(lines) + "\n"


def code_version(root: str) -> dict:
    """Which distmerge was measured: its directory, and the git commit with any uncommitted changes under
    distmerge/ (other people may be editing the tree while this runs)."""
    info = {"path": root}
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "distmerge"], capture_output=True,
                               text=True, timeout=30)
        if commit.returncode == 0:
            info.update(commit=commit.stdout.strip(), dirty=[ln[3:] for ln in dirty.stdout.splitlines()])
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---------------------------------------------------------------- main
def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through main's finally: the Ray head is stopped


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work directory: adapters, configs, outputs and the report")
    p.add_argument("--tiny", action="store_true", help="4 tiny recipes, local only: seconds, for CI")
    p.add_argument("--recipes", type=int, help="recipes in the zoo (default 50; 4 with --tiny)")
    for key in ("layers", "hidden", "intermediate", "rank"):  # adapter size: a first run that does real work
        p.add_argument(f"--{key}", type=int, help=f"the adapters' {key} (default {getattr(Setup(), key)})")
    p.add_argument("--separate", type=int, help="recipes run as separate local processes (default: all)")
    p.add_argument("--ray-separate", type=int, help="recipes run as separate Ray drivers (default: --separate)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray runs (implied by --tiny)")
    p.add_argument("--repeats", type=int, help=f"local batch first runs, reruns and CLI floors (default {REPEATS}; "
                                               f"1 with --tiny)")
    args = p.parse_args(argv)

    base = TINY if args.tiny else Setup()
    setup = Setup(**{**asdict(base), **{k: getattr(args, k) for k in ("recipes", "layers", "hidden", "intermediate",
                                                                      "rank") if getattr(args, k)}})
    use_ray = not (args.tiny or args.no_ray)
    repeats = max(1, args.repeats or (1 if args.tiny else REPEATS))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = datetime.now(timezone.utc)

    say(f"building {setup.pool} adapters and a zoo of {setup.recipes} recipes under {out}")
    adapters = build_adapters(os.path.join(out, "adapters"), setup)
    zoo_root = os.path.join(out, "zoo-local")
    zoo = os.path.join(out, "zoo.yaml")
    write_zoo(zoo, adapters, setup, zoo_root)
    configs = write_separate_configs(zoo, os.path.join(out, "configs"), os.path.join(out, "separate-local"))
    names = [c[0] for c in configs]
    for d in ("separate-local", "separate-ray", "zoo-ray") + tuple(f"zoo-local{'' if i == 0 else f'-{i + 1}'}"
                                                                   for i in range(repeats)):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)

    res: dict = {"setup": asdict(setup), "methods": list(METHODS), "runs": {}, "identical": {},
                 "adapter_bytes": os.path.getsize(os.path.join(adapters[0], "adapter_model.safetensors"))}
    runs = res["runs"]

    # what every process pays before it merges anything: the interpreter, torch's import, distmerge's CLI
    res["floor_s"] = {}
    for key, cmd in FLOORS.items():
        walls = [measure([sys.executable, *cmd], 120)["wall_s"] for _ in range(repeats)]
        res["floor_s"][key] = {"runs": walls, "median": statistics.median(walls)}
        say(f"floor: {key}: {', '.join(f'{x:.2f}' for x in walls)} s")

    # local: separate processes, then the batch (REPEATS fresh roots), then the up-to-date reruns
    sep_n = args.separate or setup.recipes
    local_idx = pick(sep_n, setup.recipes)
    runs["local_separate"] = run_separate(configs, local_idx, [], None, "local")
    firsts = []
    for k in range(repeats):
        root = zoo_root if k == 0 else f"{zoo_root}-{k + 1}"
        firsts.append(run_batch(zoo, [f"output_root={root}"], root, None, f"local batch {k + 1}/{repeats}"))
        if firsts[-1]["counts"]["merged"] != setup.recipes:
            raise SystemExit(f"the local batch merged {firsts[-1]['counts']} of {setup.recipes} recipes")
    runs["local_batch"] = summarize(firsts)
    reruns = [run_batch(zoo, [], zoo_root, None, f"up-to-date rerun {k + 1}/{repeats}") for k in range(repeats)]
    for r in reruns:
        if r["counts"]["up to date"] != setup.recipes:
            raise SystemExit(f"the rerun was not all up to date: {r['counts']}")
    runs["rerun"] = summarize(reruns)
    separate_local = {c[0]: c[2] for c in configs}
    chosen = [names[i] for i in local_idx]
    res["identical"]["local batch vs local separate"] = compare(chosen, zoo_root, separate_local)
    for k in range(1, repeats):
        res["identical"][f"local batch vs local batch #{k + 1}"] = compare(
            names, zoo_root, {n: os.path.join(f"{zoo_root}-{k + 1}", n) for n in names})

    if use_ray:
        temp_dir = tempfile.mkdtemp(prefix="dmb-", dir="/tmp")
        say(f"starting a Ray head in {temp_dir}")
        try:
            address = start_head(temp_dir)
            time.sleep(3)
            res["ray_head_idle_rss"] = idle_rss(temp_dir)
            say(f"Ray head at {address}, idle RSS {_mb(res['ray_head_idle_rss'])}")
            ray_over = ["runtime.executor=ray", f"runtime.address={address}"]
            ray_root = os.path.join(out, "zoo-ray")
            ray_idx = pick(args.ray_separate or sep_n, setup.recipes)
            ray_configs = write_separate_configs(zoo, os.path.join(out, "configs-ray"),
                                                 os.path.join(out, "separate-ray"))
            runs["ray_separate"] = run_separate(ray_configs, ray_idx, ray_over, temp_dir, "Ray")
            zoo_over = ["defaults.runtime.executor=ray", f"defaults.runtime.address={address}",
                        f"output_root={ray_root}"]
            runs["ray_batch"] = run_batch(zoo, zoo_over, ray_root, temp_dir, "Ray batch")
            if runs["ray_batch"]["counts"]["merged"] != setup.recipes:
                raise SystemExit(f"the Ray batch merged {runs['ray_batch']['counts']} of {setup.recipes} recipes")
            runs["ray_rerun"] = run_batch(zoo, zoo_over, ray_root, temp_dir, "Ray up-to-date rerun")
        finally:
            stop_head(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
        ray_chosen = [names[i] for i in ray_idx]
        res["identical"]["Ray batch vs Ray separate"] = compare(ray_chosen, ray_root, {c[0]: c[2] for c in ray_configs})
        res["identical"]["Ray batch vs local batch"] = compare(names, ray_root,
                                                               {n: os.path.join(zoo_root, n) for n in names})

    for key, r in runs.items():
        r.setdefault("per_recipe_s", r["wall_s"] / setup.recipes)
        if "per_process_s" in r:
            r["extrapolated_wall_s"] = r["per_recipe_s"] * setup.recipes
            r["extrapolated"] = r["processes"] != setup.recipes
    res["targets"] = targets(res)
    res["window"] = [start.strftime("%Y-%m-%d %H:%M"), datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")]
    import ray
    import torch

    import distmerge
    from distmerge import __version__
    res["code"] = code_version(os.path.dirname(os.path.dirname(os.path.abspath(distmerge.__file__))))
    res["env"] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                             f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, {platform.system()} {platform.release()}",
                  "versions": {"python": platform.python_version(), "distmerge": __version__, "torch": torch.__version__,
                               "ray": ray.__version__}}
    command = "python benchmarks/bench_batch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown(res, command)
    with open(os.path.join(out, "batch.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(report)
    say(f"wrote {out}/results.json and {out}/batch.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
