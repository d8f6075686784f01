"""What the CLI imports before it needs a tensor.

`import torch` is ~3 s of every `distmerge` process (docs/benchmarks.md), and most commands never
touch a tensor: `--help`, `methods`, `plan`, a config error, `batch --plan` and a batch whose recipes
are all up to date. Each runs here in a fresh interpreter that then reports whether torch (or Ray)
was imported; distmerge takes torch through distmerge._lazy, so a module that imports it eagerly, or
touches it at import time, fails here. OmegaConf too (0.15 s): it only resolves `${...}`, and these
configs have none.

The package's names are imported on first use, so no module may rely on another having been imported
before it: each is imported first, alone, in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from distmerge.cli import main
from tests.test_batch import _write, zoo_doc

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import json, sys\n"
    "from distmerge.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "watched = ('torch', 'ray', 'numpy', 'peft', 'transformers', 'omegaconf')\n"
    "print(json.dumps({'code': code, 'imported': sorted(m for m in watched if m in sys.modules)}), file=sys.stderr)\n"
)


def _probe(*args: str, cwd: Path) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    doc = json.loads(last)
    return doc["code"], doc["imported"]


def test_commands_that_need_no_tensor_never_import_torch(shelf, tmp_path, capsys):
    zoo = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    assert main(["batch", str(zoo)]) == 0  # a real first run, in this process: the outputs exist
    capsys.readouterr()
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(json.dumps({"adapters": [{"path": str(shelf / "sql")}, {"path": str(shelf / "chat")}],
                               "merge": {"method": "ties", "density": 0.5},
                               "output": {"path": str(tmp_path / "out")}}))
    cases = {
        "methods": ["methods"],
        "plan": ["plan", str(cfg)],
        "config error": ["merge", str(cfg), "merge.methd=ties"],
        "batch --plan": ["batch", "--plan", str(zoo)],
        "up-to-date batch": ["batch", str(zoo)],
    }
    for what, args in cases.items():
        code, imported = _probe(*args, cwd=tmp_path)
        assert code == (2 if what == "config error" else 0), what
        assert imported == [], f"`distmerge {' '.join(args[:2])}` ({what}) imported {imported}"
    report = json.loads((tmp_path / "zoo" / "batch_report.json").read_text())
    assert {r["status"] for r in report["recipes"]} == {"up to date"}


def test_a_merge_still_imports_torch_when_it_reads_tensors(shelf, tmp_path):
    """The other side: the probe sees torch when tensors are read, so the test above can fail."""
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(json.dumps({"adapters": [{"path": str(shelf / "sql")}, {"path": str(shelf / "chat")}],
                               "runtime": {"executor": "local", "progress": False},
                               "output": {"path": str(tmp_path / "out")}}))
    code, imported = _probe("merge", str(cfg), cwd=tmp_path)
    assert code == 0 and "torch" in imported


def test_every_module_imports_first_and_alone():
    """An import cycle hidden by the order `import distmerge` used to impose shows up as an ImportError here."""
    names = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                   for p in (ROOT / "distmerge").rglob("*.py") if p.name != "__main__.py")
    assert len(names) > 40
    failed = {}
    for name in names:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            failed[name] = (done.stderr.strip().splitlines() or ["?"])[-1]
    assert failed == {}, failed


def test_the_packages_names_survive_their_submodules_imports():
    """A submodule's first import sets its name on the package: were one named like a lazy attribute (the
    planner was distmerge/plan.py), `distmerge.plan` would become that module once a merge had run."""
    probe = ("import inspect, distmerge, distmerge.batch, distmerge.driver\n"
             "from distmerge import plan, merge, load_config, MergeConfig, DistmergeError, MergeResult\n"
             "assert all(inspect.isfunction(f) for f in (plan, merge, load_config, distmerge.plan)), distmerge.plan\n"
             "assert all(inspect.isclass(c) for c in (MergeConfig, DistmergeError, MergeResult))\n"
             "assert distmerge.config.load_config is load_config and 'merge' in dir(distmerge)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
