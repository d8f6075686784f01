"""The Ray executor on a real local Ray (one per session), real clusters in subprocesses, and a real
`ray start --head` + `ray job submit` through launch/submit.sh."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.config.schema import RuntimeSpec
from distmerge.errors import ExecutorError, MergeError
from distmerge.executors.ray import RayExecutor, _check_access, _host_port, worker_room, worker_shape
from tests.conftest import BASES, merge_config
from tests.peft_oracle import load_merged, rel_err

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def _ray(workers: int, **extra) -> dict:
    return {"executor": "ray", "num_workers": workers, "cpus_per_worker": 0.5, "progress": False, **extra}


@pytest.mark.parametrize("method", ["ties", "svd", "dare_ties", "core_dare_ties"])
def test_ray_matches_local_bytes(adapter_sets, tmp_path, ray_session, method):
    aset = adapter_sets("different_targets")
    kw = {"density": 0.5, "seed": 4}
    distmerge.merge(merge_config(aset, tmp_path / "local", method, **kw))
    for n in (1, 3):
        r = distmerge.merge(merge_config(aset, tmp_path / f"ray{n}", method, runtime=_ray(n), **kw))
        assert r.manifest["executor"] == "ray"
        assert len({s["worker"]["pid"] for s in r.manifest["shards"]}) == n
        assert _sha(tmp_path / f"ray{n}") == _sha(tmp_path / "local")


def test_killed_worker_costs_time_not_correctness(adapter_sets, tmp_path, ray_session, monkeypatch):
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "ties_svd", density=0.5))
    flag = tmp_path / "crashed"
    monkeypatch.setenv("DISTMERGE_TEST_CRASH_ONCE", str(flag))
    distmerge.merge(merge_config(aset, tmp_path / "ray", "ties_svd", density=0.5, runtime=_ray(2)))
    assert flag.exists(), "no worker was killed"
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")


def test_hung_worker_is_timed_out(adapter_sets, tmp_path, ray_session, monkeypatch):
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "linear"))
    flag = tmp_path / "hung"
    monkeypatch.setenv("DISTMERGE_TEST_HANG_ONCE", str(flag))
    distmerge.merge(merge_config(aset, tmp_path / "ray", "linear", runtime=_ray(2, task_timeout_s=3)))
    assert flag.exists()
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")


def test_slow_worker_start_is_not_timed_as_the_shard(adapter_sets, tmp_path, ray_session, monkeypatch):
    """A hung shard's replacement worker takes longer to start than task_timeout_s; the retry is timed
    from when that worker is ready, so one hang costs one retry (the old code spent a second one)."""
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "linear"))
    flag = tmp_path / "hung"
    monkeypatch.setenv("DISTMERGE_TEST_HANG_ONCE", str(flag))
    monkeypatch.setenv("DISTMERGE_TEST_SLOW_START_S", f"4:{flag}")  # the workers started after the hang
    distmerge.merge(merge_config(aset, tmp_path / "ray", "linear",
                                 runtime=_ray(1, task_timeout_s=3, max_retries=1)))
    assert flag.exists()
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")


def test_a_replacement_that_never_starts_is_not_waited_for(adapter_sets, tmp_path, ray_session, monkeypatch):
    """A hung shard's replacement never becomes ready: the other worker finishes the merge without it;
    alone, it is given up past the start bound and the merge fails clearly instead of waiting."""
    import distmerge.executors.ray as ray_executor

    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "linear"))
    monkeypatch.setattr(ray_executor, "RESTART_S", 3.0)  # the first workers start within the full START_S
    for workers in (2, 1):
        flag = tmp_path / f"hung{workers}"
        monkeypatch.setenv("DISTMERGE_TEST_HANG_ONCE", str(flag))
        monkeypatch.setenv("DISTMERGE_TEST_SLOW_START_S", f"600:{flag}")
        out = tmp_path / f"ray{workers}"
        t0 = time.monotonic()
        if workers == 2:
            r = distmerge.merge(merge_config(aset, out, "linear", runtime=_ray(2, task_timeout_s=2)))
            assert _sha(out) == _sha(tmp_path / "local")
            assert len({s["worker"]["pid"] for s in r.manifest["shards"]}) == 1
        else:
            with pytest.raises(ExecutorError, match=r"shards left and no Ray worker to run them.*not ready 3s"):
                distmerge.merge(merge_config(aset, out, "linear", runtime=_ray(1, task_timeout_s=2)))
            assert not out.exists() and not list(tmp_path.glob(f".{out.name}.distmerge-*"))
        assert flag.exists() and time.monotonic() - t0 < 30


def test_more_workers_than_room_merge_on_those_that_start(adapter_sets, tmp_path, ray_session, caplog):
    """3 workers of 1 CPU asked of a 2-CPU Ray: the merge runs on the 2 that start, without waiting
    out a start timeout, and the bytes are the local executor's."""
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "ties", density=0.5))
    t0 = time.monotonic()
    r = distmerge.merge(merge_config(aset, tmp_path / "ray", "ties", density=0.5,
                                     runtime=_ray(3, cpus_per_worker=1)))
    seconds = time.monotonic() - t0
    assert len({s["worker"]["pid"] for s in r.manifest["shards"]}) == 2
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")
    assert "3 workers asked for, 2 started (the cluster has room for 2 of 1 CPU and " in caplog.text
    assert seconds < 30, seconds


def test_a_worker_no_node_can_hold_fails_at_once(adapter_sets, tmp_path, ray_session):
    aset = adapter_sets("llama")
    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match=r"no node of the Ray cluster can hold one worker of 4 CPU.*ray status"):
        distmerge.merge(merge_config(aset, tmp_path / "out", "linear", runtime=_ray(1, cpus_per_worker=4)))
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.distmerge-*"))


def test_stopping_the_workers_is_bounded_when_ray_hangs(monkeypatch, caplog):
    """An unhealthy Ray (a hung GCS) blocks ray.kill and ray.shutdown for minutes; __exit__ gives up
    after STOP_S so that the driver still reaches its own cleanup."""
    import ray

    import distmerge.executors.ray as ray_executor

    release = __import__("threading").Event()
    monkeypatch.setattr(ray, "kill", lambda *a, **k: release.wait(60))
    monkeypatch.setattr(ray_executor, "STOP_S", 0.5)
    executor = RayExecutor(RuntimeSpec(executor="ray"))
    executor._workers = [object(), None]
    t0 = time.monotonic()
    try:
        executor.__exit__(None, None, None)
        assert time.monotonic() - t0 < 3
        assert "did not finish within 0.5s" in caplog.text and executor._workers == []
    finally:
        release.set()


def test_data_error_on_a_worker_fails_cleanly(adapter_sets, tmp_path, ray_session):
    aset = adapter_sets("llama")
    bad = tmp_path / "bad"
    shutil.copytree(aset.paths[1], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "v_proj.lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    broken = type(aset)(aset.base, [aset.paths[0], bad], [0.5, 0.5])
    with pytest.raises(MergeError, match=rf"adapter 'bad': tensor '{key}'.*NaN/Inf"):
        distmerge.merge(merge_config(broken, tmp_path / "out", "ties", density=0.5, runtime=_ray(2)))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.distmerge-*"))


def test_worker_shape_never_asks_for_missing_gpus():
    cpu = RuntimeSpec()
    assert worker_shape({"CPU": 16.0}, cpu) == (4, 0.0)
    assert worker_shape({"CPU": 2.0}, cpu) == (2, 0.0)
    assert worker_shape({"CPU": 64.0, "GPU": 8.0}, cpu) == (8, 1.0)
    assert worker_shape({"CPU": 64.0, "GPU": 8.0}, RuntimeSpec(gpus_per_worker=0)) == (4, 0.0)
    assert worker_shape({"CPU": 64.0, "GPU": 8.0}, RuntimeSpec(num_workers=3)) == (3, 1.0)
    with pytest.raises(ExecutorError, match="has 0 GPUs.*gpus_per_worker=0"):
        worker_shape({"CPU": 8.0}, RuntimeSpec(gpus_per_worker=1))


def test_worker_room_counts_node_by_node():
    nodes = [{"Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 1.5}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    assert worker_room(nodes, 1, 0) == 4  # 3 + 1: a worker cannot straddle two nodes' half CPUs
    assert worker_room(nodes, 0.5, 0) == 9
    assert worker_room(nodes, 1, 1) == 1
    assert worker_room(nodes, 4, 0) == 0


def test_cluster_addresses_that_are_probed():
    assert _host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert _host_port("ray://head:10001") == ("head", 10001)
    assert _host_port("[::1]:6379") == ("::1", 6379)
    for address in ("auto", "local", "http://head:8265", "head", "head:port"):
        assert _host_port(address) is None, address


def test_preflight_names_the_node_and_the_path(tmp_path):
    (tmp_path / "stage" / "_parts").mkdir(parents=True)
    assert _check_access([], str(tmp_path / "stage")) is None
    problem = _check_access([str(tmp_path / "missing.safetensors")], str(tmp_path / "stage"))
    assert "cannot read input" in problem and "missing.safetensors" in problem and "node" in problem
    problem = _check_access([str(tmp_path / "hub" / "models--org--name" / "blobs" / "abc")], str(tmp_path / "stage"))
    assert "runtime.hub_cache" in problem and "shared storage" in problem
    problem = _check_access([], str(tmp_path / "elsewhere"))
    assert "cannot write the output's staging directory" in problem and "node-local" in problem


@pytest.fixture
def ray_tmp():
    """Ray's temp dir for a test's own cluster: short, since Ray's socket paths must fit in 107 bytes."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dmray", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _scenario(name: str, cfg: dict, tmp_path: Path, ray_tmp: Path) -> dict:
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "tests.ray_scenarios", name, str(tmp_path / f"{name}.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_multinode_cluster(adapter_sets, tmp_path, ray_tmp):
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "svd"))
    cfg = merge_config(aset, tmp_path / "ray", "svd", runtime={"progress": False})
    manifest = _scenario("multinode", cfg, tmp_path, ray_tmp)
    nodes = {s["worker"]["node"] for s in manifest["shards"]}
    assert len(nodes) == 2, nodes
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")


def test_fake_gpus_are_requested_only_when_present(adapter_sets, tmp_path, ray_tmp):
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "ties", density=0.5))
    manifest = _scenario("fake_gpus", merge_config(aset, tmp_path / "ray", "ties", density=0.5,
                                                   runtime={"progress": False}), tmp_path, ray_tmp)
    # 2 fake GPUs: one worker per GPU; torch sees no CUDA there, so each worker falls back to the CPU
    assert len({s["worker"]["pid"] for s in manifest["shards"]}) == 2
    assert {s["worker"]["device"] for s in manifest["shards"]} == {"cpu"}
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_head(temp_dir: Path) -> None:
    """Stop only the head this test started (every process of it names its temp dir); `ray stop` would
    stop every Ray on the machine, this session's included."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


def test_ray_job_submit_end_to_end(adapter_sets, tmp_path, ray_tmp):
    """A real head on 127.0.0.1, a merge submitted through launch/submit.sh; the output loads in PEFT."""
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "local", "dare_ties", density=0.5, seed=2))
    cfg_path = tmp_path / "submit.yaml"
    cfg_path.write_text(json.dumps(merge_config(aset, tmp_path / "ray", "dare_ties", density=0.5, seed=2,
                                                runtime={"progress": False, "num_workers": 2,
                                                         "cpus_per_worker": 0.5})))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    dash, agent, metrics, client = _free_ports(4)  # the session's Ray holds the default agent ports
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", "--port=0", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
             f"--ray-client-server-port={client}",
             f"--temp-dir={ray_tmp}", "--disable-usage-stats"]
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        for _ in range(10):  # a fresh head's job agent can take a few seconds to come up
            sub = subprocess.run(["bash", str(ROOT / "launch" / "submit.sh"), f"http://127.0.0.1:{dash}",
                                  str(cfg_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in sub.stdout + sub.stderr:
                break
            time.sleep(3)
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-4000:]
        assert "merged 2 adapters" in sub.stdout or "merged 3 adapters" in sub.stdout, sub.stdout[-2000:]
    finally:
        _stop_head(ray_tmp)
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")
    ours, _ = load_merged(BASES[aset.base], tmp_path / "ray")
    theirs, _ = load_merged(BASES[aset.base], tmp_path / "local")
    assert all(rel_err(ours[k], theirs[k]) == 0 for k in theirs)


def _cli_merge(cfg: dict, overrides: list[str], tmp_path: Path, ray_tmp: Path) -> tuple[int, str, float]:
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "distmerge", "merge", str(tmp_path / "cfg.yaml"), *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stderr, time.monotonic() - t0


def test_unreachable_address_fails_within_the_bound(adapter_sets, tmp_path, ray_tmp):
    """A closed port is refused by the TCP probe; a port that answers but is no Ray (a listener that never
    speaks) leaves ray.init retrying forever, so ray.init itself is bounded. Loopback only."""
    aset = adapter_sets("llama")
    cfg = merge_config(aset, tmp_path / "out", "linear", runtime={"progress": False})
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # never accepts: the kernel completes the handshake, nothing answers
    try:
        for port, why in ((closed_port, f"TCP connect to 127.0.0.1:{closed_port}: Connection refused"),
                          (silent.getsockname()[1], "the port answers, but ray.init did not return")):
            rc, err, seconds = _cli_merge(cfg, ["runtime.executor=ray", f"runtime.address=127.0.0.1:{port}",
                                                "runtime.connect_timeout_s=2"], tmp_path, ray_tmp)
            assert rc == 2, err[-3000:]
            assert f"cannot reach the Ray cluster at 127.0.0.1:{port} within 2s ({why}" in err, err[-3000:]
            assert "raise runtime.connect_timeout_s" in err
            assert seconds < 30, seconds  # 2 s of trying, the rest is the CLI's start (torch import)
    finally:
        silent.close()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.distmerge-*"))


def test_sigterm_while_merging_removes_the_staging(adapter_sets, tmp_path, ray_tmp):
    """A driver with a SIGTERM→exception handler (as the CLI installs) is terminated while it waits on a
    hung worker: the handler survives ray.init, the exception reaches the driver, the staging directory
    goes, the hung worker is killed and the Ray the merge started is shut down."""
    aset = adapter_sets("llama")
    cfg = merge_config(aset, tmp_path / "out", "linear", runtime=_ray(1))
    cfg["hang_flag"] = str(tmp_path / "hung")
    report = _scenario("sigterm", cfg, tmp_path, ray_tmp)
    assert report["raised"] == "Terminated" and report["handler_kept"], report
    assert report["hung_worker_alive"] is False and report["ray_initialized"] is False, report
    assert report["seconds_to_stop"] < 30, report
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.distmerge-*"))


# --- a zoo batch on one pool ------------------------------------------------------------------------------------


def _zoo_outputs(zoo_path: Path) -> dict[str, dict[str, str]]:
    from distmerge.config.zoo import load_zoo

    # the adapter's own files: the manifest records times, and the card the runtime (cpus_per_worker 0.5 on
    # this Ray, 1 locally: the same torch threads, so the same weights)
    return {r.name: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in Path(r.config.output.path).iterdir() if p.name not in ("distmerge.json", "README.md")}
            for r in load_zoo(zoo_path).recipes if Path(r.config.output.path).exists()}


@pytest.mark.parametrize("workers", [1, 3])
def test_batch_on_one_ray_pool_matches_local(shelf, tmp_path, ray_session, workers):
    from distmerge.batch import run_batch
    from distmerge.config.zoo import load_zoo
    from tests.test_batch import zoo_doc

    paths = {}
    for kind, runtime in (("local", None), ("ray", _ray(workers))):
        paths[kind] = tmp_path / f"{kind}.yaml"
        paths[kind].write_text(json.dumps(zoo_doc(shelf, tmp_path / kind, runtime)))
        result = run_batch(load_zoo(paths[kind]))
        assert result.ok, [(o.recipe, o.reason) for o in result.outcomes]
    assert _zoo_outputs(paths["ray"]) == _zoo_outputs(paths["local"])
    pids = set()
    for r in load_zoo(paths["ray"]).recipes:
        manifest = json.loads((Path(r.config.output.path) / "distmerge.json").read_text())
        assert manifest["executor"] == "ray"
        pids |= {s["worker"]["pid"] for s in manifest["shards"]}
    assert len(pids) == workers  # one set of actors served every recipe


def test_batch_on_ray_survives_a_killed_worker_and_isolates_a_bad_recipe(shelf, tmp_path, ray_session, monkeypatch):
    from distmerge.batch import run_batch
    from distmerge.config.zoo import load_zoo
    from tests.test_batch import zoo_doc

    local = tmp_path / "local.yaml"
    local.write_text(json.dumps(zoo_doc(shelf, tmp_path / "local")))
    assert run_batch(load_zoo(local)).ok
    t = load_file(str(shelf / "code-b" / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(shelf / "code-b" / "adapter_model.safetensors"))
    flag = tmp_path / "crashed"
    monkeypatch.setenv("DISTMERGE_TEST_CRASH_ONCE", str(flag))
    zoo = tmp_path / "ray.yaml"
    zoo.write_text(json.dumps(zoo_doc(shelf, tmp_path / "ray", _ray(2))))
    result = run_batch(load_zoo(zoo))
    status = {o.recipe: o.status for o in result.outcomes}
    assert flag.exists(), "no worker was killed"
    assert status.pop("all-code") == "failed" and status.pop("mix") == "blocked"
    assert set(status.values()) == {"merged"}
    ours, theirs = _zoo_outputs(zoo), _zoo_outputs(local)
    assert set(ours) == set(status) and all(ours[n] == theirs[n] for n in ours)


def test_a_worker_placed_late_joins_the_running_merge(tmp_path, ray_session, monkeypatch):
    """The pool is elastic: a worker Ray cannot place at first (its CPU is taken) joins the merge once
    the CPU frees up, instead of being given up; the bytes are the local executor's."""
    import threading

    import ray

    import distmerge.executors.ray as ray_executor
    from distmerge.demo import write_llama_adapter

    monkeypatch.setattr(ray_executor, "GRACE_S", 0.5)  # start on the one worker that fits, without waiting

    paths = [write_llama_adapter(str(tmp_path / f"a{i}"), layers=8, hidden=512, intermediate=1024, rank=16,
                                 alpha=16, seed=i) for i in range(3)]
    cfg = {"adapters": [{"path": p} for p in paths], "merge": {"method": "ties_svd", "density": 0.5},
           "output": {"path": str(tmp_path / "local"), "shard_size": "1"},
           "runtime": {"executor": "local", "progress": False}}
    distmerge.merge(cfg)

    @ray.remote(num_cpus=1)
    class Blocker:
        def ping(self):
            return True

    blocker = Blocker.remote()
    ray.get(blocker.ping.remote())  # one of the session's 2 CPUs is taken: only one worker fits
    threading.Timer(3.0, lambda: ray.kill(blocker)).start()
    r = distmerge.merge(cfg, [f"output.path={tmp_path / 'ray'}", "runtime.executor=ray", "runtime.num_workers=2",
                              "runtime.cpus_per_worker=1"])
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")
    assert len({s["worker"]["pid"] for s in r.manifest["shards"]}) == 2, "the late worker never joined"
