"""Evaluate merged adapters on each source task and pick the best merge (`distmerge evaluate`).

A separate consumer of merge outputs: transformers, peft, accelerate and matplotlib are imported only
here (the `eval` extra), never by the merge path. worker.py holds the base model and scores adapters
loaded into it; data.py reads tasks; run.py decides what to score, caches it and runs the pool (the
merge executor's Ray pool, with evaluation actors); report.py computes retention and writes the report.
"""

from __future__ import annotations

EXTRA = ("transformers", "peft", "accelerate", "matplotlib")


def missing_extra() -> list[str]:
    """The `eval` extra's packages that are not installed (found without importing them)."""
    import importlib.util

    missing = []
    for name in EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a package set to None in sys.modules: hidden from this process
            missing.append(name)
    return missing


def require_extra() -> None:
    from distmerge.errors import DistmergeError

    missing = missing_extra()
    if missing:
        raise DistmergeError(f"evaluation needs the eval extra, and {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not installed; install it with "
                             f"pip install \"distmerge[eval]\"")


def evaluate(config, overrides=(), extra_candidates=()):
    """Score the base, each task's source and every candidate; write report.json/.md and retention.png."""
    require_extra()
    from distmerge.evaluate.run import evaluate as run

    return run(config, overrides, extra_candidates)
