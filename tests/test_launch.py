"""launch/: submit.sh against a fake `ray` on PATH, and the cron, systemd and Kubernetes files; no cluster."""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from distmerge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SUBMIT = LAUNCH / "submit.sh"

# Logs each call as one JSON line; for `job submit`, also what its working_dir holds (submit.sh deletes it
# on exit). `job status` answers from FAKE_RAY_STATUS: unset, "not found" (exit 1); a state, "Job ... STATE".
FAKE_RAY = """#!{python}
import json, os, sys
args = sys.argv[1:]
call = {{"argv": args}}
if args[:2] == ["job", "submit"]:
    wd = json.loads(args[args.index("--runtime-env-json") + 1])["working_dir"]
    call["working_dir"] = sorted(os.listdir(wd))
    call["files"] = sorted(os.path.relpath(os.path.join(d, f), wd) for d, _, fs in os.walk(wd) for f in fs)
    call["config"] = open(os.path.join(wd, "config.yaml")).read()
with open(os.environ["FAKE_RAY_LOG"], "a") as log:
    log.write(json.dumps(call) + "\\n")
if args[:2] == ["job", "status"]:
    state = os.environ.get("FAKE_RAY_STATUS")
    if state == "unreachable":
        print("ConnectionError: Failed to connect to Ray at address: " + args[args.index("--address") + 1])
        sys.exit(1)
    if not state:
        print("RuntimeError: Request failed with status code 404: Job " + args[-1] + " does not exist.")
        sys.exit(1)
    print("Job '" + args[-1] + "' " + state)
"""


@pytest.fixture
def run_submit(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ray"
    fake.write_text(FAKE_RAY.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "ray_calls.jsonl"

    def run(*args: str, **env: str):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTMERGE_", "FAKE_RAY_"))}
        full_env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_RAY_LOG=str(log), **env)
        log.write_text("")
        proc = subprocess.run(["bash", str(SUBMIT), *args], cwd=tmp_path, env=full_env, capture_output=True,
                              text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return proc, calls

    return run


def _submit(calls: list[dict]) -> dict:
    submits = [c for c in calls if c["argv"][:2] == ["job", "submit"]]
    assert len(submits) == 1, calls
    return submits[0]


def _flag(argv: list[str], name: str) -> str | None:
    head = argv[:argv.index("--")]
    return head[head.index(name) + 1] if name in head else None


def _entrypoint(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1:]


def _today() -> set[str]:  # the date submit.sh saw: today, or yesterday across a midnight
    now = datetime.datetime.now(datetime.timezone.utc)
    return {(now - datetime.timedelta(minutes=m)).strftime("%Y-%m-%d") for m in (0, 1)}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "my merge.yaml"
    path.write_text("adapters: []\n")
    return path


@pytest.fixture
def zoo(tmp_path):
    path = tmp_path / "Zoo_Nightly.yaml"
    path.write_text("recipes: []\n")
    return path


def test_submit_sh_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", str(SUBMIT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert os.access(SUBMIT, os.X_OK)  # cron and systemd run it directly


@pytest.mark.parametrize("subcommand", [[], ["merge"]])
def test_merge_form_unchanged(run_submit, config, subcommand):
    proc, calls = run_submit(*subcommand, "http://head:8265", str(config), "output.path=/shared/out")
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"][:2] for c in calls] == [["job", "submit"]]  # no status check without a submission id
    argv = calls[0]["argv"]
    assert _flag(argv, "--address") == "http://head:8265"
    assert _flag(argv, "--submission-id") is None
    assert _flag(argv, "--entrypoint-num-cpus") == "1"
    assert _entrypoint(argv) == ["python", "-m", "distmerge", "merge", "config.yaml", "runtime.executor=ray",
                                 "output.path=/shared/out"]
    assert calls[0]["working_dir"] == ["config.yaml", "distmerge"]
    assert calls[0]["config"] == config.read_text()
    assert "distmerge/__init__.py" in calls[0]["files"]
    assert not [f for f in calls[0]["files"] if "__pycache__" in f or f.endswith(".pyc")]


def test_merge_with_a_submission_id(run_submit, config):
    proc, calls = run_submit("http://head:8265", str(config), DISTMERGE_SUBMISSION_ID="merge-42")
    assert proc.returncode == 0, proc.stderr
    assert calls[0]["argv"] == ["job", "status", "--address", "http://head:8265", "merge-42"]
    assert _flag(_submit(calls)["argv"], "--submission-id") == "merge-42"


def test_batch_form(run_submit, zoo):
    proc, calls = run_submit("batch", "http://head:8265", str(zoo), "--only", "support-bot", "defaults.merge.seed=3")
    assert proc.returncode == 0, proc.stderr
    ids = {f"distmerge-zoo-nightly-{d}" for d in _today()}  # Zoo_Nightly.yaml: lowercased, [a-z0-9-] only
    status, submit = calls
    assert status["argv"][:4] == ["job", "status", "--address", "http://head:8265"] and status["argv"][4] in ids
    argv = submit["argv"]
    assert _flag(argv, "--submission-id") == status["argv"][4]
    assert _flag(argv, "--entrypoint-num-cpus") == "1"
    assert _entrypoint(argv) == ["python", "-m", "distmerge", "batch", "config.yaml",
                                 "defaults.runtime.executor=ray", "--only", "support-bot", "defaults.merge.seed=3"]
    assert submit["working_dir"] == ["config.yaml", "distmerge"]
    assert submit["config"] == zoo.read_text()


def test_batch_id_and_driver_cpus_from_the_environment(run_submit, zoo):
    proc, calls = run_submit("batch", "http://head:8265", str(zoo), DISTMERGE_SUBMISSION_ID="rerun-2",
                             DISTMERGE_DRIVER_CPUS="2", DISTMERGE_SUBMIT_FLAGS="--no-wait")
    assert proc.returncode == 0, proc.stderr
    argv = _submit(calls)["argv"]
    assert calls[0]["argv"][-1] == "rerun-2" and _flag(argv, "--submission-id") == "rerun-2"
    assert _flag(argv, "--entrypoint-num-cpus") == "2"
    assert "--no-wait" in argv[:argv.index("--")]


@pytest.mark.parametrize("state", ["SUCCEEDED", "RUNNING", "FAILED"])
def test_an_existing_submission_is_not_submitted_again(run_submit, zoo, state):
    proc, calls = run_submit("batch", "http://head:8265", str(zoo), FAKE_RAY_STATUS=state)
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"][:2] for c in calls] == [["job", "status"]]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and state in lines[0], proc.stdout
    assert re.search(r"distmerge-zoo-nightly-\d{4}-\d\d-\d\d", lines[0])


def test_a_failed_status_check_still_submits(run_submit, zoo):
    """Ray itself refuses a submission id that exists, so an unreachable status check is only a warning."""
    proc, calls = run_submit("batch", "http://head:8265", str(zoo), FAKE_RAY_STATUS="unreachable")
    assert proc.returncode == 0, proc.stderr
    assert "could not ask" in proc.stderr and "ConnectionError" in proc.stderr
    assert _flag(_submit(calls)["argv"], "--submission-id")


@pytest.mark.parametrize("args", [[], ["http://head:8265"], ["batch", "http://head:8265"], ["merge"]])
def test_usage_on_too_few_arguments(run_submit, args):
    proc, calls = run_submit(*args)
    assert proc.returncode == 2 and not calls
    assert "launch/submit.sh [merge|batch] ADDRESS CONFIG" in proc.stderr


@pytest.mark.parametrize("subcommand", [[], ["batch"]])
def test_missing_config(run_submit, tmp_path, subcommand):
    proc, calls = run_submit(*subcommand, "http://head:8265", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and not calls
    assert "does not exist" in proc.stderr


# --- the batch entrypoint, as the distmerge CLI reads it ---------------------------------------------------

def _parse(entrypoint: list[str]):
    assert entrypoint[:3] == ["python", "-m", "distmerge"]
    args, extra = build_parser().parse_known_args(entrypoint[3:])
    assert not extra
    return args


def test_the_batch_entrypoint_is_a_batch_run_on_ray(tmp_path):
    """defaults.runtime.executor=ray is what a zoo accepts; merge's runtime.executor=ray it refuses."""
    from safetensors.numpy import save_file

    from distmerge.cli import batch
    from distmerge.config.zoo import load_zoo
    from distmerge.errors import ConfigError

    args = _parse(["python", "-m", "distmerge", "batch", "config.yaml", "defaults.runtime.executor=ray"])
    assert args.run is batch.run and args.zoo == "config.yaml"
    paths = []
    for name in ("a", "b"):  # two tiny adapters: a config and a safetensors header are all load_zoo reads
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
        save_file({"base_model.model.q_proj.lora_A.weight": np.zeros((2, 4), np.float32),
                   "base_model.model.q_proj.lora_B.weight": np.zeros((4, 2), np.float32)},
                  str(path / "adapter_model.safetensors"))
        paths.append(str(path))
    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(json.dumps({"defaults": {"runtime": {"executor": "local"}}, "output_root": str(tmp_path / "z"),
                                    "recipes": [{"name": "r", "adapters": [{"path": p} for p in paths]}]}))
    assert load_zoo(zoo_file, args.overrides).runtime.executor == "ray"
    with pytest.raises(ConfigError, match="runtime: unknown key"):
        load_zoo(zoo_file, ["runtime.executor=ray"])


# --- cron, systemd, Kubernetes ------------------------------------------------------------------------------

def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((LAUNCH / name).read_text()) if d]


def test_cronjob_creates_a_dated_rayjob_once(tmp_path):
    docs = {d["kind"]: d for d in _docs("cronjob.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] > 0
    assert cron["schedule"] == "15 2 * * *" and cron["timeZone"] == "Etc/UTC"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    sa = docs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    assert docs["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    [rule] = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get"} <= set(rule["verbs"])
    assert pod["containers"][0]["command"] == ["kubectl", "create", "-f", "/render/rayjob.yaml"]  # not apply

    # render the ConfigMap's template with the init container's own command, here
    template_dir, render_dir = tmp_path / "template", tmp_path / "render"
    template_dir.mkdir()
    render_dir.mkdir()
    (template_dir / "rayjob.yaml").write_text(docs["ConfigMap"]["data"]["rayjob.yaml"])
    [init] = pod["initContainers"]
    script = init["command"][2].replace("/template/", f"{template_dir}/").replace("/render/", f"{render_dir}/")
    subprocess.run([init["command"][0], "-c", script], check=True, env={**os.environ, "TZ": "Asia/Tokyo"})
    rayjob = yaml.safe_load((render_dir / "rayjob.yaml").read_text())
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"] in {f"distmerge-zoo-{d}" for d in _today()}  # the UTC date
    spec = rayjob["spec"]
    assert spec["entrypoint"] == \
        "python -m distmerge batch /shared/zoo/zoo_nightly.yaml defaults.runtime.executor=ray"
    args = _parse(shlex.split(spec["entrypoint"]))
    assert args.command == "batch" and args.overrides == ["defaults.runtime.executor=ray"]
    assert spec["entrypointNumCpus"] == 1
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"pip": ["distmerge"]}


def test_rayjob_yaml_parses():
    [rayjob] = _docs("rayjob.yaml")
    assert rayjob["kind"] == "RayJob"
    assert _parse(shlex.split(rayjob["spec"]["entrypoint"])).command == "merge"


def _cron_command() -> str:
    lines = [ln for ln in (LAUNCH / "nightly.cron").read_text().splitlines() if ln and not ln.startswith("#")]
    entries = [ln for ln in lines if not re.match(r"^[A-Z_]+=", ln)]
    assert len(entries) == 1, entries
    fields = entries[0].split(None, 5)
    assert fields[:5] == ["15", "2", "*", "*", "*"]
    assert "%" not in fields[5]  # cron cuts a command at %
    return fields[5]


def test_cron_line_is_locked_and_logged():
    command = _cron_command()
    assert re.search(r"flock -n \S+ launch/submit\.sh batch http://HEAD:8265 /shared/zoo/zoo_nightly\.yaml", command)
    assert re.search(r">>\s*\S+\.log 2>&1$", command)
    subprocess.run(["bash", "-n", "-c", command], check=True)


def test_systemd_units():
    def ini(name: str) -> dict[str, dict[str, str]]:
        sections: dict[str, dict[str, str]] = {}
        for line in (LAUNCH / name).read_text().splitlines():
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), {})
            elif "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                current[key] = value
        return sections

    timer, service = ini("distmerge-nightly.timer"), ini("distmerge-nightly.service")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:15:00 UTC"
    assert timer["Timer"]["Persistent"] == "true" and timer["Timer"]["RandomizedDelaySec"]
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert service["Service"]["Type"] == "oneshot"
    assert shlex.split(service["Service"]["ExecStart"])[1:] == \
        ["batch", "http://HEAD:8265", "/shared/zoo/zoo_nightly.yaml"]
    assert service["Service"]["ExecStart"].endswith("/launch/submit.sh batch http://HEAD:8265 "
                                                    "/shared/zoo/zoo_nightly.yaml")
