"""A worker's peak RSS follows one module, not the number of layers: merge 4 and 16 layers of the same
adapters in fresh processes and compare their peak RSS with the growth of the inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


def _peak_rss(tmp_path, layers: int, method: str) -> tuple[int, int]:
    paths = [write_llama_adapter(str(tmp_path / f"L{layers}" / f"a{i}"), layers=layers, hidden=1024,
                                 intermediate=2752, rank=32, alpha=32, seed=i) for i in range(4)]
    cfg = {"adapters": [{"path": p, "weight": 0.25} for p in paths], "merge": {"method": method, "density": 0.5},
           "output": {"path": str(tmp_path / f"out-{layers}-{method}")},
           "runtime": {"executor": "local", "progress": False}}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}  # see README: glibc keeps freed big blocks otherwise
    out = subprocess.run([sys.executable, "-c", MERGE, json.dumps(cfg)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    inputs = sum((tmp_path / f"L{layers}" / f"a{i}" / "adapter_model.safetensors").stat().st_size for i in range(4))
    return int(out.stdout.strip().splitlines()[-1]), inputs


@pytest.mark.parametrize("method", ["ties", "ties_svd"])
def test_peak_rss_does_not_grow_with_layers(tmp_path, method):
    small, small_in = _peak_rss(tmp_path, 4, method)
    large, large_in = _peak_rss(tmp_path, 16, method)
    grown = large_in - small_in  # 120 MB more input
    assert grown > 100e6
    assert large - small < 0.1 * grown, f"peak RSS grew {(large - small) / 1e6:.0f} MB for {grown / 1e6:.0f} MB"
