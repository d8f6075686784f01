"""distmerge: merge many PEFT LoRA adapters into one, straight from their files, locally or on Ray.

    import distmerge
    result = distmerge.merge("configs/quickstart.yaml", ["merge.method=ties", "merge.density=0.5"])
    print(result.path, result.rank)

The names below, and the submodules, are imported on first use (PEP 562): `python -m distmerge batch` on an
up-to-date zoo, and `--version`, should not pay for the merge driver's imports. No submodule may share a
name with them: its first import would replace the name on the package (the planner is `planner`, not
`plan`, for that reason).
"""

__version__ = "0.1.0"

_LAZY = {"DistmergeError": "distmerge.errors", "MergeConfig": "distmerge.config", "load_config": "distmerge.config",
         "MergeResult": "distmerge.driver", "merge": "distmerge.driver", "plan": "distmerge.driver"}
__all__ = ["DistmergeError", "MergeConfig", "MergeResult", "__version__", "load_config", "merge", "plan"]


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"distmerge.{name}") is not None:
        value = importlib.import_module(f"distmerge.{name}")  # distmerge.config, distmerge.errors, ...
    else:
        raise AttributeError(f"module 'distmerge' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
