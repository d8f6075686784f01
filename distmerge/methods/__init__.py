"""Merge methods: a registry, shared primitives, and one file per family of methods."""

from distmerge.methods.base import Factors, Merged, MergeMethod, ModuleContext
from distmerge.methods.registry import all_methods, find, get, names, register

__all__ = ["Factors", "Merged", "MergeMethod", "ModuleContext", "all_methods", "find", "get", "names", "register"]
