"""`distmerge batch ZOO.yaml`: every recipe of a zoo on one pool, skipping what is up to date.

- **One pool.** The batch is the pool's feed: whenever a worker is free it gets the next shard of
  the next ready recipe, so the pool stays busy across recipes, and each recipe is assembled and
  renamed into place as soon as its own last shard is done.
- **Up to date without reading tensors.** A recipe is skipped when its output is complete and its
  manifest records the same fingerprint: the merge-relevant config plus each input file's sha256.
  A file's sha256 is taken from an earlier manifest when its size and mtime are unchanged, so an
  unchanged zoo is checked from manifests and headers alone.
- **Failures stay local.** A recipe that fails is reported with its error, the recipes that merge
  its output are blocked, and every other recipe completes. Outputs are complete or absent at any
  moment, so a killed batch is resumed by running it again.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from distmerge.adapters.pin import Stamp, sha256_pinned
from distmerge.config.units import format_size
from distmerge.config.zoo import Recipe, Zoo
from distmerge.errors import DistmergeError, OutputError, output_error
from distmerge.executors import make_executor, resolve_executor_name
from distmerge.job import Job, file_sha256, fingerprint, fingerprint_id, input_files
from distmerge.output.assemble import write_json
from distmerge.output.manifest import read_manifest, weights_bytes
from distmerge.output.owner import BatchLock, written_by_us
from distmerge.planner import ShardTask, build_plan
from distmerge.progress import bar
from distmerge.shard import ShardResult
from distmerge.sources import Opened, open_inputs

log = logging.getLogger("distmerge")
REPORT = "batch_report.json"
MERGED, UP_TO_DATE, FAILED, BLOCKED = "merged", "up to date", "failed", "blocked"


@dataclass
class Outcome:
    recipe: str
    status: str
    reason: str = ""
    method: str = ""
    rank: int = 0
    bytes: int = 0
    seconds: float = 0.0
    path: str = ""
    hub: dict = field(default_factory=dict)  # where output.push_to_hub uploaded it (publish.hub.record)


class Identities:
    """sha256 of input files, re-read only when a file's size, mtime or ctime differs from an earlier record.

    ctime, which no tool can set, catches a file replaced with its old size and mtime preserved
    (`cp -p`, `rsync -a` of a retrained adapter); a record without one (an older manifest) is not trusted.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int, int], str] = {}
        self.hashed: list[str] = []  # the files this run actually read, for the report and the tests

    def learn(self, manifest: dict) -> None:
        for entry in manifest.get("inputs") or []:
            for f in entry.get("files") or []:
                if isinstance(f, dict) and {"file", "bytes", "mtime_ns", "ctime_ns", "sha256"} <= set(f):
                    self._known[(f["file"], f["bytes"], f["mtime_ns"], f["ctime_ns"])] = f["sha256"]

    def learn_output(self, directory: str, manifest: dict) -> None:
        """An upstream recipe's files are known by its manifest's sha256s (checked complete by the caller)."""
        for o in manifest["outputs"]:
            path = os.path.join(directory, o["file"])
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone since the check: hashed when read, if it is read
            self._known[(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)] = o["sha256"]

    def sha(self, path: str, stamp: Stamp | None, owner: str) -> str:
        key = (path, stamp.size, stamp.mtime_ns, stamp.ctime_ns) if stamp is not None else None
        if key in self._known:
            return self._known[key]
        digest = sha256_pinned(path, stamp, owner)
        self.hashed.append(path)
        if key is not None:
            self._known[key] = digest
        return digest


def previous_output(path: str) -> dict | None:
    """The manifest of a complete earlier output at `path` (every listed file there, at its size and mtime),
    else None.

    Sizes and mtimes, not hashes: an up-to-date check must not read gigabytes. An output edited in place
    is then not up to date, and owner.not_ours, checking the hashes before it is replaced, refuses it.
    """
    manifest = read_manifest(path)
    if manifest is None:
        return None
    for o in manifest["outputs"]:
        try:
            st = os.stat(os.path.join(path, o["file"]))
        except OSError:
            return None
        if st.st_size != o["bytes"] or o.get("mtime_ns", st.st_mtime_ns) != st.st_mtime_ns:
            return None
    return manifest


def staleness(recipe: dict, previous: dict | None) -> str:
    """Why a recipe must run again, in words a person can act on; '' when it is up to date."""
    if previous is None:
        return "no complete earlier output"
    old = previous.get("recipe")
    if not isinstance(old, dict):
        return "the earlier output has no recipe fingerprint"
    if fingerprint_id(recipe) == previous.get("fingerprint") and old == recipe:
        return ""
    changed = []
    for key in ("distmerge_version", "torch_version", "merge", "output", "runtime"):
        if old.get(key) != recipe[key]:
            if isinstance(recipe[key], dict) and isinstance(old.get(key), dict):
                changed += [f"{key}.{k} {old[key].get(k)!r} → {v!r}" for k, v in recipe[key].items()
                            if old[key].get(k) != v]
            else:
                changed.append(f"{key} {old.get(key)!r} → {recipe[key]!r}")
    before = {a["name"]: a for a in old.get("adapters", [])}
    now = {a["name"]: a for a in recipe["adapters"]}
    if list(before) != list(now):
        changed.append(f"adapters {list(before)} → {list(now)}")
    for name, a in now.items():
        b = before.get(name)
        if b is None:
            continue
        if b.get("weight") != a["weight"]:
            changed.append(f"{name}.weight {b.get('weight')} → {a['weight']}")
        if (b.get("from"), b.get("hub")) != (a["from"], a.get("hub")):
            now_at = a.get("hub", {}).get("commit", "")[:12] or a["from"]
            changed.append(f"input {name!r} now comes from {now_at}")
        files = [f for f, sha in a["files"].items() if (b.get("files") or {}).get(f) != sha]
        if files:
            changed.append(f"input {name!r}: {', '.join(files)} changed")
    return "; ".join(changed) or "the recipe changed"


class Batch:
    """The pool's feed for a whole zoo; `run()` merges what is stale and returns every recipe's outcome."""

    def __init__(self, zoo: Zoo, only: Sequence[str] = (), force: Iterable[str] = ()):
        self.zoo = zoo
        self.selected = zoo.closure(only) if only else [r.name for r in zoo.recipes]
        force = set(force)
        self.force = set(self.selected) if "*" in force else force
        self.outcomes: dict[str, Outcome] = {}
        self.identities = Identities()
        self._opened = Opened()  # each shared adapter's headers read once per run
        self._waiting = list(self.selected)
        self._jobs: dict[str, Job] = {}
        self._queue: deque[ShardTask] = deque()
        self._parallelism = 1
        self._executor = ""
        self._hasher: cf.ThreadPoolExecutor | None = None
        self._bar = None
        self._checked: dict[str, tuple[str, list]] = {}  # stale recipes' checks from before the pool started
        self._previous: dict[str, dict | None] = {}  # each checked recipe's complete earlier output's manifest
        self._shards = [0, 0, 0, 0]  # shards done, shards queued, bytes read, bytes to read: the bar's postfix
        self._unpushed: set[str] = set()  # merged, but the upload failed: "failed", yet its output is complete
        self._uploader: cf.ThreadPoolExecutor | None = None  # pushes run here, so workers get tasks meanwhile
        self._uploads: dict[str, tuple[Outcome, cf.Future]] = {}

    # --- deciding -----------------------------------------------------------------------------------------

    def check(self, recipe: Recipe) -> tuple[str, list]:
        """(why it must run, or '' if up to date; the opened inputs). Reads manifests and headers only."""
        prev = self._previous[recipe.name] = previous_output(recipe.config.output.path)
        if prev is not None:
            self.identities.learn(prev)
        for need in recipe.needs:
            up = self.zoo.get(need).config.output.path
            manifest = previous_output(up)
            if manifest is not None:
                self.identities.learn_output(up, manifest)
        adapters = open_inputs(recipe.config, self._opened)
        if recipe.name in self.force:
            return "forced", adapters
        hashes = {f: file_sha256(a, f, stamp, self.identities.sha) for a, f, stamp in input_files(adapters)}
        return staleness(fingerprint(recipe.config, adapters, hashes), prev), adapters

    def plan(self) -> list[Outcome]:
        """`distmerge batch --plan`: what would run and why, merging nothing."""
        rows = []
        stale: set[str] = set()
        for name in self.selected:
            recipe = self.zoo.get(name)
            after = [n for n in recipe.needs if n in stale]
            try:
                why, adapters = self.check(recipe) if not after else ("", [])
                p = build_plan(recipe.config, adapters) if why else None
            except DistmergeError as e:
                rows.append(Outcome(name, FAILED, str(e)))
                stale.add(name)
                continue
            if after:
                rows.append(Outcome(name, "would merge", f"after {', '.join(after)} (its inputs will change)"))
                stale.add(name)
            elif p is not None:
                rows.append(Outcome(name, "would merge", why, p.method, p.rank, p.in_bytes))
                stale.add(name)
            else:
                rows.append(self._kept(recipe))
        return rows

    # --- running --------------------------------------------------------------------------------------------

    def peak_bytes(self) -> int:
        """The largest working set per worker among the recipes that can be planned before the batch runs
        (not those merging other recipes' outputs, which do not exist yet): what each Ray worker reserves."""
        if resolve_executor_name(self.zoo.runtime) != "ray":
            return 0
        peak = 0
        for name in self._waiting:
            recipe = self.zoo.get(name)
            if recipe.needs:
                continue
            try:
                checked = self._checked.get(name)
                adapters = checked[1] if checked else open_inputs(recipe.config, self._opened)
                peak = max(peak, build_plan(recipe.config, adapters).peak_bytes)
            except DistmergeError:
                continue  # the recipe fails, with this error, when its turn comes
        return peak

    def run(self, progress: bool = True) -> list[Outcome]:
        with BatchLock(self.lock_dir(), self.zoo.source):
            self._bar = bar(progress, total=len(self.selected), unit="recipe", desc="recipes")
            try:
                self._settle()
                if self._waiting:  # something to merge: only now a pool (on Ray: ray.init and the actors)
                    with make_executor(self.zoo.runtime, self.peak_bytes()) as pool, \
                            cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hasher, \
                            cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="push") as uploader:
                        self._parallelism, self._executor = pool.parallelism, pool.name
                        self._hasher = None if pool.in_process else hasher
                        self._uploader = uploader
                        pool.run(self)
                        self._uploads_done(wait=True)
            finally:
                for job in self._jobs.values():
                    job.__exit__(None, None, None)
                self._bar.close()
        return [self.outcomes[n] for n in self.selected]

    def _settle(self) -> None:
        """Before any worker starts, record in dependency order every recipe that is up to date (the recipes it
        merges up to date too), and keep the checks of the stale ones for when they run: a batch with nothing
        stale never starts a pool."""
        for name in list(self._waiting):
            recipe = self.zoo.get(name)
            if any(self.outcomes.get(n, Outcome(n, "")).status != UP_TO_DATE for n in recipe.needs):
                continue  # merges a recipe that runs: checked once that one is done
            t0 = time.perf_counter()
            try:
                why, adapters = self.check(recipe)
            except DistmergeError:
                continue  # fails, with this error, when its turn comes
            if why:
                self._checked[name] = (why, adapters)
            else:
                self._waiting.remove(name)
                self._up_to_date(recipe, t0)

    def _kept(self, recipe: Recipe) -> Outcome:
        """An up-to-date recipe's row, with the method, rank and size its output's manifest records."""
        prev = self._previous.get(recipe.name) or {}  # read_manifest checked its outputs, not its other keys
        method = prev.get("method") if isinstance(prev.get("method"), dict) else {}
        return Outcome(recipe.name, UP_TO_DATE, method=str(method.get("used") or ""), rank=int(method.get("rank") or 0),
                       bytes=weights_bytes(prev) if prev else 0, path=recipe.config.output.path)

    def _up_to_date(self, recipe: Recipe, t0: float) -> None:
        up = self._kept(recipe)
        if recipe.config.output.push_to_hub and not self._pushed(recipe, up.path):
            up.reason = "not yet pushed where output.push_to_hub says"  # an earlier push failed, or is new
            self._push(up, recipe.config)
        up.seconds = time.perf_counter() - t0
        self._record(up)

    def lock_dir(self) -> str:
        if self.zoo.output_root:
            return self.zoo.output_root
        return os.path.dirname(os.path.abspath(self.zoo.source))

    def next_task(self) -> ShardTask | None:
        while not self._queue and self._start_next():
            pass
        return self._queue.popleft() if self._queue else None

    def finished(self) -> bool:
        return not self._waiting and not self._jobs

    def _start_next(self) -> bool:
        """Resolve recipes in order until one has tasks queued; False when none can start now."""
        for name in list(self._waiting):
            recipe = self.zoo.get(name)
            held = [n for n in recipe.needs if self.outcomes.get(n, Outcome(n, "")).status in (FAILED, BLOCKED)
                    and n not in self._unpushed]
            if held:
                self._waiting.remove(name)
                self._record(Outcome(name, BLOCKED, f"needs {', '.join(held)}, which did not merge"))
                continue
            if any(n not in self.outcomes for n in recipe.needs):
                continue
            self._waiting.remove(name)
            if self._open(recipe):
                return True
        return False

    def _open(self, recipe: Recipe) -> bool:
        """Check the recipe; start its job if stale. True when its tasks are queued."""
        t0 = time.perf_counter()
        job = None
        try:
            why, adapters = self._checked.pop(recipe.name, None) or self.check(recipe)
            if not why:
                self._up_to_date(recipe, t0)
                return False
            log.info("%s: merging (%s)", recipe.name, why)
            job = Job(recipe.config, recipe.name, hasher=self.identities.sha)
            job.reason = why
            job.prepare(adapters)
            job.__enter__()
            self._jobs[recipe.name] = job
            tasks = job.shard(self._parallelism)
            self._queue.extend(tasks)
            self._shards[1] += len(tasks)
            self._shards[3] += sum(t.in_bytes for t in tasks)
            job.hash_inputs(self._hasher)
            return True
        except DistmergeError as e:
            if job is not None:
                self._jobs.pop(recipe.name, None)
                job.__exit__(type(e), e, None)
            self._record(Outcome(recipe.name, FAILED, str(e), seconds=time.perf_counter() - t0))
            return False

    def done(self, task: ShardTask, result: ShardResult) -> None:
        self._uploads_done(wait=False)
        self._shards[0] += 1
        self._shards[2] += task.in_bytes
        if self._bar is not None:
            done, queued, read, total = self._shards
            self._bar.set_postfix_str(f"shards {done}/{queued}, {format_size(read)}/{format_size(total)}")
        job = self._jobs.get(task.job)
        if job is None or not job.add(task, result):
            return  # the rest of a job that failed, or not its last shard
        del self._jobs[task.job]
        try:
            r = job.finish(self._executor)
        except DistmergeError as e:
            self._record(Outcome(task.job, FAILED, str(e)))
            return
        finally:
            job.__exit__(None, None, None)
        done = Outcome(task.job, MERGED, job.reason, r.method, r.rank, weights_bytes(r.manifest), r.seconds, r.path)
        if job.cfg.output.push_to_hub and self._uploader is not None:
            # Uploaded on a thread while the pool merges on: the output is complete, so the recipes that merge
            # it may start now (they would even if the push failed); the recipe's line waits for the push.
            self.outcomes[done.recipe] = done
            self._uploads[done.recipe] = (done, self._uploader.submit(self._push, done, job.cfg))
            return
        if job.cfg.output.push_to_hub:
            self._push(done, job.cfg)
        self._record(done)

    def _uploads_done(self, wait: bool) -> None:
        """Record the recipes whose upload has ended (all of them, waiting, when the pool is done)."""
        for name, (outcome, future) in list(self._uploads.items()):
            if not (wait or future.done()):
                continue
            del self._uploads[name]
            future.result()  # _push records its own failure in the outcome
            self._record(outcome)

    @staticmethod
    def _pushed(recipe: Recipe, path: str) -> bool:
        from distmerge.publish.hub import already_pushed  # huggingface_hub only where a recipe pushes

        return already_pushed(recipe.config.output, path)

    def _push(self, outcome: Outcome, cfg) -> None:
        """Upload a merged recipe's output; a failure fails the recipe, but its output stays for its dependents."""
        from distmerge.publish.hub import describe, push_output  # huggingface_hub only where a recipe pushes

        try:
            outcome.hub = push_output(cfg.output, outcome.path)
            outcome.reason = f"{outcome.reason}; {describe(outcome.hub)}"
        except Exception as e:  # the Hub's refusals come worded (DistmergeError); anything else is said as it is
            self._unpushed.add(outcome.recipe)
            outcome.status = FAILED
            outcome.reason = str(e) if isinstance(e, DistmergeError) else (
                f"the upload of the complete output at {outcome.path} failed with {type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}; retry with: distmerge push {outcome.path} {cfg.output.push_to_hub}")

    def failed(self, task: ShardTask, error: Exception) -> None:
        job = self._jobs.pop(task.job, None)
        if job is None:
            return
        job.__exit__(type(error), error, None)
        self._queue = deque(t for t in self._queue if t.job != task.job)
        why = str(error) if isinstance(error, DistmergeError) else (
            f"{type(error).__name__} in shard {task.index}: {' '.join(str(error).split())[:300]} (not the inputs' "
            f"fault: a worker ran out of a resource, or a bug of distmerge's to report)")
        self._record(Outcome(task.job, FAILED, why))

    def _record(self, outcome: Outcome) -> None:
        self.outcomes[outcome.recipe] = outcome
        if self._bar is not None:
            self._bar.update(1)
        detail = f" ({outcome.method}, rank {outcome.rank}, {format_size(outcome.bytes)})" if outcome.method else ""
        secs = f" in {outcome.seconds:.2f}s" if outcome.seconds else ""
        why = f": {outcome.reason}" if outcome.reason and outcome.status != MERGED else ""
        if outcome.hub:
            from distmerge.publish.hub import describe

            why = f": {describe(outcome.hub)}"
        line = f"{outcome.recipe}: {outcome.status}{detail}{secs}{why}"
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line, file=sys.stderr)
        else:
            (log.warning if outcome.status in (FAILED, BLOCKED) else log.info)(line)


# --- the report -------------------------------------------------------------------------------------------------


def table(rows: Sequence[Outcome]) -> str:
    head = ("recipe", "status", "method", "rank", "size", "seconds", "reason")
    body = [(r.recipe, r.status, r.method or "-", str(r.rank or "-"), format_size(r.bytes) if r.bytes else "-",
             f"{r.seconds:.2f}" if r.seconds else "-", r.reason.splitlines()[0][:120] if r.reason else "")
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body])


def write_report(directory: str, zoo: Zoo, rows: Sequence[Outcome], seconds: float, hashed: int) -> str:
    """batch_report.json beside the outputs: written whole (temp file, rename), never over a file not ours."""
    path = os.path.join(directory, REPORT)
    if os.path.lexists(path) and not written_by_us(path, "distmerge_batch"):
        raise OutputError(f"{path} exists and distmerge did not write it; the batch report was not written. "
                          f"Move that file away")
    from distmerge import __version__

    counts = {s: sum(r.status == s for r in rows) for s in (MERGED, UP_TO_DATE, FAILED, BLOCKED)}
    doc = {"distmerge_batch": __version__, "zoo": os.path.abspath(zoo.source), "seconds": round(seconds, 3),
           "counts": counts, "inputs_hashed": hashed, "recipes": [asdict(r) for r in rows]}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        write_json(tmp, doc)
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(e, path, "write the batch report") from None
    return path


@dataclass
class BatchRun:
    outcomes: list[Outcome]
    report: str | None
    seconds: float
    hashed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.status in (MERGED, UP_TO_DATE) for o in self.outcomes)


def run_batch(zoo: Zoo, only: Sequence[str] = (), force: Iterable[str] = ()) -> BatchRun:
    t0 = time.perf_counter()
    batch = Batch(zoo, only, force)
    rows = batch.run(progress=zoo.runtime.progress)
    seconds = time.perf_counter() - t0
    report = write_report(batch.lock_dir(), zoo, rows, seconds, len(batch.identities.hashed))
    return BatchRun(rows, report, seconds, batch.identities.hashed)


def evaluate_outputs(zoo: Zoo, outcomes: Sequence[Outcome], eval_config: str):
    """`distmerge batch --evaluate`: every output that is merged or up to date, as candidates named by their
    recipe, added to the evaluation config's own; unchanged outputs are scored from the cache. The eval
    extra is imported only here, after the merges."""
    from distmerge.config.eval import Candidate
    from distmerge.evaluate import evaluate

    done = [o for o in outcomes if o.status in (MERGED, UP_TO_DATE)]
    source = os.path.abspath(zoo.source)
    extra = [Candidate(zoo.get(o.recipe).config.output.path, o.recipe, o.recipe, source) for o in done]
    return evaluate(eval_config, (), extra)
