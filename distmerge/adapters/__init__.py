"""Input adapters: discover a directory, parse its LoraConfig, read headers, load tensors lazily."""

from distmerge.adapters.adapter import Adapter, LoraModule
from distmerge.adapters.formats import open_adapter
from distmerge.adapters.header import TensorInfo, read_header
from distmerge.adapters.reader import TensorReader

__all__ = ["Adapter", "LoraModule", "TensorInfo", "TensorReader", "open_adapter", "read_header"]
