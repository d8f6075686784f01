"""distmerge: merge many PEFT LoRA adapters into one, straight from their files, locally or on Ray.

    import distmerge
    result = distmerge.merge("configs/quickstart.yaml", ["merge.method=ties", "merge.density=0.5"])
    print(result.path, result.rank)

The names below are imported on first use (PEP 562): `python -m distmerge batch` on an up-to-date zoo,
and `--version`, should not pay for the merge driver's imports.
"""

__version__ = "0.1.0"

_LAZY = {"DistmergeError": "distmerge.errors", "MergeConfig": "distmerge.config", "load_config": "distmerge.config",
         "MergeResult": "distmerge.driver", "merge": "distmerge.driver", "plan": "distmerge.driver"}
__all__ = ["DistmergeError", "MergeConfig", "MergeResult", "__version__", "load_config", "merge", "plan"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'distmerge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
