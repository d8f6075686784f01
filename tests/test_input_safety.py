"""Hostile inputs: headers validated as strictly as safetensors does (the library is the oracle), bounded
before they are parsed, and never echoed; one line, exit 2."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.adapters import open_adapter, read_header
from distmerge.config.schema import AdapterSpec
from tests.conftest import merge_config
from tests.test_errors import _run

SINGLE = "adapter_model.safetensors"
FIX = "re-save the adapter"


def _st(header, data: bytes = b"", pad: bytes = b"") -> bytes:
    """A safetensors file byte by byte: 8-byte length, the header (a dict, or raw bytes), then the data."""
    raw = (header if isinstance(header, bytes) else json.dumps(header).encode()) + pad
    return struct.pack("<Q", len(raw)) + raw + data


def _e(dtype="F32", shape=(2,), offsets=(0, 8), **more):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **more}


def _oracle_refuses(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
    except Exception:
        return True
    return False


def _copy(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def pair(adapter_sets, tmp_path):
    return [_copy(p, tmp_path / f"in{i}") for i, p in enumerate(adapter_sets("llama").paths[:2])]


# --- 3. strict headers: (bytes, does the safetensors library refuse them too?, what the message names) ------

GOOD = _e()
HEADERS = {
    "dtype_unknown": (_st({"t": _e(dtype="F33")}, bytes(8)), True, "'F33'"),
    "shape_bool": (_st({"t": _e(shape=(True, 2))}, bytes(8)), True, "shape"),
    "shape_float": (_st({"t": _e(shape=(2.0,))}, bytes(8)), True, "shape"),
    "shape_string": (_st({"t": _e(shape=("2",))}, bytes(8)), True, "shape"),
    "shape_negative": (_st({"t": _e(shape=(-2,))}, bytes(8)), True, "shape"),
    "shape_nan": (_st(b'{"t":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', bytes(8)), True, "[nan]"),
    "shape_overflows": (_st({"t": _e(shape=(2**62, 2**62))}, bytes(8)), True, "needs more than"),
    "shape_5000_digits": (_st(b'{"t":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
                              bytes(8)), True, "number too long"),
    "offsets_float": (_st({"t": _e(offsets=(0, 8.0))}, bytes(8)), True, "data_offsets"),
    "offsets_bool": (_st({"t": _e(offsets=(False, 8))}, bytes(8)), True, "data_offsets"),
    "offsets_string": (_st({"t": _e(offsets=("0", 8))}, bytes(8)), True, "data_offsets"),
    "offsets_three": (_st({"t": _e(offsets=(0, 8, 8))}, bytes(8)), True, "data_offsets"),
    "offsets_reversed": (_st({"t": _e(offsets=(8, 0))}, bytes(8)), True, "data_offsets"),
    "bytes_mismatch": (_st({"t": _e(offsets=(0, 12))}, bytes(12)), True, "takes 8 bytes"),
    "gap_at_start": (_st({"t": _e(offsets=(4, 12))}, bytes(12)), True, "expected 0"),
    "gap_between": (_st({"t": GOOD, "u": _e(offsets=(12, 20))}, bytes(20)), True, "expected 8"),
    "overlap": (_st({"t": GOOD, "u": _e(offsets=(4, 12))}, bytes(12)), True, "expected 8"),
    "trailing_bytes": (_st({"t": GOOD}, bytes(12)), True, "corrupt or truncated"),
    "truncated": (_st({"t": GOOD}, bytes(4)), True, "corrupt or truncated"),
    "metadata_int": (_st({"__metadata__": {"format": 1}, "t": GOOD}, bytes(8)), True, "__metadata__"),
    "metadata_list": (_st({"__metadata__": ["pt"], "t": GOOD}, bytes(8)), True, "__metadata__"),
    "not_an_object": (_st(b"[1, 2]"), True, "an array"),
    "not_json": (_st(b"{'t': 1}"), True, "not valid JSON"),
    "deeply_nested": (_st(b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), True, "too deeply"),
    "duplicate_field": (_st(b'{"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)),
                        True, "'dtype' twice"),
    "header_too_large": (struct.pack("<Q", 100 * 2**20 + 8) + b"{}" + bytes(6), True, "100 MiB"),
    "length_past_end": (struct.pack("<Q", 64) + b"{}", True, "header length"),
    "shorter_than_8": (b"{}", True, "header length"),
    # stricter than the library, which accepts these:
    "duplicate_tensor": (_st(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                             b'"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)), False, "'t' twice"),
    "unknown_field": (_st({"t": _e(extra=1)}, bytes(8)), False, "exactly dtype, shape and data_offsets"),
    "metadata_null": (_st({"__metadata__": None, "t": GOOD}, bytes(8)), False, "__metadata__"),
    "zero_elements": (_st({"t": _e(shape=(4, 0), offsets=(0, 0))}), False, "no elements"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_header_strictness(pair, tmp_path, capsys, case):
    raw, oracle, named = HEADERS[case]
    file = pair[0] / SINGLE
    file.write_bytes(raw)
    assert _oracle_refuses(file) == oracle
    err = _run(tmp_path, pair, capsys)
    assert "in0" in err and str(file) in err and named in err and FIX in err, err
    assert len(err.strip().splitlines()) == 1


GOOD_FILES = {
    "plain": _st({"t": GOOD}, bytes(8)),
    "padded_with_spaces": _st({"t": GOOD}, bytes(8), pad=b"      "),
    "whitespace_around": _st(b' \n{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\n', bytes(8)),
    "escaped_key": _st(b'{"t":{"dtype":"F32","shape":[2],"data_offset\\u0073":[0,8]}}', bytes(8)),
    "two_tensors_out_of_order": _st({"__metadata__": {"format": "pt"}, "u": _e(offsets=(8, 16)), "t": GOOD},
                                    bytes(16)),
}


@pytest.mark.parametrize("case", GOOD_FILES)
def test_valid_headers_pass(tmp_path, case):
    file = tmp_path / "ok.safetensors"
    file.write_bytes(GOOD_FILES[case])
    assert not _oracle_refuses(file)
    tensors, _ = read_header(str(file))
    assert tensors["t"].shape == (2,) and tensors["t"].nbytes == 8


def test_files_written_by_safetensors_and_by_distmerge_pass(adapter_sets, tmp_path):
    file = tmp_path / "lib.safetensors"
    save_file({"a": torch.randn(3, 5), "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.arange(4)},
              str(file), metadata={"format": "pt"})
    tensors, metadata = read_header(str(file))
    assert {k: t.shape for k, t in tensors.items()} == {"a": (3, 5), "b": (7,), "c": (4,)}
    assert metadata == {"format": "pt"}
    aset = adapter_sets("llama")
    distmerge.merge(merge_config(aset, tmp_path / "out", "ties", density=0.5))
    out = tmp_path / "out" / SINGLE
    tensors, _ = read_header(str(out))
    assert tensors.keys() == load_file(str(out)).keys()
    assert open_adapter(AdapterSpec(path=str(tmp_path / "out")), 0).modules


# --- 2. no bytes of a file that is not safetensors in a message ------------------------------------------


def test_non_safetensors_file_is_not_echoed(pair, tmp_path, capsys):
    secret = b"password=hunter2-and-more-secret-text\n" * 4
    (pair[0] / SINGLE).write_bytes(secret)
    err = _run(tmp_path, pair, capsys)
    assert "is not a safetensors file" in err and "in0" in err
    assert str(int.from_bytes(secret[:8], "little")) not in err and "hunter2" not in err


def test_invalid_utf8_is_not_echoed(pair, tmp_path, capsys):
    (pair[0] / SINGLE).write_bytes(_st(b'{"t\xfe\xff":1}'))
    err = _run(tmp_path, pair, capsys)
    assert "not UTF-8" in err and "0xfe" not in err and "\\xfe" not in err and "\xfe" not in err


# --- 4. bounded memory on hostile headers -----------------------------------------------------------------

HOSTILE = {  # each just past one bound, each cheap to build; the library would parse them all
    "entries": lambda n: b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                                          for i in range(n + 2)) + b"}",
    "metadata_strings": lambda n: b'{"__metadata__":{' + b",".join(b'"%d":""' % i for i in range(3 * n)) + b"}}",
    "shape_values": lambda n: (b'{"t":{"dtype":"U8","shape":[' + b",".join([b"1"] * (11 * n))
                               + b'],"data_offsets":[0,1]}}'),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_header_is_bounded_before_parsing(pair, tmp_path, capsys, case):
    (pair[0] / SINGLE).write_bytes(_st(HOSTILE[case](200_000), b"\0"))
    err = _run(tmp_path, pair, capsys)
    assert "is not a LoRA safetensors file" in err and "200000 tensors" in err
