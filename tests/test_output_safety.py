"""Nothing the user owns is deleted or overwritten; killed runs leave nothing the next run does not clean;
a refused or failed run exits 2 with one line and leaves nothing behind. Real processes, real signals,
real full and read-only filesystems."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.cli import main
from distmerge.demo import write_llama_adapter
from distmerge.output import owner
from distmerge.output.owner import Owner, debris_name
from distmerge.output.staging import Staging
from tests.conftest import merge_config

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> dict[str, str]:
    """Every file under path with its sha256: what a user would notice missing or changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _write_cfg(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def _refused(capsys, cfg_path: Path, *overrides: str, lines: int = 1) -> str:
    """Exit 2, no traceback, one line (a config's problems: one line each)."""
    code = main(["merge", str(cfg_path), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == lines, err
    return err


def _debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".distmerge-" in p.name)


@pytest.fixture
def inputs(adapter_sets, tmp_path):
    """Copies of two real PEFT adapters in a folder the user owns, with a note of theirs beside them."""
    root = tmp_path / "adapters"
    for i, p in enumerate(adapter_sets("llama").paths[:2]):
        shutil.copytree(p, root / f"task{i}")
    (root / "NOTES.md").write_text("my notes")
    return root


def _cfg(inputs: Path, out: Path, **output) -> dict:
    return {"adapters": [{"path": str(inputs / "task0"), "weight": 0.6}, {"path": str(inputs / "task1")}],
            "merge": {"method": "linear"}, "output": {"path": str(out), **output},
            "runtime": {"executor": "local", "progress": False}}


@pytest.mark.parametrize("where", ["task0", ".", "task0/merged"])
def test_output_on_over_or_inside_an_input_is_refused(inputs, tmp_path, capsys, where):
    before = _tree(inputs)
    cfg = _write_cfg(tmp_path, _cfg(inputs, inputs / where, overwrite=True))
    err = _refused(capsys, cfg)
    assert "input adapter 'task0'" in err and "outside every adapter" in err
    assert _tree(inputs) == before and _debris(inputs) == [] and _debris(inputs / "task0") == []


def test_a_file_at_output_path_is_never_replaced(inputs, tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("mine")
    err = _refused(capsys, _write_cfg(tmp_path, _cfg(inputs, target, overwrite=True)))
    assert "not a directory" in err and target.read_text() == "mine"


def test_overwrite_replaces_only_empty_dirs_and_distmerge_outputs(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _write_cfg(tmp_path, _cfg(inputs, out, overwrite=True))
    out.mkdir()
    assert main(["merge", str(cfg)]) == 0  # an empty directory
    first = _tree(out)
    assert main(["merge", str(cfg), "adapters.0.weight=0.1"]) == 0  # its own previous output
    assert _tree(out) != first and _debris(tmp_path) == []

    (out / "NOTES.md").write_text("my notes")  # the user adds a file: the directory is theirs again
    err = _refused(capsys, cfg)
    assert "holds files distmerge did not write (NOTES.md)" in err
    assert (out / "NOTES.md").read_text() == "my notes"
    (out / "NOTES.md").unlink()
    card = (out / "README.md").read_text()
    (out / "README.md").write_text("my model card")  # the user rewrites distmerge's model card: theirs too
    assert "has README.md changed since distmerge wrote it" in _refused(capsys, cfg)
    assert (out / "README.md").read_text() == "my model card"
    (out / "README.md").write_text(card)

    tensors = load_file(str(out / "adapter_model.safetensors"))  # the user edits a merged file
    next(iter(tensors.values())).mul_(2)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    edited = _tree(out)
    assert "changed since distmerge wrote it" in _refused(capsys, cfg)
    assert _tree(out) == edited

    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_text("x")
    err = _refused(capsys, cfg, f"output.path={other}")
    assert "not a distmerge output" in err and (other / "weights.bin").read_text() == "x"
    assert "already exists" in _refused(capsys, cfg, f"output.path={other}", "output.overwrite=false")


def test_output_path_that_is_a_symlink_loop(inputs, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "is a link" in _refused(capsys, _write_cfg(tmp_path, _cfg(inputs, loop, overwrite=True)))


def test_demo_never_writes_over_adapters(tmp_path, capsys):
    assert main(["demo", str(tmp_path)]) == 0
    sql = tmp_path / "adapters" / "sql" / "adapter_model.safetensors"
    mine = tmp_path / "adapters" / "chat" / "adapter_model.safetensors"
    mine.write_bytes(b"my own adapter")
    capsys.readouterr()
    assert main(["demo", str(tmp_path), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err and "Traceback" not in err
    assert mine.read_bytes() == b"my own adapter"
    before = sql.read_bytes()
    assert main(["demo", str(tmp_path), "--seed", "3", "--force"]) == 0
    assert sql.read_bytes() != before and mine.read_bytes() != b"my own adapter"


def test_a_failed_run_removes_the_directories_it_created(inputs, tmp_path, capsys):
    t = load_file(str(inputs / "task1" / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")  # fails inside the merge, after staging exists
    save_file(t, str(inputs / "task1" / "adapter_model.safetensors"))
    err = _refused(capsys, _write_cfg(tmp_path, _cfg(inputs, tmp_path / "new" / "deeper" / "out")))
    assert "NaN/Inf" in err and not (tmp_path / "new").exists()


def test_overflow_in_the_output_dtype_is_an_error(adapter_sets, tmp_path, capsys):
    aset = adapter_sets("llama")
    cfg = merge_config(aset, tmp_path / "out", "cat", output={"dtype": "float16"})
    cfg["adapters"][0]["weight"] = 1e12  # finite in float32, Inf in float16
    err = _refused(capsys, _write_cfg(tmp_path, cfg))
    assert "float16's largest value" in err and "output.dtype: float32" in err and "module 'base_model" in err
    assert not (tmp_path / "out").exists() and _debris(tmp_path) == []
    assert main(["merge", str(tmp_path / "cfg.yaml"), "output.dtype=float32"]) == 0


def test_svd_of_an_overflowing_delta_is_an_error(adapter_sets, tmp_path, capsys):
    cfg = merge_config(adapter_sets("llama"), tmp_path / "out", "ties_svd", density=0.5)
    cfg["adapters"][0]["weight"] = 1e30
    err = _refused(capsys, _write_cfg(tmp_path, cfg))
    assert "module 'base_model" in err and "failed in its SVD" in err and "smaller weights" in err


# --- full and read-only filesystems (tmpfs: this needs root, as CI has) ---------------------------------------


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def make(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); CI runs as root and can")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(inputs, tmp_path, capsys, mount):
    small = mount("size=8k")
    err = _refused(capsys, _write_cfg(tmp_path, _cfg(inputs, small / "sub" / "out")))
    assert "No space left on device" in err and "free space" in err
    assert list(small.iterdir()) == []


def test_read_only_output_is_one_line(inputs, tmp_path, capsys, mount):
    ro = mount("ro,size=1m")
    err = _refused(capsys, _write_cfg(tmp_path, _cfg(inputs, ro / "out")))
    assert "Read-only file system" in err and "writable output.path" in err


# --- debris: named after its owner, removed only when the owner is gone -----------------------------------------


def test_debris_of_dead_processes_is_removed_and_only_that(inputs, tmp_path, caplog):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Owner.me()
    gone = Owner(me.host, me.boot, dead.pid, 12345)
    (debris_name(out, "stage", gone) / "_parts").mkdir(parents=True)
    (tmp_path / "kept").mkdir()
    (debris_name(tmp_path / "kept", "old", gone) / "x").mkdir(parents=True)  # replaced, then the merge died
    set_aside = debris_name(tmp_path / "prev", "old", gone)  # set aside, the new one never renamed in
    set_aside.mkdir()
    (set_aside / "adapter_model.safetensors").write_bytes(b"the previous output")
    live = debris_name(out, "stage", me)  # a merge still running in this process
    other_host = debris_name(out, "stage", Owner("elsewhere", me.boot, dead.pid, 1))
    legacy = tmp_path / ".out.distmerge-0123abcd"
    for d in (live, other_host, legacy):
        d.mkdir()
    distmerge.merge(_cfg(inputs, out))
    assert sorted(_debris(tmp_path)) == sorted([live.name, other_host.name, legacy.name])
    assert "removed 2 directories" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert (tmp_path / "prev" / "adapter_model.safetensors").read_bytes() == b"the previous output"
    assert f"restored {tmp_path / 'prev'}" in caplog.text
    assert "older distmerge" in caplog.text and legacy.name in caplog.text


def test_another_hosts_debris_is_removed_once_its_lease_lapses(inputs, tmp_path, caplog, monkeypatch):
    """A nightly driver on a fresh node cleans up after last night's, killed with its node: a live run renews
    its staging's mtime every RENEW_S, so another host's directory left untouched for LEASE_S is a dead run's."""
    monkeypatch.setattr(owner, "LEASE_S", 1.0)
    monkeypatch.setattr(owner, "RENEW_S", 0.1)
    out = tmp_path / "out"
    me = Owner.me()
    dead = debris_name(out, "stage", Owner("lost_node", me.boot, 4242, 1))
    (dead / "_parts").mkdir(parents=True)
    (dead / "_parts" / "part-0.safetensors").write_bytes(b"half a merge")
    set_aside = debris_name(tmp_path / "prev", "old", Owner("lost_node", me.boot, 4242, 1))
    set_aside.mkdir()
    (set_aside / "adapter_model.safetensors").write_bytes(b"the previous output")
    live = debris_name(out, "stage", Owner("busy_node", me.boot, 4343, 1))
    live.mkdir()
    renewing = owner.Lease(live).start()  # busy_node's run, alive: its lease is renewed
    try:
        time.sleep(1.6)
        assert not Owner("busy_node", me.boot, 4343, 1).alive(dead)
        assert Owner("busy_node", me.boot, 4343, 1).alive(live)
        distmerge.merge(_cfg(inputs, out))
    finally:
        renewing.stop()
    assert sorted(_debris(tmp_path)) == [live.name]
    assert "pid 4242" in caplog.text and f"restored {tmp_path / 'prev'}" in caplog.text
    assert (tmp_path / "prev" / "adapter_model.safetensors").read_bytes() == b"the previous output"


def test_a_running_merge_renews_its_staging(tmp_path, monkeypatch):
    monkeypatch.setattr(owner, "RENEW_S", 0.1)
    with Staging(str(tmp_path / "out")) as staging:
        os.utime(staging.path, (1, 1))  # as if last touched in 1970
        time.sleep(0.5)
        assert time.time() - staging.path.stat().st_mtime < 5
    assert not staging.path.exists()


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory):
    """Adapters large enough that a merge lasts about a second, to be killed part way."""
    root = tmp_path_factory.mktemp("slow")
    paths = [write_llama_adapter(str(root / f"a{i}"), layers=4, hidden=512, intermediate=1024, rank=16, alpha=16,
                                 seed=i) for i in range(3)]
    return paths


def _merge_process(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distmerge", "-q", "merge", str(cfg_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(out: Path) -> dict[str, str]:
    return {k: v for k, v in _tree(out).items() if k != "distmerge.json"}  # the manifest records times


def _wait_for_staging(directory: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not _debris(directory) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_merges_leave_nothing_the_next_run_does_not_clean(slow_inputs, tmp_path, sig):
    out = tmp_path / "out"
    cfg = {"adapters": [{"path": p} for p in slow_inputs], "merge": {"method": "ties_svd", "density": 0.5},
           "output": {"path": str(out), "overwrite": True}, "runtime": {"executor": "local", "progress": False}}
    cfg_path = _write_cfg(tmp_path, cfg)
    ref = _merge_process(cfg_path)
    _wait_for_staging(tmp_path, ref)
    t0 = time.monotonic()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    duration = time.monotonic() - t0  # from staging to the end: the part worth killing
    expected = _weights(out)
    shutil.rmtree(out)
    rng = random.Random(int(sig))
    killed = 0
    for delay in [0.0] + sorted(rng.uniform(0.05, 1.2) * duration for _ in range(3)):
        proc = _merge_process(cfg_path)
        _wait_for_staging(tmp_path, proc)
        time.sleep(delay)
        proc.send_signal(sig)
        code = proc.wait(timeout=300)
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        if code == 0:  # it finished first: the output is whole
            assert _weights(out) == expected
            shutil.rmtree(out)
            continue
        killed += 1
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 143), (code, err)
        assert not out.exists()  # the output appears whole or not at all
        if sig == signal.SIGTERM:
            assert "terminated; nothing was written" in err and _debris(tmp_path) == [], err
        else:  # SIGKILL cannot clean up: its staging stays, for the next run to remove
            assert _debris(tmp_path)
    assert killed, "no run was killed before it finished"
    rerun = _merge_process(cfg_path)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert _weights(out) == expected and _debris(tmp_path) == []


@pytest.mark.slow
def test_two_concurrent_merges_to_one_path(slow_inputs, tmp_path):
    out = tmp_path / "out"
    cfg = {"adapters": [{"path": p} for p in slow_inputs], "merge": {"method": "linear"},
           "output": {"path": str(out)}, "runtime": {"executor": "local", "progress": False}}
    cfg_path = _write_cfg(tmp_path, cfg)
    procs = [_merge_process(cfg_path) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errs = [p.stderr.read() for p in procs]
    assert codes == [0, 2], errs
    loser = next(e for e in errs if "error" in e)
    assert "Traceback" not in loser and ("already exists" in loser or "during this merge" in loser), loser
    assert load_file(str(out / "adapter_model.safetensors")) and _debris(tmp_path) == []


# --- config details users trip over ------------------------------------------------------------------------------


def test_numbers_and_sizes_as_users_write_them(inputs, tmp_path):
    cfg = distmerge.load_config(_cfg(inputs, tmp_path / "o"), ["merge.density=1e-3", "output.shard_size=1000000"])
    assert cfg.merge.density == 0.001 and cfg.shard_size_bytes == 1_000_000


def test_duplicate_yaml_key_is_named(inputs, tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(f"adapters: [{{path: {inputs / 'task0'}}}]\nmerge:\n  method: ties\n  method: svd\n")
    err = _refused(capsys, path, lines=2)
    assert "duplicate key method at line 4" in err


def test_an_internal_bug_is_reported_as_one(inputs, tmp_path, capsys, monkeypatch):
    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr("distmerge.job.build_plan", bug)
    code = main(["merge", str(_write_cfg(tmp_path, _cfg(inputs, tmp_path / "out")))])
    err = capsys.readouterr().err
    assert code == 1 and "internal error: ZeroDivisionError" in err and "file an issue" in err
    saved = Path(err.split("traceback saved in ")[1].strip())
    assert "Traceback" in saved.read_text() and "Traceback" not in err
    saved.unlink()
    assert not (tmp_path / "out").exists() and _debris(tmp_path) == []



# --- inputs are pinned: the bytes merged are the bytes planned and hashed --------------------------------------


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_an_input_changed_after_planning_fails_the_merge(inputs, tmp_path, capsys, monkeypatch, how):
    import distmerge.job

    target = inputs / "task1" / "adapter_model.safetensors"
    tensors = load_file(str(target))
    real_plan = distmerge.job.build_plan

    def plan_then_change(*args):
        plan = real_plan(*args)
        changed = {k: v * 2 for k, v in tensors.items()}
        if how == "replaced":  # a new file renamed over the old one (an rsync, a re-download)
            save_file(changed, str(target) + ".new")
            os.replace(str(target) + ".new", target)
        else:  # the same inode, same size, new bytes (a writer in place)
            with open(target, "r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(b"\x00\x00\x80\x7f")
            os.utime(target, ns=(1, 1))
        return plan
    monkeypatch.setattr(distmerge.job, "build_plan", plan_then_change)
    err = _refused(capsys, _write_cfg(tmp_path, _cfg(inputs, tmp_path / "out")))
    assert str(target) in err and "after the merge was planned" in err
    assert ("replaced by another file" if how == "replaced" else "modified") in err
    assert not (tmp_path / "out").exists() and _debris(tmp_path) == []


@pytest.mark.slow
def test_an_input_replaced_while_a_real_merge_runs(slow_inputs, tmp_path):
    """A real process: either the merge ends before the swap (and its manifest hashes the bytes it merged)
    or it refuses; never an output that mixes the two files, or a hash of the new one."""
    shelf = tmp_path / "shelf"
    for p in slow_inputs:
        shutil.copytree(p, shelf / Path(p).name)
    target = shelf / "a1" / "adapter_model.safetensors"
    old_sha = hashlib.sha256(target.read_bytes()).hexdigest()
    out = tmp_path / "out"
    cfg = {"adapters": [{"path": str(p)} for p in sorted(shelf.iterdir())], "merge": {"method": "ties_svd",
           "density": 0.5}, "output": {"path": str(out)}, "runtime": {"executor": "local", "progress": False}}
    proc = _merge_process(_write_cfg(tmp_path, cfg))
    _wait_for_staging(tmp_path, proc)
    tensors = load_file(str(target))
    save_file({k: v * 2 for k, v in tensors.items()}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", target)
    code = proc.wait(timeout=300)
    err = proc.stderr.read()
    if code == 0:
        manifest = json.loads((out / "distmerge.json").read_text())
        recorded = {f["file"]: f["sha256"] for i in manifest["inputs"] for f in i["files"]}
        assert recorded[str(target)] == old_sha
    else:
        assert code == 2 and "replaced by another file" in err and "Traceback" not in err, err
        assert not out.exists() and _debris(tmp_path) == []


def test_a_reader_that_leaves_is_not_a_bug(tmp_path):
    """`distmerge methods | head -1`: the pipe closes under the writer; no 'internal error', no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "distmerge", "methods"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert code in (0, 141) and "internal error" not in err and "Traceback" not in err, (code, err)
