"""safetensors headers, read without touching tensor bytes.

The format is 8 bytes of little-endian header length, a JSON header, then the data. Reading the
header ourselves gives the driver names, shapes, dtypes and byte offsets for planning, and lets
a corrupt file be named before any worker starts.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from distmerge.errors import AdapterError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
TORCH_TO_ST = {v: k for k, v in FLOAT_DTYPES.items()}  # output.dtype names → safetensors
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: enough to plan, load lazily, or copy without decoding."""

    name: str
    file: str
    dtype: str  # safetensors spelling: F32, F16, BF16
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str, owner: str = "") -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and metadata of one safetensors file; AdapterError naming the file when it is corrupt."""
    who = f"adapter {owner!r}: " if owner else ""
    fix = "re-save the adapter with save_pretrained(..., safe_serialization=True) or re-download it"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterError(f"{who}{path} is not a safetensors file (only {size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise AdapterError(f"{who}{path} is corrupt: header length {n} does not fit in a "
                                   f"{size}-byte file; {fix}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise AdapterError(f"{who}cannot read {path}: {e.strerror or e}; check the path and permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{who}{path} is corrupt: its header is not valid JSON ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{who}{path} is corrupt: header is not a JSON object; {fix}")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{who}{path} is corrupt: tensor {name!r} has a malformed header entry; {fix}") from None
        want = math.prod(shape) * DTYPE_SIZES.get(dtype, 0)
        if dtype not in DTYPE_SIZES or e - b != want or b < 0 or base + e > size:
            raise AdapterError(f"{who}{path} is corrupt or truncated at tensor {name!r} (dtype {dtype}, shape "
                               f"{list(shape)}, bytes {b}..{e} of a {size - base}-byte data section); {fix}")
        tensors[name] = TensorInfo(name, path, dtype, shape, base + b, base + e)
    return tensors, metadata
