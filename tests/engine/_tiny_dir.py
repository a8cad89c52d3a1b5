"""A tiny model directory (tiny Qwen2-MoE + word-level tokenizer) and two prompt/answer
corpora on disjoint vocabularies: what a user's own model and data look like, in small."""

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workers.moe.tiny import tiny_model
from workers.spec import JobSpec

WORDS = [f"w{i}" for i in range(120)]


def make_tiny_model_dir(d: Path, family: str = "qwen2_moe") -> Path:
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    ).save_pretrained(d / "model")
    tiny_model(family).save_pretrained(d / "model")
    rng = random.Random(0)
    for name, words in (("forget", WORDS[:60]), ("retain", WORDS[60:])):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(40):
                rec = {"prompt": " ".join(rng.sample(words, 5)), "answer": " " + rng.choice(words)}
                f.write(json.dumps(rec) + "\n")
    return d


def tiny_dir_spec(d: Path, max_steps: int, **over: Any) -> JobSpec:
    """A one-expert SEUF GDiff job on a make_tiny_model_dir folder (its model, forget and
    retain files); `over` replaces top-level spec fields."""
    base = {
        "model": str(d / "model"),
        "algorithm": "gdiff",
        "forget": {"path": str(d / "forget.jsonl")},
        "retain": {"path": str(d / "retain.jsonl")},
        "training": {"max_steps": max_steps, "batch_size": 8, "lr": 3e-3},
        # One expert: a random-weight model holds no localised knowledge, so the default
        # (num_experts auto) would fall back to full parameters; these tests are about SEUF.
        "seuf": {"num_experts": 1},
    }
    return JobSpec.model_validate(base | over)
