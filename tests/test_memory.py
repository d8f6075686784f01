"""A worker's peak RSS follows one module, not the number of layers: merge 4 and 16 layers of the same
adapters in fresh processes and compare their peak RSS with the growth of the inputs. And the peak
memory `distmerge plan` prints, which people size workers by, bounds the measured one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import distmerge
from distmerge.demo import write_llama_adapter

pytestmark = pytest.mark.slow

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report
# at least the RSS pytest had when it started the child.
MERGE = """
import json, sys
import distmerge
distmerge.merge(json.loads(sys.argv[1]))
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _config(paths, out, method: str, algorithm: str = "exact") -> dict:
    return {"adapters": [{"path": p, "weight": 0.25} for p in paths],
            "merge": {"method": method, "density": 0.5, "svd_algorithm": algorithm},
            "output": {"path": str(out), "overwrite": True}, "runtime": {"executor": "local", "progress": False}}


def _vm_hwm(cfg: dict) -> int:
    """Peak RSS of a fresh process that runs this merge."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}  # see README: glibc keeps freed big blocks otherwise
    out = subprocess.run([sys.executable, "-c", MERGE, json.dumps(cfg)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def _peak_rss(tmp_path, layers: int, method: str) -> tuple[int, int]:
    paths = [write_llama_adapter(str(tmp_path / f"L{layers}" / f"a{i}"), layers=layers, hidden=1024,
                                 intermediate=2752, rank=32, alpha=32, seed=i) for i in range(4)]
    peak = _vm_hwm(_config(paths, tmp_path / f"out-{layers}-{method}", method))
    inputs = sum((tmp_path / f"L{layers}" / f"a{i}" / "adapter_model.safetensors").stat().st_size for i in range(4))
    return peak, inputs


@pytest.mark.parametrize("method", ["ties", "ties_svd"])
def test_peak_rss_does_not_grow_with_layers(tmp_path, method):
    small, small_in = _peak_rss(tmp_path, 4, method)
    large, large_in = _peak_rss(tmp_path, 16, method)
    grown = large_in - small_in  # 120 MB more input
    assert grown > 100e6
    assert large - small < 0.1 * grown, f"peak RSS grew {(large - small) / 1e6:.0f} MB for {grown / 1e6:.0f} MB"


@pytest.fixture(scope="module")
def sized_adapters(tmp_path_factory):
    """(adapters at 2048/5504 widths, the same at tiny widths): one layer, 4 adapters of rank 32."""
    root = tmp_path_factory.mktemp("sized")
    return tuple([write_llama_adapter(str(root / name / f"a{i}"), layers=1, hidden=hidden, intermediate=inter,
                                      rank=32, alpha=32, seed=i) for i in range(4)]
                 for name, hidden, inter in (("big", 2048, 5504), ("tiny", 64, 128)))


@pytest.mark.parametrize("method,algorithm", [("ties", "exact"), ("svd", "exact"), ("ties_svd", "exact"),
                                              ("magnitude_prune_svd", "randomized"),
                                              ("dare_ties_svd", "randomized"), ("core_ties", "exact"),
                                              ("knots_dare_ties", "exact")])
def test_plan_peak_memory_bounds_the_measured_peak(sized_adapters, tmp_path, method, algorithm):
    """The working set is the merge's peak RSS less that of the same merge of tiny adapters (Python, torch,
    the libraries it loads). The estimate must cover it, give or take the allocator's slack, and not be
    so loose that workers are sized for memory they never use."""
    big, tiny = sized_adapters
    cfg = _config(big, tmp_path / "out", method, algorithm)
    working = _vm_hwm(cfg) - _vm_hwm(_config(tiny, tmp_path / "out-tiny", method, algorithm))
    estimate = max(t.peak_bytes for t in distmerge.plan(cfg).shard(4))
    mib = 2**20
    assert working <= 1.02 * estimate + 2 * mib, f"working set {working / mib:.1f} MiB > estimate {estimate / mib:.1f}"
    assert estimate <= 3 * working + 8 * mib, f"estimate {estimate / mib:.1f} MiB for {working / mib:.1f} MiB used"
