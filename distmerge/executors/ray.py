"""Run shard tasks on a pool of long-lived Ray actors.

Workers are thin: each wraps merge_shard, loads only its shard's tensors from shared storage, writes
its part file into the staging directory and returns metadata. The driver keeps one task in flight
per worker and hands the next shard to whichever finishes first (ray.wait). A worker that dies or
hangs is replaced and its shard runs again; part writes are atomic, so a retry is idempotent. A
shard that fails for a data reason fails the merge with the adapter and tensor named.

Every wait is bounded: reaching `runtime.address` (connect_timeout_s), workers starting (START_S),
a shard on a ready worker (task_timeout_s), stopping the workers and Ray (STOP_S).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Sequence

from distmerge.config.schema import RuntimeSpec
from distmerge.errors import DistmergeError, ExecutorError
from distmerge.executors.base import Feed, stalled
from distmerge.planner import ShardTask
from distmerge.shard import ShardResult, WorkerMemory, merge_shard

log = logging.getLogger("distmerge")
TEST_ENV_PREFIX = "DISTMERGE_TEST_"  # fault-injection hooks, forwarded to workers for the test suite
POLL_S = 1.0  # the longest the driver sits in ray.wait: a signal's exception is raised within this
START_S = 60.0  # a worker not ready this long after it was asked for (and no gpu_wait_s) never will be
RESTART_S = START_S  # the same, for a worker that replaces one that died or hung mid-merge
GRACE_S = 30.0  # once one worker is ready, how long the merge waits for the others the cluster has room for
STOP_S = 30.0  # killing the workers and shutting down a Ray we started; past this Ray is presumed hung
WORKER_BASE_BYTES = 768 * 2**20  # a Ray worker's own Python, torch and Ray client, measured ~0.5 GiB, and slack


def worker_shape(resources: dict, runtime: RuntimeSpec, available: dict | None = None) -> tuple[int, float]:
    """(number of workers, GPUs per worker) for a cluster's resources; never asks for GPUs it lacks.

    CPU workers are counted from the CPUs `available` now when given: a driver submitted with
    --entrypoint-num-cpus holds one, and asking for a worker that cannot start only costs a wait.
    """
    gpus = float(resources.get("GPU", 0))
    cpus = float((available if available is not None else resources).get("CPU", 1))
    per_gpu = runtime.gpus_per_worker if runtime.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    if per_gpu > 0 and gpus < per_gpu:
        raise ExecutorError(
            f"runtime.gpus_per_worker={per_gpu:g} but the Ray cluster has {gpus:g} GPUs; an actor asking for a GPU "
            f"that does not exist would wait forever. Set runtime.gpus_per_worker=0 for CPU workers, or "
            f"runtime.gpu_wait_s to wait for autoscaled GPU nodes")
    if runtime.num_workers:
        n = runtime.num_workers
    elif per_gpu > 0:
        n = max(1, int(gpus // per_gpu))
    else:
        n = max(1, min(4, int(cpus // runtime.cpus_per_worker)))
    return n, per_gpu


def _check_access(files: Sequence[str], staging: str) -> str | None:
    """None if this process can read every input and write the staging directory, else what failed."""
    where = f"node {socket.gethostname()} ({_node_ip()})"
    for f in files:
        try:
            with open(f, "rb") as h:
                h.read(8)
        except OSError as e:
            hub = ("; hf:// inputs are downloaded by the driver into runtime.hub_cache (default: the Hugging Face "
                   "cache), which must then be a directory on shared storage" if "/models--" in f else "")
            return f"{where} cannot read input {f}: {e.strerror or e}; inputs must be on storage every node sees{hub}"
    probe = os.path.join(staging, "_parts", f".probe-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(probe, "wb") as h:
            h.write(b"ok")
        os.remove(probe)
    except OSError as e:
        return (f"{where} cannot write the output's staging directory {staging}: {e.strerror or e}; output.path "
                f"must be on storage every node sees (not a node-local disk)")
    return None


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "?"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for `auto`, `local` and the like."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in rest:
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _unreachable(address: str, timeout: float, why: str) -> ExecutorError:
    return ExecutorError(f"cannot reach the Ray cluster at {address} within {timeout:g}s ({why}): check that "
                         f"`ray start --head` runs there and the port is open, or raise runtime.connect_timeout_s")


def _probe(address: str, timeout: float) -> None:
    """A TCP connect to the address's port: a refused or unroutable port fails here, not in ray.init's retries."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = "connection timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e) or type(e).__name__)
        raise _unreachable(address, timeout, f"TCP connect to {host}:{port}: {why}") from None


class _SigtermNote(logging.Filter):
    """Drops ray.init's note that it set no SIGTERM handler off the main thread: distmerge wants none set."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler" not in record.getMessage()


def _init_ray(address: str | None, timeout: float) -> None:
    """ray.init, keeping the caller's SIGTERM handler (ray.init replaces it with sys.exit); for a
    `host:port` address, bounded by `timeout` in all: a TCP probe, then ray.init in a daemon thread."""
    import ray

    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address is None or _host_port(address) is None:
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGTERM) if main else None
        ray.init(address=address or "local", **kwargs)
        if main and before not in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, before)  # a handler the caller installed (the CLI's) stays theirs
        return
    deadline = time.monotonic() + timeout
    _probe(address, timeout)
    lock, done, abandoned = threading.Lock(), threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
        except BaseException as e:  # handed to the driver thread, which raises it
            failure.append(e)
        with lock:
            done.set()
            late = abandoned.is_set()
        if late and not failure:
            ray.shutdown()  # connected after the driver gave up: leave no half-used connection behind

    note = _SigtermNote()
    worker_log = logging.getLogger("ray._private.worker")
    worker_log.addFilter(note)
    try:
        threading.Thread(target=connect, name="distmerge-ray-init", daemon=True).start()
        done.wait(max(0.0, deadline - time.monotonic()))
        with lock:
            if not done.is_set():
                abandoned.set()
    finally:
        worker_log.removeFilter(note)
    if abandoned.is_set():
        raise _unreachable(address, timeout, "the port answers, but ray.init did not return: is it a Ray head's "
                                             "port, of this Ray version?")
    if failure:
        e = failure[0]
        if not isinstance(e, Exception):
            raise e
        first = (str(e).strip().splitlines() or ["?"])[0]
        raise ExecutorError(f"cannot connect to the Ray cluster at {address} (runtime.address): "
                            f"{type(e).__name__}: {first}") from None


def _wait(refs: list, num_returns: int, timeout: float) -> tuple[list, list]:
    """ray.wait, raising what a signal handler raised while it waited (a SIGTERM handler's exception,
    say). Ray's C++ wait runs the handlers: it lets KeyboardInterrupt and SystemExit through (as new,
    plain ones), but any other exception comes out after the full timeout, as a SystemError caused by it."""
    import ray

    try:
        return ray.wait(refs, num_returns=num_returns, timeout=timeout)
    except SystemError as e:
        if e.__cause__ is None:
            raise
        raise e.__cause__.with_traceback(e.__cause__.__traceback__) from None


def _fault_hooks() -> None:
    """Test-only: die or hang once per flag file, so the suite can kill a worker mid-merge. The flag
    file holds the pid of the worker that took it."""
    for name, action in (("CRASH_ONCE", lambda: os._exit(1)), ("HANG_ONCE", lambda: time.sleep(10**6))):
        flag = os.environ.get(TEST_ENV_PREFIX + name)
        if flag:
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            action()


def _start_hooks() -> None:
    """Test-only: a worker that takes DISTMERGE_TEST_SLOW_START_S seconds to start (a busy node, a slow
    import); "SECONDS:PATH" slows only the workers started once PATH exists (the replacements of a hang)."""
    value = os.environ.get(TEST_ENV_PREFIX + "SLOW_START_S")
    if value:
        seconds, _, after = value.partition(":")
        if not after or os.path.exists(after):
            time.sleep(float(seconds))


def worker_room(nodes: Sequence[dict], cpus: float, gpus: float, memory: float = 0.0) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs the alive nodes (ray.nodes()) hold when nothing
    else runs: an actor lives on one node, so it is counted node by node."""
    room = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources") or {}
        fit = float(have.get("CPU", 0.0)) / cpus
        if gpus > 0:
            fit = min(fit, float(have.get("GPU", 0.0)) / gpus)
        if memory > 0:
            fit = min(fit, float(have.get("memory", 0.0)) / memory)
        room += int(fit + 1e-9)
    return room


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['?'])[0]}"


class MergeWorker:
    """The actor: a thin wrapper around merge_shard, keeping its memory from shard to shard."""

    def __init__(self) -> None:
        _start_hooks()
        self._memory = WorkerMemory()
        self._checked: set[str] = set()  # staging directories this worker has checked it can use

    def ping(self) -> tuple[str, str]:
        return socket.gethostname(), _node_ip()

    def run(self, task: ShardTask) -> ShardResult:
        _fault_hooks()
        if task.staging not in self._checked:  # once per job: a clear message naming this node, not a read error
            problem = _check_access(task.files, task.staging)
            if problem:
                raise ExecutorError(f"preflight failed: {problem}")
            self._checked.add(task.staging)
        result = merge_shard(task, self._memory)
        node = (("node", f"{_node_ip()}/{_node_id()}"),)
        return ShardResult(**{**result.__dict__, "worker": result.worker + node})


class RayExecutor:
    """The pool of actors. `worker` is the actor class (MergeWorker; distmerge evaluate's EvalWorker holds a
    base model), built with `worker_args`; it answers ping() and run(task). A task has `job` and `index`
    (and may have a `label` naming it in messages)."""

    name = "ray"
    in_process = False

    def __init__(self, runtime: RuntimeSpec, peak_bytes: int = 0, worker: type = MergeWorker,
                 worker_args: tuple = ()):
        self.runtime = runtime
        self._worker_cls, self._worker_args = worker, worker_args
        self._memory = WORKER_BASE_BYTES + peak_bytes  # Ray's `memory` resource: a reservation, not a limit
        self._owns_ray = False
        self._workers: list = []  # a slot's actor, or None once the slot is given up
        self._ready: list[int] = []  # slots whose worker answered its first ping
        self._joining: dict = {}  # ping ref → slot of workers asked for and not placed yet
        self.parallelism = 1  # the workers asked for (a ceiling); known after __enter__, before the driver shards
        self._gpus = 0.0

    def __enter__(self) -> "RayExecutor":
        import ray

        try:
            if not ray.is_initialized():
                _init_ray(self.runtime.address or os.environ.get("RAY_ADDRESS"), self.runtime.connect_timeout_s)
                self._owns_ray = True
            asked, self._gpus = self._wait_for_shape()
            env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
            self._actor = ray.remote(self._worker_cls).options(
                num_cpus=self.runtime.cpus_per_worker, num_gpus=self._gpus, memory=self._memory, max_restarts=0,
                runtime_env={"env_vars": env} if env else None)
            self._start(asked)
        except BaseException:  # an interrupt while workers start, too: __exit__ does not run when __enter__ fails
            self.__exit__(*sys.exc_info())
            raise
        log.info("ray: %d of %d workers ready (%s each) on %s%s", len(self._ready), self.parallelism, self._shape(),
                 ray.get_runtime_context().gcs_address,
                 "; the others join as Ray places them" if self._joining else "")
        return self

    def _shape(self) -> str:
        return (f"{self.runtime.cpus_per_worker:g} CPU" + (f", {self._gpus:g} GPU" if self._gpus else "")
                + f" and {self._memory / 2**30:.2f} GiB of memory")

    def _room(self) -> int | None:
        """Workers of this shape the cluster holds, or None when Ray cannot say."""
        import ray

        try:
            return worker_room(ray.nodes(), self.runtime.cpus_per_worker, self._gpus, self._memory)
        except Exception:
            return None

    def _wait_for_shape(self) -> tuple[int, float]:
        import ray

        deadline = time.monotonic() + self.runtime.gpu_wait_s
        while True:
            try:
                n, self._gpus = worker_shape(ray.cluster_resources(), self.runtime, ray.available_resources())
                if self._room() == 0:
                    raise ExecutorError(
                        f"no node of the Ray cluster can hold one worker of {self._shape()} "
                        f"(runtime.cpus_per_worker, runtime.gpus_per_worker; the memory is the plan's peak "
                        f"estimate, as `distmerge plan` prints it, plus the worker's own), so it would wait "
                        f"forever; lower them to fit a node (`ray status` lists them), merge fewer or smaller "
                        f"modules per worker, or set runtime.gpu_wait_s to wait for autoscaled nodes")
                return n, self._gpus
            except ExecutorError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))

    def _start(self, asked: int) -> None:
        """Ask for `asked` workers and return once those the cluster has room for are ready (the first
        within START_S, or gpu_wait_s for an autoscaler; the others GRACE_S after it at most): the merge
        starts on them, and the rest join as Ray places them (`run`). None ready in time is an error
        naming the shape asked for. `parallelism` is the ceiling, so the planner cuts enough shards for
        every worker that may join."""
        import ray
        from ray.exceptions import RayError

        # __exit__ kills them from now on
        self._workers = [self._actor.remote(*self._worker_args) for _ in range(asked)]
        pings = {w.ping.remote(): slot for slot, w in enumerate(self._workers)}
        self.parallelism = asked
        asked_at, first = time.monotonic(), 0.0
        deadline = asked_at + max(START_S, self.runtime.gpu_wait_s)
        errors: list[str] = []
        ready: list[int] = []
        while pings and time.monotonic() < deadline:
            if ready:  # wait on for the workers the cluster has room for now, GRACE_S at most; the rest join later
                room = self._room()
                if room is None or len(ready) >= min(asked, room):
                    break
                deadline = min(deadline, first + GRACE_S)
            done, _ = _wait(list(pings), 1, min(POLL_S, max(0.0, deadline - time.monotonic())))
            for ref in done:
                slot = pings.pop(ref)
                try:
                    ray.get(ref)
                except RayError as e:  # the actor died starting (runtime env, import, node lost)
                    if isinstance(getattr(e, "cause", None), DistmergeError):
                        raise e.cause from None  # its worker found the user's inputs wrong (an unloadable base model)
                    errors.append(_first_line(e))
                    ray.kill(self._workers[slot], no_restart=True)
                    self._workers[slot] = None
                else:
                    ready.append(slot)
                    first = first or time.monotonic()
        if not ready:
            room = self._room()
            why = errors[0] if errors and not pings else (
                f"none was ready {time.monotonic() - asked_at:.0f}s after it was asked for"
                + ("" if room is None else f"; the cluster has room for {room} when idle, so other jobs may hold it")
                + (f"; {errors[0]}" if errors else ""))
            raise ExecutorError(f"none of the {asked} Ray workers of {self._shape()} each started ({why}); "
                                f"check `ray status` for free CPUs/GPUs, or lower runtime.cpus_per_worker")
        self._ready = ready
        self._joining = pings  # ping ref → slot: workers Ray has not placed yet

    def _report_unplaced(self, never: int) -> None:
        """One line, when the run ends, about the workers Ray never placed."""
        asked = len(self._workers)
        started = asked - never
        room = self._room()
        why = (f"the cluster has room for {room} of {self._shape()} each" if room is not None and room <= started
               else "the others were never placed; see `ray status`")
        log.warning("%d workers asked for, %d started (%s); merged on %d", asked, started, why, started)

    def __exit__(self, *exc) -> None:
        """Kill the workers and shut down a Ray this executor started, within STOP_S: an unhealthy Ray
        (a hung GCS) blocks ray.shutdown for minutes, and the driver must still get to its cleanup."""
        workers = [w for w in self._workers if w is not None]
        owns = self._owns_ray
        self._workers, self._owns_ray = [], False
        if not workers and not owns:
            return

        def stop() -> None:
            import ray

            try:
                for w in workers:
                    ray.kill(w, no_restart=True)
                if owns:
                    ray.shutdown()
            except Exception as e:
                log.warning("ray: stopping the workers failed: %s", _first_line(e))

        stopper = threading.Thread(target=stop, name="distmerge-ray-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_S)
        if stopper.is_alive():
            log.warning("ray: stopping %d workers%s did not finish within %gs; Ray looks unhealthy, and its "
                        "processes may outlive this merge (`ray status`)", len(workers),
                        " and the Ray this merge started" if owns else "", STOP_S)

    def run(self, feed: Feed) -> None:
        """One task in flight per ready worker, each from the feed as a worker frees up; a shard is timed
        from when it is handed to a ready worker, so a replacement's start-up (seconds) never counts
        against runtime.task_timeout_s."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

        retry: deque[ShardTask] = deque()  # shards to run again after their worker died or hung
        attempts: dict[tuple[str, int], int] = {}
        inflight: dict = {}  # ref → (task, worker slot, when it was handed to the ready worker)
        # a worker's ping ref → (slot, when a replacement was asked for; None: a first worker, joining whenever
        # Ray places it, never given up)
        starting: dict = {ref: (slot, None) for ref, slot in self._joining.items()}
        self._joining = {}
        idle = deque(self._ready)
        lost: list[str] = []  # why slots were given up

        def submit() -> None:
            while idle:
                task = retry.popleft() if retry else feed.next_task()
                if task is None:
                    return
                slot = idle.popleft()
                inflight[self._workers[slot].run.remote(task)] = (task, slot, time.monotonic())

        def replace(slot: int, task: ShardTask, why: str) -> None:
            key = (task.job, task.index)
            attempts[key] = attempts.get(key, 0) + 1
            name = getattr(task, "label", "") or f"shard {task.index}" + (f" of {task.job!r}" if task.job else "")
            ray.kill(self._workers[slot], no_restart=True)
            self._workers[slot] = self._actor.remote(*self._worker_args)
            starting[self._workers[slot].ping.remote()] = (slot, time.monotonic())
            if attempts[key] > self.runtime.max_retries:  # that shard's job fails; a batch's others go on
                feed.failed(task, ExecutorError(f"{name} failed {attempts[key]} times ({why}); giving up after "
                                                f"runtime.max_retries={self.runtime.max_retries}"))
                return
            log.warning("%s: %s; replacing the worker and running the shard again", name, why)
            retry.appendleft(task)

        def give_up(slot: int, why: str) -> None:
            lost.append(why)
            ray.kill(self._workers[slot], no_restart=True)
            self._workers[slot] = None
            left = sum(w is not None for w in self._workers)
            log.warning("ray: a replacement worker %s; merging on the %d left", why, left)

        def end() -> None:
            never = sum(asked_at is None for _slot, asked_at in starting.values())
            if never:
                self._report_unplaced(never)

        while True:
            submit()
            if not inflight:
                if idle:  # a free worker and no task for it
                    if feed.finished():
                        return end()
                    raise stalled()
                if all(asked_at is None for _slot, asked_at in starting.values()):  # none will come for sure
                    if not retry and feed.finished():
                        return end()
                    raise ExecutorError(f"shards left and no Ray worker to run them: every replacement worker "
                                        f"failed to start ({lost[-1] if lost else '?'}); check `ray status`")
            ready, _ = _wait(list(inflight) + list(starting), 1, POLL_S)
            for ref in ready:
                if ref in starting:
                    slot, _asked = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayError as e:
                        give_up(slot, f"died starting ({_first_line(e)})")
                        continue
                    idle.append(slot)
                    continue
                task, slot, _started = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    idle.append(slot)
                    # a data error, or a bug or resource failure (CUDA OOM) in this shard: a single merge raises
                    # it, a batch fails that recipe only
                    feed.failed(task, cause if isinstance(cause, Exception) else e)
                except (RayActorError, GetTimeoutError) as e:
                    replace(slot, task, f"worker died ({type(e).__name__})")
                else:
                    idle.append(slot)
                    feed.done(task, result)
            now = time.monotonic()
            timeout = self.runtime.task_timeout_s
            if timeout:
                for ref, (task, slot, started) in list(inflight.items()):
                    if now - started > timeout and not _wait([ref], 1, 0)[0]:  # done but not yet collected: kept
                        inflight.pop(ref)
                        replace(slot, task, f"no result after runtime.task_timeout_s={timeout:g}s")
            restart_s = max(RESTART_S, self.runtime.gpu_wait_s)
            for ref, (slot, asked_at) in list(starting.items()):
                if asked_at is not None and now - asked_at > restart_s:
                    starting.pop(ref)
                    give_up(slot, f"was not ready {restart_s:g}s after it was asked for")
