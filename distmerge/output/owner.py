"""What distmerge may delete: its own previous outputs, and the staging its dead runs left behind.

The rule is the product's first promise: nothing the user owns is deleted or overwritten unless
distmerge wrote it. Three checks live here, each once:

- `check_target`: before any work, an output path that is an input (or holds one, or lies inside
  one), a file, or a directory distmerge did not write is refused, whatever `overwrite` says.
- `owned_output`: a directory is distmerge's when its manifest lists exactly the files in it and
  each still has the size and sha256 the manifest recorded. A user's README beside them makes the
  directory the user's again.
- Staging and set-aside directories are named after the process that made them (host, boot,
  pid, start time), so a later run can prove their owner is gone before it removes them
  (`sweep_debris`), and never removes a live run's work. A process on another host cannot be
  checked, so a live run renews a lease on its staging (its mtime, every RENEW_S); another host's
  directory is its dead run's once the lease is LEASE_S old. That is what lets a nightly driver on
  a fresh node clean up after last night's driver, killed with its node.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from distmerge.errors import OutputError
from distmerge.output.manifest import MANIFEST, read_manifest

log = logging.getLogger("distmerge")
KINDS = ("stage", "old")  # a merge's staging directory; a previous output set aside while it is replaced
_DEBRIS = re.compile(r"^\.(?P<target>.+)\.distmerge-(?P<kind>stage|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<boot>[0-9a-f]{8})"
                     r"-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")
_LEGACY = re.compile(r"^\..+\.distmerge-(old-)?[0-9a-f]{8}$")  # before owners were named: never removed
RENEW_S = 60.0  # a live run touches its staging this often
LEASE_S = 15 * 60.0  # another host's debris untouched this long is a dead run's (hosts' clocks may differ by less)


# --- who owns a debris directory --------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return "0" * 8


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown, None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


@dataclass(frozen=True)
class Owner:
    host: str
    boot: str
    pid: int
    start: int

    @classmethod
    def me(cls) -> "Owner":
        pid = os.getpid()
        return cls(_host(), _boot_id(), pid, _start_time(pid) or 0)

    def alive(self, debris: Path) -> bool:
        """False only when provably gone: same host and boot, and no process with this pid and start time;
        on another host, when `debris` has not been renewed for LEASE_S."""
        if self.host != _host():
            return time.time() - last_touched(debris) < LEASE_S
        if self.boot != _boot_id():
            return False  # the machine rebooted since
        now = _start_time(self.pid)
        return now is not None and (now == self.start or 0 in (now, self.start))


def last_touched(directory: Path) -> float:
    """The latest mtime or ctime of a debris directory or its _parts (which Ray workers write into): renaming
    a directory aside sets its ctime, a lease renewal its mtime, a worker's part its _parts' mtime."""
    last = 0.0
    for p in (directory, directory / "_parts"):
        try:
            st = os.lstat(p)
        except OSError:
            continue
        last = max(last, st.st_mtime, st.st_ctime)
    return last if last else time.time()  # gone or unreadable: not provably stale


class Lease:
    """Renews `path`'s mtime every RENEW_S on a daemon thread while the run that made it lives."""

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease {path.name}", daemon=True)

    def start(self) -> "Lease":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                os.utime(self.path)
            except OSError:
                return  # renamed into place or removed: nothing left to hold


def debris_name(target: Path, kind: str, owner: Owner | None = None) -> Path:
    owner = owner or Owner.me()
    return target.parent / (f".{target.name}.distmerge-{kind}-{owner.host}-{owner.boot}-{owner.pid}-{owner.start}-"
                            f"{uuid.uuid4().hex[:8]}")


def sweep_debris(directory: Path) -> list[str]:
    """Remove the staging and set-aside directories in `directory` whose owning process is gone.

    Says so in one line. Directories of live processes, of other hosts' runs whose lease is current, and
    of distmerge versions that did not name their owner are left alone (the last are named in a warning,
    to remove by hand).
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed, legacy = [], []
    for name in sorted(names):
        m = _DEBRIS.match(name)
        if m is None:
            if _LEGACY.match(name):
                legacy.append(name)
            continue
        owner = Owner(m["host"], m["boot"], int(m["pid"]), int(m["start"]))
        if owner.alive(directory / name):
            continue
        if m["kind"] == "old" and not os.path.lexists(directory / m["target"]):
            try:  # killed between setting the previous output aside and renaming the new one in: put it back
                os.rename(directory / name, directory / m["target"])
                log.warning("restored %s, set aside by a merge that was killed (pid %d)", directory / m["target"],
                            owner.pid)
                continue
            except OSError:
                pass
        shutil.rmtree(directory / name, ignore_errors=True)
        if not (directory / name).exists():
            removed.append(f"{name} (pid {owner.pid})")
    if removed:
        log.warning("removed %d director%s left in %s by merges that were killed: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", directory, ", ".join(removed))
    if legacy:
        log.warning("%s holds %d director%s left by an older distmerge (%s); their owner is unknown, so they are "
                    "kept: remove them by hand when no merge is running", directory, len(legacy),
                    "y" if len(legacy) == 1 else "ies", ", ".join(legacy))
    return removed


# --- may this output path be written? ----------------------------------------------------------------------


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_target(target: str, overwrite: bool, inputs: Iterable[tuple[str, str]]) -> None:
    """Refuse, before any work, an output path that would replace an input or something the user owns.

    `inputs` are (adapter name, directory). An output equal to, above or inside an input is refused
    whatever `overwrite` says; an existing path is replaced only when overwrite is set and it is an
    empty directory or a complete previous distmerge output.
    """
    path = Path(target)
    for name, directory in inputs:
        d = Path(os.path.realpath(directory))
        if _within(d, path) or _within(path, d):
            where = "is" if d == path else ("holds" if _within(d, path) else "lies inside")
            raise OutputError(f"output.path {target} {where} input adapter {name!r} ({directory}); a merge never "
                              f"writes over or into its inputs: choose an output.path outside every adapter")
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"output.path {target} exists and is {'a link' if path.is_symlink() else 'not a directory'}; "
                          f"distmerge writes a directory and never replaces a file: choose another output.path")
    if not overwrite:
        raise OutputError(f"output.path {target} already exists; choose a new path, or set output.overwrite=true "
                          f"to replace it (allowed for an empty directory or a previous distmerge output)")
    why = not_ours(path)
    if why:
        raise OutputError(f"output.path {target} exists and {why}; distmerge replaces only an empty directory or "
                          f"its own complete output. Move it away or choose another output.path")


def written_by_us(path: str, marker_key: str) -> bool:
    """Whether a JSON file is one distmerge wrote (a report, a cache): a JSON object holding `marker_key`.
    Anything unreadable or not such an object is the user's, so it is never overwritten."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and marker_key in doc


def not_ours(path: Path) -> str | None:
    """None if `path` is an empty directory or a complete previous distmerge output, else why not."""
    from distmerge.output.safetensors_io import sha256_file

    try:
        present = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot be listed ({e.strerror or e})"
    if not present:
        return None
    manifest = read_manifest(path)
    if manifest is None:
        return (f"is not a distmerge output (no {MANIFEST})" if not os.path.lexists(path / MANIFEST)
                else f"has a {MANIFEST} that distmerge did not write")
    listed = {o["file"]: o for o in manifest["outputs"]}
    extra = sorted(set(present) - set(listed) - {MANIFEST})
    if extra:
        return f"holds files distmerge did not write ({', '.join(extra[:5])}{', …' if len(extra) > 5 else ''})"
    for name, entry in sorted(listed.items()):
        f = path / name
        if os.path.islink(f) or not f.is_file():
            return f"lacks {name}, which its {MANIFEST} lists"
        if f.stat().st_size != entry.get("bytes") or sha256_file(str(f)) != entry.get("sha256"):
            return f"has {name} changed since distmerge wrote it"
    return None


# --- directories a run creates -----------------------------------------------------------------------------


def make_dirs(path: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first), so a refused run can remove them."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


def remove_created(created: Sequence[Path]) -> None:
    """Remove the directories a run created, innermost first, where they are still empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


# --- one batch per output root ------------------------------------------------------------------------------


class BatchLock:
    """One batch per output root at a time: a second run (a double cron trigger) refuses, naming the first.

    The lock is an OS lock (flock) on a file in the output root, held for the whole run: the kernel,
    or the NFS server, releases it when the process dies, on whatever host it ran. So a killed batch
    never blocks the next night's (whose driver may run on another node), and two runs can never
    both take over a stale lock. The file's text names the holder, for the refusal; it is left in
    place, since removing a lock file races with the next run opening it.
    """

    NAME = ".distmerge-batch.lock"

    def __init__(self, directory: str, zoo: str):
        self.directory = Path(directory)
        self.path = self.directory / self.NAME
        self.zoo = zoo
        self._fd: int | None = None

    def __enter__(self) -> "BatchLock":
        import fcntl

        try:
            make_dirs(self.directory)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the batch lock {self.path}: {e.strerror or e}; output_root must be a "
                              f"writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            raise OutputError(f"another distmerge batch ({holder}) is running on {self.directory}; wait for it to "
                              f"finish (its lock is released when its process ends, however it ends)") from None
        me = Owner.me()
        text = json.dumps({"host": me.host, "pid": me.pid, "zoo": os.path.abspath(self.zoo)}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            doc = json.loads(os.pread(fd, 65536, 0) or b"{}")
            return f"pid {doc['pid']} on {doc['host']}, zoo {doc.get('zoo', '?')}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its holder is not recorded"

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
