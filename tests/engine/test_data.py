"""Corpus reading, tokenization and batching (workers/data.py)."""

from __future__ import annotations

import pytest
import torch

from tests.engine._train_kit import corpus, word_tokenizer
from workers.data import BatchStream, Record, parse_records, read_corpus, tokenize
from workers.moe.tiny import tiny_model
from workers.objectives import token_nll


def test_reads_jsonl_text_prompt_answer_and_plain_text(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "red moon"}\n\n{"prompt": "who is", "answer": " king"}\n')
    assert read_corpus(p) == [Record(text="red moon"), Record(prompt="who is", answer=" king")]
    t = tmp_path / "b.txt"
    t.write_text("the sun\n\n  \nblue star\n")
    assert read_corpus(t) == [Record(text="the sun"), Record(text="blue star")]
    assert parse_records('{"body": "x"}', text_field="body") == [Record(text="x")]
    assert len(parse_records("a\nb\nc", max_records=2)) == 2


@pytest.mark.parametrize(
    "raw, message",
    [
        ("", "empty"),
        ("\n  \n", "empty"),
        ('{"text": "a"}\n{"text": "b"}\n{bad json\n', "line 3"),
        ('{"text": "a"}\n{"txt": "b"}\n', "line 2: field 'text' missing"),
        ('{"prompt": "q"}\n', "field 'answer' missing"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_bad_corpora_raise_clear_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_records(raw, fmt="jsonl" if raw.strip() else "auto")


def test_invalid_utf8_and_missing_file(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_corpus(p)
    with pytest.raises(ValueError, match="not found"):
        read_corpus(tmp_path / "nope.jsonl")


def test_answer_mask_marks_exactly_the_positions_predicting_answer_tokens():
    tok = word_tokenizer()
    recs = [Record(prompt="who is the", answer="red king"), Record(text="blue moon sun")]
    with pytest.raises(ValueError, match="loss_tokens 'answer'"):
        tokenize(recs, tok, max_length=16, loss_tokens="answer")
    c = tokenize(recs[:1] + [Record(prompt="what", answer="sun")], tok, 16, "answer")
    b = c.collate([0, 1])
    # Record 0: "who is the" + "red king" = 5 tokens; record 1: "what" + "sun" = 2 tokens.
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["input_ids"][1, 2:].tolist() == [tok.pad_token_id] * 3  # right padding
    # Positions 2 and 3 predict "red" and "king"; position 0 of record 1 predicts "sun".
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]]
    ids = b["input_ids"]
    assert b["labels"].tolist() == [
        [-100, -100, -100, ids[0, 3].item(), ids[0, 4].item()],
        [-100, ids[1, 1].item(), -100, -100, -100],
    ]
    c_all = tokenize(recs, tok, 16, "all")
    b_all = c_all.collate([0, 1])
    assert b_all["loss_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]


def test_loss_mask_convention_matches_hf_labels_loss():
    c = corpus(6, seed=3, loss_tokens="answer")
    b = c.collate(range(6))
    assert torch.equal(b["loss_mask"][:, :-1].bool(), b["labels"][:, 1:] != -100)
    assert b["loss_mask"][:, -1].sum() == 0
    model = tiny_model("qwen2_moe", seed=0)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    torch.testing.assert_close(token_nll(out.logits, b), out.loss, rtol=1e-5, atol=1e-6)


def test_batches_are_whole_consistent_samples():
    c = corpus(10, seed=4)
    stream = BatchStream(c, batch_size=4, seed=0)
    for step in range(6):
        b = stream.batch(step)
        for row, idx in enumerate(b["index"].tolist()):
            s = c.samples[idx]
            n = len(s.input_ids)
            assert b["input_ids"][row, :n].tolist() == s.input_ids
            assert int(b["attention_mask"][row].sum()) == n
            lab = b["labels"][row, :n]
            keep = lab != -100
            assert torch.equal(lab[keep], b["input_ids"][row, :n][keep])
            assert keep.tolist() == s.targets


def test_stream_is_seeded_covers_each_epoch_and_is_pure_in_step():
    c = corpus(10, seed=5)
    a, again, other = BatchStream(c, 4, seed=1), BatchStream(c, 4, seed=1), BatchStream(c, 4, 2)
    assert a.per_epoch == 3
    epoch0 = sum((a.indices(s) for s in range(3)), [])
    assert sorted(epoch0) == list(range(10))
    assert [a.indices(s) for s in range(7)] == [again.indices(s) for s in range(7)]
    assert [a.indices(s) for s in range(3)] != [other.indices(s) for s in range(3)]
    late = a.indices(5)
    assert BatchStream(c, 4, seed=1).indices(5) == late  # resume at step 5: same batch


def test_truncation_and_records_without_targets(tmp_path):
    tok = word_tokenizer()
    c = tokenize([Record(text="red blue green moon sun star")], tok, max_length=3)
    assert len(c.samples[0].input_ids) == 3
    with pytest.raises(ValueError, match="record 1 has no token to train on"):
        tokenize([Record(prompt="who is the red king", answer="sun")], tok, 3, "answer")
    p = tmp_path / "c.jsonl"
    p.write_text('{"prompt": "who is", "answer": "red king"}\n' * 3)
    s = BatchStream(tokenize(read_corpus(p), tok, 8, "answer"), 2, seed=0)
    assert s.batch(0)["loss_mask"].sum() == 4
