"""hf:// inputs through huggingface_hub's own code, offline, from a real cache layout: a branch, a tag and a
commit merge as the same adapters given as local paths; provenance in the manifest; every offline error;
only the files a merge reads; no socket ever opened."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import distmerge
from distmerge.cli import main
from distmerge.errors import AdapterError
from tests.hub_cache import adapter_files, publish

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection from these tests, except to this machine, fails the test."""
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) \
                and self.family != socket.AF_UNIX:
            raise AssertionError(f"a Hub test connected to {address}")
        return real(self, address)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub(adapter_sets, tmp_path):
    """A cache holding org/sql (main, tag v1) with a README and a pickle beside the adapter, and org/multi
    with the second adapter in a subfolder; returns (cache, commits, local adapter paths)."""
    paths = adapter_sets("llama").paths[:2]
    cache = tmp_path / "hf-cache"
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "README.md").write_text("---\nlicense: apache-2.0\n---\n# sql\n")
    (extra / "adapter_model.bin").write_bytes(b"a pickle distmerge must never need")
    files = {**adapter_files(paths[0]), "README.md": extra / "README.md",
             "adapter_model.bin": extra / "adapter_model.bin"}
    sql = publish(cache, "org/sql", files, refs=("main", "v1"))
    multi = publish(cache, "org/multi", {**adapter_files(paths[1], "adapters/chat"), "README.md": extra / "README.md"})
    return cache, {"sql": sql, "multi": multi}, paths


def _cfg(cache: Path, out: Path, *paths: str) -> dict:
    return {"adapters": [{"path": p, "weight": w} for p, w in zip(paths, (0.6, 0.4))],
            "merge": {"method": "ties", "density": 0.5}, "output": {"path": str(out)},
            "runtime": {"executor": "local", "progress": False, "hub_cache": str(cache)}}


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_branch_tag_and_commit_merge_as_the_local_adapters(hub, tmp_path):
    cache, commits, paths = hub
    local = tmp_path / "local"
    distmerge.merge(_cfg(cache, local, str(paths[0]), str(paths[1])))
    for rev in ("", "@main", "@v1", f"@{commits['sql']}"):
        out = tmp_path / f"hub{rev.replace('@', '-')}"
        r = distmerge.merge(_cfg(cache, out, f"hf://org/sql{rev}", "hf://org/multi@main/adapters/chat"))
        assert _sha(out) == _sha(local), rev
        sql, chat = r.manifest["inputs"]
        assert sql["hub"] == {"repo": "org/sql", "revision": rev[1:] or "main", "commit": commits["sql"],
                              "subfolder": None}
        assert sql["uri"] == f"hf://org/sql{rev}" and sql["name"] == "sql"
        assert chat["hub"]["subfolder"] == "adapters/chat" and chat["name"] == "chat"
        for entry, adapter in ((sql, paths[0]), (chat, paths[1])):  # the files read are the cache's blobs,
            assert {Path(f["file"]).parent.name for f in entry["files"]} == {"blobs"}  # hashed as the files are
            assert {f["sha256"] for f in entry["files"]} == {
                hashlib.sha256((adapter / n).read_bytes()).hexdigest()
                for n in ("adapter_model.safetensors", "adapter_config.json")}


def test_only_the_files_a_merge_reads_are_asked_for(hub, tmp_path, monkeypatch):
    """huggingface_hub's own filter, given distmerge's patterns, keeps the config, the safetensors and the
    index, and never the pickle or the README."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    cache, _, _ = hub
    asked = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        asked.append(kwargs["allow_patterns"])
        return real(*args, **kwargs)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    distmerge.merge(_cfg(cache, tmp_path / "o", "hf://org/sql", "hf://org/multi@main/adapters/chat"))
    repo = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
            "adapter_model.safetensors.index.json", "adapter_model-00001-of-00002.safetensors", "training_args.bin"]
    assert sorted(filter_repo_objects(repo, allow_patterns=asked[0])) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "adapter_model.safetensors.index.json",
         "adapter_model-00001-of-00002.safetensors"])
    sub = [f"adapters/chat/{f}" for f in repo] + ["adapter_config.json", "other/adapter_model.safetensors"]
    assert sorted(filter_repo_objects(sub, allow_patterns=asked[1])) == sorted(
        f"adapters/chat/{f}" for f in ["adapter_config.json", "adapter_model.safetensors",
                                       "adapter_model.safetensors.index.json",
                                       "adapter_model-00001-of-00002.safetensors"])


@pytest.mark.parametrize("path, expected", [
    ("hf://org/absent", "org/absent@main is not in the Hugging Face cache"),
    ("hf://org/sql@v9", "org/sql@v9 is not in the Hugging Face cache"),
    ("hf://org/multi", "has no adapter_config.json; is it a PEFT LoRA adapter? Point at the subfolder"),
    ("hf://org/multi@main/adapters/none", "has no adapter_config.json in adapters/none/"),
])
def test_offline_errors_name_the_adapter_and_what_to_do(hub, tmp_path, capsys, monkeypatch, path, expected):
    cache, _, paths = hub
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    (tmp_path / "c.yaml").write_text(json.dumps(_cfg(cache, tmp_path / "out", str(paths[0]), path)))
    assert main(["merge", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert expected in err and repr(path) in err and "Traceback" not in err, err
    assert "hf_secret_token_value" not in err
    assert not (tmp_path / "out").exists()


def test_a_bad_hub_path_is_a_config_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(json.dumps({"adapters": [{"path": "hf://just-a-name"}],
                                                 "output": {"path": str(tmp_path / "o")}}))
    assert main(["merge", str(tmp_path / "c.yaml")]) == 2
    assert "adapters[0].path: 'hf://just-a-name' is not a Hub path" in capsys.readouterr().err


def _http_error(kind: str):
    from huggingface_hub import errors

    try:  # the HTTP client huggingface_hub builds its errors on: httpx2 in 2.x, httpx before
        import httpx2 as httpx
    except ImportError:
        import httpx

    response = httpx.Response(401 if kind != "revision" else 404, request=httpx.Request("GET", "https://hf.co/x"))
    cls = {"gated": errors.GatedRepoError, "missing": errors.RepositoryNotFoundError,
           "revision": errors.RevisionNotFoundError}[kind]
    return cls("server said no", response=response)


@pytest.mark.parametrize("kind, expected", [
    ("gated", "org/sql is gated (HF_TOKEN is set); accept its terms"),
    ("missing", "the Hub has no repo org/sql you can see (HF_TOKEN is set); check the name, or, if it is private"),
    ("revision", "org/sql has no revision 'v7'; use a branch, tag or commit that exists"),
])
def test_online_errors_as_huggingface_hub_raises_them(tmp_path, capsys, monkeypatch, kind, expected):
    """Gated, missing and private repos cannot be produced offline: huggingface_hub's own exceptions, raised
    where it would raise them, must still give one line that never shows the token."""
    import huggingface_hub

    def refuse(*a, **k):
        raise _http_error(kind)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    (tmp_path / "c.yaml").write_text(json.dumps({"adapters": [{"path": "hf://org/sql@v7"}],
                                                 "output": {"path": str(tmp_path / "o")},
                                                 "runtime": {"executor": "local"}}))
    assert main(["merge", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and "hf_secret_token_value" not in err, err


def test_a_snapshot_link_out_of_the_repo_is_refused(hub, tmp_path):
    cache, commits, paths = hub
    snapshot = cache / "models--org--sql" / "snapshots" / commits["sql"]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((paths[0] / "adapter_model.safetensors").read_bytes())
    (snapshot / "adapter_model.safetensors").unlink()
    (snapshot / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AdapterError, match="outside the adapter's directory"):
        distmerge.merge(_cfg(cache, tmp_path / "o", "hf://org/sql", str(paths[1])))


def test_the_cli_honours_hf_hub_cache(hub, tmp_path):
    """The usual environment, read by huggingface_hub itself in a fresh process: HF_HUB_CACHE, offline."""
    cache, _, paths = hub
    cfg = _cfg(cache, tmp_path / "out", "hf://org/sql@v1", str(paths[1]))
    del cfg["runtime"]["hub_cache"]
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret_token_value"}
    out = subprocess.run([sys.executable, "-m", "distmerge", "merge", str(tmp_path / "c.yaml")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    manifest = (tmp_path / "out" / "distmerge.json").read_text()
    assert "hf_secret_token_value" not in manifest + out.stdout + out.stderr
    assert json.loads(manifest)["inputs"][0]["hub"]["revision"] == "v1"


def test_batch_identity_is_the_commit(hub, tmp_path, capsys):
    """An unchanged revision is neither downloaded nor hashed again; a moved branch makes exactly the
    recipes that use it stale."""
    cache, commits, paths = hub
    doc = {"defaults": {"merge": {"method": "linear"},
                        "runtime": {"executor": "local", "progress": False, "hub_cache": str(cache)}},
           "output_root": str(tmp_path / "zoo"),
           "recipes": [{"name": "uses-main", "adapters": ["hf://org/sql", str(paths[1])]},
                       {"name": "uses-tag", "adapters": ["hf://org/sql@v1", str(paths[1])]},
                       {"name": "local-only", "adapters": [str(paths[0]), str(paths[1])]}]}
    (tmp_path / "zoo.yaml").write_text(json.dumps(doc))

    def run() -> dict:
        assert main(["batch", str(tmp_path / "zoo.yaml")]) == 0
        capsys.readouterr()
        report = json.loads((tmp_path / "zoo" / "batch_report.json").read_text())
        return {r["recipe"]: r["status"] for r in report["recipes"]}, report["inputs_hashed"]

    assert run()[0] == {"uses-main": "merged", "uses-tag": "merged", "local-only": "merged"}
    assert run() == ({"uses-main": "up to date", "uses-tag": "up to date", "local-only": "up to date"}, 0)
    # main moves to a new commit with the same adapter files (a README edit): its recipes are stale, since
    # their manifest and card name the commit; the tag's are not
    publish(cache, "org/sql", adapter_files(paths[0]), refs=("main",), salt="a README edit")
    assert run()[0] == {"uses-main": "merged", "uses-tag": "up to date", "local-only": "up to date"}
    # main moves to a new commit whose adapter is retrained; the tag stays
    retrained = tmp_path / "retrained"
    retrained.mkdir()
    from safetensors.torch import load_file, save_file

    t = load_file(str(paths[0] / "adapter_model.safetensors"))
    save_file({k: v * 1.5 for k, v in t.items()}, str(retrained / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (retrained / "adapter_config.json").write_bytes((paths[0] / "adapter_config.json").read_bytes())
    publish(cache, "org/sql", adapter_files(retrained), refs=("main",))
    statuses, _ = run()
    assert statuses == {"uses-main": "merged", "uses-tag": "up to date", "local-only": "up to date"}


def test_an_evaluate_base_model_missing_from_the_cache_is_said_in_distmerges_words(hub, monkeypatch):
    """evaluate's hf:// base model goes through the same download as adapters: one line, no huggingface_hub text."""
    from types import SimpleNamespace

    from distmerge.config.schema import RuntimeSpec
    from distmerge.errors import DistmergeError
    from distmerge.evaluate.run import resolve_base

    cache, _, _ = hub
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    cfg = SimpleNamespace(base_model="hf://org/base@v2", runtime=RuntimeSpec(hub_cache=str(cache)))
    with pytest.raises(DistmergeError) as e:
        resolve_base(cfg)
    text = str(e.value)
    assert text.startswith("base_model 'hf://org/base@v2': org/base@v2 is not in the Hugging Face cache"), text
    assert "hf_secret_token_value" not in text and "\n" not in text
