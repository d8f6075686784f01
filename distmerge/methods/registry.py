"""The one list of method names. Config validation, CLI help and errors all read it."""

from __future__ import annotations

import importlib
import pkgutil

from distmerge.methods.base import MergeMethod

_METHODS: dict[str, MergeMethod] = {}
_loaded = False


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def _load() -> None:
    """Import every method file in this package; each registers itself. Adding a method is a new file."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import distmerge.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name not in ("base", "registry"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def names() -> list[str]:
    _load()
    return list(_METHODS)


def find(name: str) -> MergeMethod | None:
    _load()
    return _METHODS.get(name)


def get(name: str) -> MergeMethod:
    method = find(name)
    if method is None:
        raise KeyError(f"unknown merge method {name!r}; one of: {', '.join(names())}")
    return method


def all_methods() -> list[MergeMethod]:
    _load()
    return list(_METHODS.values())
