"""`distmerge batch`: the same bytes as each recipe merged alone; up to date from manifests and headers
alone; failures that stay with their recipe; a killed batch resumed by running it again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.adapters.reader import TensorReader
from distmerge.cli import main
from distmerge.config.zoo import load_zoo

ROOT = Path(__file__).resolve().parents[1]


def _weights(out: Path) -> dict[str, str]:
    """The output's adapter files by sha256 (the manifest records times, so it is left out)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.name != "distmerge.json"}


def zoo_doc(shelf: Path, root: Path, runtime: dict | None = None) -> dict:
    return {
        "defaults": {"merge": {"method": "ties", "density": 0.5, "seed": 3},
                     "runtime": runtime or {"executor": "local", "progress": False}},
        "output_root": str(root),
        "recipes": [
            {"name": "support-bot", "adapters": [{"path": str(shelf / "sql"), "weight": 0.5},
                                                 {"path": str(shelf / "chat"), "weight": 0.5}]},
            {"name": "all-code", "adapters": {"glob": str(shelf / "code-*"), "weight": "equal"},
             "merge": {"method": "svd", "svd_rank": 3}},
            {"name": "mix", "adapters": [{"recipe": "support-bot", "weight": 0.7},
                                         {"recipe": "all-code", "weight": 0.3}],
             "merge": {"method": "cat"}},
            {"name": "sweep", "adapters": [{"path": str(shelf / "sql")}, {"path": str(shelf / "code-a")}],
             "grid": {"merge.method": ["dare_ties", "ties_svd"], "merge.density": [0.3, 0.7]}},
        ]}


def _write(tmp_path: Path, doc: dict, name: str = "zoo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _batch(capsys, zoo: Path, *args: str) -> tuple[int, str, dict]:
    """Run the CLI; (exit code, stdout, the report's rows by recipe)."""
    code = main(["batch", str(zoo), *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    report = Path(json.loads(zoo.read_text())["output_root"], "batch_report.json")
    rows = json.loads(report.read_text())["recipes"] if report.exists() else []
    return code, out.out, {r["recipe"]: r for r in rows}


def test_batch_bytes_equal_each_recipe_alone(shelf, tmp_path, capsys):
    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    code, out, report = _batch(capsys, zoo_path)
    assert code == 0, out
    zoo = load_zoo(zoo_path)
    assert set(report) == {r.name for r in zoo.recipes} and {r["status"] for r in report.values()} == {"merged"}
    for recipe in zoo.recipes:
        alone = tmp_path / "alone" / recipe.name
        distmerge.merge(recipe.config, [f"output.path={alone}"])
        assert _weights(alone) == _weights(Path(recipe.config.output.path)), recipe.name
    assert "support-bot" in out and "merged" in out


def test_a_batch_reads_each_shared_adapters_headers_once(shelf, tmp_path, capsys, monkeypatch):
    """Recipes share adapters (support-bot and the four sweep points all merge sql and chat): an up-to-date
    rerun opens each adapter file once, and a file changed since is read again."""
    from distmerge.adapters import adapter as adapter_module
    from distmerge.config.schema import AdapterSpec
    from distmerge.sources import Opened

    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    assert _batch(capsys, zoo_path)[0] == 0
    reads: list[str] = []
    real = adapter_module.read_header
    monkeypatch.setattr(adapter_module, "read_header", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    code, out, report = _batch(capsys, zoo_path)
    assert code == 0 and {r["status"] for r in report.values()} == {"up to date"}, out
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 7  # 5 adapters, the 2 outputs mix merges

    reads.clear()
    opened = Opened()
    sql = str(shelf / "sql" / "adapter_model.safetensors")
    a = opened.open(AdapterSpec(str(shelf / "sql"), 0.5, "first"), 0, None)
    b = opened.open(AdapterSpec(str(shelf / "sql"), -1.0), 3, None)
    assert len(reads) == 1 and (a.name, a.weight, a.index) == ("first", 0.5, 0) and (b.name, b.weight, b.index) == (
        "sql", -1.0, 3) and a.modules == b.modules
    os.utime(sql, ns=(1, 1))  # the same bytes, a new mtime: not the file that was read, so it is read again
    opened.open(AdapterSpec(str(shelf / "sql")), 0, None)
    assert reads == [sql, sql]


def test_up_to_date_reads_no_tensor_and_hashes_nothing(shelf, tmp_path, capsys, monkeypatch):
    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    code, _, first = _batch(capsys, zoo_path)
    assert code == 0
    before = {r.name: _weights(Path(r.config.output.path)) for r in load_zoo(zoo_path).recipes}

    def no_tensors(*a, **k):
        raise AssertionError("an up-to-date batch read a tensor")
    monkeypatch.setattr(TensorReader, "read_into", no_tensors)
    monkeypatch.setattr("distmerge.batch.make_executor", no_tensors)  # nothing stale: no pool (no ray.init)
    code, out, report = _batch(capsys, zoo_path)
    assert code == 0 and {r["status"] for r in report.values()} == {"up to date"}, out
    assert json.loads((tmp_path / "zoo" / "batch_report.json").read_text())["inputs_hashed"] == 0
    # an up-to-date row says what the output is, from its manifest: the method, rank and size it was merged with
    keep = ("method", "rank", "bytes")
    assert {n: [r[k] for k in keep] for n, r in report.items()} == {n: [r[k] for k in keep] for n, r in first.items()}
    assert all(r["method"] and r["rank"] > 0 and r["bytes"] > 0 for r in report.values()), report
    monkeypatch.undo()

    # the same bytes with a new mtime: hashed again, not merged again
    os.utime(shelf / "chat" / "adapter_model.safetensors", ns=(1, 1))
    code, out, report = _batch(capsys, zoo_path)
    assert {n for n, r in report.items() if r["status"] != "up to date"} == set(), out
    assert json.loads((tmp_path / "zoo" / "batch_report.json").read_text())["inputs_hashed"] == 1

    # new bytes in chat: exactly support-bot and the mix that merges it run again
    t = load_file(str(shelf / "chat" / "adapter_model.safetensors"))
    next(iter(t.values())).mul_(1.5)
    save_file(t, str(shelf / "chat" / "adapter_model.safetensors"))
    code, out, report = _batch(capsys, zoo_path, "--plan")
    assert "input 'chat': adapter_model.safetensors changed" in out and "after support-bot" in out
    code, out, report = _batch(capsys, zoo_path)
    assert {n for n, r in report.items() if r["status"] == "merged"} == {"support-bot", "mix"}, out
    assert "input 'chat': adapter_model.safetensors changed" in report["support-bot"]["reason"]
    after = {r.name: _weights(Path(r.config.output.path)) for r in load_zoo(zoo_path).recipes}
    assert {n for n in after if after[n] != before[n]} == {"support-bot", "mix"}

    # the same adapter, moved: its recipes' cards and manifests would name the old path, so they run again
    shutil.move(str(shelf / "sql"), str(shelf / "sql-moved"))
    doc = zoo_doc(shelf, tmp_path / "zoo")
    for r in doc["recipes"]:
        for a in r["adapters"] if isinstance(r["adapters"], list) else []:
            if a.get("path") == str(shelf / "sql"):
                a.update(path=str(shelf / "sql-moved"), name="sql")
    _write(tmp_path, doc)
    code, out, report = _batch(capsys, zoo_path)
    assert code == 0, out
    # (mix merges support-bot's weights, which are the same bytes: it stays up to date)
    assert {n for n, r in report.items() if r["status"] == "merged"} == {"support-bot"} | {
        n for n in report if n.startswith("sweep/")}, out
    assert "now comes from" in report["support-bot"]["reason"]
    shutil.move(str(shelf / "sql-moved"), str(shelf / "sql"))
    _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    assert _batch(capsys, zoo_path)[0] == 0

    # a changed recipe key re-merges the recipes it applies to, and says which key
    code, out, report = _batch(capsys, zoo_path, "--only", "all-code", "defaults.merge.seed=4")
    assert set(report) == {"all-code"} and report["all-code"]["status"] == "merged"
    assert "merge.seed 3 → 4" in report["all-code"]["reason"]


def test_a_bad_recipe_fails_alone_and_blocks_its_dependents(shelf, tmp_path, capsys):
    t = load_file(str(shelf / "code-b" / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(shelf / "code-b" / "adapter_model.safetensors"))
    code, out, report = _batch(capsys, _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo")))
    assert code == 2
    assert report["all-code"]["status"] == "failed" and "NaN/Inf" in report["all-code"]["reason"]
    assert report["mix"]["status"] == "blocked" and "all-code" in report["mix"]["reason"]
    assert {n for n, r in report.items() if r["status"] == "merged"} == {"support-bot"} | {
        n for n in report if n.startswith("sweep/")}
    assert not (tmp_path / "zoo" / "all-code").exists() and not (tmp_path / "zoo" / "mix").exists()
    assert not [p for p in (tmp_path / "zoo").rglob("*") if ".distmerge-" in p.name and not p.name.endswith(".lock")]


def test_a_second_batch_on_the_same_root_refuses(shelf, tmp_path, capsys):
    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    (tmp_path / "zoo").mkdir()
    from distmerge.output.owner import BatchLock

    with BatchLock(str(tmp_path / "zoo"), str(zoo_path)):  # a batch of this process holds it
        assert main(["batch", str(zoo_path)]) == 2
        err = capsys.readouterr().err
        assert f"another distmerge batch (pid {os.getpid()}" in err and "Traceback" not in err
    assert main(["batch", str(zoo_path)]) == 0  # released on exit


def test_a_killed_batchs_lock_never_blocks_the_next(shelf, tmp_path, capsys):
    """The lock is the kernel's: a holder killed with SIGKILL releases it, even one whose host is not this
    one (its lock file says 'another-host', as a nightly RayJob's driver on a fresh node would)."""
    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    (tmp_path / "zoo").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from distmerge.output.owner import BatchLock\n"
        f"lock = BatchLock({str(tmp_path / 'zoo')!r}, 'z').__enter__()\n"
        "import os; os.ftruncate(lock._fd, 0)\n"
        "os.pwrite(lock._fd, b'{\"host\": \"another-host\", \"pid\": 1, \"zoo\": \"z\"}', 0)\n"
        "print('held', flush=True); time.sleep(600)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["batch", str(zoo_path)]) == 2
        assert "another distmerge batch (pid 1 on another-host" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert main(["batch", str(zoo_path)]) == 0


@pytest.mark.slow
def test_killed_batch_is_resumed_by_running_it_again(tmp_path):
    from distmerge.demo import write_llama_adapter

    shelf = tmp_path / "shelf"
    for i in range(4):
        write_llama_adapter(str(shelf / f"a{i}"), layers=4, hidden=384, intermediate=768, rank=16, alpha=16, seed=i)
    doc = {"defaults": {"merge": {"method": "ties_svd", "density": 0.5},
                        "runtime": {"executor": "local", "progress": False}},
           "output_root": str(tmp_path / "zoo"),
           "recipes": [{"name": f"r{k}", "adapters": [{"path": str(shelf / f"a{k}")},
                                                      {"path": str(shelf / f"a{(k + 1) % 4}")}]}
                       for k in range(4)]}
    zoo_path = _write(tmp_path, doc)
    cmd = [sys.executable, "-m", "distmerge", "-q", "batch", str(zoo_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "zoo" / "r1").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = sorted(p.name for p in (tmp_path / "zoo").iterdir() if p.name.startswith("r"))
    assert 0 < len(done) < 4, done  # killed part way
    for name in done:  # complete or absent: what is there loads
        assert load_file(str(tmp_path / "zoo" / name / "adapter_model.safetensors"))
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = {r["recipe"]: r["status"] for r in
              json.loads((tmp_path / "zoo" / "batch_report.json").read_text())["recipes"]}
    assert {n for n, s in report.items() if s == "up to date"} == set(done)
    assert not [p for p in (tmp_path / "zoo").iterdir() if ".distmerge-" in p.name and not p.name.endswith(".lock")]
    for k in range(4):
        alone = tmp_path / "alone" / f"r{k}"
        distmerge.merge(load_zoo(zoo_path).get(f"r{k}").config, [f"output.path={alone}"])
        assert _weights(alone) == _weights(tmp_path / "zoo" / f"r{k}")


def test_an_output_edited_in_place_is_not_up_to_date_and_not_replaced(shelf, tmp_path, capsys):
    """Same size, new bytes: the size-and-mtime check sees it without reading, and the hash check before any
    replacement refuses to overwrite what the user changed."""
    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    assert _batch(capsys, zoo_path)[0] == 0
    weights = tmp_path / "zoo" / "support-bot" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    edited = weights.read_bytes()
    code, out, report = _batch(capsys, zoo_path)
    assert code == 2 and report["support-bot"]["status"] == "failed", out
    assert "changed since distmerge wrote it" in report["support-bot"]["reason"]
    assert weights.read_bytes() == edited
    assert report["all-code"]["status"] == "up to date"


def test_an_adapter_replaced_with_its_old_size_and_mtime_is_still_seen(shelf, tmp_path, capsys):
    """`cp -p` / `rsync -a` of a retrained adapter keeps size and mtime: the cached hash must not be trusted."""
    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    assert _batch(capsys, zoo_path)[0] == 0
    target = shelf / "chat" / "adapter_model.safetensors"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x80  # the last float's sign: a retrained adapter of the same shapes and size
    (shelf / "chat" / "new").write_bytes(bytes(data))
    os.utime(shelf / "chat" / "new", ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -a keep it
    os.replace(shelf / "chat" / "new", target)
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    code, out, report = _batch(capsys, zoo_path)
    assert report["support-bot"]["status"] == "merged", out  # (mix follows only if support-bot's bytes changed)
    assert "input 'chat': adapter_model.safetensors changed" in report["support-bot"]["reason"]


def test_grid_recipes_can_be_named_on_the_command_line(shelf, tmp_path, capsys):
    zoo_path = _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo"))
    grid = "sweep/method=dare_ties,density=0.3"
    code, out, report = _batch(capsys, zoo_path, "--only", grid, "--only", "support-bot,all-code")
    assert code == 0 and set(report) == {grid, "support-bot", "all-code"}, out
    code, out, report = _batch(capsys, zoo_path, "--only", grid, "--force", grid)
    assert report[grid]["status"] == "merged" and report[grid]["reason"] == "forced"
    code, out, report = _batch(capsys, zoo_path, "--only", "support-bot", "--force", "defaults.merge.seed=9")
    assert report["support-bot"]["status"] == "merged" and "merge.seed" not in report["support-bot"]["reason"]


def test_a_shard_that_crashes_fails_its_recipe_alone(shelf, tmp_path, capsys, monkeypatch):
    """Not a data error: a worker out of memory (or a bug) in one recipe's shard. The batch goes on."""
    import distmerge.executors.local as local

    real = local.merge_shard

    def crash(task, memory):
        if task.job == "all-code":
            raise MemoryError("cannot allocate 64 GiB")
        return real(task, memory)
    monkeypatch.setattr(local, "merge_shard", crash)
    code, out, report = _batch(capsys, _write(tmp_path, zoo_doc(shelf, tmp_path / "zoo")))
    assert code == 2
    assert report["all-code"]["status"] == "failed" and "MemoryError" in report["all-code"]["reason"]
    assert report["mix"]["status"] == "blocked" and report["support-bot"]["status"] == "merged"
