"""The benchmark runs end to end at a tiny size: both tools, the PEFT sample and its extrapolation,
the randomized SVD and the report. It asserts what the numbers mean, never how fast they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    methods = ["linear", "cat", "dare_ties", "svd", "ties_svd"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vs_peft.py"), "--out", str(tmp_path),
                          "--tiny", "--methods", ",".join(methods), "--peft-sample", "always"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["algorithm"]): r for r in results["rows"]}
    assert set(rows) == {(m, "exact") for m in methods} | {("ties_svd", "randomized")}
    for (method, algorithm), r in rows.items():
        assert r["wall_s"] > 0 and r["peak_rss"] > 0 and r["peft_wall_s"] > 0 and r["peft_peak_rss"] > 0
        assert r["peft_extrapolated"] == (method in ("svd", "ties_svd"))
        assert set(r["phases"]) == {"read", "math", "write"} and sum(r["phases"].values()) <= r["merge_s"]
        runs = r["merge_runs_s"]  # the merge-vs-read targets take the fastest of 5, as the read baseline does
        assert len(runs) == (5 if method in ("linear", "cat", "dare_ties") else 1) and r["merge_s"] == min(runs)
        if method == "dare_ties" or algorithm == "randomized":
            assert r["agreement"] is None  # PEFT's DARE is unseeded; randomized is not PEFT's algorithm
        else:
            # PEFT's cat writes into bf16 weights on a bf16 base; every other method keeps float32
            assert r["agreement"] < (1e-2 if method == "cat" else 1e-3), (method, r["agreement"])
    assert 0.999 <= rows[("ties_svd", "randomized")]["trunc_ratio"] < 1.5  # exact is optimal, up to rounding
    assert results["read_once_s"] > 0
    report = (tmp_path / "benchmarks.md").read_text()
    assert "merge / read once" in report
    assert all(f"| {m} |" in report for m in methods) and "~ PEFT merged a sample of 3 modules" in report


def test_batch_benchmark_smoke(tmp_path):
    """bench_batch.py --tiny: 4 recipes, local only. Both sides merged the same bytes; no timing is asserted."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), "--tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"setup", "env", "floor_s", "runs", "identical", "targets", "window"} <= set(results)
    assert results["setup"]["recipes"] == 4
    runs = results["runs"]
    assert set(runs) == {"local_separate", "local_batch", "rerun"}  # --tiny runs no Ray
    assert runs["local_separate"]["processes"] == 4 and not runs["local_separate"]["extrapolated"]
    for r in runs.values():
        assert r["wall_s"] > 0 and r["peak_rss"] > 0
    assert runs["local_batch"]["counts"]["merged"] == 4
    assert runs["rerun"]["counts"]["up to date"] == 4 and runs["rerun"]["inputs_hashed"] == 0
    same = results["identical"]["local batch vs local separate"]
    assert same == {"compared": 4, "identical": 4, "mismatched": []}
    assert {t["target"] for t in results["targets"]} == {"local: separate processes / batch",
                                                        "local batch first run / up-to-date rerun"}
    report = (tmp_path / "batch.md").read_text()
    assert "| local: `distmerge batch`, up to date |" in report and "4 of 4 identical" in report


def test_native_methods_benchmark_smoke(tmp_path):
    """benchmarks/native_methods.py --tiny: each LoRA-native method timed against svd, ties_svd and its
    dense version; no timing is asserted, only that every number is there and the targets are derived."""
    methods = ["core_ties", "knots_dare_ties", "tsv", "della_svd"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "native_methods.py"), "--tiny", "--out",
                          str(tmp_path), "--methods", ",".join(methods)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    result = json.loads((tmp_path / "native.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(methods)
    for r in rows.values():
        assert r["s"] > 0 and r["svd_s"] > 0 and r["ties_svd_s"] > 0 and r["dense_s"] > 0
        assert r["dense_modules"] == 1 and r["speedup_vs_dense"] > 0
    assert {t["target"] for t in result["targets"]} >= {"core_ties: time vs svd", "tsv: speedup vs dense TSV-M"}
    assert "| knots_dare_ties | knots/dare_ties |" in (tmp_path / "native.md").read_text()
