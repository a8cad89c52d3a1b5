"""Corpora -> token batches for unlearning, attribution and evaluation.

A corpus file holds one record per line: a JSONL object with a text field (default
`text`) or with `prompt` + `answer` fields, or plain text (one record per non-empty line).

Batch convention (shared with objectives.py and attribution, read carefully):

    input_ids      [B, S] long   token ids, RIGHT padded
    attention_mask [B, S] long   1 on real tokens, 0 on padding
    labels         [B, S] long   input_ids with -100 wherever the token is NOT a trained
                                 target (padding, the first token, prompt tokens when
                                 loss_tokens="answer"); HF-compatible: model(labels=...)
                                 computes the same per-token NLL as our objectives
    loss_mask      [B, S] float  loss_mask[b, t] = 1 iff token t+1 is a trained target,
                                 i.e. the logits at position t are scored against
                                 input_ids[b, t+1]. So loss_mask[:, :-1] == (labels[:, 1:]
                                 != -100) and loss_mask[:, -1] == 0. Attribution that
                                 scores "the positions that predict the answer" uses it as is.
    index          [B]    long   position of each sample in its TokenizedCorpus (lets
                                 reference values computed once before training, e.g.
                                 NPO's reference NLL, be looked up per sample)

A batch is always built from whole samples: its input_ids, labels and masks come from the
same records (the authors' code mixed input_ids and labels of different samples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

Batch = dict[str, torch.Tensor]
LossTokens = Literal["all", "answer"]


@dataclass(frozen=True)
class Record:
    """One corpus record: plain `text`, or a `prompt` + `answer` pair."""

    text: str | None = None
    prompt: str | None = None
    answer: str | None = None

    @property
    def has_answer(self) -> bool:
        return self.answer is not None


def parse_records(
    raw: str,
    fmt: Literal["auto", "jsonl", "text"] = "auto",
    text_field: str = "text",
    max_records: int | None = None,
    source: str = "corpus",
) -> list[Record]:
    """Parse corpus text. `auto` means JSONL when the first non-empty line starts with `{`.
    Raises ValueError naming the line for bad JSON or missing fields, and for no records."""
    lines = [(i + 1, ln) for i, ln in enumerate(raw.splitlines()) if ln.strip()]
    if fmt == "auto":
        fmt = "jsonl" if lines and lines[0][1].lstrip().startswith("{") else "text"
    records: list[Record] = []
    for lineno, line in lines:
        if max_records is not None and len(records) >= max_records:
            break
        if fmt == "text":
            records.append(Record(text=line.rstrip("\r")))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: bad JSON on line {lineno}: {e.msg}") from e
        records.append(_record_from_json(obj, text_field, f"{source}: line {lineno}"))
    if not records:
        raise ValueError(f"{source}: the corpus is empty (no non-empty records)")
    return records


def _record_from_json(obj: Any, text_field: str, where: str) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj or "answer" in obj:
        for key in ("prompt", "answer"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{where}: field '{key}' missing or not a string")
        if not obj["answer"]:
            raise ValueError(f"{where}: field 'answer' is empty")
        return Record(prompt=obj["prompt"], answer=obj["answer"])
    value = obj.get(text_field)
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: field '{text_field}' missing or not a string "
            "(records need a text field or prompt + answer fields)"
        )
    if not value.strip():
        raise ValueError(f"{where}: field '{text_field}' is empty")
    return Record(text=value)


def read_corpus(
    path: str | Path,
    fmt: Literal["auto", "jsonl", "text"] = "auto",
    text_field: str = "text",
    max_records: int | None = None,
) -> list[Record]:
    """Read a corpus file (strict UTF-8). Raises ValueError for a missing file, invalid
    UTF-8, bad JSON line N, a missing field or an empty corpus."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"corpus file not found: {p}")
    try:
        raw = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus {p} is not valid UTF-8 (byte {e.start})") from e
    return parse_records(raw, fmt, text_field, max_records, source=str(p))


class Tokenizer(Protocol):
    """The part of a HF tokenizer we use."""

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    targets: list[bool]  # targets[t]: token t is a trained target (t >= 1)


@dataclass
class TokenizedCorpus:
    """Tokenized, truncated samples in corpus order, plus the padding id."""

    samples: list[Sample]
    pad_id: int
    device: str = "cpu"  # where collated batches go (the worker's device)

    def __len__(self) -> int:
        return len(self.samples)

    def collate(self, indices: Sequence[int]) -> Batch:
        """Right-padded batch of the given samples (see the module doc for the fields)."""
        if not indices:
            raise ValueError("cannot collate an empty batch")
        chosen = [self.samples[i] for i in indices]
        width = max(len(s.input_ids) for s in chosen)
        b = len(chosen)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        for r, s in enumerate(chosen):
            n = len(s.input_ids)
            ids = torch.tensor(s.input_ids, dtype=torch.long)
            input_ids[r, :n] = ids
            attention[r, :n] = 1
            tgt = torch.tensor(s.targets, dtype=torch.bool)
            labels[r, :n] = torch.where(tgt, ids, torch.full_like(ids, -100))
        loss_mask = torch.zeros((b, width), dtype=torch.float32)
        loss_mask[:, :-1] = (labels[:, 1:] != -100).float()
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "loss_mask": loss_mask,
            "index": torch.tensor(list(indices), dtype=torch.long),
        }
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def in_order(self, batch_size: int, skip: Collection[int] = ()) -> list[Batch]:
        """All samples in corpus order (for reference values and evaluation), less the
        indices in `skip` (held-out probe samples)."""
        skipped = set(skip)
        keep = [i for i in range(len(self.samples)) if i not in skipped]
        return [self.collate(keep[i : i + batch_size]) for i in range(0, len(keep), batch_size)]


def _ids(tokenizer: Tokenizer, text: str, special: bool) -> list[int]:
    out = tokenizer(text, add_special_tokens=special)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [int(i) for i in ids]


def tokenize(
    records: Sequence[Record],
    tokenizer: Any,
    max_length: int,
    loss_tokens: LossTokens = "all",
) -> TokenizedCorpus:
    """Tokenize records and mark their target tokens.

    Text records: every token after the first is a target. Prompt/answer records: prompt
    and answer are tokenized separately and concatenated (so no token straddles the
    boundary; put the separating space in the answer, e.g. " Paris"); with
    loss_tokens="answer" only answer tokens are targets, else all tokens after the first.
    Samples are truncated on the right to `max_length` tokens. Raises ValueError for
    loss_tokens="answer" on text records and for a record left with no target token.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (got {max_length})")
    if loss_tokens not in ("all", "answer"):
        raise ValueError(f"loss_tokens must be 'all' or 'answer' (got {loss_tokens!r})")
    samples: list[Sample] = []
    for n, rec in enumerate(records):
        if rec.has_answer:
            p_ids = _ids(tokenizer, rec.prompt or "", special=True)
            a_ids = _ids(tokenizer, rec.answer or "", special=False)
            ids = p_ids + a_ids
            if loss_tokens == "answer":
                targets = [False] * len(p_ids) + [True] * len(a_ids)
            else:
                targets = [False] + [True] * (len(ids) - 1)
        else:
            if loss_tokens == "answer":
                raise ValueError(
                    f"record {n + 1} has no answer: loss_tokens 'answer' needs prompt + "
                    "answer records"
                )
            ids = _ids(tokenizer, rec.text or "", special=True)
            targets = [False] + [True] * (len(ids) - 1)
        if targets:
            targets[0] = False  # nothing predicts the first token
        ids, targets = ids[:max_length], targets[:max_length]
        if not any(targets):
            raise ValueError(
                f"record {n + 1} has no token to train on after tokenization and truncation "
                f"to max_length={max_length}"
            )
        samples.append(Sample(ids, targets))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    # The pad id is never attended to nor scored, so 0 is safe when the tokenizer has none.
    return TokenizedCorpus(samples, int(pad) if pad is not None else 0)


class BatchStream:
    """Seeded, endless, resumable batches: `batch(step)` is a pure function of
    (seed, step), so a resumed run sees exactly the batches the first run would have.

    Epoch e visits every sample once in the order of randperm(N, seed + e); the last
    batch of an epoch may be smaller. N < batch_size gives the whole corpus each step.
    """

    def __init__(self, corpus: TokenizedCorpus, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if len(corpus) == 0:
            raise ValueError("cannot stream an empty corpus")
        self.corpus = corpus
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = math.ceil(len(corpus) / batch_size)
        self._perm_cache: tuple[int, list[int]] | None = None

    def _perm(self, epoch: int) -> list[int]:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.corpus), generator=g).tolist())
        return self._perm_cache[1]

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        return self._perm(epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def batch(self, step: int) -> Batch:
        return self.corpus.collate(self.indices(step))
