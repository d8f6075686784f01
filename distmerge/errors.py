"""Errors a user can act on.

Every error distmerge raises for bad input is a `DistmergeError`: one line that says what failed,
where (adapter, tensor, config key), what was expected against what was found, and what to do.
The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

EXIT_USAGE = 2


class DistmergeError(Exception):
    """Bad input or environment; the message is the whole story."""

    exit_code = EXIT_USAGE


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `with` block cleans up as on Ctrl-C."""


class ConfigError(DistmergeError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"invalid config ({n} problem{'s' if n != 1 else ''}):"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class AdapterError(DistmergeError):
    """An input adapter that cannot be merged correctly."""


class MergeError(DistmergeError):
    """A merge that failed for a data reason (named tensor, named adapter)."""


class ExecutorError(DistmergeError):
    """The cluster cannot run the merge (no GPUs, unreadable inputs on a node, …)."""


class OutputError(DistmergeError):
    """The output cannot be written where asked, or would replace something distmerge did not write."""


class PushError(DistmergeError):
    """The output is complete on disk, but its upload to the Hub failed; `distmerge push` retries it alone."""


def output_error(e: OSError, path: str, doing: str = "write") -> OutputError:
    """An OSError while writing the output, as one line that names the path and what to do."""
    import errno

    fix = {errno.ENOSPC: "free space there or choose an output.path on a larger disk",
           errno.EDQUOT: "free space in your quota or choose another output.path",
           errno.EROFS: "that filesystem is read-only: choose a writable output.path",
           errno.EACCES: "you may not write there: choose a writable output.path",
           errno.EPERM: "you may not write there: choose a writable output.path"}.get(
        e.errno, "check that output.path is a writable directory on local or shared storage")
    return OutputError(f"cannot {doing} {path}: {e.strerror or e}; {fix}. Nothing was written")
