"""Publishing: every output carries a model card that huggingface_hub parses back. No test reaches the network:
HF_HUB_OFFLINE is set (conftest), and a guard fails any test that opens a socket to a non-loopback address."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import statistics
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import distmerge
from distmerge.cli import main
from distmerge.output.owner import not_ours
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
