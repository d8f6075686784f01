"""safetensors headers, read without touching tensor bytes.

The format is 8 bytes of little-endian header length, a JSON header, then the data. Reading the
header ourselves gives the driver names, shapes, dtypes and byte offsets for planning, and lets
a corrupt file be named before any worker starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from distmerge._lazy import torch
from distmerge.adapters.pin import Stamp
from distmerge.errors import AdapterError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
TORCH_TO_ST = {v: k for k, v in FLOAT_DTYPES.items()}  # output.dtype names → safetensors
_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype code (one DTYPE_SIZES knows)."""
    return getattr(torch, _TORCH_NAMES[code])


def st_dtype(dtype: "torch.dtype") -> str:
    """The safetensors dtype code of a torch dtype (`torch.float32` → "F32")."""
    return _ST_CODES[str(dtype).removeprefix("torch.")]


_ST_CODES = {v: k for k, v in _TORCH_NAMES.items()}
MAX_HEADER = 100 * 2**20
# A LoRA adapter holds thousands of tensors (every linear layer of a 70B model: 80 × 7 × 2 = 1,120),
# per-expert LoRA on a 256-expert MoE about 100k; 200k is generous. The header's JSON is bounded before
# it is parsed, by counts of characters JSON cannot escape: each object opens with '{', each string has
# two '"', each value after the first in a container follows ','. A tensor entry is one object, five
# strings and ~5 + ndim commas, so these bounds admit any real adapter and keep the Python objects json
# builds for a hostile header (metadata pairs, long shapes, empty entries) to a few hundred MB.
MAX_TENSORS = 200_000
# (byte, bytes per item, most items, what): the header, __metadata__ and a few metadata strings on top.
JSON_BOUNDS = ((b"{", 1, MAX_TENSORS + 2, "objects"), (b'"', 2, 5 * MAX_TENSORS + 100, "strings"),
               (b",", 1, 10 * MAX_TENSORS, "values"))
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
FIX = "re-save the adapter with save_pretrained(..., safe_serialization=True) or re-download it"
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


class BadJSON(ValueError):
    """A JSON document refused; the message says what is wrong without quoting the document."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: enough to plan, load lazily, or copy without decoding."""

    name: str
    file: str
    dtype: str  # safetensors spelling: F32, F16, BF16
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in file
    end: int
    stamp: Optional[Stamp] = None  # the input file as planned (size, mtime, inode); None for distmerge's own parts

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str, owner: str = "") -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and metadata of one safetensors file, validated as the safetensors library does and stricter
    (no duplicate keys, no unknown fields, no empty tensors); AdapterError naming file and tensor otherwise."""
    where = f"adapter {owner!r}: {path}" if owner else path
    raw, data_size, stamp = _raw_header(path, where)
    header = _parse_header(raw, where)
    metadata = _metadata(header.pop("__metadata__", {}), where)
    spans = {name: _entry(name, entry, data_size, where) for name, entry in header.items()}
    _check_tiling(spans, data_size, where)
    base = 8 + len(raw)
    return {name: TensorInfo(name, path, dtype, shape, base + b, base + e, stamp)
            for name, (dtype, shape, b, e) in spans.items()}, metadata


def load_json(raw: bytes) -> Any:
    """raw as strict JSON: UTF-8, no key twice in an object. BadJSON never quotes raw, which may be any file."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except BadJSON:
        raise
    except UnicodeDecodeError as e:
        raise BadJSON(f"is not UTF-8 text (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadJSON(f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise BadJSON("nests JSON too deeply to parse") from None
    except ValueError:  # an integer longer than sys.get_int_max_str_digits()
        raise BadJSON("holds a number too long to parse") from None


def json_kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def show(value: Any, limit: int = 300) -> str:
    """A value from a file, for a message: repr'd (no control characters) and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise BadJSON(f"has the key {show(twice)} twice in one object")
    return obj


def _raw_header(path: str, where: str) -> tuple[bytes, int, Stamp]:
    """The header's bytes, the size of the data section after it, and the file's stamp, all from one open file."""
    try:
        with open(path, "rb") as f:
            stamp = Stamp.of(f.fileno())
            size = stamp.size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            if size < 8 or n > MAX_HEADER or 8 + n > size:  # n is the file's own bytes: never printed
                raise AdapterError(f"{where} is not a safetensors file: its first 8 bytes do not give a header "
                                   f"length that fits in its {size} bytes (at most {MAX_HEADER >> 20} MiB); {FIX}")
            raw = f.read(n)
    except OSError as e:
        raise AdapterError(f"{where}: cannot read it: {e.strerror or e}; check the path and permissions") from None
    return raw, size - 8 - n, stamp


def _parse_header(raw: bytes, where: str) -> dict[str, Any]:
    """The header object, its size bounded before json builds it: the counts are true upper bounds, where
    counting "data_offsets" would not be (data_offset\\u0073 spells the same key, and safetensors takes it)."""
    for byte, per, most, what in JSON_BOUNDS:
        if (found := raw.count(byte) // per) > most:
            raise AdapterError(f"{where} is not a LoRA safetensors file: its header has {found} JSON {what}, "
                               f"expected at most {most} (for {MAX_TENSORS} tensors, far more than any adapter "
                               f"holds); {FIX}")
    try:
        header = load_json(raw)
    except BadJSON as e:
        raise AdapterError(f"{where} is not a valid safetensors file: its header {e}; {FIX}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where} is not a valid safetensors file: its header is {json_kind(header)}, "
                           f"expected a JSON object; {FIX}")
    return header


def _metadata(metadata: Any, where: str) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise AdapterError(f"{where} is corrupt: __metadata__ is {json_kind(metadata)}, expected an object of "
                           f"strings; {FIX}")
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise AdapterError(f"{where} is corrupt: __metadata__[{show(bad)}] is {json_kind(metadata[bad])}, "
                           f"expected a string; {FIX}")
    return metadata


def _entry(name: str, entry: Any, data_size: int, where: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field checked against what it must be."""
    def corrupt(what: str, state: str = "corrupt") -> AdapterError:
        return AdapterError(f"{where} is {state} at tensor {show(name)}: {what}; {FIX}")

    if not isinstance(entry, dict) or entry.keys() != ENTRY_KEYS:
        found = sorted(entry) if isinstance(entry, dict) else json_kind(entry)
        raise corrupt(f"expected an object of exactly dtype, shape and data_offsets, found {show(found)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise corrupt(f"dtype is {show(dtype)}, expected one of {', '.join(DTYPE_SIZES)}")
    if not _naturals(shape):
        raise corrupt(f"shape is {show(shape)}, expected a list of non-negative integers")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise corrupt(f"data_offsets is {show(offsets)}, expected two integers [begin, end] with begin <= end")
    if 0 in shape:  # legal to safetensors, but no LoRA tensor is empty, and hostile headers stack millions
        raise corrupt(f"shape {show(shape)} has no elements; a LoRA adapter holds no empty tensors")
    nbytes = _nbytes(shape, DTYPE_SIZES[dtype], data_size)
    if nbytes is None:
        raise corrupt(f"shape {show(shape)} of {dtype} needs more than the file's {data_size} bytes of data",
                      "corrupt or truncated")
    if offsets[1] - offsets[0] != nbytes:
        raise corrupt(f"shape {show(shape)} of {dtype} takes {nbytes} bytes, but data_offsets {offsets} "
                      f"span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _naturals(value: Any) -> bool:
    """A JSON array of non-negative integers (not booleans, not integral floats: safetensors refuses both)."""
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor, or None once it exceeds limit: a hostile shape's product is never built."""
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def _check_tiling(spans: dict[str, tuple[str, tuple[int, ...], int, int]], data_size: int, where: str) -> None:
    """The tensors, by begin, cover the data section exactly: from 0, no gap, no overlap, no trailing bytes."""
    pos, prev = 0, None
    for name, (_, _, b, e) in sorted(spans.items(), key=lambda s: s[1][2]):
        if b != pos:
            after = f"where tensor {show(prev)} ends" if prev is not None else "the start of the data"
            raise AdapterError(f"{where} is corrupt at tensor {show(name)}: its data begins at byte {b}, expected "
                               f"{pos} ({after}): tensors must follow one another without gaps or overlaps; {FIX}")
        pos, prev = e, name
    if pos != data_size:
        raise AdapterError(f"{where} is corrupt or truncated: its tensors end at byte {pos} of the data section, "
                           f"but the file holds {data_size} bytes of data; {FIX}")
