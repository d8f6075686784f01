"""torch, imported on its first use.

`import torch` costs about 3 s here (docs/benchmarks.md), more than everything else `distmerge`
does for `--help`, `methods`, a config error or an up-to-date batch, none of which touch a tensor.
So distmerge's modules take torch from here (`from distmerge._lazy import torch`): the real import
happens at the first attribute used, e.g. the first tensor a shard reads. tests/test_startup.py keeps
those paths free of it.
"""

from __future__ import annotations

import functools
import importlib
import types


class LazyModule(types.ModuleType):
    """A stand-in for a module that imports it on the first attribute read, then caches what it reads."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_module"] = None

    def __getattr__(self, attr: str):
        module = self.__dict__["_module"]
        if module is None:
            module = self.__dict__["_module"] = importlib.import_module(self.__name__)
        value = getattr(module, attr)
        if not attr.startswith("__"):
            self.__dict__[attr] = value  # later reads skip __getattr__: as fast as the real module's
        return value


torch = LazyModule("torch")
numpy = LazyModule("numpy")  # 0.2 s; only the CPU selection scans of the pruning methods use it


@functools.lru_cache(maxsize=1)
def torch_version() -> str:
    """torch's version without importing it: the installed distribution's, which is torch.__version__ (read
    once: a zoo's fingerprints ask for it per recipe, and each read parses the distribution's metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:  # a source tree on sys.path, not installed: ask the module itself
        return torch.__version__
