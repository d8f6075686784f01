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
