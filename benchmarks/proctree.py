"""Run a command as its own process and measure what its user pays: wall seconds and the peak RSS of
its whole process tree (with executor=ray: the raylet, GCS and every worker too).

The tree's summed RSS is polled every `poll_s`, and so is the kernel's own high-water mark of the
direct child (VmHWM), so a short peak of a single-process run is not missed between polls. wait4's
ru_maxrss is no use here: Linux carries it over fork and exec, so a child reports at least the RSS
its parent had when it was started.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss: int  # bytes
    returncode: int
    stdout: str
    stderr: str


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 poll_s: float = 0.02, timeout_s: float | None = None) -> Measured:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        root = psutil.Process(proc.pid)
        peak, status = 0, None
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _tree_rss(root), _hwm(proc.pid))
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                for p in [root] + root.children(recursive=True):
                    p.kill()
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return Measured(wall, peak, proc.returncode, out.read(), err.read())
