"""A tiny world to evaluate merges in: a Llama built from a config, a word-level tokenizer saved beside it
(built offline), and LoRA adapters *trained* on three distinct synthetic text tasks:

- succ:  each colour's successor in a fixed list     "succ red blue"   → "orange indigo"
- rev:   a short sequence reversed                   "rev red blue"    → "blue red"
- spell: digits mapped to words                      "spell 3 1"       → "three one"

The base is first trained (all of it, like a pretrained model) to *copy* any three words after any task
word, so it knows the vocabulary and the prompt format, and each adapter learns a small change of it, as
fine-tunes of one real pretrained model do; from a random base the three updates interfered so much that
every merge kept nothing (measured: mean retention < 0.1 for every method).

`build_world(root)` writes base/, adapters/{succ,rev,spell}/ and data/{task}.jsonl under root; training is a
few hundred Adam steps on batched tensors (seconds on a CPU). The tests build it once per session; the
quality benchmark (benchmarks/quality.py) builds the same world.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

COLOURS = ["red", "orange", "yellow", "green", "blue", "indigo", "violet", "black", "white", "gray", "pink", "brown"]
DIGITS = [str(i) for i in range(10)]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = SPECIALS + ["succ", "rev", "spell"] + COLOURS + DIGITS + NUMBERS
TASKS = ("succ", "rev", "spell")
LENGTH = 3  # words per prompt
PRETRAIN_STEPS = 200
PRETRAIN_LR = 3e-3
STEPS = 120
BATCH = 32
LR = 5e-3
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
LLAMA = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             tie_word_embeddings=False)


def example(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "spell":
        ds = [rng.randrange(10) for _ in range(LENGTH)]
        return "spell " + " ".join(DIGITS[d] for d in ds), " ".join(NUMBERS[d] for d in ds)
    cs = [rng.randrange(len(COLOURS)) for _ in range(LENGTH)]
    words = [COLOURS[c] for c in cs]
    if task == "succ":
        return "succ " + " ".join(words), " ".join(COLOURS[(c + 1) % len(COLOURS)] for c in cs)
    return "rev " + " ".join(words), " ".join(reversed(words))


def pretrain_example(rng: random.Random) -> tuple[str, str]:
    """What the base learns: any task word, three words, then the same three words."""
    words = [rng.choice(COLOURS + DIGITS + NUMBERS) for _ in range(LENGTH)]
    return rng.choice(TASKS) + " " + " ".join(words), " ".join(words)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_base(steps: int = PRETRAIN_STEPS):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    with torch.no_grad():  # RMSNorm caps a 0.02-initialised head's logits near 1: room for confident answers
        model.model.norm.weight.mul_(8.0)
    with _one_thread():
        tok = make_tokenizer()
        opt = torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR)
        rng = random.Random("pretrain")
        model.train()
        for _ in range(steps):
            ids, labels = _batch(tok, [pretrain_example(rng) for _ in range(BATCH)])
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class _one_thread:
    """Measured: 4x faster than 2 threads on a busy 2-core machine for a model this small."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _batch(tok, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of same-length examples: every task's prompt and completion have fixed lengths."""
    rows, labels = [], []
    for prompt, completion in pairs:
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    return torch.tensor(rows), torch.tensor(labels)


def train_adapter(base_dir: Path, task: str, out: Path, steps: int = STEPS, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    with _one_thread():
        return _train(base_dir, task, out, steps, seed)


def _train(base_dir: Path, task: str, out: Path, steps: int, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**LORA))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    rng = random.Random(f"train-{task}-{seed}")
    for _ in range(steps):
        ids, labels = _batch(tok, [example(task, rng) for _ in range(BATCH)])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out))
    return out


def write_data(path: Path, task: str, n: int, seed: int = 12345) -> Path:
    rng = random.Random(f"eval-{task}-{seed}")
    with open(path, "w") as f:
        for _ in range(n):
            prompt, completion = example(task, rng)
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


@dataclass(frozen=True)
class World:
    root: Path
    base: Path
    adapters: dict  # task → adapter dir
    data: dict  # task → jsonl


def build_world(root: Path, steps: int = STEPS, n_eval: int = 40) -> World:
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    make_base().save_pretrained(str(base))
    make_tokenizer().save_pretrained(str(base))
    adapters = {t: train_adapter(base, t, root / "adapters" / t, steps) for t in TASKS}
    (root / "data").mkdir(exist_ok=True)
    data = {t: write_data(root / "data" / f"{t}.jsonl", t, n_eval) for t in TASKS}
    return World(root, base, adapters, data)


def eval_config(world: World, output: Path, candidates: list, metrics: dict | None = None, **runtime) -> dict:
    """An evaluate config over the world's three tasks (loss unless `metrics` says otherwise)."""
    metrics = metrics or {}
    tasks = []
    for t in TASKS:
        task = {"name": t, "data": str(world.data[t]), "metric": metrics.get(t, "loss"),
                "source": str(world.adapters[t])}
        if task["metric"] == "exact_match":
            task["max_new_tokens"] = LENGTH
        tasks.append(task)
    return {"base_model": str(world.base), "dtype": "float32", "tasks": tasks, "candidates": candidates,
            "output": str(output), "runtime": {"executor": "local", "progress": False, **runtime}}
