"""Fixtures of the dispatcher tests: one real local Ray (2 CPUs) per test session in its
own temp folder, a tiny MoE model directory with a word-level tokenizer built here (no
downloads), and the service tests' databases (SQLite file + a fresh PostgreSQL database;
an unreachable PostgreSQL fails the tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# The service tests' database fixtures (SQLite copy of a migrated template; PostgreSQL
# database created for this session and emptied per test).
from tests.service.conftest import (  # noqa: F401
    Db,
    db,
    pg_factory,
    pg_migrated_url,
    sqlite_template,
)

WORDS = (
    "the capital of is city river king queen red blue green moon sun star who what where "
    "answer paris rome oslo lima kyiv cairo rabbit fox owl bear wolf seal lives in near"
).split()
FORGET_SUBJECTS = ("rabbit", "fox", "owl")
RETAIN_SUBJECTS = ("king", "queen", "moon", "sun")
PLACES = ("paris", "rome", "oslo", "lima", "kyiv", "cairo")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-MoE (hidden 32, 3 layers, 8 experts) + word-level tokenizer on disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from workers.moe.tiny import TINY_VOCAB, tiny_model

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    out = tmp_path_factory.mktemp("tiny-moe") / "model"
    tiny_model("qwen2_moe", seed=0).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def corpus_bytes(subjects: tuple[str, ...], n: int) -> bytes:
    """JSONL text records: '<subject> lives in <place>' sentences."""
    lines = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        p = PLACES[(i * 7 + len(s)) % len(PLACES)]
        lines.append(json.dumps({"text": f"the {s} lives in {p} near the river"}))
    return ("\n".join(lines) + "\n").encode()
