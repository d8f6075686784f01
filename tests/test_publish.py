"""Publishing: every output carries a model card that huggingface_hub parses back, and push_to_hub uploads the
finished output in one commit. No test reaches the network: HF_HUB_OFFLINE is set (conftest), a guard fails any
test that opens a socket to a non-loopback address, and the Hub is a recording stand-in for HfApi."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import statistics
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitInfo, ModelCard

import distmerge
from distmerge.cli import main
from distmerge.config.zoo import load_zoo
from distmerge.errors import ConfigError, PushError
from distmerge.output.owner import not_ours
from distmerge.publish import hub as hub_module
from distmerge.publish.card import build_card
from tests.conftest import merge_config

TOKEN = "hf_FakeTokenForTests0123456789abcdef"


# --- no network, ever -------------------------------------------------------------------------------------------


def _loopback(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection to, or name lookup of, a non-loopback host fails the test, even if the code caught it."""
    attempts: list[str] = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guard(address) -> None:
        host = address[0] if isinstance(address, tuple) else None  # AF_UNIX paths are local
        if not _loopback(host):
            attempts.append(repr(address))
            raise ConnectionRefusedError(f"test_publish: network access to {address!r} is forbidden")

    def guarded_connect(self, address):
        guard(address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        guard(address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            attempts.append(f"getaddrinfo({host!r})")
            raise socket.gaierror(f"test_publish: name lookup of {host!r} is forbidden")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # a token that must never be printed
    yield attempts
    assert not attempts, f"the test touched the network: {attempts}"


def test_the_network_guard_catches_a_connection(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("hf.co", 443), timeout=1)
    assert no_network == ["getaddrinfo('hf.co')"]
    no_network.clear()


# --- the Hub, as a recording stand-in -----------------------------------------------------------------------------


class Hub:
    """What distmerge asked of the Hub, call by call. `fail` makes every call raise it."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.fail: BaseException | None = None

    def names(self, call: str) -> list[dict]:
        return [kw for c, kw in self.calls if c == call]


class RecordingApi:
    def __init__(self, hub: Hub):
        self.hub = hub

    def _call(self, name: str, **kw):
        self.hub.calls.append((name, kw))
        if self.hub.fail is not None:
            raise self.hub.fail

    def create_repo(self, repo_id, **kw):
        self._call("create_repo", repo_id=repo_id, **kw)

    def create_branch(self, repo_id, **kw):
        self._call("create_branch", repo_id=repo_id, **kw)

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        # what upload_folder would send: the files there that allow_patterns admits (exact names here)
        kw["files"] = [n for n in present or [] if n in (kw.get("allow_patterns") or present)]
        kw["present"] = present
        kw["complete"] = folder.is_dir() and not_ours(folder) is None
        kw["debris"] = sorted(p.name for p in folder.parent.iterdir() if ".distmerge-" in p.name)
        self._call("upload_folder", **kw)
        n = len(self.hub.names("upload_folder"))
        oid = f"{n:040x}"
        pr = f"https://huggingface.co/{kw['repo_id']}/discussions/{n}" if kw.get("create_pr") else None
        return CommitInfo(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{oid}",
                          commit_message=kw.get("commit_message") or "", commit_description="", oid=oid, pr_url=pr)


@pytest.fixture
def hub(monkeypatch) -> Hub:
    """Replaces HfApi where distmerge constructs it (distmerge.publish.hub.HfApi)."""
    recorder = Hub()
    monkeypatch.setattr(hub_module, "HfApi", lambda *a, **k: RecordingApi(recorder))
    return recorder


# --- helpers ---------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, doc: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return code, out.out, out.err


def _section(text: str, title: str) -> str:
    body = text.split(f"\n## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def _manifest(out: Path) -> dict:
    return json.loads((out / "distmerge.json").read_text())


# --- the model card --------------------------------------------------------------------------------------------


def test_card_metadata_sections_and_round_trip(adapter_sets, tmp_path):
    aset = adapter_sets("llama")
    out = tmp_path / "out"
    distmerge.merge(merge_config(aset, out, "ties_svd", density=0.5, svd_rank=2))
    m = _manifest(out)
    assert "README.md" in {o["file"] for o in m["outputs"]} and not_ours(out) is None  # listed; still ours

    card = ModelCard.load(out / "README.md")  # huggingface_hub's own parser
    assert card.data.to_dict() == {"base_model": "tiny-base", "library_name": "peft",
                                   "tags": ["lora", "peft", "merge", "distmerge"]}
    again = ModelCard(str(card))
    assert (again.data.base_model, again.data.library_name, again.data.tags) == (
        "tiny-base", "peft", ["lora", "peft", "merge", "distmerge"])
    # a pure function of the manifest (without outputs) and the output's adapter_config
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert str(build_card({**m, "outputs": []}, adapter_config)) == (out / "README.md").read_text()

    text = card.text
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", _section(text, "Merge config"), re.S)[1])
    expected = json.loads(json.dumps(m["config"]))  # a copy
    for key in ("path", "overwrite", "model_card", "push_to_hub", "hub_private", "hub_revision", "hub_create_pr",
                "hub_commit_message"):  # where this copy went, not what was merged
        expected["output"].pop(key, None)
    expected["runtime"] = {k: expected["runtime"][k] for k in ("device", "cpus_per_worker")}
    assert config == expected and config["merge"] == m["config"]["merge"]

    table = [line for line in _section(text, "Source adapters").splitlines() if line.startswith("|")]
    assert table[0] == "| adapter | source | weight | rank |"
    rows = [line.split(" | ") for line in table[2:]]
    assert [r[0].lstrip("| ") for r in rows] == [e["name"] for e in m["inputs"]]
    for row, entry, path, weight in zip(rows, m["inputs"], aset.paths, aset.weights):
        assert row[1] == f"`{path}`" and float(row[2]) == weight and row[3].rstrip(" |") == "4" == str(entry["rank"])

    method = _section(text, "Method")
    assert method.startswith("\n`ties_svd`") and "- `density`: 0.5" in method and "- `svd_rank`: 2" in method
    assert "- output rank: 2" in method

    errors = {k: s["svd_truncation_error"] for k, s in m["modules"].items()}
    worst = max(errors, key=errors.get)
    stats = _section(text, "Merge statistics")
    assert f"| modules merged | {len(m['modules'])} |" in stats
    assert f"| {statistics.median(errors.values()):.6g} |" in stats
    assert f"| {errors[worst]:.6g} (`{worst}`) |" in stats
    assert f"| {statistics.fmean(s['kept_fraction'] for s in m['modules'].values()):.6g} |" in stats

    use = _section(text, "Use")
    assert "PeftModel.from_pretrained(base, " in use and "LoRARequest(" in use and "max_lora_rank=8" in use
    assert f"distmerge](https://github.com/distmerge/distmerge) {distmerge.__version__}" in text


def test_card_metadata_from_the_manifest_alone(adapter_sets, tmp_path):
    """License, Hub sources, local base models and vLLM's rank steps, on a real manifest edited by hand."""
    out = tmp_path / "out"
    distmerge.merge(merge_config(adapter_sets("llama"), out, "cat"))
    m, adapter_config = _manifest(out), json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 12 and "license" not in build_card(m, adapter_config).data.to_dict()
    assert "max_lora_rank=16" in build_card(m, adapter_config).text  # 12 is not a rank vLLM accepts

    hub_entry = {"repo": "org/sql-lora", "revision": "main", "commit": "c" * 40, "subfolder": "v2"}
    m["inputs"][0]["hub"] = hub_entry
    for entry in m["inputs"]:
        entry["license"] = "apache-2.0"
    card = build_card(m, adapter_config)
    assert card.data.license == "apache-2.0"
    assert f"| `org/sql-lora@{'c' * 40}` (`v2`) |" in card.text
    m["inputs"][1]["license"] = "mit"  # inputs disagree: no license is claimed
    assert card.data.license == "apache-2.0" and build_card(m, adapter_config).data.license is None

    local = build_card(m, {**adapter_config, "base_model_name_or_path": "/models/llama-3-8b"})
    assert local.data.base_model is None and "`/models/llama-3-8b`" in local.text  # the Hub refuses a path
    assert build_card(m, {**adapter_config, "base_model_name_or_path": None}).data.base_model is None


def test_model_card_false_writes_none(adapter_sets, tmp_path):
    out = tmp_path / "out"
    distmerge.merge(merge_config(adapter_sets("llama"), out, "linear", output={"model_card": False}))
    assert not (out / "README.md").exists()
    assert {o["file"] for o in _manifest(out)["outputs"]} == {"adapter_config.json", "adapter_model.safetensors"}


def test_an_output_with_its_card_is_replaced_but_an_edited_card_is_not(adapter_sets, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _write(tmp_path, merge_config(adapter_sets("llama"), out, "linear", output={"overwrite": True}))
    assert _cli(capsys, "merge", str(cfg))[0] == 0
    first = (out / "README.md").read_text()
    code, _, err = _cli(capsys, "merge", str(cfg), "adapters.0.weight=0.9")
    assert code == 0, err
    assert (out / "README.md").read_text() != first and "| 0.9 |" in (out / "README.md").read_text()
    (out / "README.md").write_text(first + "\nmy notes\n")  # the user edits the card: the directory is theirs
    code, _, err = _cli(capsys, "merge", str(cfg))
    assert code == 2 and "has README.md changed since distmerge wrote it" in err
    assert (out / "README.md").read_text().endswith("my notes\n")


# --- push_to_hub ---------------------------------------------------------------------------------------------


def test_merge_pushes_the_complete_output(adapter_sets, tmp_path, capsys, hub):
    out = tmp_path / "out"
    cfg = _write(tmp_path, merge_config(adapter_sets("llama"), out, "ties", density=0.5, output={
        "push_to_hub": "my-org/support-merged", "hub_private": True, "hub_revision": "nightly",
        "hub_create_pr": True, "hub_commit_message": "Nightly merge"}))
    code, stdout, err = _cli(capsys, "merge", str(cfg))
    assert code == 0, err
    assert [c for c, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.names("create_repo") == [{"repo_id": "my-org/support-merged", "private": True, "exist_ok": True,
                                         "repo_type": "model"}]
    assert hub.names("create_branch") == [{"repo_id": "my-org/support-merged", "branch": "nightly", "exist_ok": True,
                                           "repo_type": "model"}]
    up = hub.names("upload_folder")[0]
    listed = sorted({o["file"] for o in _manifest(out)["outputs"]} | {"distmerge.json"})
    assert up["folder_path"] == str(out)  # the final directory, not its staging
    assert up["files"] == up["present"] == listed == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors", "distmerge.json"]
    assert up["complete"] and up["debris"] == []  # uploaded after the rename: complete, no staging left
    assert (up["repo_id"], up["revision"], up["create_pr"], up["commit_message"]) == (
        "my-org/support-merged", "nightly", True, "Nightly merge")
    assert up["delete_patterns"] == ["adapter_model*.safetensors", "adapter_model.safetensors.index.json"]
    assert "pushed to my-org/support-merged@nightly as a pull request: https://huggingface.co/my-org/" in stdout
    assert TOKEN not in stdout + err


def test_push_defaults_and_the_python_api(adapter_sets, tmp_path, hub):
    out = tmp_path / "out"
    result = distmerge.merge(merge_config(adapter_sets("llama"), out, "linear",
                                          output={"push_to_hub": "my-org/plain", "consolidate": False,
                                                  "shard_size": "2KB"}))
    assert [c for c, _ in hub.calls] == ["create_repo", "upload_folder"]  # no branch to create
    assert hub.names("create_repo")[0]["private"] is False
    up = hub.names("upload_folder")[0]
    assert (up["revision"], up["create_pr"]) == (None, False) and "linear" in up["commit_message"]
    assert len([f for f in up["files"] if f.startswith("adapter_model-")]) > 1  # every shard and the index
    assert "adapter_model.safetensors.index.json" in up["files"]
    assert result.hub == {"repo": "my-org/plain", "revision": "main", "oid": f"{1:040x}", "pr_url": None,
                          "commit_url": f"https://huggingface.co/my-org/plain/commit/{1:040x}"}
    assert "hub" not in _manifest(out)  # written before the upload; the push is recorded in the result


@pytest.mark.parametrize("error", ["http", "oserror", "offline"])
def test_a_failed_upload_leaves_the_output_complete_and_says_how_to_retry(adapter_sets, tmp_path, capsys, hub,
                                                                          monkeypatch, error):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    out = tmp_path / "my out"
    if error == "http":
        response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        hub.fail = HfHubHTTPError(f"401 Client Error: Unauthorized (Authorization: Bearer {TOKEN})",
                                  response=response)
    elif error == "oserror":
        hub.fail = OSError(f"[Errno 101] Network is unreachable\nwhile sending {TOKEN}")
    else:  # the real HfApi: HF_HUB_OFFLINE makes it refuse before any request
        monkeypatch.setattr(hub_module, "HfApi", huggingface_hub.HfApi)
    cfg = _write(tmp_path, merge_config(adapter_sets("llama"), out, "linear",
                                        output={"push_to_hub": "my-org/x", "hub_revision": "dev"}))
    code, stdout, err = _cli(capsys, "merge", str(cfg))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"the output is complete at {out}, but uploading it to my-org/x@dev failed" in err
    assert f"retry the upload alone with: distmerge push '{out}' my-org/x --revision dev" in err
    assert TOKEN not in err + stdout
    if error == "http":
        assert "set HF_TOKEN to a token with write access to my-org" in err
    if error == "offline":
        assert "OfflineModeIsEnabled" in err
    assert not_ours(out) is None and (out / "README.md").is_file()  # complete, and still distmerge's own
    assert not [p for p in tmp_path.iterdir() if ".distmerge-" in p.name]
    with pytest.raises(PushError):
        distmerge.merge(str(cfg), ["output.overwrite=true"])


def test_distmerge_push_refuses_what_is_not_a_complete_output(adapter_sets, tmp_path, capsys, hub):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.bin").write_text("x")
    code, _, err = _cli(capsys, "push", str(theirs), "my-org/x")
    assert code == 2 and "is not a distmerge output (no distmerge.json)" in err and "distmerge push uploads" in err
    (tmp_path / "empty").mkdir()
    assert _cli(capsys, "push", str(tmp_path / "empty"), "my-org/x")[0] == 2
    assert _cli(capsys, "push", str(tmp_path / "missing"), "my-org/x")[0] == 2

    out = tmp_path / "out"
    distmerge.merge(merge_config(adapter_sets("llama"), out, "linear"))
    code, _, err = _cli(capsys, "push", str(out), "my org/x", "--revision", "a b")
    assert code == 2 and "ORG/NAME: 'my org/x' is not a valid Hub repo id" in err
    assert "--revision: 'a b' is not a branch name" in err
    (out / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, "push", str(out), "my-org/x")
    assert code == 2 and "holds files distmerge did not write (notes.txt)" in err
    assert hub.calls == []

    (out / "notes.txt").unlink()
    code, stdout, err = _cli(capsys, "push", str(out), "my-org/x", "--private", "--revision", "v1", "--create-pr",
                             "--message", "Retry")
    assert code == 0, err
    up = hub.names("upload_folder")[0]
    assert hub.names("create_repo")[0]["private"] is True and hub.names("create_branch")[0]["branch"] == "v1"
    assert (up["folder_path"], up["revision"], up["create_pr"], up["commit_message"]) == (str(out), "v1", True,
                                                                                          "Retry")
    assert "pushed to my-org/x@v1 as a pull request" in stdout


def test_push_keys_are_validated_with_the_rest(adapter_sets, tmp_path):
    cfg = merge_config(adapter_sets("llama"), tmp_path / "out", "linear", output={
        "push_to_hub": "my-org/a/b", "hub_revision": "../main", "hub_commit_message": "two\nlines",
        "model_card": "yes"})
    with pytest.raises(ConfigError) as e:
        distmerge.load_config(cfg)
    problems = "\n".join(e.value.problems)
    assert len(e.value.problems) == 1 and "output.model_card: expected bool" in problems  # types first
    del cfg["output"]["model_card"]
    with pytest.raises(ConfigError) as e:
        distmerge.load_config(cfg)
    assert [p.split(":")[0] for p in e.value.problems] == ["output.push_to_hub", "output.hub_revision",
                                                          "output.hub_commit_message"]
    assert "expected ORG/NAME" in e.value.problems[0]
    with pytest.raises(ConfigError, match="is not a valid Hub repo id"):
        distmerge.load_config(cfg, ["output.push_to_hub=my-org/bad--name", "output.hub_revision=null",
                                    "output.hub_commit_message=null"])


# --- a batch --------------------------------------------------------------------------------------------------


def _zoo(shelf: Path, root: Path) -> dict:
    return {"defaults": {"merge": {"method": "linear"}, "runtime": {"executor": "local", "progress": False}},
            "output_root": str(root),
            "recipes": [
                {"name": "bot", "adapters": [{"path": str(shelf / "sql")}, {"path": str(shelf / "chat")}],
                 "output": {"push_to_hub": "my-org/bot"}},
                {"name": "code", "adapters": [{"path": str(shelf / "code-a")}, {"path": str(shelf / "code-b")}],
                 "output": {"push_to_hub": "my-org/code"}},
                {"name": "mix", "adapters": [{"recipe": "bot"}, {"recipe": "code"}]},
            ]}


def _batch(capsys, zoo: Path, *args: str) -> tuple[int, str, dict]:
    code, stdout, _ = _cli(capsys, "batch", str(zoo), *args)
    report = json.loads(Path(json.loads(zoo.read_text())["output_root"], "batch_report.json").read_text())
    return code, stdout, {r["recipe"]: r for r in report["recipes"]}


def test_a_batch_pushes_what_it_merges_and_nothing_up_to_date(shelf, tmp_path, capsys, hub):
    zoo = _write(tmp_path, _zoo(shelf, tmp_path / "zoo"), "zoo.yaml")
    code, stdout, report = _batch(capsys, zoo)
    assert code == 0, stdout
    ups = hub.names("upload_folder")
    assert sorted((u["repo_id"], u["folder_path"]) for u in ups) == [
        ("my-org/bot", str(tmp_path / "zoo" / "bot")), ("my-org/code", str(tmp_path / "zoo" / "code"))]
    assert all(u["complete"] for u in ups)
    assert report["bot"]["hub"]["repo"] == "my-org/bot" and report["bot"]["hub"]["oid"]
    assert "pushed to my-org/bot@main" in report["bot"]["reason"] and report["mix"]["hub"] == {}

    code, stdout, report = _batch(capsys, zoo)  # all up to date: nothing merges, nothing is pushed again
    assert code == 0 and {r["status"] for r in report.values()} == {"up to date"}
    assert len(hub.names("upload_folder")) == 2

    _batch(capsys, zoo, "--force", "code")
    assert [u["repo_id"] for u in hub.names("upload_folder")][2:] == ["my-org/code"]


def test_a_batch_merges_on_while_a_recipe_uploads(shelf, tmp_path, capsys, monkeypatch):
    """The pool is not idle during an upload: bot's upload waits (up to 30 s) for code, the next recipe, to be
    merged, which happens only if the upload runs beside the pool rather than in its loop."""
    root = tmp_path / "zoo"
    recorder = Hub()

    class SlowApi(RecordingApi):
        def upload_folder(self, **kw):
            if kw["repo_id"] == "my-org/bot":
                deadline = time.monotonic() + 30
                while not (root / "code" / "distmerge.json").exists():
                    if time.monotonic() > deadline:
                        raise OSError("code was not merged while bot uploaded")
                    time.sleep(0.05)
            return super().upload_folder(**kw)

    monkeypatch.setattr(hub_module, "HfApi", lambda *a, **k: SlowApi(recorder))
    zoo = _write(tmp_path, _zoo(shelf, root), "zoo.yaml")
    code, stdout, report = _batch(capsys, zoo)
    assert code == 0, report
    assert {n: r["status"] for n, r in report.items()} == {"bot": "merged", "code": "merged", "mix": "merged"}
    assert [u["repo_id"] for u in recorder.names("upload_folder")] == ["my-org/bot", "my-org/code"]  # one at a time
    assert "pushed to my-org/bot@main" in report["bot"]["reason"]


def test_a_failed_push_fails_its_recipe_alone(shelf, tmp_path, capsys, hub):
    hub.fail = OSError("Network is unreachable")
    zoo = _write(tmp_path, _zoo(shelf, tmp_path / "zoo"), "zoo.yaml")
    code, stdout, report = _batch(capsys, zoo)
    assert code == 2
    assert {n: r["status"] for n, r in report.items()} == {"bot": "failed", "code": "failed", "mix": "merged"}
    bot = tmp_path / "zoo" / "bot"
    assert f"the output is complete at {bot}" in report["bot"]["reason"]
    assert f"distmerge push {bot} my-org/bot" in report["bot"]["reason"]
    for name in ("bot", "code", "mix"):  # the outputs stay, complete; the recipe merging them ran
        assert not_ours(tmp_path / "zoo" / name) is None
    hub.fail = None
    code, _, report = _batch(capsys, zoo)  # up to date, but not pushed: this run pushes them, and merges nothing
    assert code == 0 and {n: r["status"] for n, r in report.items()} == {
        "bot": "up to date", "code": "up to date", "mix": "up to date"}
    assert "pushed to my-org/bot@main" in report["bot"]["reason"]
    assert sorted(u["repo_id"] for u in hub.names("upload_folder")) == ["my-org/bot", "my-org/code"]
    code, _, report = _batch(capsys, zoo)  # now recorded as pushed: nothing more
    assert code == 0 and len(hub.names("upload_folder")) == 2


def test_an_unexpected_upload_error_fails_its_recipe_with_the_retry(shelf, tmp_path, capsys, hub, monkeypatch):
    """A bug after the upload (not a Hub refusal, which push words itself) fails that recipe alone."""
    def broken_record(*args, **kwargs):
        raise RuntimeError("stand-in bug")

    monkeypatch.setattr(hub_module, "record", broken_record)
    zoo = _write(tmp_path, _zoo(shelf, tmp_path / "zoo"), "zoo.yaml")
    code, _, report = _batch(capsys, zoo)
    assert code == 2 and {n: r["status"] for n, r in report.items()} == {"bot": "failed", "code": "failed",
                                                                         "mix": "merged"}
    assert "RuntimeError" in report["bot"]["reason"] and "distmerge push" in report["bot"]["reason"]


def test_two_recipes_pushing_to_one_branch_are_refused(shelf, tmp_path):
    doc = _zoo(shelf, tmp_path / "zoo")
    doc["recipes"][1]["output"]["push_to_hub"] = "my-org/bot"
    with pytest.raises(ConfigError, match="recipes 'bot' and 'code' both push to my-org/bot@main"):
        load_zoo(_write(tmp_path, doc, "zoo.yaml"))
    doc["recipes"][1]["output"]["hub_revision"] = "code"
    assert len(load_zoo(_write(tmp_path, doc, "zoo.yaml")).recipes) == 3


def test_readme_documents_the_keys():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key in ("model_card:", "push_to_hub:", "hub_private:", "hub_revision:", "hub_create_pr:",
                "hub_commit_message:", "## Publish to the Hub", "distmerge push"):
        assert key in readme, key



def test_diffusion_cards_name_the_file_and_do_not_say_every_method_approximates():
    """The loading snippet comes from the format table; ties/dare/della/breadcrumbs prune, so the card does not
    say that every method approximates the cat sum."""
    from distmerge.adapters.formats import DIFFUSERS_FILE
    from distmerge.publish.card import _usage_of

    diffusers, kohya, peft = (_usage_of(f, {"base_model_name_or_path": "m"}) for f in ("diffusers", "kohya", "peft"))
    assert f'weight_name="{DIFFUSERS_FILE}")  # this repo, or the local directory\n' in diffusers
    assert 'weight_name="NAME.safetensors")  # this repo, or the local directory; NAME.safetensors: its kohya ' \
           'file\n' in kohya
    for card in (diffusers, kohya):
        assert "approximate" not in card and "other methods merge as their method says, usually at a smaller " \
               "rank" in card
    assert "PeftModel.from_pretrained" in peft and "load_lora_weights" not in peft
