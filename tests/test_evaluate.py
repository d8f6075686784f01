"""`distmerge evaluate` on a tiny world with adapters trained on real (synthetic) tasks: scores checked
against independent computations (weights folded with merge_and_unload, a hand-written cross-entropy,
one-at-a-time greedy decoding), retention's definition, the cache, Ray against local, and
`batch --evaluate` end to end. The merge path is checked never to import the eval extra."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import distmerge
from distmerge.config.eval import load_eval_config
from distmerge.errors import ConfigError, OutputError
from distmerge.evaluate import evaluate
from tests import eval_fixtures as E

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"succ": "exact_match"}  # succ by greedy generation, rev and spell by loss: both metrics in one sweep


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Measured: these tiny models run 4x faster on one thread than on two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> E.World:
    """Base, tokenizer and three trained adapters, once per session (~20 s on 2 cores)."""
    return E.build_world(tmp_path_factory.mktemp("eval-world"))


def _merge(world: E.World, out: Path, method: str, weights=(1.0, 1.0, 1.0), **merge) -> str:
    distmerge.merge({"adapters": [{"path": str(world.adapters[t]), "weight": w} for t, w in zip(E.TASKS, weights)],
                     "merge": {"method": method, **merge}, "output": {"path": str(out)},
                     "runtime": {"executor": "local", "progress": False}})
    return str(out)


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merged")
    out = {"cat_onehot": _merge(world, root / "cat_onehot", "cat", (1.0, 0.0, 0.0)),
           "linear": _merge(world, root / "linear", "linear", (0.5, 0.5, 0.5)),
           "ties": _merge(world, root / "ties", "ties", density=0.5)}
    copy = root / "succ_copy"  # a source given again as a candidate, under another name
    shutil.copytree(world.adapters["succ"], copy)
    out["succ_copy"] = str(copy)
    return out


@pytest.fixture(scope="module")
def local_run(world, merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    cfg = E.eval_config(world, out, [{"path": p, "name": n} for n, p in merged.items()], METRICS)
    return cfg, evaluate(cfg)


def _scores(run) -> dict:
    return {(c["name"], t): s for c in run.report["candidates"] for t, s in c["scores"].items()}


def test_each_trained_adapter_beats_the_base_on_its_own_task(local_run):
    _cfg, run = local_run
    tasks = {t["name"]: t for t in run.report["tasks"]}
    assert tasks["succ"]["base_score"] <= 0.05 and tasks["succ"]["source_score"] >= 0.9  # accuracy
    for name in ("rev", "spell"):  # loss: at most 60% of the base's
        assert tasks[name]["source_score"] < 0.6 * tasks[name]["base_score"], tasks[name]


def test_report_ranks_names_the_best_and_writes_its_config(local_run, merged):
    cfg, run = local_run
    out = Path(cfg["output"])
    for name in ("report.json", "report.md", "retention.png", "best_config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    means = [c["mean_retention"] for c in report["candidates"]]
    assert means == sorted(means, reverse=True)
    best = report["best"]
    assert best["name"] == report["candidates"][0]["name"] and best["name"] in (report["candidates"][0]["name"],)
    md = (out / "report.md").read_text()
    assert f"Best: {best['name']}" in md and "mean retention" in md
    for c in report["candidates"]:  # the worst task is beside the mean, and is the minimum
        assert c["worst_retention"] == min(v for v in c["retention"].values() if v is not None)
    if best["name"] in ("linear", "ties", "cat_onehot"):  # a merge: its config is the one that made it
        made = yaml.safe_load((out / "best_config.yaml").read_text())
        again = distmerge.load_config(made)
        assert again.output.path == merged[best["name"]]


def test_retention_is_one_for_a_source_and_for_cat_with_one_hot_weights(local_run):
    _cfg, run = local_run
    rows = {c["name"]: c for c in run.report["candidates"]}
    assert rows["succ_copy"]["retention"]["succ"] == pytest.approx(1.0, abs=1e-9)
    scores = _scores(run)
    for task in E.TASKS:  # cat (1, 0, 0) is the first source, on every task
        assert scores[("cat_onehot", task)] == pytest.approx(scores[("succ_copy", task)], abs=1e-4), task
    assert rows["cat_onehot"]["retention"]["succ"] == pytest.approx(1.0, abs=1e-4)


def test_retention_definition(local_run):
    _cfg, run = local_run
    tasks = {t["name"]: t for t in run.report["tasks"]}
    for c in run.report["candidates"]:
        base, source, cand = (tasks["spell"]["base_score"], tasks["spell"]["source_score"], c["scores"]["spell"])
        assert c["retention"]["spell"] == pytest.approx((base - cand) / (base - source), abs=1e-12)
        assert c["retention"]["succ"] == pytest.approx(c["scores"]["succ"] / tasks["succ"]["source_score"], abs=1e-12)


def test_unchanged_inputs_are_scored_from_the_cache(local_run):
    cfg, run = local_run
    assert run.evaluated > 0 and run.cached == 0
    from distmerge.evaluate import run as run_module

    hashed: list[str] = []  # adapter files read for their sha256 (the base's small JSONs are hashed each run)
    base = os.path.realpath(cfg["base_model"]) + os.sep
    real = run_module.sha256_file

    def counted(path: str) -> str:
        if not os.path.realpath(path).startswith(base):
            hashed.append(path)
        return real(path)

    run_module.sha256_file = counted
    try:
        again = evaluate(cfg)  # the sources (no distmerge manifest) are known by their stamps: none is read
        assert hashed == [] and again.evaluated == 0 and again.cached == run.evaluated
        source = Path(cfg["tasks"][0]["source"]) / "adapter_model.safetensors"
        os.utime(source, ns=(1, 1))  # the same bytes, a new mtime: read again, and still the same adapter
        assert evaluate(cfg).evaluated == 0 and [os.path.realpath(p) for p in hashed] == [os.path.realpath(source)]
    finally:
        run_module.sha256_file = real
    assert _scores(again) == _scores(run)
    resumed = Path(cfg["output"]).parent / "resumed"  # a run stopped before its report left only its cache
    resumed.mkdir()
    shutil.copy(Path(cfg["output"]) / "scores_cache.json", resumed)
    assert evaluate(dict(cfg, output=str(resumed))).evaluated == 0 and (resumed / "report.json").is_file()
    changed = dict(cfg, tasks=[dict(t, limit=10) for t in cfg["tasks"]])  # a setting changed: scored again
    assert evaluate(changed).evaluated == run.evaluated


def _variable_data(path: Path, n: int = 37) -> Path:
    """spell examples of 1..5 digits: prompts and completions of different lengths, so batches are padded."""
    rng = random.Random(7)
    with open(path, "w") as f:
        for _ in range(n):
            ds = [rng.randrange(10) for _ in range(rng.randint(1, 5))]
            f.write(json.dumps({"prompt": "spell " + " ".join(map(str, ds)),
                                "completion": " ".join(E.NUMBERS[d] for d in ds)}) + "\n")
    return path


def test_loss_equals_folded_weights_and_a_hand_written_cross_entropy(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distmerge.evaluate.data import read_task
    from distmerge.evaluate.worker import EvalItem, Evaluator

    data = _variable_data(tmp_path / "spell_var.jsonl")
    cfg = load_eval_config(E.eval_config(world, tmp_path / "out", []))
    task, _ = read_task(type(cfg.tasks[0])(name="spell", data=str(data)))
    ev = Evaluator(str(world.base))
    ev.evaluate(EvalItem("rev", str(world.adapters["rev"]), (task,)))  # another adapter first: swapped out below
    [(_, loss, count)] = ev.evaluate(EvalItem("spell", str(world.adapters["spell"]), (task,)))

    folded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.base),
                                       str(world.adapters["spell"])).merge_and_unload().eval()
    tok = E.make_tokenizer()
    hf_sum, hand_sum, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for prompt, completion in task.examples:  # one example at a time: no padding, no batching
            p = tok(prompt)["input_ids"]
            c = tok(completion, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c])
            labels = torch.tensor([[-100] * len(p) + c])
            hf_sum += float(folded(input_ids=ids, labels=labels).loss) * len(c)
            logp = folded(input_ids=ids).logits[0].double().log_softmax(-1)
            hand_sum += -sum(float(logp[len(p) - 1 + i, tok_id]) for i, tok_id in enumerate(c))
            tokens += len(c)
    assert count == tokens
    assert loss == pytest.approx(hand_sum / tokens, abs=1e-4)
    assert loss == pytest.approx(hf_sum / tokens, abs=1e-4)
    base_loss = ev.evaluate(EvalItem("base", None, (task,)))[0][1]  # adapters disabled: the base again
    assert base_loss > loss + 1.0


def test_exact_match_equals_one_at_a_time_greedy_decoding(world, tmp_path):
    from distmerge.evaluate.worker import EvalItem, Evaluator, TaskData

    rng = random.Random(3)
    examples = [E.example("succ", rng) for _ in range(20)]
    examples = (examples[:8] + [(p, c.split()[0] + " red") for p, c in examples[8:14]]  # some made wrong
                + [(" ".join(["succ"] * k) + " " + p, c) for k, (p, c) in zip((1, 2, 3, 1, 2, 3), examples[14:])])
    task = TaskData("succ", "exact_match", E.LENGTH, tuple(examples))  # prompts of 3 lengths: left padding
    ev = Evaluator(str(world.base))
    [(_, acc, n)] = ev.evaluate(EvalItem("succ", str(world.adapters["succ"]), (task,)))
    tok = E.make_tokenizer()
    hits = 0
    with torch.no_grad():
        for prompt, completion in examples:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            for _ in range(E.LENGTH):  # greedy by hand
                nxt = ev.forward(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            hits += tok.decode(ids[0, -E.LENGTH:].tolist(), skip_special_tokens=True).strip() == completion.strip()
    assert n == 20 and acc == hits / 20 and 0 < acc < 1


@pytest.mark.slow
def test_ray_sweep_scores_like_local_and_survives_a_dead_worker(world, merged, local_run, tmp_path, ray_session,
                                                              monkeypatch):
    _cfg, run = local_run
    monkeypatch.setenv("DISTMERGE_TEST_CRASH_ONCE", str(tmp_path / "crash.flag"))
    cfg = E.eval_config(world, tmp_path / "ray-report", [{"path": p, "name": n} for n, p in merged.items()], METRICS,
                        executor="ray", num_workers=2, cpus_per_worker=0.5)
    ray_run = evaluate(cfg)
    assert (tmp_path / "crash.flag").exists()  # a worker died mid-evaluation, and its adapter was scored again
    assert ray_run.evaluated == run.evaluated and not any(c["error"] for c in ray_run.report["candidates"])
    local, remote = _scores(run), _scores(ray_run)
    assert local.keys() == remote.keys()
    for key, value in local.items():
        assert remote[key] == pytest.approx(value, abs=1e-5), key


def test_batch_evaluate_merges_a_grid_evaluates_it_and_skips_what_is_unchanged(world, tmp_path, capsys):
    from distmerge.cli import main

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({
        "defaults": {"runtime": {"executor": "local", "progress": False}},
        "output_root": str(tmp_path / "zoo"),
        "recipes": [{"name": "sweep", "adapters": [str(world.adapters[t]) for t in E.TASKS],
                     "grid": {"merge.method": ["ties", "dare_linear"], "merge.density": [0.3, 0.7]}}]},
                                  sort_keys=False))
    ev = tmp_path / "eval.yaml"
    ev.write_text(yaml.safe_dump(E.eval_config(world, tmp_path / "leaderboard", [{"batch": str(zoo)}])))
    early = evaluate(str(ev))  # {batch: ZOO} before the batch ran: every output is missing, and said so
    assert early.report["candidates"] == [] and len(early.report["missing"]) == 4
    assert main(["batch", str(zoo), "--evaluate", str(ev)]) == 0
    first = capsys.readouterr().out
    report = json.loads((tmp_path / "leaderboard" / "report.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    grid = {f"sweep/method={m},density={d}" for m in ("ties", "dare_linear") for d in (0.3, 0.7)}
    assert len(names) == 4 and set(names) == grid
    assert report["best"]["name"] in names and "best:" in first
    assert all(c["recipe"] for c in report["candidates"]) and report["scores_computed"] == 4 * 3  # base, sources cached
    assert report["missing"] == []
    config = yaml.safe_load((tmp_path / "leaderboard" / "best_config.yaml").read_text())
    assert config["merge"]["method"] in ("ties", "dare_linear")

    assert main(["batch", str(zoo), "--evaluate", str(ev)]) == 0  # nothing merged, nothing scored again
    again = json.loads((tmp_path / "leaderboard" / "report.json").read_text())
    batch = json.loads((tmp_path / "zoo" / "batch_report.json").read_text())
    assert batch["counts"]["up to date"] == 4 and again["scores_computed"] == 0
    assert again["candidates"] == report["candidates"]


def test_config_problems_are_reported_at_once_with_key_paths(world, tmp_path):
    cfg = E.eval_config(world, tmp_path / "out", [str(tmp_path / "nope")])
    cfg["taks"] = []
    cfg["dtype"] = "bfloat61"
    cfg["tasks"][0]["metric"] = "los"
    cfg["tasks"][1]["data"] = str(tmp_path / "missing.jsonl")
    cfg["tasks"][2]["limt"] = 3
    with pytest.raises(ConfigError) as e:
        load_eval_config(cfg)
    text = str(e.value)
    assert "taks: unknown key; did you mean 'tasks'?" in text
    assert "dtype: expected one of float32, float16, bfloat16, got 'bfloat61'; did you mean 'bfloat16'?" in text
    assert "tasks[0] (succ).metric: expected one of loss, exact_match, got 'los'; did you mean 'loss'?" in text
    assert "tasks[1] (rev).data:" in text and "tasks[2].limt: unknown key; did you mean 'limit'?" in text
    assert "candidates[0].path: adapter directory" in text and len(e.value.problems) == 6


def test_bad_data_and_a_report_directory_not_ours_are_clear_errors(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "succ red", "completion": "orange"}\n{"prompt": 3}\n')
    cfg = E.eval_config(world, tmp_path / "out", [])
    cfg["tasks"][0]["data"] = str(bad)
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected a JSON object with string prompt and completion"):
        evaluate(cfg)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.json").write_text("{}")
    with pytest.raises(OutputError, match="distmerge did not write it"):
        evaluate(E.eval_config(world, theirs, []))
    assert (theirs / "report.json").read_text() == "{}" and sorted(os.listdir(theirs)) == ["report.json"]


def test_without_the_extra_evaluate_exits_2_naming_it(world, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump(E.eval_config(world, tmp_path / "out", [])))
    code = ("import sys; sys.modules['peft'] = None; from distmerge.cli import main; "
            f"sys.exit(main(['evaluate', {str(cfg)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert 'pip install "distmerge[eval]"' in out.stderr and "peft" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_the_merge_path_never_imports_the_eval_extra(world, tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"defaults": {"runtime": {"executor": "local", "progress": False}},
                                   "output_root": str(tmp_path / "zoo"),
                                   "recipes": [{"name": "r", "adapters": [str(world.adapters[t]) for t in E.TASKS],
                                                "merge": {"method": "ties", "density": 0.5}}]}))
    code = f"""
import sys
from distmerge.cli import main
assert main(['batch', {str(zoo)!r}]) == 0
import distmerge
distmerge.merge({{'adapters': {[str(world.adapters[t]) for t in E.TASKS]!r}, 'merge': {{'method': 'svd'}},
                 'output': {{'path': {str(tmp_path / 'one')!r}}},
                 'runtime': {{'executor': 'local', 'progress': False}}}})
print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'accelerate', 'matplotlib')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert (tmp_path / "zoo" / "r" / "adapter_model.safetensors").is_file()


def test_the_example_config_uses_only_known_keys():
    from distmerge.config.eval import TOP_KEYS, TaskSpec

    text = (ROOT / "configs" / "evaluate.yaml").read_text()
    assert text.startswith("# python benchmarks/quality.py") and "distmerge evaluate configs/evaluate.yaml" in text
    raw = yaml.safe_load(text)
    assert set(raw) == set(TOP_KEYS)
    fields = set(TaskSpec.__dataclass_fields__)
    assert all(set(t) <= fields for t in raw["tasks"]) and fields == set().union(*map(set, raw["tasks"]))


def test_an_adapter_that_does_not_fit_the_base_fails_alone(world, merged, local_run, tmp_path):
    from tests.conftest import make_adapter

    alien = make_adapter(tmp_path / "alien", "llama", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = E.eval_config(world, tmp_path / "out", [{"path": str(alien), "name": "alien"},
                                                  {"path": merged["linear"], "name": "linear"}], METRICS)
    run = evaluate(cfg)
    rows = {c["name"]: c for c in run.report["candidates"]}
    assert rows["alien"]["error"] and rows["alien"]["mean_retention"] is None
    assert rows["linear"]["error"] is None and rows["linear"]["mean_retention"] is not None
    assert run.report["best"]["name"] == "linear"
    before = {t: s for (name, t), s in _scores(local_run[1]).items() if name == "linear"}
    assert rows["linear"]["scores"] == pytest.approx(before, abs=1e-6)  # the failure left the base clean


def test_an_evaluate_config_error_imports_no_torch(tmp_path):
    """As tests/test_startup.py asks of the other commands: a config error is reported before any tensor."""
    code = ("import sys; from distmerge.cli import main; "
            f"c = main(['evaluate', {str(ROOT / 'configs' / 'evaluate.yaml')!r}, 'taks=1']); "
            "print(c, sorted(m for m in ('torch', 'ray', 'peft', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip().splitlines()[-1] == "2 []", out.stdout + out.stderr[-2000:]
    assert "taks: unknown key; did you mean 'tasks'?" in out.stderr and "base_model:" in out.stderr


def _cached_output(local_run, path: Path) -> Path:
    """A new report directory holding only the module run's score cache: the base and the sources come from it."""
    path.mkdir()
    shutil.copy(Path(local_run[0]["output"]) / "scores_cache.json", path)
    return path


def test_bin_adapters_are_known_by_their_weights_not_their_config(world, local_run, tmp_path):
    """Two adapters saved as adapter_model.bin with one adapter_config.json are two adapters, not one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distmerge.evaluate.run import adapter_identity

    bins = {}
    for task in ("succ", "rev"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.base), str(world.adapters[task]))
        model.save_pretrained(str(tmp_path / f"{task}_bin"), safe_serialization=False)
        bins[task] = tmp_path / f"{task}_bin"
        assert (bins[task] / "adapter_model.bin").is_file() and not list(bins[task].glob("*.safetensors"))
    assert (bins["succ"] / "adapter_config.json").read_bytes() == (bins["rev"] / "adapter_config.json").read_bytes()
    ident = adapter_identity(str(bins["succ"]))
    assert ident != adapter_identity(str(bins["rev"]))
    (bins["succ"] / "training_args.bin").write_bytes(b"a trainer's file, not the adapter")
    assert adapter_identity(str(bins["succ"])) == ident
    cfg = E.eval_config(world, _cached_output(local_run, tmp_path / "out"),
                        [{"path": str(bins[t]), "name": f"{t}_bin"} for t in bins], METRICS)
    scores = _scores(evaluate(cfg))
    before = _scores(local_run[1])
    for task in E.TASKS:  # the .bin copy of succ scores as its safetensors copy did; rev's is another adapter
        assert scores[("succ_bin", task)] == pytest.approx(before[("succ_copy", task)], abs=1e-5), task
    assert scores[("rev_bin", "rev")] < scores[("succ_bin", "rev")] - 0.5  # loss: rev's own adapter is far better


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_base_model_transformers_cannot_load_is_a_one_line_error_and_writes_nothing(world, tmp_path, capsys,
                                                                                     executor, request):
    """On Ray too: the actor's load error comes back as the user's error, not as "no worker started"."""
    from distmerge.cli import main

    if executor == "ray":
        request.getfixturevalue("ray_session")
    bad = tmp_path / "bad-base"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    on_ray = {"num_workers": 2, "cpus_per_worker": 0.5} if executor == "ray" else {}
    cfg = E.eval_config(world, tmp_path / "out", [], executor=executor, **on_ray)
    cfg["base_model"] = str(bad)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["evaluate", str(tmp_path / "eval.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"base_model: cannot load {bad}: " in err and "expected a transformers model directory saved with " \
        "save_pretrained (config.json, weights, tokenizer)" in err, err
    assert "internal error" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no empty report directory left behind


def test_an_output_that_is_a_file_or_lies_under_one_is_refused(world, tmp_path):
    blocker = tmp_path / "report.txt"
    blocker.write_text("mine")
    for output in (blocker, blocker / "sub"):
        with pytest.raises(OutputError, match=f"output: {blocker} exists and is not a directory"):
            evaluate(E.eval_config(world, output, []))
    assert blocker.read_text() == "mine"


def test_a_kohya_or_diffusers_candidate_is_said_to_need_the_peft_format(world, local_run, tmp_path):
    from safetensors.torch import save_file

    from distmerge.config.eval import Candidate

    kohya = tmp_path / "kohya-out"
    kohya.mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(kohya / "kohya-out.safetensors"))
    cfg = E.eval_config(world, _cached_output(local_run, tmp_path / "out"), [], METRICS)
    run = evaluate(cfg, extra_candidates=[Candidate(str(kohya), "k")])
    [missing] = run.report["missing"]
    assert "kohya-out.safetensors" in missing["reason"] and "output.format: peft" in missing["reason"]
    assert "not merged" not in missing["reason"] and run.evaluated == 0


def test_ray_actors_reserve_one_load_of_host_memory_with_a_gpu_and_two_without(world, tmp_path):
    from distmerge.evaluate.run import make_pool
    from distmerge.evaluate.worker import _weights_bytes
    from distmerge.executors.ray import WORKER_BASE_BYTES

    weights = _weights_bytes(str(world.base))
    for runtime, copies in (({"gpus_per_worker": 1}, 1), ({"gpus_per_worker": 0}, 2),
                            ({"gpus_per_worker": 1, "device": "cpu"}, 2)):
        cfg = load_eval_config(E.eval_config(world, tmp_path / "out", [], executor="ray", **runtime))
        pool = make_pool(cfg, str(world.base))
        assert pool._memory == WORKER_BASE_BYTES + copies * weights, runtime


def test_written_by_us_reads_the_marker_of_a_json_object_only(tmp_path):
    from distmerge.output.owner import written_by_us

    cases = {"ours.json": '{"distmerge_evaluate": "1", "x": 1}', "list.json": '["distmerge_evaluate"]',
             "other.json": '{"x": 1}', "broken.json": '{"distmerge_evaluate"', "string.json": '"distmerge_evaluate"'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    assert {n: written_by_us(str(tmp_path / n), "distmerge_evaluate") for n in cases} == {
        "ours.json": True, "list.json": False, "other.json": False, "broken.json": False, "string.json": False}
    assert not written_by_us(str(tmp_path / "absent.json"), "distmerge_evaluate")
