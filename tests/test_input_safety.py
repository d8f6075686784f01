"""Hostile inputs: headers validated as strictly as safetensors does (the library is the oracle), no file
read from outside an adapter, sharded adapters exact, adapter_config.json checked; one line, exit 2."""

from __future__ import annotations

import json
import os
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
from distmerge.errors import AdapterError
from tests.conftest import AdapterSet, merge_config
from tests.test_errors import _run

INDEX = "adapter_model.safetensors.index.json"
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


@pytest.fixture(scope="module")
def sharded_src(adapter_sets, tmp_path_factory):
    """A real sharded adapter (index + shards), as distmerge itself writes one."""
    out = tmp_path_factory.mktemp("sharded") / "adapter"
    distmerge.merge(merge_config(adapter_sets("llama"), out, "linear",
                                 output={"shard_size": "2KB", "consolidate": False}))
    return out


@pytest.fixture
def sharded(sharded_src, pair, tmp_path):
    """[a sharded adapter, a single-file one] to break the first of."""
    return [_copy(sharded_src, tmp_path / "sh"), pair[1]]


def _index(path: Path) -> dict:
    return json.loads((path / INDEX).read_text())


def _write_index(path: Path, weight_map) -> None:
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


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


# --- 1 and 7. confined reads --------------------------------------------------------------------------------


def _outside(tmp_path: Path, pair) -> Path:
    other = _copy(pair[1], tmp_path / "other")
    return other / SINGLE


@pytest.mark.parametrize("entry", ["../other/adapter_model.safetensors", "ABS", "sub/x.safetensors", "..", "",
                                   "a\\b.safetensors", "a\0b"])
def test_index_entries_must_be_plain_names(sharded, tmp_path, capsys, entry):
    entry = str(_outside(tmp_path, sharded)) if entry == "ABS" else entry
    wm = _index(sharded[0])["weight_map"]
    wm[next(iter(wm))] = entry
    _write_index(sharded[0], wm)
    err = _run(tmp_path, sharded, capsys)
    assert "'sh'" in err and repr(entry)[1:-1] in err and "plain file name" in err


@pytest.mark.parametrize("file", [SINGLE, "adapter_config.json", "SHARD", INDEX])
def test_symlink_out_of_the_adapter_is_refused(sharded, tmp_path, capsys, file):
    adapter = sharded[0] if file in ("SHARD", INDEX) else sharded[1]
    file = sorted(adapter.glob("adapter_model-*.safetensors"))[0].name if file == "SHARD" else file
    target = tmp_path / "elsewhere" / file
    target.parent.mkdir()
    shutil.copy(adapter / file, target)
    (adapter / file).unlink()
    (adapter / file).symlink_to(target)
    err = _run(tmp_path, sharded, capsys)
    assert file in err and "outside the adapter's directory" in err and str(target) in err


def test_symlink_inside_the_adapter_and_a_cache_root(pair, tmp_path):
    """Links within the confinement root are followed, as a Hub cache's snapshots → blobs need."""
    repo = tmp_path / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (SINGLE, "adapter_config.json"):
        shutil.copy(pair[0] / f, blobs / f"sha-{f}")
        (snap / f).symlink_to(Path("../../blobs") / f"sha-{f}")
    spec = AdapterSpec(path=str(snap))
    with pytest.raises(AdapterError, match="outside the adapter's directory"):
        open_adapter(spec, 0)
    adapter = open_adapter(spec, 0, root=str(repo))
    assert adapter.files == (str(blobs / f"sha-{SINGLE}"),) and adapter.modules


@pytest.mark.parametrize("kind", ["loop", "dangling", "directory", "fifo"])
def test_weights_that_are_not_a_regular_file(pair, tmp_path, capsys, kind):
    file = pair[0] / SINGLE
    file.unlink()
    make = {"loop": lambda: file.symlink_to(file.name), "dangling": lambda: file.symlink_to("gone"),
            "directory": file.mkdir, "fifo": lambda: os.mkfifo(file)}
    make[kind]()
    err = _run(tmp_path, pair, capsys)
    assert "in0" in err and str(file) in err


def test_symlink_loop_as_adapter_path(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop.name)
    with pytest.raises(AdapterError, match="cannot resolve the adapter path"):
        open_adapter(AdapterSpec(path=str(loop)), 0)


def test_symlink_loop_as_adapter_path_from_the_cli(pair, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop.name)
    assert "loop" in _run(tmp_path, [pair[0], loop], capsys)


# --- 5. sharded adapters are exact ----------------------------------------------------------------------


def test_good_sharded_adapter_merges(sharded, tmp_path):
    assert len(open_adapter(AdapterSpec(path=str(sharded[0])), 0).files) > 2
    distmerge.merge(merge_config(AdapterSet("llama", sharded, [0.5, 0.5]), tmp_path / "out", "ties", density=0.5))
    assert (tmp_path / "out" / SINGLE).exists()


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("adapter_model-*.safetensors"))


def _key_in_index_not_in_shard(path):
    wm = _index(path)["weight_map"]
    wm["base_model.model.extra.lora_A.weight"] = _shards(path)[0].name
    _write_index(path, wm)
    return "base_model.model.extra.lora_A.weight", "does not hold it"


def _tensor_not_in_index(path):
    wm = _index(path)["weight_map"]
    gone = sorted(wm)[0]
    del wm[gone]
    _write_index(path, wm)
    return gone, "does not list it"


def _tensor_mapped_to_another_shard(path):
    wm = _index(path)["weight_map"]
    key = sorted(wm)[0]
    wm[key] = next(s.name for s in _shards(path) if s.name != wm[key])
    _write_index(path, wm)
    return key, "maps it to"


def _tensor_in_two_shards(path):
    wm = _index(path)["weight_map"]
    key = sorted(wm)[0]
    other = next(s for s in _shards(path) if s.name != wm[key])
    tensors = load_file(str(other))
    tensors[key] = load_file(str(path / wm[key]))[key]
    save_file(tensors, str(other))
    return key, "is in both"


def _unlisted_shard(path):
    shutil.copy(_shards(path)[0], path / "adapter_model-extra.safetensors")
    return "adapter_model-extra.safetensors", "does not list"


def _missing_shard(path):
    gone = _shards(path)[-1]
    gone.unlink()
    return gone.name, "missing"


SHARD_BREAKS = {"key_not_in_shard": _key_in_index_not_in_shard, "tensor_not_in_index": _tensor_not_in_index,
                "mapped_elsewhere": _tensor_mapped_to_another_shard, "in_two_shards": _tensor_in_two_shards,
                "unlisted_file": _unlisted_shard, "missing_shard": _missing_shard}


@pytest.mark.parametrize("case", SHARD_BREAKS)
def test_sharded_adapter_must_be_exact(sharded, tmp_path, capsys, case):
    named, why = SHARD_BREAKS[case](sharded[0])
    err = _run(tmp_path, sharded, capsys)
    assert "'sh'" in err and why in err and named in err, err


@pytest.mark.parametrize("doc", [[], {"weight_map": []}, {"weight_map": {"t": 1}}, {"metadata": {}}])
def test_index_shape(sharded, tmp_path, capsys, doc):
    (sharded[0] / INDEX).write_text(json.dumps(doc))
    assert "is not a valid index" in _run(tmp_path, sharded, capsys)


# --- 6. adapter_config.json --------------------------------------------------------------------------------


def _raw_config(path: Path, key: str, raw: str) -> None:
    """Set key to raw JSON text, which may be what json.dumps never writes (NaN, 5000 digits)."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[key] = "@@"
    (path / "adapter_config.json").write_text(json.dumps(cfg).replace('"@@"', raw))


CONFIGS = [  # (key, raw JSON value, what the message says)
    ("r", "4.5", "r=4.5, expected a positive integer"), ("r", "4.0", "r=4.0, expected a positive integer"),
    ("r", '"4"', "r='4', expected a positive integer"), ("r", "true", "r=True, expected a positive integer"),
    ("r", "0", "r=0, expected"), ("r", "NaN", "r=nan, expected"), ("r", "Infinity", "r=inf, expected"),
    ("r", "1" + "0" * 400, "r=1000"),
    ("lora_alpha", "NaN", "lora_alpha=nan, expected a positive finite number"),
    ("lora_alpha", "-Infinity", "lora_alpha=-inf, expected"), ("lora_alpha", "1e400", "lora_alpha=inf, expected"),
    ("lora_alpha", '"8"', "lora_alpha='8', expected"),
    ("rank_pattern", '["q_proj", 2]', "rank_pattern=['q_proj', 2], expected an object"),
    ("rank_pattern", '"q_proj"', "rank_pattern='q_proj', expected an object"),
    ("rank_pattern", '{"q_proj(": 4}', "rank_pattern key 'q_proj(', which is not a valid regular expression"),
    ("rank_pattern", '{"a)|(b": 4}', "rank_pattern key 'a)|(b', which is not a valid regular expression"),
    ("rank_pattern", '{"q_proj": 2.5}', "rank_pattern['q_proj']=2.5, expected a positive integer"),
    ("rank_pattern", '{"q_proj": 0}', "rank_pattern['q_proj']=0, expected"),
    ("rank_pattern", '{"q_proj": NaN}', "rank_pattern['q_proj']=nan, expected"),
    ("alpha_pattern", "[8]", "alpha_pattern=[8], expected an object"),
    ("alpha_pattern", '{"[v": 3}', "alpha_pattern key '[v', which is not a valid regular expression"),
    ("alpha_pattern", '{"v_proj": Infinity}', "alpha_pattern['v_proj']=inf, expected a positive finite number"),
    ("alpha_pattern", '{"v_proj": -3}', "alpha_pattern['v_proj']=-3, expected"),
    ("target_modules", '[["q_proj"]]', "target_modules=[['q_proj']], expected a regex string or a list"),
    ("modules_to_save", '"lm_head"', "modules_to_save='lm_head', expected a list of module names"),
    ("base_model_name_or_path", '{"a": 1}', "base_model_name_or_path={'a': 1}, expected a string"),
    ("r", "9" * 5000, "holds a number too long to parse"),
    ("lora_dropout", "[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
]


@pytest.mark.parametrize("key, raw, why", CONFIGS, ids=[f"{k}={r[:12]}" for k, r, _ in CONFIGS])
def test_config_values(pair, tmp_path, capsys, key, raw, why):
    _raw_config(pair[0], key, raw)
    err = _run(tmp_path, pair, capsys)
    assert "in0" in err and str(pair[0] / "adapter_config.json") in err and why in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("raw, why", [(b'{"r": 4, "r": 8}', "'r' twice"), (b'{"r": 4\xff}', "not UTF-8"),
                                      (b"\xef\xbb\xbf{}", "not valid JSON")])
def test_config_file(pair, tmp_path, capsys, raw, why):
    (pair[0] / "adapter_config.json").write_bytes(raw)
    err = _run(tmp_path, pair, capsys)
    assert "in0" in err and why in err and "\\xff" not in err, err


def test_integral_lora_alpha_float_is_accepted(pair):
    _raw_config(pair[0], "lora_alpha", "8.0")
    _raw_config(pair[0], "alpha_pattern", '{"v_proj": 3.5}')
    adapter = open_adapter(AdapterSpec(path=str(pair[0])), 0)
    assert {m.alpha for m in adapter.modules.values()} == {8.0, 3.5}
